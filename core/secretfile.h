/* secretfile.h — what every loader of a file full of secrets (core/tokens.c, core/access.c) needs,
 * kept in one place: a whole-file read that leaves no stale copy behind, a constant-time compare, a
 * random hash key, and messages that never echo a value long enough to be a secret.
 * Concurrency: pure functions (kd_secretfile_read does blocking file I/O: call it off the shards).
 * Ownership: all arguments are borrowed; kd_secretfile_read hands the caller a malloc'd buffer that
 *   the caller wipes (explicit_bzero) and frees.
 */
#ifndef KD_CORE_SECRETFILE_H
#define KD_CORE_SECRETFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Values longer than this are never shown in a message, only their length: any token the loaders
 * accept is longer (each loader static-asserts its minimum token length against it). */
#define KD_SECRETFILE_SHOW_MAX 15
/* Room kd_secretfile_describe() needs: 15 bytes escaped as \xNN, quotes and NUL, or the length. */
#define KD_SECRETFILE_DESCRIBE_LEN (4 * KD_SECRETFILE_SHOW_MAX + 48)

/* The whole file at path into a malloc'd buffer *out of *outlen bytes (not NUL-terminated), at most
 * max bytes. Sized from fstat and grown by copy-and-wipe (never realloc) if the file grows meanwhile,
 * so no copy of its contents is left in freed memory. 0, or -EFBIG (larger than max), -ENOMEM, or
 * -errno of open/read. On error nothing is allocated. */
int kd_secretfile_read(const char *path, size_t max, char **out, size_t *outlen);

/* Constant-time equality of a[0..alen) and b[0..blen): runs over max(alen, blen) bytes whatever they
 * contain, with the length difference folded in, no data-dependent branch or early exit. Bytes past
 * the end of the shorter side count as 0 and are never read; an empty side may be NULL. Lengths
 * below 2^63. */
bool kd_secretfile_equal(const void *a, size_t alen, const void *b, size_t blen);

/* n bytes from getrandom() (retried on EINTR and short reads). 0 or -errno. */
int kd_secretfile_random(uint8_t *key, size_t n);

/* Append s[0..n) to dst (capacity cap, current length *len) as one line of printable ASCII: '"' and
 * '\\' backslashed, bytes outside 0x20..0x7e as \xNN; a character that does not fit is left out
 * whole. Always NUL-terminates (cap > 0); never writes past cap. */
void kd_secretfile_escape(char *dst, size_t cap, size_t *len, const char *s, size_t n);

/* A value for a message, into dst (cap >= KD_SECRETFILE_DESCRIBE_LEN): "x" (quoted, escaped) when it
 * has at most KD_SECRETFILE_SHOW_MAX bytes, else "<N bytes, not shown>". */
void kd_secretfile_describe(char *dst, size_t cap, const char *s, size_t n);

#endif

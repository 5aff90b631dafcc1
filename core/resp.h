/* resp.h — the Redis protocol (RESP2) as bytes: encoding commands and decoding replies into
 * kasd's own reply tree. No I/O: shards/redis.c moves the bytes on the shard's io_uring.
 * Concurrency: a reader belongs to one thread (the connection's shard); kd_resp_format is pure.
 * Ownership: a reply returned by kd_resp_reader_next is the caller's, freed with kd_resp_free
 * (the whole tree at once); kd_resp_format returns malloc'ed bytes the caller frees with free().
 *
 * A reply tree:
 *
 *   *2\r\n$3\r\nfoo\r\n*1\r\n:7\r\n   ──>   ARRAY n=2 ─┬─ STRING "foo" (len 3, NUL-terminated)
 *                                                     └─ ARRAY n=1 ── INTEGER 7
 *
 * Limits (a hostile or broken server must not make kasd allocate without bound): one reply's
 * decoded tree plus the bytes of it received but not yet decoded may not exceed max_reply_bytes;
 * arrays nest at most KD_RESP_MAX_DEPTH deep. Past either limit the reader fails for good with an
 * error naming the limit; the connection has to be closed (its stream position is lost anyway).
 */
#ifndef KD_CORE_RESP_H
#define KD_CORE_RESP_H

#include <stddef.h>

/* Arrays within arrays: the codec's fixed task stack allows 7 levels below the top-level reply. */
#define KD_RESP_MAX_DEPTH 7

enum kd_resp_type {
    KD_RESP_STRING,
    KD_RESP_ARRAY,
    KD_RESP_INTEGER,
    KD_RESP_NIL,
    KD_RESP_STATUS,
    KD_RESP_ERROR
};

/* STRING, STATUS, ERROR: str/len (str NUL-terminated, may hold NULs). INTEGER: integer.
 * ARRAY: elem[0..n). NIL: nothing (also a nil array, "*-1"). */
struct kd_resp {
    enum kd_resp_type type;
    long long integer;
    size_t len;
    char *str;
    size_t n;
    struct kd_resp **elem;
};

struct kd_resp_reader;

/* max_reply_bytes 0: KD_RESP_DEFAULT_MAX. NULL on allocation failure. */
#define KD_RESP_DEFAULT_MAX (64u << 20)
struct kd_resp_reader *kd_resp_reader_new(size_t max_reply_bytes);
void kd_resp_reader_free(struct kd_resp_reader *r);
/* Bytes received from the server (copied). 0, or -1 after an error (kd_resp_reader_error). */
int kd_resp_reader_feed(struct kd_resp_reader *r, const void *buf, size_t len);
/* 1: *out is the next complete reply; 0: more bytes are needed; -1: protocol error or limit. */
int kd_resp_reader_next(struct kd_resp_reader *r, struct kd_resp **out);
/* The error text once next/feed returned -1 ("" before), e.g. "reply larger than max_reply_bytes
 * (1048576 bytes)" or "protocol error: expected '$', got 'x'". */
const char *kd_resp_reader_error(const struct kd_resp_reader *r);
void kd_resp_free(struct kd_resp *reply);

/* Encode one command; returns malloc'ed bytes and their length, or NULL (argc < 1, no memory). */
char *kd_resp_format(int argc, const char *const *argv, const size_t *argvlen, size_t *outlen);

#endif

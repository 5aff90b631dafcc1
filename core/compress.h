/* compress.h — gRPC message compression: "gzip" (RFC 1952) and "deflate" (zlib format, RFC 1950,
 * as grpc-core means it). The only module that knows zlib (core/compress.c).
 * Concurrency: an inflater or deflater belongs to one thread (in kasd: one HTTP/2 session, which
 * reuses it for every message of every call); no locks, no shared state.
 * Ownership: output goes into a struct kd_compress_buf owned by the caller once filled (blocks from
 * the thread's chunk pool, core/chunkpool.h): release it with kd_compress_buf_release. Input bytes
 * are borrowed for the call.
 *
 * Why bounded: a few KiB of gzip can inflate to gigabytes. The inflater writes into a buffer that
 * grows (doubling) only up to the limit given at begin, and stops with -EMSGSIZE as soon as one byte
 * more would come out, so a bomb costs at most the limit plus zlib's own 40 KiB of state.
 * Errors are negative errno: -EMSGSIZE (over the limit), -EBADMSG (corrupt, truncated, trailing
 * bytes after the stream, bad header), -ENOMEM, -EINVAL (bad algorithm or use).
 */
#ifndef KD_CORE_COMPRESS_H
#define KD_CORE_COMPRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kd_compress_alg {
    KD_COMPRESS_IDENTITY = 0,
    KD_COMPRESS_GZIP = 1,
    KD_COMPRESS_DEFLATE = 2,
};

/* What kasd advertises in grpc-accept-encoding. */
#define KD_COMPRESS_ACCEPT_ENCODING "gzip, deflate, identity"

/* A grpc-encoding value: the algorithm, or -ENOENT for one kasd does not have. */
int kd_compress_alg_parse(const char *name, size_t len);
const char *kd_compress_alg_name(enum kd_compress_alg alg);
/* Does a grpc-accept-encoding list ("gzip, deflate" — commas, optional spaces) name alg? */
bool kd_compress_accepts(const char *list, size_t len, enum kd_compress_alg alg);

struct kd_compress_buf {
    uint8_t *data;
    size_t len, cap; /* cap as the chunk pool gave it */
};
void kd_compress_buf_release(struct kd_compress_buf *b);

/* Streaming inflate of one message at a time. new() allocates no zlib state; the first begin()
 * does (about 7 KiB, plus zlib's 32 KiB window on first use), later begins reuse it. */
struct kd_inflater;
struct kd_inflater *kd_inflater_new(void);
void kd_inflater_free(struct kd_inflater *z);
/* Start a message of algorithm alg (gzip or deflate) whose output may not exceed limit bytes. */
int kd_inflater_begin(struct kd_inflater *z, enum kd_compress_alg alg, size_t limit);
/* Feed compressed bytes in any split. 0 or negative errno (then the message is lost: begin again). */
int kd_inflater_feed(struct kd_inflater *z, const uint8_t *data, size_t len);
/* End of input: the whole stream must have arrived (-EBADMSG otherwise). On 0, *out holds the
 * message (possibly empty, data may be NULL) and belongs to the caller. */
int kd_inflater_end(struct kd_inflater *z, struct kd_compress_buf *out);
/* One call: begin, feed, end. */
int kd_inflater_run(struct kd_inflater *z, enum kd_compress_alg alg, const uint8_t *in, size_t len,
                    size_t limit, struct kd_compress_buf *out);

/* Streaming deflate. The zlib state (about 256 KiB at the default level) is allocated at the first
 * begin and kept for reuse: keep one per session, never one per call. */
struct kd_deflater;
struct kd_deflater *kd_deflater_new(int level); /* 1 fastest .. 9 smallest; 0 or <0 = zlib's default */
void kd_deflater_free(struct kd_deflater *d);
int kd_deflater_begin(struct kd_deflater *d, enum kd_compress_alg alg);
/* Compress len bytes, appending to *out (grown as needed); last = true ends the stream. */
int kd_deflater_feed(struct kd_deflater *d, const uint8_t *data, size_t len, bool last,
                     struct kd_compress_buf *out);
/* One call: begin and feed everything with last = true into a fresh *out. */
int kd_deflater_run(struct kd_deflater *d, enum kd_compress_alg alg, const uint8_t *in, size_t len,
                    struct kd_compress_buf *out);

#endif

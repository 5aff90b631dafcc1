/* compress_fuzz.c — arbitrary bytes inflated as gzip and as deflate under small limits, fed in
 * splits chosen by the input; and the round-trip property: whatever is compressed inflates back to
 * the same bytes, and one byte less of limit is -EMSGSIZE.
 * Input: byte 0 = limit selector, byte 1 = split seed, the rest = the stream (or the plaintext). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/compress.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct kd_inflater *inf;
static struct kd_deflater *def;

static void inflate_split(enum kd_compress_alg alg, const uint8_t *p, size_t n, size_t limit, unsigned seed)
{
    struct kd_compress_buf out;
    int rc = kd_inflater_begin(inf, alg, limit);
    if (rc < 0)
        abort();
    size_t off = 0;
    while (rc == 0 && off < n) {
        seed = seed * 1103515245u + 12345u;
        size_t take = 1 + (seed >> 16) % 97;
        if (take > n - off)
            take = n - off;
        rc = kd_inflater_feed(inf, p + off, take);
        off += take;
    }
    if (rc == 0)
        rc = kd_inflater_end(inf, &out);
    if (rc == 0) {
        if (out.len > limit)
            abort(); /* the bound is the whole point */
        /* the same stream in one piece gives the same answer */
        struct kd_compress_buf one;
        if (kd_inflater_run(inf, alg, p, n, limit, &one) != 0 || one.len != out.len ||
            (out.len && memcmp(one.data, out.data, out.len) != 0))
            abort();
        kd_compress_buf_release(&one);
        kd_compress_buf_release(&out);
    } else if (rc != -EMSGSIZE && rc != -EBADMSG) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t limits[] = {0, 1, 16, 100, 1024, 4096, 65536, 300000};
    if (size < 2)
        return 0;
    if (inf == NULL) {
        inf = kd_inflater_new();
        def = kd_deflater_new(0);
    }
    size_t limit = limits[data[0] % 8];
    unsigned seed = data[1];
    const uint8_t *p = data + 2;
    size_t n = size - 2;
    inflate_split(KD_COMPRESS_GZIP, p, n, limit, seed);
    inflate_split(KD_COMPRESS_DEFLATE, p, n, limit, seed);
    /* round trip */
    for (int a = 0; a < 2; a++) {
        enum kd_compress_alg alg = a ? KD_COMPRESS_DEFLATE : KD_COMPRESS_GZIP;
        struct kd_compress_buf z, out;
        if (kd_deflater_run(def, alg, p, n, &z) != 0)
            abort();
        inflate_split(alg, z.data, z.len, n, seed);
        if (kd_inflater_run(inf, alg, z.data, z.len, n, &out) != 0 || out.len != n ||
            (n && memcmp(out.data, p, n) != 0))
            abort();
        kd_compress_buf_release(&out);
        if (n > 0 && kd_inflater_run(inf, alg, z.data, z.len, n - 1, &out) != -EMSGSIZE)
            abort();
        kd_compress_buf_release(&z);
    }
    return 0;
}

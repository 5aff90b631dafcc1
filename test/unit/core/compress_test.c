/* compress_test.c — gzip and deflate round trips in every split, a 1 GiB bomb held to a 4 MiB limit
 * (output buffer and RSS checked), truncated streams, trailing garbage, bad headers, empty messages,
 * and the grpc-encoding / grpc-accept-encoding helpers. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "core/compress.h"

static const enum kd_compress_alg algs[] = {KD_COMPRESS_GZIP, KD_COMPRESS_DEFLATE};

static void fill(uint8_t *p, size_t n, unsigned seed)
{
    /* half text-like (compressible), half noise */
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = i % 512 < 256 ? (uint8_t)('a' + i % 7) : (uint8_t)(seed >> 16);
    }
}

/* ASan keeps freed blocks in quarantine, so the buffer's doublings all stay resident there: allow
 * for it, still far below the GiB an unbounded inflate would take. */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_SLACK_KIB (64 * 1024)
#else
#define RSS_SLACK_KIB (12 * 1024)
#endif

static long maxrss_kib(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

Test(compress, round_trip_every_split)
{
    static const size_t sizes[] = {1, 17, 1000, 70000, 300000};
    struct kd_deflater *d = kd_deflater_new(0);
    struct kd_inflater *z = kd_inflater_new();
    for (size_t a = 0; a < 2; a++) {
        for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
            size_t n = sizes[k];
            uint8_t *in = malloc(n);
            fill(in, n, (unsigned)(k + 1));
            struct kd_compress_buf c, out;
            cr_assert_eq(kd_deflater_run(d, algs[a], in, n, &c), 0);
            if (algs[a] == KD_COMPRESS_GZIP)
                cr_assert(c.len > 2 && c.data[0] == 0x1f && c.data[1] == 0x8b, "RFC 1952 magic");
            else
                cr_assert(c.len > 2 && (c.data[0] & 0x0f) == 8 && ((c.data[0] << 8) | c.data[1]) % 31 == 0,
                          "RFC 1950 header");
            cr_assert_eq(kd_inflater_run(z, algs[a], c.data, c.len, n, &out), 0, "%s %zu",
                         kd_compress_alg_name(algs[a]), n);
            cr_assert_eq(out.len, n);
            cr_assert(memcmp(out.data, in, n) == 0);
            kd_compress_buf_release(&out);
            /* any split of the input gives the same bytes */
            for (size_t step = 1; step < c.len; step = step * 3 + 1) {
                cr_assert_eq(kd_inflater_begin(z, algs[a], n), 0);
                for (size_t off = 0; off < c.len; off += step)
                    cr_assert_eq(kd_inflater_feed(z, c.data + off, c.len - off < step ? c.len - off : step),
                                 0);
                cr_assert_eq(kd_inflater_end(z, &out), 0);
                cr_assert_eq(out.len, n);
                cr_assert(memcmp(out.data, in, n) == 0);
                kd_compress_buf_release(&out);
            }
            /* one byte under the exact size is over the limit */
            cr_assert_eq(kd_inflater_run(z, algs[a], c.data, c.len, n - 1, &out), -EMSGSIZE);
            kd_compress_buf_release(&c);
            free(in);
        }
    }
    kd_inflater_free(z);
    kd_deflater_free(d);
}

Test(compress, empty_message)
{
    struct kd_deflater *d = kd_deflater_new(0);
    struct kd_inflater *z = kd_inflater_new();
    for (size_t a = 0; a < 2; a++) {
        struct kd_compress_buf c, out;
        cr_assert_eq(kd_deflater_run(d, algs[a], NULL, 0, &c), 0);
        cr_assert(c.len > 0);
        cr_assert_eq(kd_inflater_run(z, algs[a], c.data, c.len, 0, &out), 0, "empty fits a zero limit");
        cr_assert_eq(out.len, 0);
        kd_compress_buf_release(&out);
        kd_compress_buf_release(&c);
        /* zero bytes are not a stream (grpc-go: EOF) */
        cr_assert_eq(kd_inflater_run(z, algs[a], NULL, 0, 100, &out), -EBADMSG);
    }
    kd_inflater_free(z);
    kd_deflater_free(d);
}

Test(compress, truncated_trailing_and_bad_header)
{
    struct kd_deflater *d = kd_deflater_new(0);
    struct kd_inflater *z = kd_inflater_new();
    uint8_t in[5000];
    fill(in, sizeof(in), 7);
    for (size_t a = 0; a < 2; a++) {
        struct kd_compress_buf c, out;
        cr_assert_eq(kd_deflater_run(d, algs[a], in, sizeof(in), &c), 0);
        /* every truncation fails (the gzip trailer's CRC and length included) */
        for (size_t cut = 0; cut < c.len; cut++)
            cr_assert_eq(kd_inflater_run(z, algs[a], c.data, cut, 1 << 20, &out), -EBADMSG, "cut at %zu",
                         cut);
        /* trailing garbage, in one piece or fed after the end */
        uint8_t *more = malloc(c.len + 3);
        memcpy(more, c.data, c.len);
        memcpy(more + c.len, "xyz", 3);
        cr_assert_eq(kd_inflater_run(z, algs[a], more, c.len + 3, 1 << 20, &out), -EBADMSG);
        cr_assert_eq(kd_inflater_begin(z, algs[a], 1 << 20), 0);
        cr_assert_eq(kd_inflater_feed(z, more, c.len), 0);
        cr_assert_eq(kd_inflater_feed(z, more + c.len, 1), -EBADMSG);
        /* a flipped byte in the body or the CRC is caught */
        more[c.len - 2] ^= 0x55;
        cr_assert_eq(kd_inflater_run(z, algs[a], more, c.len, 1 << 20, &out), -EBADMSG);
        /* bad header */
        memcpy(more, c.data, c.len);
        more[0] ^= 0xff;
        cr_assert_eq(kd_inflater_run(z, algs[a], more, c.len, 1 << 20, &out), -EBADMSG);
        free(more);
        /* the other algorithm's wrapper is refused */
        cr_assert_eq(kd_inflater_run(z, algs[1 - a], c.data, c.len, 1 << 20, &out), -EBADMSG);
        /* and after all the failures the inflater still works */
        cr_assert_eq(kd_inflater_run(z, algs[a], c.data, c.len, sizeof(in), &out), 0);
        cr_assert(out.len == sizeof(in) && memcmp(out.data, in, sizeof(in)) == 0);
        kd_compress_buf_release(&out);
        kd_compress_buf_release(&c);
    }
    struct kd_compress_buf out;
    cr_assert_eq(kd_inflater_run(z, KD_COMPRESS_IDENTITY, in, 10, 100, &out), -EINVAL);
    kd_inflater_free(z);
    kd_deflater_free(d);
}

/* 1 GiB of zeros compressed in 1 MiB steps (about 1 MiB of output), inflated under a 4 MiB limit:
 * refused with -EMSGSIZE, the output buffer never above the limit, RSS not grown by the GiB, and
 * quickly (it stops at the limit, it does not inflate the rest). */
Test(compress, bomb_bounded_by_limit, .timeout = 120)
{
    const size_t step = 1 << 20, total = (size_t)1 << 30, limit = 4 << 20;
    uint8_t *zeros = calloc(1, step);
    struct kd_deflater *d = kd_deflater_new(1);
    struct kd_inflater *z = kd_inflater_new();
    for (size_t a = 0; a < 2; a++) {
        struct kd_compress_buf bomb = {0};
        cr_assert_eq(kd_deflater_begin(d, algs[a]), 0);
        for (size_t done = 0; done < total; done += step)
            cr_assert_eq(kd_deflater_feed(d, zeros, step, done + step == total, &bomb), 0);
        cr_assert(bomb.len < total / 100, "a bomb: %zu bytes inflate to 1 GiB", bomb.len);
        long rss0 = maxrss_kib();
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        struct kd_compress_buf out;
        cr_assert_eq(kd_inflater_run(z, algs[a], bomb.data, bomb.len, limit, &out), -EMSGSIZE);
        /* streamed in 64 KiB pieces the same */
        cr_assert_eq(kd_inflater_begin(z, algs[a], limit), 0);
        int rc = 0;
        for (size_t off = 0; off < bomb.len && rc == 0; off += 65536)
            rc = kd_inflater_feed(z, bomb.data + off, bomb.len - off < 65536 ? bomb.len - off : 65536);
        cr_assert_eq(rc, -EMSGSIZE);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        long grown = maxrss_kib() - rss0;
        double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
        cr_assert(grown < RSS_SLACK_KIB, "RSS grew %ld KiB inflating a bomb under a 4 MiB limit", grown);
        cr_assert(secs < 5.0, "took %.2f s: it should stop at the limit", secs);
        /* exactly the limit of zeros is fine: the probe at the limit sees the end */
        struct kd_compress_buf four = {0};
        cr_assert_eq(kd_deflater_begin(d, algs[a]), 0);
        for (size_t done = 0; done < limit; done += step)
            cr_assert_eq(kd_deflater_feed(d, zeros, step, done + step == limit, &four), 0);
        cr_assert_eq(kd_inflater_run(z, algs[a], four.data, four.len, limit, &out), 0);
        cr_assert_eq(out.len, limit);
        cr_assert(out.cap >= limit && out.cap <= limit + 128, "buffer %zu for a %zu limit", out.cap, limit);
        kd_compress_buf_release(&out);
        kd_compress_buf_release(&four);
        kd_compress_buf_release(&bomb);
    }
    kd_inflater_free(z);
    kd_deflater_free(d);
    free(zeros);
}

Test(compress, encoding_names)
{
    cr_assert_eq(kd_compress_alg_parse("gzip", 4), KD_COMPRESS_GZIP);
    cr_assert_eq(kd_compress_alg_parse("deflate", 7), KD_COMPRESS_DEFLATE);
    cr_assert_eq(kd_compress_alg_parse("identity", 8), KD_COMPRESS_IDENTITY);
    cr_assert_eq(kd_compress_alg_parse("snappy", 6), -ENOENT);
    cr_assert_eq(kd_compress_alg_parse("gzipx", 5), -ENOENT);
    const char *l = "identity, deflate,gzip";
    cr_assert(kd_compress_accepts(l, strlen(l), KD_COMPRESS_GZIP));
    cr_assert(kd_compress_accepts(l, strlen(l), KD_COMPRESS_DEFLATE));
    const char *l2 = "identity,gzipx, xgzip";
    cr_assert_not(kd_compress_accepts(l2, strlen(l2), KD_COMPRESS_GZIP));
    cr_assert_not(kd_compress_accepts("", 0, KD_COMPRESS_GZIP));
}

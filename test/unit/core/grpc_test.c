/* grpc_test.c — gRPC byte work: deframing in every split, limits, timeouts, percent-encoding. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/grpc.h"

struct seen {
    int n;
    size_t lens[64];
    uint8_t first[64];
    bool compressed[64];
    int fail_at; /* return -EIO at this message index (or -1) */
};

static int collect(void *ud, const uint8_t *msg, size_t len, bool compressed)
{
    struct seen *s = ud;
    if (s->n == s->fail_at)
        return -EIO;
    s->compressed[s->n] = compressed;
    s->lens[s->n] = len;
    s->first[s->n] = len ? msg[0] : 0;
    s->n++;
    return 0;
}

static size_t frame(uint8_t *out, const uint8_t *msg, uint32_t len)
{
    kd_grpc_frame_prefix(out, len);
    memcpy(out + 5, msg, len);
    return 5 + len;
}

Test(grpc, deframe_every_split)
{
    uint8_t buf[4096], msg[1000];
    size_t n = 0;
    uint32_t sizes[] = {0, 1, 5, 999, 1000, 3};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        memset(msg, (int)('a' + i), sizes[i]);
        n += frame(buf + n, msg, sizes[i]);
    }
    /* feed in chunks of every size from 1 to n: the same messages come out each time */
    for (size_t chunk = 1; chunk <= n; chunk += (chunk < 20 ? 1 : 97)) {
        struct kd_grpc_deframer d;
        struct seen s = {.fail_at = -1};
        kd_grpc_deframer_init(&d, 4096);
        for (size_t off = 0; off < n; off += chunk) {
            size_t take = n - off < chunk ? n - off : chunk;
            cr_assert_eq(kd_grpc_deframer_feed(&d, buf + off, take, collect, &s), 0);
        }
        cr_assert_eq(s.n, 6, "chunk %zu: %d messages", chunk, s.n);
        for (int i = 0; i < 6; i++) {
            cr_assert_eq(s.lens[i], sizes[i]);
            if (sizes[i])
                cr_assert_eq(s.first[i], 'a' + i);
        }
        cr_assert(kd_grpc_deframer_idle(&d));
        kd_grpc_deframer_free(&d);
    }
}

Test(grpc, deframe_limits_and_flags)
{
    struct kd_grpc_deframer d;
    struct seen s = {.fail_at = -1};
    uint8_t hdr[5];
    kd_grpc_deframer_init(&d, 100);
    kd_grpc_frame_prefix(hdr, 101);
    cr_assert_eq(kd_grpc_deframer_feed(&d, hdr, 5, collect, &s), -EMSGSIZE, "over the limit is refused");
    kd_grpc_deframer_free(&d);

    kd_grpc_deframer_init(&d, 100);
    /* the compressed flag is passed on, not refused: inflating is the HTTP/2 layer's business */
    uint8_t compressed[] = {1, 0, 0, 0, 1, 'x', 0, 0, 0, 0, 1, 'y'};
    cr_assert_eq(kd_grpc_deframer_feed(&d, compressed, sizeof(compressed), collect, &s), 0);
    cr_assert_eq(s.n, 2);
    cr_assert(s.compressed[0]);
    cr_assert_not(s.compressed[1]);
    s.n = 0;
    kd_grpc_deframer_free(&d);

    kd_grpc_deframer_init(&d, 100);
    uint8_t reserved[] = {0x80, 0, 0, 0, 0};
    cr_assert_eq(kd_grpc_deframer_feed(&d, reserved, sizeof(reserved), collect, &s), -EPROTO);
    kd_grpc_deframer_free(&d);

    /* a partial message is not idle */
    kd_grpc_deframer_init(&d, 100);
    uint8_t part[] = {0, 0, 0, 0, 10, 'a', 'b'};
    cr_assert_eq(kd_grpc_deframer_feed(&d, part, sizeof(part), collect, &s), 0);
    cr_assert_not(kd_grpc_deframer_idle(&d));
    kd_grpc_deframer_free(&d);
}

Test(grpc, deframe_callback_error_propagates)
{
    struct kd_grpc_deframer d;
    struct seen s = {.fail_at = 1};
    uint8_t buf[64];
    size_t n = frame(buf, (const uint8_t *)"ab", 2);
    n += frame(buf + n, (const uint8_t *)"cd", 2);
    kd_grpc_deframer_init(&d, 100);
    cr_assert_eq(kd_grpc_deframer_feed(&d, buf, n, collect, &s), -EIO);
    cr_assert_eq(s.n, 1);
    kd_grpc_deframer_free(&d);
}

Test(grpc, timeout_parse)
{
    uint64_t us;
    cr_assert_eq(kd_grpc_timeout_parse("1S", 2, &us), 0);
    cr_assert_eq(us, 1000000);
    cr_assert_eq(kd_grpc_timeout_parse("250m", 4, &us), 0);
    cr_assert_eq(us, 250000);
    cr_assert_eq(kd_grpc_timeout_parse("2H", 2, &us), 0);
    cr_assert_eq(us, 7200000000ull);
    cr_assert_eq(kd_grpc_timeout_parse("3M", 2, &us), 0);
    cr_assert_eq(us, 180000000ull);
    cr_assert_eq(kd_grpc_timeout_parse("7u", 2, &us), 0);
    cr_assert_eq(us, 7);
    cr_assert_eq(kd_grpc_timeout_parse("1n", 2, &us), 0);
    cr_assert_eq(us, 1, "nanoseconds round up");
    cr_assert_eq(kd_grpc_timeout_parse("99999999H", 9, &us), 0);
    cr_assert_eq(kd_grpc_timeout_parse("123456789S", 10, &us), -EINVAL, "at most 8 digits");
    cr_assert_eq(kd_grpc_timeout_parse("S", 1, &us), -EINVAL);
    cr_assert_eq(kd_grpc_timeout_parse("1x", 2, &us), -EINVAL);
    cr_assert_eq(kd_grpc_timeout_parse("-1S", 3, &us), -EINVAL);
    cr_assert_eq(kd_grpc_timeout_parse("1 S", 3, &us), -EINVAL);
}

Test(grpc, timeout_format_round_trips)
{
    uint64_t vals[] = {1, 999, 1000, 1500000, 20000000, 99999999, 100000000, 7200000000ull, 1ull << 50};
    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        char out[16];
        uint64_t back;
        kd_grpc_timeout_format(vals[i], out);
        cr_assert_eq(kd_grpc_timeout_parse(out, strlen(out), &back), 0, "%s", out);
        cr_assert_geq(back, vals[i], "never shorter than asked: %s", out);
    }
}

Test(grpc, message_percent_encoding)
{
    char enc[64], dec[64];
    const char *in = "é 100%\n ok";
    size_t n = kd_grpc_message_encode(in, strlen(in), enc, sizeof(enc));
    cr_assert_str_eq(enc, "%C3%A9 100%25%0A ok");
    cr_assert_eq(n, strlen(enc));
    kd_grpc_message_decode(enc, n, dec, sizeof(dec));
    cr_assert_str_eq(dec, in);
    /* lenient decoding: a broken escape passes through */
    kd_grpc_message_decode("50%zz%", 6, dec, sizeof(dec));
    cr_assert_str_eq(dec, "50%zz%");
    /* never cut inside an escape */
    n = kd_grpc_message_encode("\n\n\n", 3, enc, 8);
    cr_assert_str_eq(enc, "%0A%0A");
}

Test(grpc, status_names_and_keys)
{
    cr_assert_str_eq(kd_grpc_status_name(KD_GRPC_UNAUTHENTICATED), "UNAUTHENTICATED");
    cr_assert_str_eq(kd_grpc_status_name(99), "UNKNOWN");
    cr_assert(kd_grpc_metadata_key_valid("kas-hop-routing-agent-id", 24));
    cr_assert_not(kd_grpc_metadata_key_valid("Bad", 3));
    cr_assert_not(kd_grpc_metadata_key_valid("", 0));
    cr_assert_not(kd_grpc_metadata_key_valid("a b", 3));
}

/* resp_test.c — unit tests for core/resp (RESP2 codec) and core/sha1 (script names): every split
 * point of a buffer holding several replies, nesting, errors, nil, and the size/depth limits. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/resp.h"
#include "core/sha1.h"

TestSuite(resp, .timeout = 30);

/* Render a reply as compact text, for comparisons: S"..", +.., -.., :N, nil, [a,b]. */
static void render(const struct kd_resp *o, char *buf, size_t cap, size_t *len)
{
    int w = 0;
    switch (o->type) {
    case KD_RESP_STRING:
        w = snprintf(buf + *len, cap - *len, "S\"%.*s\"", (int)o->len, o->str);
        break;
    case KD_RESP_STATUS:
        w = snprintf(buf + *len, cap - *len, "+%.*s", (int)o->len, o->str);
        break;
    case KD_RESP_ERROR:
        w = snprintf(buf + *len, cap - *len, "-%.*s", (int)o->len, o->str);
        break;
    case KD_RESP_INTEGER:
        w = snprintf(buf + *len, cap - *len, ":%lld", o->integer);
        break;
    case KD_RESP_NIL:
        w = snprintf(buf + *len, cap - *len, "nil");
        break;
    case KD_RESP_ARRAY:
        w = snprintf(buf + *len, cap - *len, "[");
        *len += (size_t)w;
        for (size_t i = 0; i < o->n; i++) {
            if (i > 0) {
                buf[(*len)++] = ',';
                buf[*len] = '\0';
            }
            render(o->elem[i], buf, cap, len);
        }
        w = snprintf(buf + *len, cap - *len, "]");
        break;
    }
    *len += (size_t)w;
}

static const char MULTI[] = "+OK\r\n"
                            "-ERR wrong type\r\n"
                            ":-42\r\n"
                            "$5\r\nhe\0lo\r\n"
                            "$0\r\n\r\n"
                            "$-1\r\n"
                            "*-1\r\n"
                            "*0\r\n"
                            "*3\r\n$3\r\nfoo\r\n*2\r\n:1\r\n*1\r\n+in\r\n$-1\r\n"
                            ":9223372036854775807\r\n";
static const char *const EXPECT[] = {
    "+OK",
    "-ERR wrong type",
    ":-42",
    "S\"he\"",
    "S\"\"",
    "nil",
    "nil",
    "[]",
    "[S\"foo\",[:1,[+in]],nil]",
    ":9223372036854775807",
};
#define NEXPECT (sizeof(EXPECT) / sizeof(EXPECT[0]))

/* Feed buf in pieces cut at the given points, collecting rendered replies. */
static size_t decode_split(const char *buf, size_t len, size_t cut1, size_t cut2, char out[][128])
{
    struct kd_resp_reader *r = kd_resp_reader_new(0);
    size_t n = 0, cuts[4] = {0, cut1, cut2, len};
    cr_assert_not_null(r);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(kd_resp_reader_feed(r, buf + cuts[i], cuts[i + 1] - cuts[i]), 0);
        struct kd_resp *o;
        int rc;
        while ((rc = kd_resp_reader_next(r, &o)) == 1) {
            size_t l = 0;
            cr_assert_lt(n, NEXPECT + 1);
            render(o, out[n], 128, &l);
            kd_resp_free(o);
            n++;
        }
        cr_assert_eq(rc, 0, "error: %s", kd_resp_reader_error(r));
    }
    kd_resp_reader_free(r);
    return n;
}

Test(resp, every_split_point)
{
    size_t len = sizeof(MULTI) - 1;
    char out[NEXPECT + 1][128];
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b += (a % 7 == 0 ? 1 : 13)) { /* all pairs for some a, a sample else */
            size_t n = decode_split(MULTI, len, a, b, out);
            cr_assert_eq(n, NEXPECT, "split %zu/%zu: %zu replies", a, b, n);
            for (size_t i = 0; i < n; i++)
                cr_assert_str_eq(out[i], EXPECT[i], "split %zu/%zu reply %zu", a, b, i);
        }
    }
}

Test(resp, string_keeps_nul_and_terminates)
{
    struct kd_resp_reader *r = kd_resp_reader_new(0);
    struct kd_resp *o;
    kd_resp_reader_feed(r, "$3\r\na\0b\r\n", 9);
    cr_assert_eq(kd_resp_reader_next(r, &o), 1);
    cr_assert_eq(o->type, KD_RESP_STRING);
    cr_assert_eq(o->len, 3);
    cr_assert_eq(memcmp(o->str, "a\0b", 4), 0);
    kd_resp_free(o);
    cr_assert_eq(kd_resp_reader_next(r, &o), 0);
    kd_resp_reader_free(r);
}

Test(resp, protocol_error_is_sticky)
{
    struct kd_resp_reader *r = kd_resp_reader_new(0);
    struct kd_resp *o;
    kd_resp_reader_feed(r, "?what\r\n", 7);
    cr_assert_eq(kd_resp_reader_next(r, &o), -1);
    cr_assert_null(o);
    cr_assert(strstr(kd_resp_reader_error(r), "protocol error") != NULL, "%s", kd_resp_reader_error(r));
    cr_assert_eq(kd_resp_reader_feed(r, "+OK\r\n", 5), -1);
    cr_assert_eq(kd_resp_reader_next(r, &o), -1);
    kd_resp_reader_free(r);
}

Test(resp, error_mid_array_frees_partial_tree)
{
    struct kd_resp_reader *r = kd_resp_reader_new(0);
    struct kd_resp *o;
    const char *in = "*3\r\n$3\r\nabc\r\n*2\r\n:1\r\n!bad\r\n";
    kd_resp_reader_feed(r, in, strlen(in));
    cr_assert_eq(kd_resp_reader_next(r, &o), -1);
    kd_resp_reader_free(r); /* ASan/LSan: the partial tree is freed */
}

Test(resp, size_limit_on_bulk)
{
    struct kd_resp_reader *r = kd_resp_reader_new(1024);
    struct kd_resp *o;
    char chunk[256];
    memset(chunk, 'x', sizeof(chunk));
    kd_resp_reader_feed(r, "$100000\r\n", 9);
    int rc = 0;
    for (int i = 0; i < 10 && rc == 0; i++) {
        cr_assert_eq(kd_resp_reader_feed(r, chunk, sizeof(chunk)), 0);
        rc = kd_resp_reader_next(r, &o);
    }
    cr_assert_eq(rc, -1);
    cr_assert_str_eq(kd_resp_reader_error(r), "reply larger than max_reply_bytes (1024 bytes)");
    kd_resp_reader_free(r);
}

Test(resp, size_limit_on_huge_array_header)
{
    struct kd_resp_reader *r = kd_resp_reader_new(1 << 20);
    struct kd_resp *o;
    kd_resp_reader_feed(r, "*2000000000\r\n", 13);
    cr_assert_eq(kd_resp_reader_next(r, &o), -1);
    cr_assert(strstr(kd_resp_reader_error(r), "max_reply_bytes") != NULL, "%s", kd_resp_reader_error(r));
    kd_resp_reader_free(r);
}

Test(resp, size_limit_on_many_small_elements)
{
    struct kd_resp_reader *r = kd_resp_reader_new(4096);
    struct kd_resp *o;
    kd_resp_reader_feed(r, "*1000\r\n", 7);
    int rc = 0;
    for (int i = 0; i < 1000 && rc == 0; i++) {
        kd_resp_reader_feed(r, ":1\r\n", 4);
        rc = kd_resp_reader_next(r, &o);
    }
    cr_assert_eq(rc, -1);
    cr_assert(strstr(kd_resp_reader_error(r), "max_reply_bytes") != NULL);
    kd_resp_reader_free(r);
}

Test(resp, limit_is_per_reply)
{
    /* Many replies, each well under the limit, together far over it. */
    struct kd_resp_reader *r = kd_resp_reader_new(512);
    struct kd_resp *o;
    for (int i = 0; i < 1000; i++) {
        kd_resp_reader_feed(r, "$10\r\n0123456789\r\n", 17);
        cr_assert_eq(kd_resp_reader_next(r, &o), 1, "%s", kd_resp_reader_error(r));
        kd_resp_free(o);
    }
    kd_resp_reader_free(r);
}

Test(resp, depth_limit)
{
    char in[256];
    size_t len = 0;
    for (int i = 0; i < KD_RESP_MAX_DEPTH + 1; i++)
        len += (size_t)snprintf(in + len, sizeof(in) - len, "*1\r\n");
    len += (size_t)snprintf(in + len, sizeof(in) - len, ":1\r\n");
    struct kd_resp_reader *r = kd_resp_reader_new(0);
    struct kd_resp *o;
    kd_resp_reader_feed(r, in, len);
    cr_assert_eq(kd_resp_reader_next(r, &o), 1, "%s", kd_resp_reader_error(r)); /* exactly the limit */
    kd_resp_free(o);
    len = 0;
    for (int i = 0; i < KD_RESP_MAX_DEPTH + 2; i++)
        len += (size_t)snprintf(in + len, sizeof(in) - len, "*1\r\n");
    len += (size_t)snprintf(in + len, sizeof(in) - len, ":1\r\n");
    kd_resp_reader_feed(r, in, len);
    cr_assert_eq(kd_resp_reader_next(r, &o), -1);
    cr_assert(strstr(kd_resp_reader_error(r), "depth") != NULL, "%s", kd_resp_reader_error(r));
    kd_resp_reader_free(r);
}

Test(resp, format_binary_safe)
{
    const char *argv[] = {"SET", "k\r\n", "a\0b"};
    size_t argvlen[] = {3, 3, 3}, len;
    char *out = kd_resp_format(3, argv, argvlen, &len);
    static const char want[] = "*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$3\r\na\0b\r\n";
    cr_assert_not_null(out);
    cr_assert_eq(len, sizeof(want) - 1);
    cr_assert_eq(memcmp(out, want, len), 0);
    free(out);
    cr_assert_null(kd_resp_format(0, argv, argvlen, &len));
}

Test(resp, sha1_vectors)
{
    char hex[41];
    kd_sha1_hex("", 0, hex);
    cr_assert_str_eq(hex, "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    kd_sha1_hex("abc", 3, hex);
    cr_assert_str_eq(hex, "a9993e364706816aba3e25717850c26c9cd0d89d");
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    kd_sha1_hex(m, strlen(m), hex);
    cr_assert_str_eq(hex, "84983e441c3bd26ebaae4aa1f95129e5e54670f1");
    /* a Redis script name: redis-cli SCRIPT LOAD "return 1" */
    kd_sha1_hex("return 1", 8, hex);
    cr_assert_str_eq(hex, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
}

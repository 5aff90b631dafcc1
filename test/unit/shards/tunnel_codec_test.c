/* tunnel_codec_test.c — ReverseTunnel messages by hand: decoding every member, descriptors,
 * metadata blobs both ways, encoders checked by decoding their output, and the order automaton. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/pb.h"
#include "shards/tunnel_codec.h"

/* ConnectRequest{message{data:"hello"}} = 1a 07 0a 05 h e l l o */
Test(tunnel, decode_message)
{
    const uint8_t m[] = {0x1a, 0x07, 0x0a, 0x05, 'h', 'e', 'l', 'l', 'o'};
    struct kd_tun_msg t;
    cr_assert_eq(kd_tun_decode_request(m, sizeof(m), &t), 0);
    cr_assert_eq(t.kind, KD_TUN_MESSAGE);
    cr_assert_eq(t.data_len, 5);
    cr_assert_eq(memcmp(t.data, "hello", 5), 0);
    /* an empty Message is a message with no bytes */
    const uint8_t e[] = {0x1a, 0x00};
    cr_assert_eq(kd_tun_decode_request(e, sizeof(e), &t), 0);
    cr_assert_eq(t.kind, KD_TUN_MESSAGE);
    cr_assert_eq(t.data_len, 0);
}

/* KD_TUN_WRAP_OVERHEAD bounds what the tunnel's Message adds, both ways (ConnectResponse.message
 * = 2, ConnectRequest.message = 3: the same sizes), up to the largest message limit (1 GiB) and
 * beyond: the agent listener's limit is the message limit plus it. */
Test(tunnel, wrap_overhead_bounds_the_message_wrapping)
{
    static const size_t sizes[] = {0,        1,        127,       128, 16383, 16384, (4u << 20) - 1,
                                   4u << 20, 1u << 30, UINT32_MAX};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t n = sizes[i];
        cr_assert_leq(kd_tun_message_size(n) - n, KD_TUN_WRAP_OVERHEAD, "%zu", n);
        cr_assert_leq(kd_pb_len_field_size(3, kd_pb_len_field_size(1, n)) - n, KD_TUN_WRAP_OVERHEAD, "%zu",
                      n);
    }
    /* 4 MiB - 1 bytes: (1 + 4) + (1 + 4) bytes of wrapping, the case that used to be refused */
    cr_assert_eq(kd_tun_message_size((4u << 20) - 1), (4u << 20) - 1 + 10);
}

Test(tunnel, decode_error_status)
{
    /* ConnectRequest{error{status{code:9, message:"no"}}} */
    const uint8_t m[] = {0x2a, 0x08, 0x0a, 0x06, 0x08, 0x09, 0x12, 0x02, 'n', 'o'};
    struct kd_tun_msg t;
    cr_assert_eq(kd_tun_decode_request(m, sizeof(m), &t), 0);
    cr_assert_eq(t.kind, KD_TUN_ERROR);
    cr_assert_eq(t.code, 9);
    cr_assert_eq(t.text_len, 2);
}

Test(tunnel, decode_rejects_garbage)
{
    struct kd_tun_msg t;
    const uint8_t empty[] = {0};
    cr_assert_eq(kd_tun_decode_request(empty, 0, &t), -EBADMSG, "no member set");
    const uint8_t trunc[] = {0x1a, 0x07, 0x0a};
    cr_assert_eq(kd_tun_decode_request(trunc, sizeof(trunc), &t), -EBADMSG);
    const uint8_t varint_member[] = {0x18, 0x01};
    cr_assert_eq(kd_tun_decode_request(varint_member, sizeof(varint_member), &t), -EBADMSG);
    const uint8_t group[] = {0x1b};
    cr_assert_eq(kd_tun_decode_request(group, sizeof(group), &t), -EBADMSG);
    /* unknown fields alone: no member */
    const uint8_t unknown[] = {0x38, 0x01};
    cr_assert_eq(kd_tun_decode_request(unknown, sizeof(unknown), &t), -EBADMSG);
}

struct seen {
    char names[8][64];
    int n;
};

static int collect(void *ud, const char *svc, size_t sl, const char *m, size_t ml)
{
    struct seen *s = ud;
    snprintf(s->names[s->n++], 64, "/%.*s/%.*s", (int)sl, svc, (int)ml, m);
    return 0;
}

static size_t put_descriptor(uint8_t *out, const char *svc, const char *const *methods, int n)
{
    uint8_t svcbuf[256], *p = svcbuf;
    /* methods before the name: the decoder must not care about order */
    for (int i = 0; i < n; i++) {
        uint8_t mb[64];
        uint8_t *q = kd_pb_put_len_field(mb, 1, methods[i], strlen(methods[i]));
        p = kd_pb_put_len_field(p, 2, mb, (size_t)(q - mb));
    }
    p = kd_pb_put_len_field(p, 1, svc, strlen(svc));
    uint8_t ad[300], *a = kd_pb_put_len_field(ad, 1, svcbuf, (size_t)(p - svcbuf));
    return (size_t)(kd_pb_put_len_field(out, 1, ad, (size_t)(a - ad)) - out);
}

Test(tunnel, descriptor_methods)
{
    uint8_t d[512];
    const char *methods[] = {"Unary", "Stream"};
    size_t n = put_descriptor(d, "test.Echo", methods, 2);
    struct seen s = {0};
    cr_assert_eq(kd_tun_descriptor_each(d, n, collect, &s), 2);
    cr_assert_str_eq(s.names[0], "/test.Echo/Unary");
    cr_assert_str_eq(s.names[1], "/test.Echo/Stream");
    const char *bad[] = {""};
    n = put_descriptor(d, "test.Echo", bad, 1);
    cr_assert_eq(kd_tun_descriptor_each(d, n, collect, &s), -EINVAL, "empty method name");
    const char *slash[] = {"a/b"};
    n = put_descriptor(d, "test.Echo", slash, 1);
    cr_assert_eq(kd_tun_descriptor_each(d, n, collect, &s), -EINVAL, "'/' in a method name");
    n = put_descriptor(d, "", methods, 1);
    cr_assert_eq(kd_tun_descriptor_each(d, n, collect, &s), -EINVAL, "empty service name");
}

struct md {
    char lines[16][128];
    int n;
};

static int md_collect(void *ud, const char *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct md *m = ud;
    snprintf(m->lines[m->n++], 128, "%.*s=%.*s", (int)kl, k, (int)vl, (const char *)v);
    return 0;
}

Test(tunnel, request_info_round_trip)
{
    uint8_t blob[256], *p = blob;
    const uint8_t *v1[] = {(const uint8_t *)"a", (const uint8_t *)"bb"};
    size_t l1[] = {1, 2};
    p = kd_tun_blob_put_entry(p, "x-k", 3, v1, l1, 2);
    const uint8_t *v2[] = {(const uint8_t *)"z"};
    size_t l2[] = {1};
    p = kd_tun_blob_put_entry(p, "y", 1, v2, l2, 1);
    size_t bl = (size_t)(p - blob);
    cr_assert_eq(kd_tun_blob_entry_size(3, l1, 2) + kd_tun_blob_entry_size(1, l2, 1), bl);

    size_t n;
    uint8_t *out;
    /* exact agreement with the method length actually used */
    n = kd_tun_request_info_size(6, blob, bl);
    out = malloc(n);
    cr_assert_eq((size_t)(kd_tun_put_request_info(out, "/a.B/C", 6, blob, bl) - out), n);
    /* decode by hand: ConnectResponse field 1 -> RequestInfo {1: method, 2: entries} */
    struct kd_pb_reader r, ri;
    struct kd_pb_field f, g;
    kd_pb_reader_init(&r, out, n);
    cr_assert_eq(kd_pb_next(&r, &f), 1);
    cr_assert_eq(f.num, 1);
    kd_pb_reader_init(&ri, f.data, f.len);
    int entries = 0, methods = 0;
    while (kd_pb_next(&ri, &g) == 1) {
        if (g.num == 1) {
            /* counted below: a missing method field must fail, not skip this check */
            methods++;
            cr_assert_eq(g.len, 6);
            cr_assert_eq(memcmp(g.data, "/a.B/C", 6), 0);
        }
        if (g.num == 2)
            entries++;
    }
    cr_assert_eq(methods, 1);
    cr_assert_eq(entries, 2);
    /* the same entries read back through the blob walker */
    struct md m = {0};
    cr_assert_eq(kd_tun_blob_each(blob, bl, md_collect, &m), 0);
    cr_assert_eq(m.n, 3);
    cr_assert_str_eq(m.lines[0], "x-k=a");
    cr_assert_str_eq(m.lines[1], "x-k=bb");
    cr_assert_str_eq(m.lines[2], "y=z");
    free(out);
}

Test(tunnel, header_meta_to_blob)
{
    /* Header { meta = 1: entry{1:"k", 2:Values{1:"v"}} } */
    uint8_t entry[32], *e = entry;
    uint8_t vals[8], *v = kd_pb_put_len_field(vals, 1, "v", 1);
    e = kd_pb_put_len_field(e, 1, "k", 1);
    e = kd_pb_put_len_field(e, 2, vals, (size_t)(v - vals));
    uint8_t hdr[64], *h = kd_pb_put_len_field(hdr, 1, entry, (size_t)(e - entry));
    uint8_t blob[64];
    long bl = kd_tun_meta_to_blob(hdr, (size_t)(h - hdr), blob, sizeof(blob));
    cr_assert_gt(bl, 0);
    struct md m = {0};
    cr_assert_eq(kd_tun_blob_each(blob, (size_t)bl, md_collect, &m), 0);
    cr_assert_eq(m.n, 1);
    cr_assert_str_eq(m.lines[0], "k=v");
}

Test(tunnel, message_and_close_send_encoders)
{
    uint8_t buf[64];
    size_t n = kd_tun_message_size(5);
    cr_assert_eq((size_t)(kd_tun_put_message(buf, (const uint8_t *)"hello", 5) - buf), n);
    const uint8_t want[] = {0x12, 0x07, 0x0a, 0x05, 'h', 'e', 'l', 'l', 'o'};
    cr_assert_eq(n, sizeof(want));
    cr_assert_eq(memcmp(buf, want, n), 0);
    cr_assert_eq((size_t)(kd_tun_put_close_send(buf) - buf), kd_tun_close_send_size());
    cr_assert_eq(buf[0], 0x1a);
    cr_assert_eq(buf[1], 0x00);
}

Test(tunnel, order_automaton)
{
    const char *why;
    cr_assert_eq(kd_tun_step(KD_TUN_WAIT_DESCRIPTOR, KD_TUN_DESCRIPTOR, &why), KD_TUN_IDLE);
    cr_assert_eq(kd_tun_step(KD_TUN_WAIT_DESCRIPTOR, KD_TUN_MESSAGE, &why), -EPROTO);
    cr_assert_eq(kd_tun_step(KD_TUN_WAIT_DESCRIPTOR, KD_TUN_ERROR, &why), -EPROTO);
    cr_assert_eq(kd_tun_step(KD_TUN_IDLE, KD_TUN_HEADER, &why), -EPROTO, "no call bound");
    cr_assert_eq(kd_tun_step(KD_TUN_IDLE, KD_TUN_DESCRIPTOR, &why), -EPROTO);
    cr_assert_eq(kd_tun_step(KD_TUN_IDLE, KD_TUN_ERROR, &why), KD_TUN_DONE);
    cr_assert_eq(kd_tun_step(KD_TUN_BOUND, KD_TUN_MESSAGE, &why), -EPROTO, "header first");
    cr_assert_eq(kd_tun_step(KD_TUN_BOUND, KD_TUN_TRAILER, &why), -EPROTO);
    cr_assert_eq(kd_tun_step(KD_TUN_BOUND, KD_TUN_HEADER, &why), KD_TUN_RESPONDING);
    cr_assert_eq(kd_tun_step(KD_TUN_BOUND, KD_TUN_ERROR, &why), KD_TUN_DONE);
    cr_assert_eq(kd_tun_step(KD_TUN_RESPONDING, KD_TUN_MESSAGE, &why), KD_TUN_RESPONDING);
    cr_assert_eq(kd_tun_step(KD_TUN_RESPONDING, KD_TUN_HEADER, &why), -EPROTO, "header twice");
    cr_assert_eq(kd_tun_step(KD_TUN_RESPONDING, KD_TUN_TRAILER, &why), KD_TUN_DONE);
    cr_assert_eq(kd_tun_step(KD_TUN_RESPONDING, KD_TUN_ERROR, &why), KD_TUN_DONE);
    for (int k = KD_TUN_DESCRIPTOR; k <= KD_TUN_ERROR; k++)
        cr_assert_eq(kd_tun_step(KD_TUN_DONE, (enum kd_tun_kind)k, &why), -EPROTO);
    cr_assert_not_null(why);
}

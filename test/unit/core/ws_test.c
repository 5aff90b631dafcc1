/* ws_test.c — the WebSocket upgrade check (RFC 6455's sample key, every refusal), the head reader
 * in every split, the frame decoder in every split (masking, fragmentation, control frames, close,
 * limits, protocol errors) and the encoder, round-tripped through the decoder. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/ws.h"

/* ---- upgrade ---------------------------------------------------------------------------------- */

#define SAMPLE_KEY    "dGhlIHNhbXBsZSBub25jZQ=="
#define SAMPLE_ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

static const char good_head[] = "GET /-/kubernetes-agent/ HTTP/1.1\r\n"
                                "Host: kas.example.com\r\n"
                                "User-Agent: gitlab-agent/v17.0.0/abc\r\n"
                                "Connection: Upgrade\r\n"
                                "Upgrade: websocket\r\n"
                                "Sec-WebSocket-Version: 13\r\n"
                                "Sec-WebSocket-Key: " SAMPLE_KEY "\r\n"
                                "Sec-WebSocket-Protocol: ws-tunnel\r\n"
                                "\r\n";

static int check(const char *head, const char **reason)
{
    char accept[KD_WS_ACCEPT_LEN + 1] = "";
    return kd_ws_upgrade_check(head, strlen(head), accept, reason);
}

Test(ws_upgrade, rfc6455_sample_key)
{
    char out[KD_WS_ACCEPT_LEN + 1];
    kd_ws_accept_key(SAMPLE_KEY, strlen(SAMPLE_KEY), out);
    cr_assert_str_eq(out, SAMPLE_ACCEPT, "RFC 6455 1.3's example");
}

Test(ws_upgrade, accepts_agentk_request)
{
    char accept[KD_WS_ACCEPT_LEN + 1] = "";
    const char *why = "unset";
    cr_assert_eq(kd_ws_upgrade_check(good_head, strlen(good_head), accept, &why), 101);
    cr_assert_str_eq(accept, SAMPLE_ACCEPT);
    cr_assert_null(why);
}

Test(ws_upgrade, token_lists_and_case)
{
    const char *why;
    const char *h = "GET / HTTP/1.1\r\n"
                    "host: x\r\n"
                    "connection: keep-alive, UPGRADE\r\n"
                    "UPGRADE: h2c , WebSocket\r\n"
                    "sec-websocket-version:13\r\n"
                    "sec-websocket-key:\t" SAMPLE_KEY " \r\n"
                    "Sec-WebSocket-Protocol: chat\r\n"
                    "Sec-WebSocket-Protocol: other, ws-tunnel\r\n"
                    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                    "\r\n";
    cr_assert_eq(check(h, &why), 101, "%s", why ? why : "");
}

struct refusal {
    const char *head;
    int status;
    const char *reason_part;
};

#define STD_REST                                                                                             \
    "Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"                  \
    "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n"

Test(ws_upgrade, refusals)
{
    static const struct refusal r[] = {
        {"POST / HTTP/1.1\r\n" STD_REST, 400, "method must be GET"},
        {"get / HTTP/1.1\r\n" STD_REST, 400, "method must be GET"},
        {"GET / HTTP/1.0\r\n" STD_REST, 400, "HTTP/1.1"},
        {"GET /  HTTP/1.1\r\n" STD_REST, 400, "request line"},
        {"GET HTTP/1.1\r\n" STD_REST, 400, "request line"},
        {"GET / HTTP/1.1\n" STD_REST, 400, "request line"},
        {"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Host"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Upgrade header"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websockets\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Upgrade header"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nUpgrade: "
         "websocket\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Connection header"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "8\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         426, "Version must be 13"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         426, "Version must be 13"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Version: 12\r\nSec-WebSocket-Key: " SAMPLE_KEY
         "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         426, "Version must be 13"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Key must be base64 of 16 bytes"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Key must be base64 of 16 bytes"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Key must be base64 of 16 bytes"}, /* padding bits set */
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "Key must be base64 of 16 bytes"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Key: " SAMPLE_KEY
         "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
         400, "more than one"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\n\r\n",
         400, "Protocol must offer ws-tunnel"},
        {"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: "
         "13\r\n"
         "Sec-WebSocket-Key: " SAMPLE_KEY "\r\nSec-WebSocket-Protocol: WS-TUNNEL, ws-tunnel2\r\n\r\n",
         400, "Protocol must offer ws-tunnel"},
        {"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n" STD_REST, 400, "folded"},
        {"GET / HTTP/1.1\r\nHost : x\r\n" STD_REST, 400, "header name"},
        {"GET / HTTP/1.1\r\nNoColon\r\n" STD_REST, 400, "header line"},
        {"GET / HTTP/1.1\r\nX-A: a\001b\r\n" STD_REST, 400, "control character"},
    };
    for (size_t i = 0; i < sizeof(r) / sizeof(r[0]); i++) {
        const char *why = NULL;
        int st = check(r[i].head, &why);
        cr_expect_eq(st, r[i].status, "case %zu: status %d, want %d (%s)", i, st, r[i].status,
                     why ? why : "");
        cr_expect(why != NULL && strstr(why, r[i].reason_part) != NULL, "case %zu: reason '%s' lacks '%s'", i,
                  why ? why : "(null)", r[i].reason_part);
    }
}

/* The head reader in every 2-way split and byte by byte; the answer it leaves. */
Test(ws_handshake, every_split)
{
    size_t n = strlen(good_head);
    const char tail[] = "\x82\x80"; /* the start of a frame right after the head */
    uint8_t buf[1024];
    memcpy(buf, good_head, n);
    memcpy(buf + n, tail, 2);
    for (size_t cut = 0; cut <= n + 2; cut++) {
        struct kd_ws_handshake *h = kd_ws_handshake_new(0);
        cr_assert_not_null(h);
        size_t used = 0, total = 0;
        int st = kd_ws_handshake_feed(h, buf, cut, &used);
        total += used;
        if (st == 0) {
            cr_assert_eq(used, cut);
            st = kd_ws_handshake_feed(h, buf + cut, n + 2 - cut, &used);
            total += used;
        }
        cr_assert_eq(st, 101, "cut %zu", cut);
        cr_assert_eq(total, n, "cut %zu: the head is %zu bytes, %zu taken", cut, n, total);
        cr_assert(strstr(h->resp, "HTTP/1.1 101 Switching Protocols\r\n") == h->resp);
        cr_assert(strstr(h->resp, "\r\nSec-WebSocket-Accept: " SAMPLE_ACCEPT "\r\n") != NULL);
        cr_assert(strstr(h->resp, "\r\nSec-WebSocket-Protocol: ws-tunnel\r\n") != NULL);
        cr_assert(strstr(h->resp, "Extensions") == NULL, "nothing negotiated");
        cr_assert_eq(h->resp_len, strlen(h->resp));
        cr_assert_eq(kd_ws_handshake_feed(h, buf, 5, &used), 101);
        cr_assert_eq(used, 0, "after the decision nothing more is taken");
        kd_ws_handshake_free(h);
    }
    struct kd_ws_handshake *h = kd_ws_handshake_new(0);
    size_t used;
    for (size_t i = 0; i < n - 1; i++)
        cr_assert_eq(kd_ws_handshake_feed(h, buf + i, 1, &used), 0, "byte %zu", i);
    cr_assert_eq(kd_ws_handshake_feed(h, buf + n - 1, 3, &used), 101);
    cr_assert_eq(used, 1);
    kd_ws_handshake_free(h);
}

Test(ws_handshake, error_answers)
{
    struct kd_ws_handshake *h = kd_ws_handshake_new(0);
    const char *bad = "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                      "Sec-WebSocket-Version: 7\r\nSec-WebSocket-Key: " SAMPLE_KEY "\r\n\r\n";
    size_t used;
    cr_assert_eq(kd_ws_handshake_feed(h, (const uint8_t *)bad, strlen(bad), &used), 426);
    cr_assert(strstr(h->resp, "HTTP/1.1 426 Upgrade Required\r\n") == h->resp, "%s", h->resp);
    cr_assert(strstr(h->resp, "\r\nSec-WebSocket-Version: 13\r\n") != NULL);
    cr_assert(strstr(h->resp, "\r\nConnection: close\r\n") != NULL);
    cr_assert(strstr(h->resp, "\r\n\r\nSec-WebSocket-Version must be 13\n") != NULL, "%s", h->resp);
    kd_ws_handshake_free(h);

    h = kd_ws_handshake_new(0);
    const char *noproto = "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                          "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " SAMPLE_KEY "\r\n\r\n";
    cr_assert_eq(kd_ws_handshake_feed(h, (const uint8_t *)noproto, strlen(noproto), &used), 400);
    cr_assert(strstr(h->resp, "HTTP/1.1 400 Bad Request\r\n") == h->resp);
    const char *body = strstr(h->resp, "\r\n\r\n") + 4;
    char cl[64];
    snprintf(cl, sizeof(cl), "Content-Length: %zu\r\n", strlen(body));
    cr_assert(strstr(h->resp, cl) != NULL, "%s", h->resp);
    cr_assert_str_eq(body, "Sec-WebSocket-Protocol must offer ws-tunnel\n");
    kd_ws_handshake_free(h);
}

Test(ws_handshake, head_limit)
{
    struct kd_ws_handshake *h = kd_ws_handshake_new(64);
    uint8_t junk[100];
    memset(junk, 'a', sizeof(junk));
    size_t used;
    cr_assert_eq(kd_ws_handshake_feed(h, junk, 40, &used), 0);
    cr_assert_eq(kd_ws_handshake_feed(h, junk, 40, &used), 431);
    cr_assert_eq(used, 24);
    cr_assert(strstr(h->resp, "HTTP/1.1 431 ") == h->resp);
    kd_ws_handshake_free(h);
    /* exactly at the limit is still fine */
    size_t n = strlen(good_head);
    h = kd_ws_handshake_new(n);
    cr_assert_eq(kd_ws_handshake_feed(h, (const uint8_t *)good_head, n, &used), 101);
    kd_ws_handshake_free(h);
}

/* ---- decoder ---------------------------------------------------------------------------------- */

struct sink {
    uint8_t data[1 << 17];
    size_t len;
    unsigned pings;
    uint8_t ping[125];
    size_t ping_len;
    int fail_data; /* return this from on_data */
};

static int sink_data(void *ud, const uint8_t *data, size_t len)
{
    struct sink *s = ud;
    cr_assert_leq(s->len + len, sizeof(s->data));
    memcpy(s->data + s->len, data, len);
    s->len += len;
    return s->fail_data;
}

static int sink_ping(void *ud, const uint8_t *p, size_t len)
{
    struct sink *s = ud;
    s->pings++;
    memcpy(s->ping, p, len);
    s->ping_len = len;
    return 0;
}

static const struct kd_ws_events sink_ev = {.on_data = sink_data, .on_ping = sink_ping};

/* A client frame: masked with `mask` unless mask is NULL. Returns its size. */
static size_t cframe(uint8_t *out, uint8_t b0, const uint8_t *mask, const void *payload, size_t len)
{
    size_t h = kd_ws_frame_header(out, KD_WS_OP_CONT, false, len); /* length bytes */
    out[0] = b0;
    if (mask != NULL) {
        out[1] |= 0x80;
        memcpy(out + h, mask, 4);
        h += 4;
    }
    const uint8_t *p = payload;
    for (size_t i = 0; i < len; i++)
        out[h + i] = mask ? (uint8_t)(p[i] ^ mask[i & 3]) : p[i];
    return h + len;
}

static const uint8_t m1[4] = {0x37, 0xfa, 0x21, 0x3d};
static const uint8_t m2[4] = {0x01, 0x80, 0xff, 0x5a};

/* Decode buf whole, then in every 2-way and 3-way split, and byte by byte; every run must give
 * the same bytes, pings and ending. */
static void decode_all_splits(const uint8_t *buf, size_t n, uint64_t max, const uint8_t *want,
                              size_t want_len, unsigned want_pings, int want_rc, uint16_t want_code)
{
    struct sink *s = calloc(1, sizeof(*s));
    struct kd_ws_decoder d;
    /* Small inputs: every split. Large ones: every split in the first 16 bytes (the header),
     * then about a hundred points spread over the rest. */
    size_t step = n > 300 ? n / 97 + 1 : 1;
    for (size_t a = 0; a <= n; a += a < 16 ? 1 : step) {
        for (size_t b = a; b <= n; b += b < a + 16 ? 1 : step) {
            memset(s, 0, sizeof(*s));
            kd_ws_decoder_init(&d, max);
            int rc = kd_ws_decode(&d, buf, a, &sink_ev, s);
            if (rc == 0)
                rc = kd_ws_decode(&d, buf + a, b - a, &sink_ev, s);
            if (rc == 0)
                rc = kd_ws_decode(&d, buf + b, n - b, &sink_ev, s);
            cr_assert_eq(rc, want_rc, "split %zu/%zu: rc %d want %d (%s)", a, b, rc, want_rc,
                         d.close_why ? d.close_why : "");
            cr_assert_eq(s->len, want_len, "split %zu/%zu: %zu bytes, want %zu", a, b, s->len, want_len);
            cr_assert(want_len == 0 || memcmp(s->data, want, want_len) == 0, "split %zu/%zu: bytes differ", a,
                      b);
            cr_assert_eq(s->pings, want_pings, "split %zu/%zu", a, b);
            if (want_rc == 1)
                cr_assert_eq(d.close_code, want_code, "split %zu/%zu: code %u want %u", a, b, d.close_code,
                             want_code);
        }
    }
    memset(s, 0, sizeof(*s));
    kd_ws_decoder_init(&d, max);
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = kd_ws_decode(&d, buf + i, 1, &sink_ev, s);
    cr_assert_eq(rc, want_rc);
    cr_assert_eq(s->len, want_len);
    cr_assert(want_len == 0 || memcmp(s->data, want, want_len) == 0);
    free(s);
}

Test(ws_decode, binary_frames_every_split)
{
    uint8_t buf[70000], want[70000];
    size_t n = 0, wl = 0;
    const char *a = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    n += cframe(buf + n, 0x82, m1, a, strlen(a));
    memcpy(want + wl, a, strlen(a)), wl += strlen(a);
    n += cframe(buf + n, 0x82, m2, "", 0); /* empty message */
    uint8_t mid[300];                      /* 16-bit length */
    for (size_t i = 0; i < sizeof(mid); i++)
        mid[i] = (uint8_t)(i * 7);
    n += cframe(buf + n, 0x82, m2, mid, sizeof(mid));
    memcpy(want + wl, mid, sizeof(mid)), wl += sizeof(mid);
    decode_all_splits(buf, n, 0, want, wl, 0, 0, 0);
}

Test(ws_decode, long_length_and_masking)
{
    static uint8_t buf[70100], want[70000];
    for (size_t i = 0; i < sizeof(want); i++)
        want[i] = (uint8_t)(i ^ (i >> 8));
    size_t n = cframe(buf, 0x82, m1, want, sizeof(want)); /* 64-bit length */
    cr_assert_eq(buf[1], 0x80 | 127);
    decode_all_splits(buf, n, 0, want, sizeof(want), 0, 0, 0);
}

Test(ws_decode, fragmentation_with_interleaved_ping)
{
    uint8_t buf[512];
    size_t n = 0;
    n += cframe(buf + n, 0x02, m1, "abc", 3);   /* binary, not fin */
    n += cframe(buf + n, 0x89, m2, "hello", 5); /* ping between fragments */
    n += cframe(buf + n, 0x00, m1, "defg", 4);  /* continuation */
    n += cframe(buf + n, 0x8a, m2, "x", 1);     /* pong: ignored */
    n += cframe(buf + n, 0x80, m2, "h", 1);     /* final continuation */
    n += cframe(buf + n, 0x82, m1, "ij", 2);    /* a new message */
    decode_all_splits(buf, n, 0, (const uint8_t *)"abcdefghij", 10, 1, 0, 0);

    struct sink *s = calloc(1, sizeof(*s));
    struct kd_ws_decoder d;
    kd_ws_decoder_init(&d, 0);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 0);
    cr_assert_eq(s->ping_len, 5);
    cr_assert(memcmp(s->ping, "hello", 5) == 0, "the ping payload, unmasked, to echo");
    free(s);
}

Test(ws_decode, ping_max_payload)
{
    uint8_t p[126], buf[200];
    memset(p, 0xa5, sizeof(p));
    size_t n = cframe(buf, 0x89, m1, p, 125);
    decode_all_splits(buf, n, 0, NULL, 0, 1, 0, 0);
    n = cframe(buf, 0x89, m1, p, 126); /* 126 needs the 16-bit form: too long for control */
    decode_all_splits(buf, n, 0, NULL, 0, 0, 1, KD_WS_CLOSE_PROTOCOL);
}

Test(ws_decode, close_from_peer)
{
    uint8_t buf[64];
    size_t n = cframe(buf, 0x82, m1, "ab", 2);
    uint8_t cl[] = {0x03, 0xe8, 'b', 'y', 'e'};
    n += cframe(buf + n, 0x88, m2, cl, sizeof(cl));
    n += cframe(buf + n, 0x82, m1, "zz", 2); /* after the close: ignored */
    decode_all_splits(buf, n, 0, (const uint8_t *)"ab", 2, 0, 1, 1000);
    struct kd_ws_decoder d;
    struct sink *s = calloc(1, sizeof(*s));
    kd_ws_decoder_init(&d, 0);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 1);
    cr_assert(d.peer_closed);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 1, "done stays done");
    cr_assert_eq(s->len, 2);

    /* no status: an empty close back */
    n = cframe(buf, 0x88, m1, "", 0);
    decode_all_splits(buf, n, 0, NULL, 0, 0, 1, 0);
    /* 1-byte payload, and a code never sent on the wire */
    n = cframe(buf, 0x88, m1, "\x03", 1);
    decode_all_splits(buf, n, 0, NULL, 0, 0, 1, KD_WS_CLOSE_PROTOCOL);
    uint8_t c1005[] = {0x03, 0xed};
    n = cframe(buf, 0x88, m1, c1005, 2);
    decode_all_splits(buf, n, 0, NULL, 0, 0, 1, KD_WS_CLOSE_PROTOCOL);
    uint8_t c4000[] = {0x0f, 0xa0};
    n = cframe(buf, 0x88, m1, c4000, 2);
    decode_all_splits(buf, n, 0, NULL, 0, 0, 1, 4000);
    free(s);
}

Test(ws_decode, protocol_errors)
{
    struct {
        uint8_t b0;
        bool masked;
        const char *payload;
        uint16_t code;
        const char *why;
    } c[] = {
        {0x82, false, "ab", KD_WS_CLOSE_PROTOCOL, "not masked"},
        {0x81, true, "ab", KD_WS_CLOSE_UNSUPPORTED, "text"},
        {0xc2, true, "ab", KD_WS_CLOSE_PROTOCOL, "reserved"}, /* RSV1: permessage-deflate not negotiated */
        {0xa2, true, "ab", KD_WS_CLOSE_PROTOCOL, "reserved"},
        {0x92, true, "ab", KD_WS_CLOSE_PROTOCOL, "reserved"},
        {0x83, true, "ab", KD_WS_CLOSE_PROTOCOL, "opcode"},
        {0x87, true, "ab", KD_WS_CLOSE_PROTOCOL, "opcode"},
        {0x8b, true, "ab", KD_WS_CLOSE_PROTOCOL, "opcode"},
        {0x8f, true, "ab", KD_WS_CLOSE_PROTOCOL, "opcode"},
        {0x09, true, "ab", KD_WS_CLOSE_PROTOCOL, "fragmented control"},
        {0x80, true, "ab", KD_WS_CLOSE_PROTOCOL, "continuation"},
    };
    uint8_t lead[16];
    size_t ln = cframe(lead, 0x82, m1, "ok", 2);
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
        uint8_t buf[64];
        memcpy(buf, lead, ln);
        size_t n =
            ln + cframe(buf + ln, c[i].b0, c[i].masked ? m2 : NULL, c[i].payload, strlen(c[i].payload));
        decode_all_splits(buf, n, 0, (const uint8_t *)"ok", 2, 0, 1, c[i].code);
        struct kd_ws_decoder d;
        struct sink *s = calloc(1, sizeof(*s));
        kd_ws_decoder_init(&d, 0);
        cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 1);
        cr_assert(!d.peer_closed);
        cr_assert(d.close_why != NULL && strstr(d.close_why, c[i].why) != NULL, "case %zu: '%s'", i,
                  d.close_why ? d.close_why : "");
        free(s);
    }
    /* a new binary message while a fragmented one is open */
    uint8_t buf[64];
    size_t n = cframe(buf, 0x02, m1, "ab", 2);
    n += cframe(buf + n, 0x82, m2, "cd", 2);
    decode_all_splits(buf, n, 0, (const uint8_t *)"ab", 2, 0, 1, KD_WS_CLOSE_PROTOCOL);
}

Test(ws_decode, top_bit_length)
{
    uint8_t buf[16] = {0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4};
    decode_all_splits(buf, 14, 0, NULL, 0, 0, 1, KD_WS_CLOSE_PROTOCOL);
    struct kd_ws_decoder d;
    struct sink *s = calloc(1, sizeof(*s));
    kd_ws_decoder_init(&d, 0);
    cr_assert_eq(kd_ws_decode(&d, buf, 14, &sink_ev, s), 1);
    cr_assert(strstr(d.close_why, "most significant bit") != NULL);
    /* 2^62 without the top bit: a length, far over the limit */
    buf[2] = 0x40;
    decode_all_splits(buf, 14, 0, NULL, 0, 0, 1, KD_WS_CLOSE_TOO_BIG);
    free(s);
}

Test(ws_decode, message_limit_across_fragments)
{
    uint8_t buf[256];
    uint8_t p[80];
    memset(p, 'q', sizeof(p));
    /* limit 100: 40 + 40 fits, a third fragment does not */
    size_t n = cframe(buf, 0x02, m1, p, 40);
    n += cframe(buf + n, 0x00, m2, p, 40);
    size_t ok = n;
    n += cframe(buf + n, 0x80, m1, p, 40);
    decode_all_splits(buf, n, 100, p, 80, 0, 1, KD_WS_CLOSE_TOO_BIG);
    /* once the message ends, the count starts again */
    n = ok;
    n += cframe(buf + n, 0x80, m1, p, 20);
    n += cframe(buf + n, 0x82, m2, p, 40);
    n += cframe(buf + n, 0x82, m2, p, 40);
    struct kd_ws_decoder d;
    struct sink *s = calloc(1, sizeof(*s));
    kd_ws_decoder_init(&d, 100);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 0, "%s", d.close_why ? d.close_why : "");
    cr_assert_eq(s->len, 180);
    /* exactly at the limit */
    kd_ws_decoder_init(&d, 40);
    n = cframe(buf, 0x82, m1, p, 40);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 0);
    n = cframe(buf, 0x82, m1, p, 41);
    kd_ws_decoder_init(&d, 40);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), 1);
    cr_assert_eq(d.close_code, KD_WS_CLOSE_TOO_BIG);
    /* the default limit is agentk's 10 MiB */
    kd_ws_decoder_init(&d, 0);
    cr_assert_eq(d.max_message, 10u << 20);
    free(s);
}

Test(ws_decode, callback_error_stops)
{
    uint8_t buf[64];
    size_t n = cframe(buf, 0x82, m1, "abcd", 4);
    struct kd_ws_decoder d;
    struct sink *s = calloc(1, sizeof(*s));
    s->fail_data = -12;
    kd_ws_decoder_init(&d, 0);
    cr_assert_eq(kd_ws_decode(&d, buf, n, &sink_ev, s), -12);
    free(s);
}

/* ---- encoder ---------------------------------------------------------------------------------- */

Test(ws_encode, header_sizes)
{
    uint8_t h[KD_WS_FRAME_HDR_MAX];
    cr_assert_eq(kd_ws_frame_header(h, KD_WS_OP_BINARY, true, 0), 2);
    cr_assert_eq(h[0], 0x82);
    cr_assert_eq(h[1], 0);
    cr_assert_eq(kd_ws_frame_header(h, KD_WS_OP_BINARY, true, 125), 2);
    cr_assert_eq(h[1], 125);
    cr_assert_eq(kd_ws_frame_header(h, KD_WS_OP_BINARY, false, 126), 4);
    cr_assert_eq(h[0], 0x02);
    cr_assert(h[1] == 126 && h[2] == 0 && h[3] == 126);
    cr_assert_eq(kd_ws_frame_header(h, KD_WS_OP_BINARY, true, 65535), 4);
    cr_assert_eq(kd_ws_frame_header(h, KD_WS_OP_BINARY, true, 65536), 10);
    cr_assert(h[1] == 127 && h[7] == 1 && h[8] == 0 && h[9] == 0);
}

/* Server frames are unmasked; a client would mask them. Re-mask what the encoder made and run it
 * through the decoder: the bytes come back. */
static size_t remask(const uint8_t *in, size_t n, uint8_t *out, const uint8_t *mask)
{
    size_t h = (in[1] & 0x7f) == 126 ? 4 : (in[1] & 0x7f) == 127 ? 10 : 2;
    cr_assert_eq(in[1] & 0x80, 0, "server frames carry no mask");
    memcpy(out, in, h);
    out[1] |= 0x80;
    memcpy(out + h, mask, 4);
    for (size_t i = h; i < n; i++)
        out[i + 4] = (uint8_t)(in[i] ^ mask[(i - h) & 3]);
    return n + 4;
}

Test(ws_encode, round_trip)
{
    static uint8_t payload[70000], frame[70020], masked[70030];
    for (size_t i = 0; i < sizeof(payload); i++)
        payload[i] = (uint8_t)(i * 31);
    size_t sizes[] = {0, 1, 125, 126, 65535, 65536, 70000};
    for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
        size_t h = kd_ws_frame_header(frame, KD_WS_OP_BINARY, true, sizes[k]);
        memcpy(frame + h, payload, sizes[k]);
        size_t n = remask(frame, h + sizes[k], masked, m1);
        struct kd_ws_decoder d;
        struct sink *s = calloc(1, sizeof(*s));
        kd_ws_decoder_init(&d, 0);
        cr_assert_eq(kd_ws_decode(&d, masked, n, &sink_ev, s), 0);
        cr_assert_eq(s->len, sizes[k]);
        cr_assert(memcmp(s->data, payload, sizes[k]) == 0);
        free(s);
    }
    /* close frames: code and reason, cut to a control frame's 125 bytes */
    uint8_t cf[KD_WS_CLOSE_FRAME_MAX];
    size_t n = kd_ws_close_frame(cf, 1002, "client frame not masked");
    cr_assert_eq(n, 2 + 2 + 23);
    cr_assert(cf[0] == 0x88 && cf[1] == 25 && cf[2] == 0x03 && cf[3] == 0xea);
    cr_assert(memcmp(cf + 4, "client frame not masked", 23) == 0);
    char longr[300];
    memset(longr, 'r', sizeof(longr) - 1);
    longr[sizeof(longr) - 1] = '\0';
    cr_assert_eq(kd_ws_close_frame(cf, 1009, longr), 2 + 125);
    cr_assert_eq(cf[1], 125);
    cr_assert_eq(kd_ws_close_frame(cf, 0, "x"), 2);
    cr_assert(cf[0] == 0x88 && cf[1] == 0);
    uint8_t m[KD_WS_CLOSE_FRAME_MAX + 4];
    n = remask(cf, kd_ws_close_frame(cf, 1000, "bye"), m, m2);
    struct kd_ws_decoder d;
    kd_ws_decoder_init(&d, 0);
    cr_assert_eq(kd_ws_decode(&d, m, n, &sink_ev, NULL), 1);
    cr_assert(d.peer_closed);
    cr_assert_eq(d.close_code, 1000);
}

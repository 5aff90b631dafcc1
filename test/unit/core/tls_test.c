/* tls_test.c — unit tests for core/tls.h, whichever backend the binary is linked with (meson builds
 * it once per backend). A client and a server kd_tls talk in memory: the pump moves each side's
 * output into the other and reads both until nothing moves. Certificates come from the test PKI in
 * test/certs (KD_TEST_CERTS, default "test/certs" relative to the working directory).
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/tls.h"

TestSuite(tls, .timeout = 60);

/* ---- fixtures --------------------------------------------------------------------------------- */

static char path_buf[8][512];
static int path_next;

/* A path in the test PKI; the ring of buffers lets one call use several. */
static const char *cert(const char *name)
{
    const char *dir = getenv("KD_TEST_CERTS");
    if (dir == NULL || dir[0] == 0)
        dir = "test/certs";
    char *p = path_buf[path_next++ % 8];
    snprintf(p, sizeof(path_buf[0]), "%s/%s", dir, name);
    return p;
}

static struct kd_tls_ctx *make_ctx(const struct kd_tls_ctx_opts *o)
{
    char err[512] = "";
    struct kd_tls_ctx *ctx = NULL;
    int rc = kd_tls_ctx_create(o, &ctx, err, sizeof(err));
    cr_assert_eq(rc, 0, "kd_tls_ctx_create: %d %s", rc, err);
    cr_assert_not_null(ctx);
    return ctx;
}

static struct kd_tls_ctx_opts server_opts(void)
{
    return (struct kd_tls_ctx_opts){
        .server = true, .cert_file = cert("server.pem"), .key_file = cert("server.key"), .alpn = "h2"};
}

static struct kd_tls_ctx_opts client_opts(void)
{
    return (struct kd_tls_ctx_opts){.server = false, .ca_file = cert("ca.pem"), .alpn = "h2"};
}

/* One side of a conversation: its kd_tls, the plaintext it has read, and its first error. */
struct peer {
    struct kd_tls *t;
    uint8_t *rx;
    size_t rxlen, rxcap;
    ssize_t err;
};

static void peer_free(struct peer *p)
{
    kd_tls_free(p->t);
    free(p->rx);
    memset(p, 0, sizeof(*p));
}

static void drain_read(struct peer *p)
{
    uint8_t buf[7000]; /* not a record multiple, so reads end mid-record */
    while (p->err == 0) {
        ssize_t n = kd_tls_read(p->t, buf, sizeof(buf));
        if (n == 0)
            return;
        if (n < 0) {
            p->err = n;
            return;
        }
        if (p->rxlen + (size_t)n > p->rxcap) {
            p->rxcap = (p->rxlen + (size_t)n) * 2;
            p->rx = realloc(p->rx, p->rxcap);
            cr_assert_not_null(p->rx);
        }
        memcpy(p->rx + p->rxlen, buf, (size_t)n);
        p->rxlen += (size_t)n;
    }
}

/* Moves all of from's output into to, in odd-sized pieces to exercise partial records. */
static bool move(struct peer *from, struct peer *to)
{
    uint8_t buf[5000];
    bool moved = false;
    while (kd_tls_output_pending(from->t) > 0) {
        size_t n = kd_tls_take_output(from->t, buf, sizeof(buf));
        cr_assert_gt(n, 0);
        cr_assert_eq(kd_tls_feed(to->t, buf, n), 0);
        moved = true;
    }
    return moved;
}

/* Until nothing moves: bytes keep flowing after an error so alerts reach the other side. */
static void pump(struct peer *c, struct peer *s)
{
    for (int i = 0; i < 100000; i++) {
        bool moved = move(c, s);
        drain_read(s);
        moved |= move(s, c);
        drain_read(c);
        if (!moved)
            return;
    }
    cr_assert_fail("pump did not settle");
}

static void start(struct peer *c, struct peer *s, struct kd_tls_ctx *cctx, struct kd_tls_ctx *sctx,
                  const char *name)
{
    memset(c, 0, sizeof(*c));
    memset(s, 0, sizeof(*s));
    c->t = kd_tls_new(cctx, name);
    s->t = kd_tls_new(sctx, NULL);
    cr_assert_not_null(c->t);
    cr_assert_not_null(s->t);
    cr_assert_not(kd_tls_handshake_done(c->t));
    cr_assert_null(kd_tls_version(c->t));
    cr_assert_eq(kd_tls_connect(c->t), 0, "connect: %s", kd_tls_error(c->t));
    cr_assert_gt(kd_tls_output_pending(c->t), 0, "the ClientHello is waiting");
    pump(c, s);
}

static void assert_established(struct peer *c, struct peer *s, const char *version)
{
    cr_assert_eq(c->err, 0, "client: %zd %s", c->err, kd_tls_error(c->t));
    cr_assert_eq(s->err, 0, "server: %zd %s", s->err, kd_tls_error(s->t));
    cr_assert(kd_tls_handshake_done(c->t));
    cr_assert(kd_tls_handshake_done(s->t));
    cr_assert_str_eq(kd_tls_version(c->t), version);
    cr_assert_str_eq(kd_tls_version(s->t), version);
    cr_assert_str_eq(kd_tls_error(c->t), "");
}

/* Handshake with the given versions (0: default) and return established peers. */
static void connect_pair(struct peer *c, struct peer *s, struct kd_tls_ctx **cctx, struct kd_tls_ctx **sctx,
                         unsigned client_max)
{
    struct kd_tls_ctx_opts so = server_opts();
    struct kd_tls_ctx_opts co = client_opts();
    co.max_version = client_max;
    *sctx = make_ctx(&so);
    *cctx = make_ctx(&co);
    start(c, s, *cctx, *sctx, "localhost");
    assert_established(c, s, client_max == 12 ? "TLSv1.2" : "TLSv1.3");
}

static void teardown_pair(struct peer *c, struct peer *s, struct kd_tls_ctx *cctx, struct kd_tls_ctx *sctx)
{
    peer_free(c);
    peer_free(s);
    kd_tls_ctx_destroy(cctx);
    kd_tls_ctx_destroy(sctx);
}

/* Logs the text too (criterion --verbose shows it): the wording is part of what is reviewed. */
static bool contains(const char *hay, const char *needle)
{
    cr_log_info("[%s] %s", kd_tls_backend(), hay ? hay : "(null)");
    return hay != NULL && strstr(hay, needle) != NULL;
}

/* ---- handshakes ------------------------------------------------------------------------------- */

Test(tls, backend_name)
{
    const char *b = kd_tls_backend();
    cr_assert(strcmp(b, "wolfssl") == 0 || strcmp(b, "openssl") == 0, "backend %s", b);
}

static void handshake(unsigned client_max, const char *version)
{
    struct peer c, s;
    struct kd_tls_ctx *cctx, *sctx;
    connect_pair(&c, &s, &cctx, &sctx, client_max);
    cr_assert_str_eq(kd_tls_version(c.t), version);
    cr_assert_str_eq(kd_tls_alpn(c.t), "h2");
    cr_assert_str_eq(kd_tls_alpn(s.t), "h2");
    cr_assert_eq(kd_tls_output_pending(c.t), 0);
    cr_assert_eq(kd_tls_output_pending(s.t), 0);
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, handshake_tls13)
{
    handshake(0, "TLSv1.3");
}

Test(tls, handshake_tls12)
{
    handshake(12, "TLSv1.2");
}

Test(tls, server_min_13_refuses_tls12_client)
{
    struct kd_tls_ctx_opts so = server_opts();
    so.min_version = 13;
    struct kd_tls_ctx_opts co = client_opts();
    co.max_version = 12;
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "localhost");
    cr_assert_eq(s.err, -EPROTO);
    cr_assert_eq(c.err, -EPROTO);
    cr_assert(contains(kd_tls_error(s.t), "protocol version"), "server: %s", kd_tls_error(s.t));
    cr_assert(contains(kd_tls_error(c.t), "protocol version"), "client: %s", kd_tls_error(c.t));
    cr_assert_null(kd_tls_version(c.t));
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, ip_address_san)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "127.0.0.1");
    assert_established(&c, &s, "TLSv1.3");
    peer_free(&c);
    peer_free(&s);

    start(&c, &s, cctx, sctx, "127.0.0.2");
    cr_assert_eq(c.err, -EPROTO);
    cr_assert(contains(kd_tls_error(c.t), "certificate verify failed"), "client: %s", kd_tls_error(c.t));
    cr_assert(contains(kd_tls_error(c.t), "127.0.0.2"), "client: %s", kd_tls_error(c.t));
    teardown_pair(&c, &s, cctx, sctx);
}

/* ---- ALPN ------------------------------------------------------------------------------------- */

static void alpn_mismatch(unsigned client_max)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    co.alpn = "http/1.1";
    co.max_version = client_max;
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "localhost");
    cr_assert_eq(s.err, -EPROTO);
    cr_assert_eq(c.err, -EPROTO);
    cr_assert(contains(kd_tls_error(s.t), "no shared ALPN protocol"), "server: %s", kd_tls_error(s.t));
    cr_assert(contains(kd_tls_error(s.t), "h2"), "server: %s", kd_tls_error(s.t));
    cr_assert(contains(kd_tls_error(s.t), "http/1.1"), "server: %s", kd_tls_error(s.t));
    cr_assert(contains(kd_tls_error(c.t), "alert from peer"), "client: %s", kd_tls_error(c.t));
    cr_assert_not(kd_tls_handshake_done(s.t));
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, alpn_mismatch_fails_with_clear_error_tls13)
{
    alpn_mismatch(0);
}

Test(tls, alpn_mismatch_fails_with_clear_error_tls12)
{
    alpn_mismatch(12);
}

Test(tls, client_without_alpn_proceeds)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    co.alpn = NULL;
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "localhost");
    assert_established(&c, &s, "TLSv1.3");
    cr_assert_null(kd_tls_alpn(c.t));
    cr_assert_null(kd_tls_alpn(s.t), "the caller decides what no ALPN means");
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, server_without_alpn_ignores_client_alpn)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    so.alpn = NULL;
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "localhost");
    assert_established(&c, &s, "TLSv1.3");
    cr_assert_null(kd_tls_alpn(c.t));
    cr_assert_null(kd_tls_alpn(s.t));
    teardown_pair(&c, &s, cctx, sctx);
}

/* ---- data ------------------------------------------------------------------------------------- */

static uint8_t *pattern(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n ? n : 1);
    cr_assert_not_null(p);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (uint8_t)(seed >> 16);
    }
    return p;
}

/* Writes n bytes from one side in pieces of varying size, pumping now and then, and checks the
 * other side read exactly them. */
static void transfer(struct peer *from, struct peer *to, struct peer *c, struct peer *s, size_t n,
                     uint32_t seed)
{
    uint8_t *data = pattern(n, seed);
    size_t off = 0, before = to->rxlen;
    uint32_t r = seed;
    while (off < n) {
        r = r * 1664525u + 1013904223u;
        size_t piece = 1 + (r >> 8) % 40000;
        if (piece > n - off)
            piece = n - off;
        cr_assert_eq(kd_tls_write(from->t, data + off, piece), 0, "write: %s", kd_tls_error(from->t));
        off += piece;
        if ((r & 3) == 0)
            pump(c, s);
    }
    pump(c, s);
    cr_assert_eq(c->err, 0, "client: %s", kd_tls_error(c->t));
    cr_assert_eq(s->err, 0, "server: %s", kd_tls_error(s->t));
    cr_assert_eq(to->rxlen - before, n);
    cr_assert(memcmp(to->rx + before, data, n) == 0, "plaintext arrives intact");
    free(data);
}

static void data_both_ways(unsigned client_max)
{
    struct peer c, s;
    struct kd_tls_ctx *cctx, *sctx;
    connect_pair(&c, &s, &cctx, &sctx, client_max);
    static const size_t sizes[] = {1, 100 * 1000, 1000 * 1000};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        transfer(&c, &s, &c, &s, sizes[i], 7 + (uint32_t)i);
        transfer(&s, &c, &c, &s, sizes[i], 77 + (uint32_t)i);
    }
    cr_assert_eq(kd_tls_output_pending(c.t), 0);
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, data_tls13)
{
    data_both_ways(0);
}

Test(tls, data_tls12)
{
    data_both_ways(12);
}

Test(tls, writes_before_handshake_are_queued)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c = {0}, s = {0};
    c.t = kd_tls_new(cctx, "localhost");
    s.t = kd_tls_new(sctx, NULL);
    cr_assert_eq(kd_tls_write(c.t, (const uint8_t *)"early client", 12), 0);
    cr_assert_eq(kd_tls_write(s.t, (const uint8_t *)"early server", 12), 0);
    cr_assert_eq(kd_tls_output_pending(s.t), 0, "nothing leaves a server before the ClientHello");
    cr_assert_eq(kd_tls_connect(c.t), 0);
    pump(&c, &s);
    assert_established(&c, &s, "TLSv1.3");
    cr_assert_eq(s.rxlen, 12);
    cr_assert(memcmp(s.rx, "early client", 12) == 0);
    cr_assert_eq(c.rxlen, 12);
    cr_assert(memcmp(c.rx, "early server", 12) == 0);
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, one_byte_at_a_time)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c = {0}, s = {0};
    c.t = kd_tls_new(cctx, "localhost");
    s.t = kd_tls_new(sctx, NULL);
    cr_assert_eq(kd_tls_connect(c.t), 0);
    /* Every byte of the handshake fed separately: the backends must cope with partial records. */
    for (int round = 0; round < 100 && !(kd_tls_handshake_done(c.t) && kd_tls_handshake_done(s.t)); round++) {
        uint8_t b;
        while (kd_tls_take_output(c.t, &b, 1) == 1) {
            cr_assert_eq(kd_tls_feed(s.t, &b, 1), 0);
            drain_read(&s);
        }
        while (kd_tls_take_output(s.t, &b, 1) == 1) {
            cr_assert_eq(kd_tls_feed(c.t, &b, 1), 0);
            drain_read(&c);
        }
        cr_assert_eq(c.err, 0, "client: %s", kd_tls_error(c.t));
        cr_assert_eq(s.err, 0, "server: %s", kd_tls_error(s.t));
    }
    pump(&c, &s);
    assert_established(&c, &s, "TLSv1.3");
    teardown_pair(&c, &s, cctx, sctx);
}

/* ---- verification ----------------------------------------------------------------------------- */

Test(tls, hostname_mismatch_fails)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "kas.example.com");
    cr_assert_eq(c.err, -EPROTO);
    cr_assert_not(kd_tls_handshake_done(c.t));
    const char *e = kd_tls_error(c.t);
    cr_assert(contains(e, "certificate verify failed"), "client: %s", e);
    cr_assert(contains(e, "hostname mismatch"), "client: %s", e);
    cr_assert(contains(e, "kas.example.com"), "client: %s", e);
    cr_assert_eq(s.err, -EPROTO, "the server hears the alert");
    cr_assert(contains(kd_tls_error(s.t), "alert from peer"), "server: %s", kd_tls_error(s.t));
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, unknown_ca_fails)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    co.ca_file = cert("other-ca.pem");
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "localhost");
    cr_assert_eq(c.err, -EPROTO);
    const char *e = kd_tls_error(c.t);
    cr_assert(contains(e, "certificate verify failed"), "client: %s", e);
    cr_assert(contains(e, "issuer"), "client: %s", e);
    cr_assert_eq(s.err, -EPROTO);
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, insecure_skip_verify_accepts_unknown_ca)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    co.ca_file = cert("other-ca.pem");
    co.insecure_skip_verify = true;
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, NULL);
    assert_established(&c, &s, "TLSv1.3");
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, client_needs_server_name)
{
    struct kd_tls_ctx_opts co = client_opts();
    struct kd_tls_ctx *cctx = make_ctx(&co);
    errno = 0;
    cr_assert_null(kd_tls_new(cctx, NULL));
    cr_assert_eq(errno, EINVAL);
    kd_tls_ctx_destroy(cctx);
}

/* ---- mTLS ------------------------------------------------------------------------------------- */

static void mtls(unsigned client_max, const char *cert_file, const char *key_file, bool accepted)
{
    struct kd_tls_ctx_opts so = server_opts(), co = client_opts();
    so.ca_file = cert("ca.pem");
    so.require_client_cert = true;
    co.max_version = client_max;
    co.cert_file = cert_file;
    co.key_file = key_file;
    struct kd_tls_ctx *sctx = make_ctx(&so), *cctx = make_ctx(&co);
    struct peer c, s;
    start(&c, &s, cctx, sctx, "localhost");
    if (accepted) {
        assert_established(&c, &s, client_max == 12 ? "TLSv1.2" : "TLSv1.3");
        /* Data flows both ways once the server has seen the certificate. */
        transfer(&c, &s, &c, &s, 1000, 1);
        transfer(&s, &c, &c, &s, 1000, 2);
    } else {
        cr_assert_eq(s.err, -EPROTO);
        cr_assert_not(kd_tls_handshake_done(s.t));
        /* TLS 1.3 clients finish before the server judges their certificate: the alert arrives on
         * their next read, which the pump has done. */
        cr_assert_eq(c.err, -EPROTO, "client: %s", kd_tls_error(c.t));
        cr_assert(contains(kd_tls_error(c.t), "alert from peer"), "client: %s", kd_tls_error(c.t));
    }
    const char *e = kd_tls_error(s.t);
    if (!accepted && cert_file == NULL)
        cr_assert(contains(e, "did not send a certificate"), "server: %s", e);
    if (!accepted && cert_file != NULL)
        cr_assert(contains(e, "certificate verify failed"), "server: %s", e);
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, mtls_without_client_cert_rejected_tls13)
{
    mtls(0, NULL, NULL, false);
}

Test(tls, mtls_without_client_cert_rejected_tls12)
{
    mtls(12, NULL, NULL, false);
}

Test(tls, mtls_with_client_cert_accepted_tls13)
{
    mtls(0, cert("client.pem"), cert("client.key"), true);
}

Test(tls, mtls_with_client_cert_accepted_tls12)
{
    mtls(12, cert("client.pem"), cert("client.key"), true);
}

Test(tls, mtls_client_cert_from_unknown_ca_rejected)
{
    mtls(0, cert("other-client.pem"), cert("other-client.key"), false);
}

/* ---- closing and bad input -------------------------------------------------------------------- */

Test(tls, close_notify_is_connreset_after_data)
{
    struct peer c, s;
    struct kd_tls_ctx *cctx, *sctx;
    connect_pair(&c, &s, &cctx, &sctx, 0);
    cr_assert_eq(kd_tls_write(c.t, (const uint8_t *)"bye", 3), 0);
    kd_tls_shutdown(c.t);
    kd_tls_shutdown(c.t); /* idempotent */
    cr_assert_eq(kd_tls_write(c.t, (const uint8_t *)"x", 1), -EPIPE);
    pump(&c, &s);
    cr_assert_eq(s.rxlen, 3, "data before close_notify is delivered");
    cr_assert(memcmp(s.rx, "bye", 3) == 0);
    cr_assert_eq(s.err, -ECONNRESET);
    uint8_t b[16];
    cr_assert_eq(kd_tls_read(s.t, b, sizeof(b)), -ECONNRESET, "and stays so");
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, close_notify_tls12)
{
    struct peer c, s;
    struct kd_tls_ctx *cctx, *sctx;
    connect_pair(&c, &s, &cctx, &sctx, 12);
    kd_tls_shutdown(s.t);
    pump(&c, &s);
    cr_assert_eq(c.err, -ECONNRESET);
    teardown_pair(&c, &s, cctx, sctx);
}

Test(tls, garbage_before_handshake_is_eproto)
{
    struct kd_tls_ctx_opts so = server_opts();
    struct kd_tls_ctx *sctx = make_ctx(&so);
    struct kd_tls *t = kd_tls_new(sctx, NULL);
    static const char req[] = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    cr_assert_eq(kd_tls_feed(t, (const uint8_t *)req, sizeof(req) - 1), 0);
    uint8_t b[64];
    cr_assert_eq(kd_tls_read(t, b, sizeof(b)), -EPROTO);
    cr_assert(contains(kd_tls_error(t), "not TLS"), "server: %s", kd_tls_error(t));
    cr_assert_eq(kd_tls_read(t, b, sizeof(b)), -EPROTO, "errors are sticky");
    cr_assert_eq(kd_tls_write(t, b, 1), -EPROTO);
    kd_tls_free(t);
    kd_tls_ctx_destroy(sctx);
}

Test(tls, garbage_after_handshake_is_eproto)
{
    struct peer c, s;
    struct kd_tls_ctx *cctx, *sctx;
    connect_pair(&c, &s, &cctx, &sctx, 0);
    uint8_t junk[300];
    junk[0] = 23; /* application_data record header, then a body that fails authentication */
    junk[1] = 3;
    junk[2] = 3;
    junk[3] = 1;
    junk[4] = 0x20;
    for (size_t i = 5; i < sizeof(junk); i++)
        junk[i] = (uint8_t)(i * 37);
    cr_assert_eq(kd_tls_feed(s.t, junk, sizeof(junk)), 0);
    drain_read(&s);
    cr_assert_eq(s.err, -EPROTO);
    cr_assert(contains(kd_tls_error(s.t), "bad record mac"), "server: %s", kd_tls_error(s.t));
    teardown_pair(&c, &s, cctx, sctx);
}

/* ---- context errors --------------------------------------------------------------------------- */

static void ctx_fails(const struct kd_tls_ctx_opts *o, int want_rc, const char *want_text)
{
    char err[512] = "";
    struct kd_tls_ctx *ctx = NULL;
    int rc = kd_tls_ctx_create(o, &ctx, err, sizeof(err));
    cr_assert_eq(rc, want_rc, "rc %d (%s)", rc, err);
    cr_assert_null(ctx);
    cr_assert(contains(err, want_text), "error \"%s\" should mention \"%s\"", err, want_text);
}

Test(tls, ctx_missing_cert_names_path)
{
    struct kd_tls_ctx_opts o = server_opts();
    o.cert_file = "/nonexistent/kasd/server.pem";
    ctx_fails(&o, -ENOENT, "/nonexistent/kasd/server.pem");
}

Test(tls, ctx_missing_key_names_path)
{
    struct kd_tls_ctx_opts o = server_opts();
    o.key_file = "/nonexistent/kasd/server.key";
    ctx_fails(&o, -ENOENT, "/nonexistent/kasd/server.key");
}

Test(tls, ctx_missing_ca_names_path)
{
    struct kd_tls_ctx_opts o = client_opts();
    o.ca_file = "/nonexistent/kasd/ca.pem";
    ctx_fails(&o, -ENOENT, "/nonexistent/kasd/ca.pem");
}

Test(tls, ctx_cert_not_pem_names_path)
{
    struct kd_tls_ctx_opts o = server_opts();
    o.cert_file = cert("README.md");
    ctx_fails(&o, -EPROTO, o.cert_file);
}

Test(tls, ctx_key_mismatch)
{
    struct kd_tls_ctx_opts o = server_opts();
    o.key_file = cert("client.key");
    ctx_fails(&o, -EPROTO, "does not match");
}

Test(tls, ctx_bad_options)
{
    struct kd_tls_ctx_opts o = server_opts();
    o.cert_file = NULL;
    ctx_fails(&o, -EINVAL, "certificate");
    o = server_opts();
    o.min_version = 11;
    ctx_fails(&o, -EINVAL, "12 or 13");
    o = server_opts();
    o.min_version = 13;
    o.max_version = 12;
    ctx_fails(&o, -EINVAL, "12 or 13");
    o = server_opts();
    o.require_client_cert = true;
    ctx_fails(&o, -EINVAL, "CA");
}

/* tls_bench.c — core/tls.h cost on one core, for whichever backend the binary is linked with.
 *
 *   handshake  full handshakes with a client and a server kd_tls in this process, bytes handed
 *              over in memory; the time spent inside server-side calls (feed, read, take_output,
 *              new/free) is summed separately, so the server's cost per handshake is reported on
 *              its own, which is what a kasd listener pays.
 *   bulk       an established TLS 1.3 pair; the client encrypts 16 KiB records (one kd_tls_write of
 *              16384 bytes each), the server decrypts them. Encrypt and decrypt are timed apart.
 *   memory     heap in use per connection (mallinfo2 uordblks + hblkhd deltas over many
 *              connections): fresh server, idle server after the handshake, idle client after it.
 *
 * Certificates: the test PKI (KD_TEST_CERTS, default test/certs): ECDSA P-256 server certificate;
 * key exchange is the first group both sides list (X25519); the record cipher is the backend's
 * first choice (AES-128-GCM, or ChaCha20-Poly1305 for a wolfSSL built without AES-NI).
 *
 * Rates are per second of this thread's CPU time, so a busy machine slows the run but does not skew
 * the result much; the server/client and encrypt/decrypt splits are ratios of monotonic-clock time
 * spent in each side's calls, applied to the CPU total.
 *
 * Usage: tls_bench [--seconds N] [--connections N]   (N seconds of CPU per measurement, default 2)
 */
#include <malloc.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/tls.h"

#define RECORD 16384

static double seconds = 2;
static unsigned connections = 1000;
static char certdir[400];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* CPU time of this thread: the machine may be shared, and what we want is the cost. Fine-grained
 * splits (server vs client, encrypt vs decrypt) use the monotonic clock, which is cheaper to read,
 * and are applied as ratios to the CPU total. */
static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static const char *cert(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", certdir, name);
    return buf;
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "tls_bench: %s: %s\n", what, why);
    exit(1);
}

static struct kd_tls_ctx *make_ctx(bool server, unsigned max_version)
{
    char c[512], k[512], a[512], err[512];
    struct kd_tls_ctx_opts o = {.server = server, .alpn = "h2", .max_version = max_version};
    if (server) {
        o.cert_file = cert(c, sizeof(c), "server.pem");
        o.key_file = cert(k, sizeof(k), "server.key");
    } else {
        o.ca_file = cert(a, sizeof(a), "ca.pem");
    }
    struct kd_tls_ctx *ctx;
    if (kd_tls_ctx_create(&o, &ctx, err, sizeof(err)) < 0)
        die("kd_tls_ctx_create", err);
    return ctx;
}

/* Time spent in server-side calls, accumulated by the helpers below. */
static uint64_t server_ns;

static void drain(struct kd_tls *t, bool server)
{
    static uint8_t buf[RECORD];
    uint64_t t0 = server ? now_ns() : 0;
    for (;;) {
        ssize_t n = kd_tls_read(t, buf, sizeof(buf));
        if (n == 0)
            break;
        if (n < 0)
            die(server ? "server read" : "client read", kd_tls_error(t));
    }
    if (server)
        server_ns += now_ns() - t0;
}

/* from's output into to; the side flags say whose clock the take and the feed run on. */
static bool move(struct kd_tls *from, bool from_server, struct kd_tls *to)
{
    static uint8_t buf[65536];
    bool moved = false;
    while (kd_tls_output_pending(from) > 0) {
        uint64_t t0 = now_ns();
        size_t n = kd_tls_take_output(from, buf, sizeof(buf));
        uint64_t t1 = now_ns();
        if (kd_tls_feed(to, buf, n) < 0)
            die("feed", "out of memory");
        uint64_t t2 = now_ns();
        server_ns += from_server ? t1 - t0 : t2 - t1;
        moved = true;
    }
    return moved;
}

/* One full handshake; returns the established server, and the client unless client_out is NULL. */
static struct kd_tls *handshake(struct kd_tls_ctx *cctx, struct kd_tls_ctx *sctx, struct kd_tls **client_out)
{
    struct kd_tls *c = kd_tls_new(cctx, "localhost");
    uint64_t t0 = now_ns();
    struct kd_tls *s = kd_tls_new(sctx, NULL);
    server_ns += now_ns() - t0;
    if (c == NULL || s == NULL)
        die("kd_tls_new", "out of memory");
    if (kd_tls_connect(c) < 0)
        die("connect", kd_tls_error(c));
    for (int i = 0; i < 100; i++) {
        bool moved = move(c, false, s);
        drain(s, true);
        moved |= move(s, true, c);
        drain(c, false);
        if (!moved)
            break;
    }
    if (!kd_tls_handshake_done(c) || !kd_tls_handshake_done(s))
        die("handshake", "did not complete");
    if (client_out != NULL)
        *client_out = c;
    else
        kd_tls_free(c);
    return s;
}

struct hs_result {
    double per_sec, server_us, client_us;
    char version[16];
};

static struct hs_result bench_handshakes(unsigned max_version)
{
    struct kd_tls_ctx *sctx = make_ctx(true, max_version), *cctx = make_ctx(false, max_version);
    struct hs_result r = {0};
    for (int i = 0; i < 20; i++) /* warm-up: lazily built tables, allocator pools */
        kd_tls_free(handshake(cctx, sctx, NULL));
    server_ns = 0;
    uint64_t n = 0, start = now_ns(), cpu0 = cpu_ns(), end = cpu0 + (uint64_t)(seconds * 1e9), t, cpu;
    do {
        struct kd_tls *s = handshake(cctx, sctx, NULL);
        if (n == 0)
            snprintf(r.version, sizeof(r.version), "%s", kd_tls_version(s));
        uint64_t t0 = now_ns();
        kd_tls_free(s);
        server_ns += now_ns() - t0;
        n++;
    } while ((cpu = cpu_ns()) < end);
    t = now_ns();
    double cpu_us = (double)(cpu - cpu0) / 1e3 / (double)n;
    double server_share = (double)server_ns / (double)(t - start);
    r.per_sec = 1e6 / cpu_us;
    r.server_us = cpu_us * server_share;
    r.client_us = cpu_us - r.server_us; /* includes the harness, which is small */
    kd_tls_ctx_destroy(sctx);
    kd_tls_ctx_destroy(cctx);
    return r;
}

struct bulk_result {
    double enc_mbs, dec_mbs, both_mbs;
};

static struct bulk_result bench_bulk(void)
{
    struct kd_tls_ctx *sctx = make_ctx(true, 0), *cctx = make_ctx(false, 0);
    struct kd_tls *c, *s = handshake(cctx, sctx, &c);
    static uint8_t plain[RECORD], cipher[RECORD + 256], out[RECORD];
    for (size_t i = 0; i < sizeof(plain); i++)
        plain[i] = (uint8_t)(i * 7);
    uint64_t enc_ns = 0, dec_ns = 0, bytes = 0;
    uint64_t cpu0 = cpu_ns(), end = cpu0 + (uint64_t)(seconds * 1e9), cpu;
    while ((cpu = cpu_ns()) < end) {
        for (int k = 0; k < 64; k++) {
            uint64_t t0 = now_ns();
            if (kd_tls_write(c, plain, sizeof(plain)) < 0)
                die("write", kd_tls_error(c));
            size_t n = kd_tls_take_output(c, cipher, sizeof(cipher));
            uint64_t t1 = now_ns();
            if (kd_tls_output_pending(c) != 0)
                die("bulk", "a 16 KiB write did not fit one record");
            if (kd_tls_feed(s, cipher, n) < 0)
                die("feed", "out of memory");
            size_t got = 0;
            while (got < sizeof(plain)) {
                ssize_t r = kd_tls_read(s, out, sizeof(out));
                if (r <= 0)
                    die("bulk read", r == 0 ? "short record" : kd_tls_error(s));
                got += (size_t)r;
            }
            uint64_t t2 = now_ns();
            enc_ns += t1 - t0;
            dec_ns += t2 - t1;
            bytes += sizeof(plain);
        }
    }
    if (memcmp(out, plain, sizeof(out)) != 0)
        die("bulk", "plaintext mismatch");
    double cpu_s = (double)(cpu - cpu0) / 1e9, enc_share = (double)enc_ns / (double)(enc_ns + dec_ns);
    struct bulk_result r = {
        .enc_mbs = (double)bytes / 1e6 / (cpu_s * enc_share),
        .dec_mbs = (double)bytes / 1e6 / (cpu_s * (1 - enc_share)),
        .both_mbs = (double)bytes / 1e6 / cpu_s,
    };
    kd_tls_free(c);
    kd_tls_free(s);
    kd_tls_ctx_destroy(sctx);
    kd_tls_ctx_destroy(cctx);
    return r;
}

static size_t heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}

struct mem_result {
    double fresh_server, idle_server, idle_client;
};

static struct mem_result bench_memory(void)
{
    struct kd_tls_ctx *sctx = make_ctx(true, 0), *cctx = make_ctx(false, 0);
    struct kd_tls **conns = calloc(connections, sizeof(*conns));
    if (conns == NULL)
        die("memory", "out of memory");
    struct mem_result r;
    for (int i = 0; i < 20; i++) /* warm-up, as above */
        kd_tls_free(handshake(cctx, sctx, NULL));

    size_t before = heap_in_use();
    for (unsigned i = 0; i < connections; i++)
        if ((conns[i] = kd_tls_new(sctx, NULL)) == NULL)
            die("kd_tls_new", "out of memory");
    r.fresh_server = (double)(heap_in_use() - before) / connections;
    for (unsigned i = 0; i < connections; i++)
        kd_tls_free(conns[i]);

    /* Idle servers: the client of each handshake is freed before the next one, so only the
     * servers remain in use. */
    before = heap_in_use();
    for (unsigned i = 0; i < connections; i++)
        conns[i] = handshake(cctx, sctx, NULL);
    r.idle_server = (double)(heap_in_use() - before) / connections;
    for (unsigned i = 0; i < connections; i++)
        kd_tls_free(conns[i]);

    before = heap_in_use();
    for (unsigned i = 0; i < connections; i++) {
        struct kd_tls *c;
        kd_tls_free(handshake(cctx, sctx, &c));
        conns[i] = c;
    }
    r.idle_client = (double)(heap_in_use() - before) / connections;
    for (unsigned i = 0; i < connections; i++)
        kd_tls_free(conns[i]);

    free(conns);
    kd_tls_ctx_destroy(sctx);
    kd_tls_ctx_destroy(cctx);
    return r;
}

static void usage(void)
{
    fprintf(stderr, "usage: tls_bench [--seconds N] [--connections N]\n"
                    "  certificates from $KD_TEST_CERTS (default test/certs)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            seconds = strtod(argv[++i], NULL);
            if (!(seconds > 0))
                usage();
        } else if (strcmp(argv[i], "--connections") == 0 && i + 1 < argc) {
            connections = (unsigned)strtoul(argv[++i], NULL, 10);
            if (connections == 0)
                usage();
        } else {
            usage();
        }
    }
    const char *dir = getenv("KD_TEST_CERTS");
    snprintf(certdir, sizeof(certdir), "%s", dir != NULL && dir[0] != 0 ? dir : "test/certs");

    struct hs_result h13 = bench_handshakes(0);
    struct hs_result h12 = bench_handshakes(12);
    struct bulk_result b = bench_bulk();
    struct mem_result m = bench_memory();

    printf("tls_bench  backend=%s  %.3g s CPU per measurement, one core, in memory\n", kd_tls_backend(),
           seconds);
    printf("  ECDSA P-256 certificate, X25519 key exchange, the backend's preferred AEAD (see CIPHERS in\n"
           "  core/tls_%s.c: AES-128-GCM, or ChaCha20-Poly1305 for a wolfSSL without AES-NI)\n\n",
           kd_tls_backend());
    printf("%-44s %12s %14s %14s\n", "handshake (full, client+server in process)", "handshakes/s",
           "server us/hs", "client us/hs");
    printf("%-44s %12.0f %14.1f %14.1f\n", h13.version, h13.per_sec, h13.server_us, h13.client_us);
    printf("%-44s %12.0f %14.1f %14.1f\n", h12.version, h12.per_sec, h12.server_us, h12.client_us);
    printf("%-44s %12.0f %14s %14s\n", "  server-only capacity TLSv1.3 (1/server us)", 1e6 / h13.server_us,
           "", "");
    printf("\n%-44s %12s %14s %14s\n", "bulk TLSv1.3, 16 KiB records", "encrypt MB/s", "decrypt MB/s",
           "enc+dec MB/s");
    printf("%-44s %12.0f %14.0f %14.0f\n", "", b.enc_mbs, b.dec_mbs, b.both_mbs);
    printf("\n%-44s %12s\n", "heap per connection (mallinfo2 deltas)", "bytes");
    printf("%-44s %12.0f\n", "server, fresh (before handshake)", m.fresh_server);
    printf("%-44s %12.0f\n", "server, idle after TLSv1.3 handshake", m.idle_server);
    printf("%-44s %12.0f\n", "client, idle after TLSv1.3 handshake", m.idle_client);
    printf("  (over %u connections each)\n", connections);
    return 0;
}

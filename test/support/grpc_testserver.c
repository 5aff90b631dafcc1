/* grpc_testserver.c — kasd's gRPC server layer with test methods, for interop tests with a real
 * gRPC client (python3-grpcio). Listens on 127.0.0.1:0 (h2c, and TLS when --cert/--key are given),
 * prints {"port":N,"tls_port":M} on stdout, serves until SIGTERM/SIGINT, exits 0.
 *
 * Methods (raw bytes in and out):
 *   /test.Echo/Unary         echo the request
 *   /test.Echo/ServerStream  request "N SIZE": N messages of SIZE bytes ('a'..'z' pattern)
 *   /test.Echo/ClientStream  answer the total bytes received, as decimal text
 *   /test.Echo/Bidi          echo every message; finish OK on half-close
 *   /test.Echo/Status        request "CODE message": finish with that status and message
 *   /test.Echo/Hang          never answers (deadline / cancellation tests)
 *   /test.Echo/Stats         "cancelled=N deadline=N" seen by Hang calls
 *   /test.Echo/Metadata      answer with the request metadata "key=value\n" (non-pseudo)
 */
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/tls.h"
#include "core/compress.h"
#include "shards/grpc.h"
#include "shards/server.h"

static _Atomic unsigned long hang_cancelled, hang_deadline;

static int unary_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    kd_grpc_send_message(c, m, n);
    kd_grpc_finish(c, KD_GRPC_OK, NULL, NULL, 0);
    return 0;
}

static void nop_done(struct kd_h2_call *c, int status, const char *msg)
{
}

static void nop_half_close(struct kd_h2_call *c)
{
}

static const struct kd_h2_handler unary_h = {
    .on_message = unary_msg, .on_half_close = nop_half_close, .on_done = nop_done};

/* Server streaming with flow control: produce while under the high-water mark, resume on_writable. */
struct sstream {
    unsigned long left;
    size_t size;
    uint8_t *buf;
};

static void ss_pump(struct kd_h2_call *c)
{
    struct sstream *ss = kd_h2_call_user(c);
    while (ss->left > 0) {
        ss->left--;
        int rc = kd_grpc_send_message(c, ss->buf, ss->size);
        if (rc < 0)
            return;
        if (rc == 1)
            return; /* wait for on_writable */
    }
    kd_grpc_finish(c, KD_GRPC_OK, NULL, NULL, 0);
}

static int ss_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    char req[64];
    struct sstream *ss = kd_h2_call_user(c);
    if (n >= sizeof(req))
        return kd_grpc_finish(c, KD_GRPC_INVALID_ARGUMENT, "bad request", NULL, 0), 0;
    memcpy(req, m, n);
    req[n] = '\0';
    if (sscanf(req, "%lu %zu", &ss->left, &ss->size) != 2 || ss->size > (8u << 20))
        return kd_grpc_finish(c, KD_GRPC_INVALID_ARGUMENT, "want \"N SIZE\"", NULL, 0), 0;
    ss->buf = malloc(ss->size ? ss->size : 1);
    for (size_t i = 0; i < ss->size; i++)
        ss->buf[i] = (uint8_t)('a' + i % 26);
    ss_pump(c);
    return 0;
}

static void ss_done(struct kd_h2_call *c, int status, const char *msg)
{
    struct sstream *ss = kd_h2_call_user(c);
    free(ss->buf);
    free(ss);
}

static const struct kd_h2_handler ss_h = {
    .on_message = ss_msg, .on_half_close = nop_half_close, .on_writable = ss_pump, .on_done = ss_done};

static int cs_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    uint64_t *total = kd_h2_call_user(c);
    *total += n;
    return 0;
}

static void cs_half_close(struct kd_h2_call *c)
{
    char out[32];
    uint64_t *total = kd_h2_call_user(c);
    int n = snprintf(out, sizeof(out), "%llu", (unsigned long long)*total);
    kd_grpc_send_message(c, (const uint8_t *)out, (size_t)n);
    kd_grpc_finish(c, KD_GRPC_OK, NULL, NULL, 0);
}

static void free_user(struct kd_h2_call *c, int status, const char *msg)
{
    free(kd_h2_call_user(c));
}

static const struct kd_h2_handler cs_h = {
    .on_message = cs_msg, .on_half_close = cs_half_close, .on_done = free_user};

static int bidi_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    kd_grpc_send_message(c, m, n);
    return 0;
}

static void bidi_half_close(struct kd_h2_call *c)
{
    kd_grpc_finish(c, KD_GRPC_OK, NULL, NULL, 0);
}

static const struct kd_h2_handler bidi_h = {
    .on_message = bidi_msg, .on_half_close = bidi_half_close, .on_done = nop_done};

static int status_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    char req[512];
    int code = 0, off = 0;
    if (n >= sizeof(req))
        n = sizeof(req) - 1;
    memcpy(req, m, n);
    req[n] = '\0';
    sscanf(req, "%d %n", &code, &off);
    static const struct kd_h2_header md[] = {{"x-test-trailer", 14, "yes", 3}};
    kd_grpc_finish(c, code, req + off, md, 1);
    return 0;
}

static const struct kd_h2_handler status_h = {
    .on_message = status_msg, .on_half_close = nop_half_close, .on_done = nop_done};

static int hang_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    return 0;
}

static void hang_done(struct kd_h2_call *c, int status, const char *msg)
{
    if (status == KD_GRPC_CANCELLED)
        hang_cancelled++;
    else if (status == KD_GRPC_DEADLINE_EXCEEDED)
        hang_deadline++;
}

static const struct kd_h2_handler hang_h = {
    .on_message = hang_msg, .on_half_close = nop_half_close, .on_done = hang_done};

static int stats_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    char out[64];
    int len = snprintf(out, sizeof(out), "cancelled=%lu deadline=%lu", (unsigned long)hang_cancelled,
                       (unsigned long)hang_deadline);
    kd_grpc_send_message(c, (const uint8_t *)out, (size_t)len);
    kd_grpc_finish(c, KD_GRPC_OK, NULL, NULL, 0);
    return 0;
}

static const struct kd_h2_handler stats_h = {
    .on_message = stats_msg, .on_half_close = nop_half_close, .on_done = nop_done};

static int md_msg(struct kd_h2_call *c, const uint8_t *m, size_t n)
{
    char out[8192];
    size_t len = 0;
    struct kd_h2_header h;
    for (size_t i = 0; kd_h2_call_header(c, i, &h); i++) {
        if (h.name[0] == ':')
            continue;
        int w = snprintf(out + len, sizeof(out) - len, "%.*s=%.*s\n", (int)h.namelen, h.name, (int)h.valuelen,
                         h.value);
        if (w < 0 || (size_t)w >= sizeof(out) - len)
            break;
        len += (size_t)w;
    }
    kd_grpc_send_message(c, (const uint8_t *)out, len);
    kd_grpc_finish(c, KD_GRPC_OK, NULL, NULL, 0);
    return 0;
}

static const struct kd_h2_handler md_h = {
    .on_message = md_msg, .on_half_close = nop_half_close, .on_done = nop_done};

static int start_with(kd_grpc_call *call, void *ud)
{
    const struct kd_h2_handler *h = ud;
    void *user = NULL;
    if (h == &ss_h)
        user = calloc(1, sizeof(struct sstream));
    else if (h == &cs_h)
        user = calloc(1, sizeof(uint64_t));
    kd_grpc_accept(call, h, user);
    return 0;
}

static const struct kd_grpc_method methods[] = {
    {"/test.Echo/Unary", start_with, (void *)&unary_h},
    {"/test.Echo/ServerStream", start_with, (void *)&ss_h},
    {"/test.Echo/ClientStream", start_with, (void *)&cs_h},
    {"/test.Echo/Bidi", start_with, (void *)&bidi_h},
    {"/test.Echo/Status", start_with, (void *)&status_h},
    {"/test.Echo/Hang", start_with, (void *)&hang_h},
    {"/test.Echo/Stats", start_with, (void *)&stats_h},
    {"/test.Echo/Metadata", start_with, (void *)&md_h},
    {"/grpc.health.v1.Health/Check", NULL, NULL}, /* filled in main */
};

int main(int argc, char **argv)
{
    const char *cert = NULL, *key = NULL;
    unsigned shards = 2;
    uint32_t max_message = 0, age_ms = 0, grace_ms = 0, handshake_ms = 0;
    bool response_gzip = false;
    static const struct option lo[] = {{"cert", required_argument, NULL, 'c'},
                                       {"key", required_argument, NULL, 'k'},
                                       {"shards", required_argument, NULL, 's'},
                                       {"max-message", required_argument, NULL, 'm'},
                                       {"max-age-ms", required_argument, NULL, 'a'},
                                       {"grace-ms", required_argument, NULL, 'g'},
                                       {"handshake-ms", required_argument, NULL, 'h'},
                                       {"response-gzip", no_argument, NULL, 'z'},
                                       {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'c':
            cert = optarg;
            break;
        case 'k':
            key = optarg;
            break;
        case 's':
            shards = (unsigned)atoi(optarg);
            break;
        case 'm':
            max_message = (uint32_t)atoi(optarg);
            break;
        case 'a':
            age_ms = (uint32_t)atoi(optarg);
            break;
        case 'g':
            grace_ms = (uint32_t)atoi(optarg);
            break;
        case 'h':
            handshake_ms = (uint32_t)atoi(optarg);
            break;
        case 'z':
            response_gzip = true;
            break;
        default:
            return 2;
        }
    }
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    kd_log_configure(KD_LOG_INFO, 2);
    kd_log_start();

    struct kd_grpc_method table[sizeof(methods) / sizeof(methods[0])];
    memcpy(table, methods, sizeof(methods));
    table[sizeof(methods) / sizeof(methods[0]) - 1] = kd_grpc_health_method;
    struct kd_grpc_server_cfg cfg[2] = {{0}};
    for (int i = 0; i < 2; i++) {
        cfg[i].name = i ? "test-tls" : "test";
        cfg[i].methods = table;
        cfg[i].nmethods = sizeof(table) / sizeof(table[0]);
        cfg[i].max_message = max_message;
        cfg[i].max_connection_age_ms = age_ms;
        cfg[i].max_connection_age_grace_ms = grace_ms;
        cfg[i].handshake_timeout_ms = handshake_ms;
        cfg[i].response_compression = response_gzip ? KD_COMPRESS_GZIP : KD_COMPRESS_IDENTITY;
        kd_grpc_server_cfg_defaults(&cfg[i]);
    }
    char err[512];
    struct kd_tls_ctx *tls = NULL;
    if (cert != NULL) {
        struct kd_tls_ctx_opts to = {.server = true, .cert_file = cert, .key_file = key, .alpn = "h2"};
        if (kd_tls_ctx_create(&to, &tls, err, sizeof(err)) < 0) {
            fprintf(stderr, "tls: %s\n", err);
            return 1;
        }
        cfg[1].tls = tls;
    }
    struct kd_server_opts o = {.shards = shards,
                               .connections_per_shard = 4096,
                               .recv_buffers = 256,
                               .recv_buffer_size = 16384,
                               .ring_size = 1024,
                               .shutdown_grace_ms = 3000};
    for (int i = 0; i < (tls ? 2 : 1); i++) {
        struct sockaddr_in *in = (struct sockaddr_in *)&o.listeners[i].addr;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        o.listeners[i].addrlen = sizeof(*in);
        o.listeners[i].name = cfg[i].name;
        o.listeners[i].ops = &kd_grpc_server_ops;
        o.listeners[i].cfg = &cfg[i];
        o.nlisteners++;
    }
    struct kd_server *srv;
    if (kd_server_create(&o, &srv, err, sizeof(err)) < 0 || kd_server_start(srv, err, sizeof(err)) < 0) {
        fprintf(stderr, "start: %s\n", err);
        return 1;
    }
    printf("{\"port\":%d,\"tls_port\":%d}\n", kd_server_port(srv, 0), tls ? kd_server_port(srv, 1) : 0);
    fflush(stdout);
    int sig;
    sigwait(&sigs, &sig);
    kd_server_stop(srv);
    kd_server_wait(srv);
    kd_server_destroy(srv);
    if (tls)
        kd_tls_ctx_destroy(tls);
    kd_log_stop();
    return 0;
}

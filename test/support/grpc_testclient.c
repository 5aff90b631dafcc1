/* grpc_testclient.c — kasd's own gRPC client (kd_grpc_channel on a shard) run through a fixed list
 * of cases against a server that implements the test.Echo methods (test/support/grpc_testserver.c,
 * or the python grpcio server in test/integration/grpc_client_test.py). One JSON line per case on
 * stdout; exit 0 when every case passed.
 *
 *   grpc_testclient --target 127.0.0.1:PORT [--ca FILE --server-name NAME] [--refused-port P]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/log.h"
#include "core/tls.h"
#include "shards/grpc.h"
#include "shards/server.h"
#include "shards/shard.h"

struct ctx;
typedef void (*case_fn)(struct ctx *x);

struct ctx {
    struct kd_server *srv;
    struct kd_shard *shard;
    struct sockaddr_in target;
    char authority[64];
    struct kd_tls_ctx *tls;
    const char *server_name;
    int refused_port;
    struct kd_grpc_channel *ch;
    size_t case_idx;
    int failures;
    int passed;
    uint64_t case_start;
    /* per-case state */
    int pending;
    int status;
    char message[512];
    size_t nmsg;
    size_t bytes;
    bool content_ok;
    uint8_t *expect;
    size_t expect_len;
    struct kd_timer timer;
    kd_grpc_call *call;
    struct kd_grpc_channel *extra;
};

static struct ctx X;
static void next_case(struct ctx *x);

static void report(struct ctx *x, const char *name, bool ok, const char *detail)
{
    uint64_t ms = kd_clock_ms() - x->case_start;
    printf("{\"case\":\"%s\",\"ok\":%s,\"ms\":%llu,\"detail\":\"", name, ok ? "true" : "false",
           (unsigned long long)ms);
    for (const char *p = detail; *p; p++)
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p >= 0x20)
            putchar(*p);
    printf("\"}\n");
    fflush(stdout);
    if (ok)
        x->passed++;
    else
        x->failures++;
}

/* ---- generic handler collecting messages ---- */

static int col_message(kd_grpc_call *c, const uint8_t *m, size_t n)
{
    struct ctx *x = kd_h2_call_user(c);
    if (x->expect != NULL) {
        size_t off = x->bytes;
        if (off + n > x->expect_len || memcmp(x->expect + off, m, n) != 0)
            x->content_ok = false;
    }
    x->nmsg++;
    x->bytes += n;
    return 0;
}

static void col_done(kd_grpc_call *c, int status, const char *message)
{
    struct ctx *x = kd_h2_call_user(c);
    x->status = status;
    snprintf(x->message, sizeof(x->message), "%s", message);
    x->call = NULL;
    if (--x->pending == 0)
        next_case(x);
}

static const struct kd_h2_handler col = {.on_message = col_message, .on_done = col_done};

static void reset(struct ctx *x)
{
    free(x->expect);
    x->expect = NULL;
    x->expect_len = 0;
    x->status = -1;
    x->message[0] = '\0';
    x->nmsg = x->bytes = 0;
    x->content_ok = true;
    x->pending = 0;
}

static kd_grpc_call *start(struct ctx *x, const char *path, uint64_t timeout_us)
{
    kd_grpc_call *c = kd_grpc_channel_call(x->ch, path, NULL, 0, timeout_us, &col, x);
    if (c != NULL)
        x->pending++;
    return c;
}

/* ---- cases: each has a start and a check (run when all its calls are done) ---- */

struct case_def {
    const char *name;
    case_fn start;
    bool (*check)(struct ctx *x, char *detail, size_t len);
};

static void unary_sizes_start(struct ctx *x)
{
    static const size_t sizes[] = {0, 1, 16384, 1 << 20, 4 << 20};
    /* one call per size, all at once; the expected content is the concatenation */
    size_t total = 0;
    for (size_t i = 0; i < 5; i++)
        total += sizes[i];
    x->expect = malloc(total ? total : 1);
    x->expect_len = total;
    /* messages come back in call order only per stream; keep them identical so order is moot */
    memset(x->expect, 'u', total);
    for (size_t i = 0; i < 5; i++) {
        kd_grpc_call *c = start(x, "/test.Echo/Unary", 30000000);
        uint8_t *m = malloc(sizes[i] ? sizes[i] : 1);
        memset(m, 'u', sizes[i]);
        kd_grpc_send_message(c, m, sizes[i]);
        kd_grpc_close_send(c);
        free(m);
    }
}

static bool unary_sizes_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d msgs %zu bytes %zu", x->status, x->nmsg, x->bytes);
    return x->status == 0 && x->nmsg == 5 && x->bytes == x->expect_len && x->content_ok;
}

static void sstream_start(struct ctx *x)
{
    kd_grpc_call *c = start(x, "/test.Echo/ServerStream", 30000000);
    kd_grpc_send_message(c, (const uint8_t *)"50 100000", 9);
    kd_grpc_close_send(c);
}

static bool sstream_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d msgs %zu bytes %zu", x->status, x->nmsg, x->bytes);
    return x->status == 0 && x->nmsg == 50 && x->bytes == 5000000;
}

static void cstream_start(struct ctx *x)
{
    uint8_t buf[10000];
    memset(buf, 'c', sizeof(buf));
    kd_grpc_call *c = start(x, "/test.Echo/ClientStream", 30000000);
    for (int i = 0; i < 300; i++)
        kd_grpc_send_message(c, buf, sizeof(buf));
    kd_grpc_close_send(c);
    x->expect = (uint8_t *)strdup("3000000");
    x->expect_len = 7;
}

static bool cstream_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d msgs %zu content %s", x->status, x->nmsg, x->content_ok ? "ok" : "wrong");
    return x->status == 0 && x->nmsg == 1 && x->bytes == 7 && x->content_ok;
}

static void bidi_start(struct ctx *x)
{
    x->expect_len = 100 * 3000;
    x->expect = malloc(x->expect_len);
    for (size_t i = 0; i < x->expect_len; i++)
        x->expect[i] = (uint8_t)('a' + (i / 3000) % 26);
    kd_grpc_call *c = start(x, "/test.Echo/Bidi", 30000000);
    for (int i = 0; i < 100; i++)
        kd_grpc_send_message(c, x->expect + (size_t)i * 3000, 3000);
    kd_grpc_close_send(c);
}

static bool bidi_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d msgs %zu bytes %zu", x->status, x->nmsg, x->bytes);
    return x->status == 0 && x->nmsg == 100 && x->content_ok;
}

static void status_start(struct ctx *x)
{
    const char *req = "7 denied: \xc3\xa9 100%";
    kd_grpc_call *c = start(x, "/test.Echo/Status", 10000000);
    kd_grpc_send_message(c, (const uint8_t *)req, strlen(req));
    kd_grpc_close_send(c);
}

static bool status_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d message %s", x->status, x->message);
    return x->status == 7 && strcmp(x->message, "denied: \xc3\xa9 100%") == 0;
}

static void deadline_start(struct ctx *x)
{
    kd_grpc_call *c = start(x, "/test.Echo/Hang", 300000);
    kd_grpc_send_message(c, (const uint8_t *)"", 0);
    kd_grpc_close_send(c);
}

static bool deadline_check(struct ctx *x, char *d, size_t len)
{
    uint64_t ms = kd_clock_ms() - x->case_start;
    snprintf(d, len, "status %d after %llu ms", x->status, (unsigned long long)ms);
    return x->status == KD_GRPC_DEADLINE_EXCEEDED && ms >= 250 && ms < 3000;
}

static void cancel_cb(struct kd_timer *t)
{
    struct ctx *x = KD_CONTAINER_OF(t, struct ctx, timer);
    if (x->call != NULL)
        kd_grpc_cancel(x->call, KD_GRPC_CANCELLED, "cancelled by the test");
}

static void cancel_start(struct ctx *x)
{
    x->call = start(x, "/test.Echo/Hang", 0);
    kd_grpc_send_message(x->call, (const uint8_t *)"", 0);
    kd_timerwheel_add(kd_shard_timers(x->shard), &x->timer, kd_shard_now_ms(x->shard) + 100);
}

static bool cancel_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d", x->status);
    return x->status == KD_GRPC_CANCELLED;
}

static void stats_start(struct ctx *x)
{
    kd_grpc_call *c = start(x, "/test.Echo/Stats", 10000000);
    kd_grpc_send_message(c, (const uint8_t *)"", 0);
    kd_grpc_close_send(c);
}

static bool stats_check(struct ctx *x, char *d, size_t len)
{
    /* the server saw the previous case's cancellation (RST_STREAM reached it) */
    snprintf(d, len, "status %d msgs %zu", x->status, x->nmsg);
    return x->status == 0 && x->nmsg == 1;
}

static void unknown_start(struct ctx *x)
{
    kd_grpc_call *c = start(x, "/no.Such/Method", 10000000);
    kd_grpc_send_message(c, (const uint8_t *)"x", 1);
    kd_grpc_close_send(c);
}

static bool unknown_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d message %s", x->status, x->message);
    return x->status == KD_GRPC_UNIMPLEMENTED;
}

static void oversize_start(struct ctx *x)
{
    size_t n = (4u << 20) + 1;
    uint8_t *m = calloc(1, n);
    kd_grpc_call *c = start(x, "/test.Echo/Unary", 30000000);
    kd_grpc_send_message(c, m, n);
    kd_grpc_close_send(c);
    free(m);
}

static bool oversize_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "status %d message %s", x->status, x->message);
    return x->status == KD_GRPC_RESOURCE_EXHAUSTED;
}

static void concurrent_start(struct ctx *x)
{
    x->expect_len = 300 * 64;
    x->expect = malloc(x->expect_len);
    memset(x->expect, 'k', x->expect_len);
    for (int i = 0; i < 300; i++) {
        kd_grpc_call *c = start(x, "/test.Echo/Unary", 30000000);
        if (c == NULL)
            break;
        kd_grpc_send_message(c, x->expect, 64);
        kd_grpc_close_send(c);
    }
}

static bool concurrent_check(struct ctx *x, char *d, size_t len)
{
    snprintf(d, len, "last status %d msgs %zu", x->status, x->nmsg);
    return x->status == 0 && x->nmsg == 300 && x->content_ok;
}

static void refused_start(struct ctx *x)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                            .sin_port = htons((uint16_t)x->refused_port)};
    char auth[64];
    snprintf(auth, sizeof(auth), "127.0.0.1:%d", x->refused_port);
    struct kd_grpc_channel_opts o = {.addr = (struct sockaddr *)&a, .addrlen = sizeof(a), .authority = auth};
    x->extra = kd_grpc_channel_open(x->shard, &o);
    kd_grpc_call *c = kd_grpc_channel_call(x->extra, "/test.Echo/Unary", NULL, 0, 5000000, &col, x);
    x->pending++;
    kd_grpc_send_message(c, (const uint8_t *)"x", 1);
    kd_grpc_close_send(c);
}

static bool refused_check(struct ctx *x, char *d, size_t len)
{
    kd_grpc_channel_close(x->extra);
    x->extra = NULL;
    snprintf(d, len, "status %d message %s", x->status, x->message);
    return x->status == KD_GRPC_UNAVAILABLE && strstr(x->message, "refused") != NULL;
}

static const struct case_def cases[] = {
    {"unary_sizes", unary_sizes_start, unary_sizes_check},
    {"server_stream", sstream_start, sstream_check},
    {"client_stream", cstream_start, cstream_check},
    {"bidi", bidi_start, bidi_check},
    {"status_passthrough", status_start, status_check},
    {"deadline", deadline_start, deadline_check},
    {"cancel", cancel_start, cancel_check},
    {"after_cancel", stats_start, stats_check},
    {"unknown_method", unknown_start, unknown_check},
    {"oversize", oversize_start, oversize_check},
    {"concurrent_300", concurrent_start, concurrent_check},
    {"connect_refused", refused_start, refused_check},
};

static void finish_run(struct ctx *x)
{
    kd_grpc_channel_close(x->ch);
    x->ch = NULL;
    printf("%d passed, %d failed\n", x->passed, x->failures);
    fflush(stdout);
    kill(getpid(), SIGTERM);
}

static void next_case(struct ctx *x)
{
    char detail[600];
    if (x->case_idx > 0) {
        const struct case_def *d = &cases[x->case_idx - 1];
        bool ok = d->check(x, detail, sizeof(detail));
        report(x, d->name, ok, detail);
    }
    reset(x);
    while (x->case_idx < sizeof(cases) / sizeof(cases[0])) {
        const struct case_def *d = &cases[x->case_idx++];
        if (strcmp(d->name, "connect_refused") == 0 && x->refused_port == 0)
            continue;
        x->case_start = kd_clock_ms();
        d->start(x);
        if (x->pending > 0)
            return;
        report(x, d->name, false, "could not start a call");
    }
    finish_run(x);
}

static int on_start(struct kd_shard *s)
{
    struct ctx *x = &X;
    x->shard = s;
    kd_timer_init(&x->timer, cancel_cb);
    struct kd_grpc_channel_opts o = {.addr = (struct sockaddr *)&x->target,
                                     .addrlen = sizeof(x->target),
                                     .authority = x->authority,
                                     .tls = x->tls,
                                     .server_name = x->server_name};
    x->ch = kd_grpc_channel_open(s, &o);
    if (x->ch == NULL)
        return -ENOMEM;
    next_case(x);
    return 0;
}

int main(int argc, char **argv)
{
    const char *target = NULL, *ca = NULL;
    static const struct option lo[] = {{"target", required_argument, NULL, 't'},
                                       {"ca", required_argument, NULL, 'c'},
                                       {"server-name", required_argument, NULL, 'n'},
                                       {"refused-port", required_argument, NULL, 'r'},
                                       {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 't':
            target = optarg;
            break;
        case 'c':
            ca = optarg;
            break;
        case 'n':
            X.server_name = optarg;
            break;
        case 'r':
            X.refused_port = atoi(optarg);
            break;
        default:
            return 2;
        }
    }
    if (target == NULL || strncmp(target, "127.0.0.1:", 10) != 0) {
        fprintf(stderr, "usage: grpc_testclient --target 127.0.0.1:PORT [--ca FILE --server-name N]\n");
        return 2;
    }
    snprintf(X.authority, sizeof(X.authority), "%s", target);
    X.target.sin_family = AF_INET;
    X.target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    X.target.sin_port = htons((uint16_t)atoi(target + 10));
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    kd_log_configure(KD_LOG_WARN, 2);
    char err[512];
    if (ca != NULL) {
        struct kd_tls_ctx_opts to = {.server = false, .ca_file = ca, .alpn = "h2"};
        if (kd_tls_ctx_create(&to, &X.tls, err, sizeof(err)) < 0) {
            fprintf(stderr, "tls: %s\n", err);
            return 1;
        }
    }
    struct kd_server_opts o = {.shards = 1,
                               .connections_per_shard = 64,
                               .recv_buffers = 256,
                               .recv_buffer_size = 16384,
                               .ring_size = 64,
                               .shutdown_grace_ms = 1000,
                               .on_shard_start = on_start};
    if (kd_server_create(&o, &X.srv, err, sizeof(err)) < 0 || kd_server_start(X.srv, err, sizeof(err)) < 0) {
        fprintf(stderr, "start: %s\n", err);
        return 1;
    }
    /* the whole run is bounded: a stuck case is a failure, not a hang */
    struct timespec ts = {.tv_sec = 120};
    int sig = sigtimedwait(&sigs, NULL, &ts);
    kd_server_stop(X.srv);
    kd_server_wait(X.srv);
    kd_server_destroy(X.srv);
    if (X.tls)
        kd_tls_ctx_destroy(X.tls);
    if (sig < 0) {
        printf("{\"case\":\"run\",\"ok\":false,\"detail\":\"timed out in case %zu\"}\n", X.case_idx);
        return 1;
    }
    return X.failures == 0 && X.passed > 0 ? 0 : 1;
}

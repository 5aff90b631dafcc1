/* redis_testclient.c — kasd's Redis connection (shards/redis.c) driven on a real shard against a
 * real redis-server, for test/integration/redis_test.py. One mode per run; JSON lines on stdout
 * (events and checks, flushed at once so the test can react, e.g. restart Redis after "up"), a
 * final {"done":true,"ok":...}; exit 0 when every check passed. Every run is bounded (--limit).
 *
 *   redis_testclient MODE --addr 127.0.0.1:PORT [--password P] [--username U] [--db N]
 *       [--tls-ca FILE] [--server-name N] [--sentinel-master M --sentinel ADDR...]
 *       [--read-timeout MS] [--dial-timeout MS] [--expect TEXT] [--limit S]
 *   MODE: basic | error | timeout | restart | sentinel
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/log.h"
#include "core/tls.h"
#include "shards/redis.h"
#include "shards/server.h"
#include "shards/shard.h"

#define NPIPE   10000
#define BIGSIZE (1u << 20)

static struct {
    const char *mode, *expect;
    struct kd_redis_opts o;
    const char *sentinels[8];
    struct kd_server *srv;
    struct kd_shard *s;
    struct kd_redis *r, *sub;
    struct kd_timer tick;
    int failures, checks;
    bool done;
    /* basic */
    int step;
    int pipe_next, pipe_bad;
    char *big;
    struct kd_redis_script script;
    /* restart / sentinel / timeout */
    int ups, sub_ups, down_errs, msgs;
    char first_addr[256];
    char last_err[400];
    uint64_t started, up_at;
    bool got_message, sent_after_up;
} X;

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void check(const char *name, bool ok, const char *detail)
{
    X.checks++;
    if (!ok)
        X.failures++;
    printf("{\"check\":\"%s\",\"ok\":%s,\"detail\":", name, ok ? "true" : "false");
    json_str(detail ? detail : "");
    printf("}\n");
    fflush(stdout);
}

static void event(const char *name, const char *detail)
{
    printf("{\"event\":\"%s\",\"detail\":", name);
    json_str(detail ? detail : "");
    printf("}\n");
    fflush(stdout);
}

static void finish(void)
{
    if (X.done)
        return;
    X.done = true;
    printf("{\"done\":true,\"ok\":%s,\"checks\":%d,\"failures\":%d}\n",
           X.failures == 0 && X.checks > 0 ? "true" : "false", X.checks, X.failures);
    fflush(stdout);
    kill(getpid(), SIGTERM);
}

static int cmd(kd_redis_cb cb, void *arg, int argc, ...)
{
    const char *argv[16];
    size_t lens[16];
    va_list ap;
    va_start(ap, argc);
    for (int i = 0; i < argc; i++) {
        argv[i] = va_arg(ap, const char *);
        lens[i] = strlen(argv[i]);
    }
    va_end(ap);
    return kd_redis_cmd(X.r, cb, arg, argc, argv, lens);
}

/* ---- basic: pipelining, big values, scripts, MULTI/EXEC, error replies ---- */

static void basic_next(void);

static void pipe_reply(void *arg, const struct kd_resp *reply, const char *err)
{
    int i = (int)(intptr_t)arg;
    char want[16];
    snprintf(want, sizeof(want), "%d", i);
    if (err != NULL || reply->type != KD_RESP_STRING || strcmp(reply->str, want) != 0 || i != X.pipe_next)
        X.pipe_bad++;
    X.pipe_next++;
    if (X.pipe_next == NPIPE) {
        char d[64];
        snprintf(d, sizeof(d), "%d replies, %d out of order or wrong", NPIPE, X.pipe_bad);
        check("pipeline_10k_in_order", X.pipe_bad == 0, d);
        basic_next();
    }
}

static void big_get(void *arg, const struct kd_resp *reply, const char *err)
{
    bool ok = err == NULL && reply->type == KD_RESP_STRING && reply->len == BIGSIZE &&
              memcmp(reply->str, X.big, BIGSIZE) == 0;
    check("value_1MiB_roundtrip", ok, err);
    basic_next();
}

static void big_set(void *arg, const struct kd_resp *reply, const char *err)
{
    if (err != NULL || reply->type != KD_RESP_STATUS) {
        check("value_1MiB_set", false, err ? err : "not OK");
        basic_next();
        return;
    }
}

static void script_reply(void *arg, const struct kd_resp *reply, const char *err)
{
    int n = (int)(intptr_t)arg;
    bool ok = err == NULL && reply->type == KD_RESP_STRING && strcmp(reply->str, "k1|v1") == 0;
    check(n == 0 ? "evalsha_after_script_flush_falls_back" : "evalsha_loaded", ok,
          err                            ? err
          : reply->type == KD_RESP_ERROR ? reply->str
                                         : "");
    if (n == 1) {
        basic_next();
        return;
    }
    const char *argv[] = {"k1", "v1"};
    size_t lens[] = {2, 2};
    kd_redis_eval(X.r, &X.script, script_reply, (void *)1, 1, 2, argv, lens);
}

static void noop(void *arg, const struct kd_resp *reply, const char *err)
{
}

static void exec_reply(void *arg, const struct kd_resp *reply, const char *err)
{
    bool ok = err == NULL && reply->type == KD_RESP_ARRAY && reply->n == 3 &&
              reply->elem[0]->type == KD_RESP_STATUS && reply->elem[1]->type == KD_RESP_INTEGER &&
              reply->elem[1]->integer == 11 && reply->elem[2]->type == KD_RESP_STRING &&
              strcmp(reply->elem[2]->str, "11") == 0;
    check("multi_exec", ok, err);
    basic_next();
}

static void error_reply(void *arg, const struct kd_resp *reply, const char *err)
{
    bool ok = err == NULL && reply->type == KD_RESP_ERROR && strstr(reply->str, "wrong number") != NULL;
    check("error_reply_is_a_reply", ok, err ? err : reply->str);
    basic_next();
}

static void basic_next(void)
{
    switch (X.step++) {
    case 0: {
        /* All in one loop turn: they leave together (pipelined) and come back in order. */
        char num[16];
        X.pipe_next = 0;
        for (int i = 0; i < NPIPE; i++) {
            snprintf(num, sizeof(num), "%d", i);
            cmd(pipe_reply, (void *)(intptr_t)i, 2, "ECHO", num);
        }
        break;
    }
    case 1: {
        X.big = malloc(BIGSIZE);
        for (size_t i = 0; i < BIGSIZE; i++)
            X.big[i] = (char)('a' + (i * 7) % 26);
        /* 12 MiB in one loop turn: more than a connection's output queue takes at once
         * (KD_CONN_OUT_MAX, 8 MiB), so it must leave in parts, in order. */
        for (int i = 0; i < 12; i++) {
            char key[16];
            snprintf(key, sizeof(key), "big%d", i);
            const char *argv[] = {"SET", key, X.big};
            size_t lens[] = {3, strlen(key), BIGSIZE};
            kd_redis_cmd(X.r, big_set, NULL, 3, argv, lens);
        }
        cmd(big_get, NULL, 2, "GET", "big11");
        break;
    }
    case 2: {
        kd_redis_script_init(&X.script, "return KEYS[1] .. '|' .. ARGV[1]");
        cmd(noop, NULL, 2, "SCRIPT", "FLUSH");
        const char *argv[] = {"k1", "v1"};
        size_t lens[] = {2, 2};
        kd_redis_eval(X.r, &X.script, script_reply, (void *)0, 1, 2, argv, lens);
        /* the fallback's EVAL loaded it: this one is served by EVALSHA; issued after the first one's
         * reply so it cannot race the fallback */
        break;
    }
    case 3: {
        const char *a1[] = {"SET", "ctr", "10"}, *a2[] = {"INCR", "ctr"}, *a3[] = {"GET", "ctr"};
        size_t l1[] = {3, 3, 2}, l2[] = {4, 3}, l3[] = {3, 3};
        struct kd_redis_cmdv c[] = {{3, a1, l1}, {2, a2, l2}, {2, a3, l3}};
        kd_redis_multi(X.r, exec_reply, NULL, 3, c);
        break;
    }
    case 4:
        cmd(error_reply, NULL, 1, "GET");
        break;
    default:
        finish();
        break;
    }
}

/* ---- hooks ---- */

static void on_up(void *arg)
{
    X.ups++;
    X.up_at = kd_clock_ms();
    char d[200];
    snprintf(d, sizeof(d), "%s", kd_redis_address(X.r));
    printf("{\"event\":\"up\",\"n\":%d,\"address\":", X.ups);
    json_str(d);
    printf("}\n");
    fflush(stdout);
    if (X.ups == 1)
        snprintf(X.first_addr, sizeof(X.first_addr), "%s", d);
    if (strcmp(X.mode, "basic") == 0 && X.ups == 1)
        basic_next();
}

static void on_down(void *arg, const char *reason)
{
    event("down", reason);
}

static void sub_up(void *arg)
{
    X.sub_ups++;
    printf("{\"event\":\"sub_up\",\"n\":%d}\n", X.sub_ups);
    fflush(stdout);
}

static void on_message(void *arg, const char *ch, size_t chlen, const char *msg, size_t msglen)
{
    X.msgs++;
    if (!X.got_message && X.ups >= 2 && X.sub_ups >= 2 && msglen == 5 && memcmp(msg, "after", 5) == 0) {
        X.got_message = true;
        check("pubsub_message_after_restart", chlen == 2 && memcmp(ch, "ch", 2) == 0, "");
        finish();
    }
}

static void traffic_reply(void *arg, const struct kd_resp *reply, const char *err)
{
    if (err != NULL && X.down_errs++ == 0) {
        snprintf(X.last_err, sizeof(X.last_err), "%s", err);
        event("command_failed", err);
    }
}

static void timeout_reply(void *arg, const struct kd_resp *reply, const char *err)
{
    char want[64];
    snprintf(want, sizeof(want), "read timeout after %u ms", X.o.read_timeout_ms);
    check("read_timeout_error_text",
          err != NULL && strstr(err, want) != NULL && strstr(err, X.o.address) != NULL,
          err ? err : "no error");
    finish();
}

static void tick(struct kd_timer *t)
{
    uint64_t now = kd_clock_ms();
    struct kd_timerwheel *w = kd_shard_timers(X.s);
    if (X.done)
        return;
    if (strcmp(X.mode, "error") == 0) {
        const char *e = kd_redis_last_error(X.r);
        if (strstr(e, X.expect) != NULL) {
            /* and a command issued now fails at once with the cause */
            snprintf(X.last_err, sizeof(X.last_err), "%s", "");
            cmd(traffic_reply, NULL, 1, "PING");
            bool ok = strstr(X.last_err, "not connected (") != NULL && strstr(X.last_err, X.expect) != NULL &&
                      strstr(X.last_err, "i/o timeout") == NULL;
            check("error_text", ok, X.last_err);
            finish();
            return;
        }
    } else if (strcmp(X.mode, "timeout") == 0) {
        if (X.ups == 1 && !X.sent_after_up && now >= X.up_at + 700) {
            X.sent_after_up = true;
            cmd(timeout_reply, NULL, 1, "PING");
        }
    } else if (strcmp(X.mode, "restart") == 0) {
        if (kd_redis_up(X.r))
            cmd(traffic_reply, NULL, 2, "INCR", "traffic");
        if (X.ups >= 2 && X.sub_ups >= 2 && !X.got_message)
            cmd(noop, NULL, 3, "PUBLISH", "ch", "after");
    } else if (strcmp(X.mode, "sentinel") == 0) {
        if (kd_redis_up(X.r))
            cmd(traffic_reply, NULL, 3, "SET", "sentinel-key", "v");
        if (X.ups >= 2 && strcmp(kd_redis_address(X.r), X.first_addr) != 0) {
            char d[400];
            snprintf(d, sizeof(d), "%s -> %s", X.first_addr, kd_redis_address(X.r));
            check("followed_failover", true, d);
            finish();
            return;
        }
    }
    kd_timerwheel_add(w, &X.tick, now + 20);
}

static int on_start(struct kd_shard *s)
{
    struct kd_redis_hooks h = {.on_up = on_up, .on_down = on_down};
    X.s = s;
    X.started = kd_clock_ms();
    X.o.name = "test";
    X.r = kd_redis_new(s, &X.o, &h, NULL);
    if (X.r == NULL)
        return -ENOMEM;
    if (strcmp(X.mode, "restart") == 0) {
        struct kd_redis_opts so = X.o;
        struct kd_redis_hooks sh = {.on_up = sub_up, .on_message = on_message};
        so.subscriber = true;
        so.name = "test-sub";
        X.sub = kd_redis_new(s, &so, &sh, NULL);
        if (X.sub == NULL || kd_redis_subscribe(X.sub, "ch", 2) < 0)
            return -ENOMEM;
    }
    kd_timer_init(&X.tick, tick);
    kd_timerwheel_add(kd_shard_timers(s), &X.tick, kd_shard_now_ms(s) + 20);
    return 0;
}

static void on_stop(struct kd_shard *s)
{
    kd_timerwheel_cancel(kd_shard_timers(s), &X.tick);
    kd_redis_free(X.r);
    kd_redis_free(X.sub);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {{"addr", required_argument, NULL, 'a'},
                                       {"password", required_argument, NULL, 'p'},
                                       {"username", required_argument, NULL, 'u'},
                                       {"db", required_argument, NULL, 'd'},
                                       {"tls-ca", required_argument, NULL, 'c'},
                                       {"server-name", required_argument, NULL, 'n'},
                                       {"sentinel-master", required_argument, NULL, 'm'},
                                       {"sentinel", required_argument, NULL, 's'},
                                       {"read-timeout", required_argument, NULL, 'r'},
                                       {"dial-timeout", required_argument, NULL, 't'},
                                       {"expect", required_argument, NULL, 'e'},
                                       {"limit", required_argument, NULL, 'l'},
                                       {NULL, 0, NULL, 0}};
    const char *ca = NULL;
    long limit = 60;
    unsigned nsent = 0;
    int opt;
    X.o.read_timeout_ms = 2000;
    X.o.dial_timeout_ms = 2000;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'a':
            X.o.address = optarg;
            break;
        case 'p':
            X.o.password = optarg;
            break;
        case 'u':
            X.o.username = optarg;
            break;
        case 'd':
            X.o.database = (unsigned)atoi(optarg);
            break;
        case 'c':
            ca = optarg;
            break;
        case 'n':
            X.o.server_name = optarg;
            break;
        case 'm':
            X.o.sentinel_master = optarg;
            break;
        case 's':
            if (nsent < 8)
                X.sentinels[nsent++] = optarg;
            break;
        case 'r':
            X.o.read_timeout_ms = (uint32_t)atoi(optarg);
            break;
        case 't':
            X.o.dial_timeout_ms = (uint32_t)atoi(optarg);
            break;
        case 'e':
            X.expect = optarg;
            break;
        case 'l':
            limit = atol(optarg);
            break;
        default:
            return 2;
        }
    }
    if (optind != argc - 1 || (X.o.address == NULL && X.o.sentinel_master == NULL)) {
        fprintf(stderr, "usage: redis_testclient MODE --addr ADDR [options]\n");
        return 2;
    }
    X.mode = argv[optind];
    if (strcmp(X.mode, "error") == 0 && X.expect == NULL)
        X.expect = "";
    X.o.sentinel_addrs = X.sentinels;
    X.o.n_sentinel_addrs = nsent;
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    kd_log_configure(KD_LOG_INFO, 2);
    char err[512];
    struct kd_tls_ctx *tls = NULL;
    if (ca != NULL) {
        struct kd_tls_ctx_opts to = {.server = false, .ca_file = ca};
        if (kd_tls_ctx_create(&to, &tls, err, sizeof(err)) < 0) {
            fprintf(stderr, "tls: %s\n", err);
            return 1;
        }
        X.o.tls = tls;
    }
    struct kd_server_opts so = {.shards = 1,
                                .connections_per_shard = 64,
                                .recv_buffers = 256,
                                .recv_buffer_size = 16384,
                                .ring_size = 64,
                                .shutdown_grace_ms = 2000,
                                .on_shard_start = on_start,
                                .on_shard_stop = on_stop};
    if (kd_server_create(&so, &X.srv, err, sizeof(err)) < 0 || kd_server_start(X.srv, err, sizeof(err)) < 0) {
        fprintf(stderr, "start: %s\n", err);
        return 1;
    }
    struct timespec ts = {.tv_sec = limit};
    int sig = sigtimedwait(&sigs, NULL, &ts);
    kd_server_stop(X.srv);
    kd_server_wait(X.srv);
    kd_server_destroy(X.srv);
    if (tls != NULL)
        kd_tls_ctx_destroy(tls);
    free(X.big);
    if (sig < 0) {
        printf("{\"done\":true,\"ok\":false,\"detail\":\"timed out after %ld s\"}\n", limit);
        return 1;
    }
    return X.failures == 0 && X.checks > 0 ? 0 : 1;
}

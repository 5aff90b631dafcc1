/* agentsim.c — the bench's agent simulator, on kasd's own shards and gRPC client code.
 *
 * Agent mode (--target, kasd's agent listener): N agents, each one HTTP/2 connection (one
 * kd_grpc_channel) sending `authorization: Bearer <token>` on every call. Each agent registers
 * (AgentRegistrar/Register) and keeps K idle reverse tunnels (ReverseTunnel/Connect streams whose
 * first message is the descriptor). When kasd binds a call to a tunnel (RequestInfo), the agent at
 * once opens a replacement, as agentk does when fewer than its minimum are idle, and serves the
 * call; a tunnel carries one call.
 *
 * Direct mode (--listen): the same methods as a plain gRPC server (the "direct" baseline, and the
 * backend behind haproxy). Both modes may run in one process.
 *
 * Methods (service bench.Echo; raw bytes in and out):
 *   /bench.Echo/Unary   after the request half-closes: header, every request message, trailer
 *   /bench.Echo/Bulk    header at once, each message echoed as it arrives, trailer on half-close;
 *                       the echo holds input while its own output is over the high-water mark
 *   /bench.Echo/Source  request "N SIZE": N pattern messages of SIZE bytes as fast as flow
 *                       control allows (the slow-reader scenario), then trailer
 *   /bench.Echo/Sink    counts request bytes; on half-close answers the count as decimal text
 *
 * Output (stdout, one JSON object per line): {"event":"listening",...} in direct mode,
 * {"event":"ready",...} once every agent has registered and has K tunnels accepted by kasd (or
 * {"event":"not_ready",...} after --ready-timeout), and {"event":"stats",...} at exit.
 * Runs until SIGTERM/SIGINT or --duration seconds, whichever comes first.
 *
 *   agentsim --write-tokens FILE --agents N [--first-agent ID] [--seed S]     (and exit)
 *   agentsim --target 127.0.0.1:PORT --agents N [--tunnels K] [--seed S | --tokens FILE]
 *            [--ca FILE [--server-name NAME]] [--shards S] [--connect-window W] [--trace-tunnels]
 *   agentsim --listen 127.0.0.1:0 [--shards S]
 *
 * Limits: every agent is one TCP connection from 127.0.0.1 to the target, so one target address
 * allows about as many agents as the ephemeral port range has ports (ip_local_port_range: ~28k).
 * kd_conn_connect cannot bind a source address yet; see docs/benchmarks.md.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/resource.h>

#include "bench/agentcodec.h"
#include "bench/benchlib.h"
#include "core/clock.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/tls.h"
#include "core/compress.h"
#include "shards/grpc.h"
#include "shards/server.h"
#include "shards/shard.h"

#define CONNECT_PATH   "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect"
#define REGISTER_PATH  "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register"
#define SERVICE        "bench.Echo"
#define MAX_RECONNECTS 20

enum method { M_UNARY, M_BULK, M_SOURCE, M_SINK, M_COUNT, M_NONE = M_COUNT };
static const char *const method_names[M_COUNT] = {"Unary", "Bulk", "Source", "Sink"};

struct opts {
    bool gzip; /* --gzip: grpc-encoding gzip and every message compressed, as agentk sends */
    struct sockaddr_in target;
    char authority[64];
    char server_name[64];
    bool have_target;
    struct sockaddr_in listen;
    bool have_listen;
    int64_t first_agent, nagents;
    unsigned tunnels;
    unsigned shards;
    unsigned connect_window;
    uint64_t seed;
    int64_t *ids; /* from --tokens, else first_agent + i */
    char *tokens; /* from --tokens: nagents * BENCH_TOKEN_MAX */
    struct kd_tls_ctx *tls;
    uint32_t duration_s;
    uint32_t ready_timeout_s;
    bool trace_tunnels; /* --trace-tunnels: tunnels only after Register succeeded; a tunnel_open line each */
};

/* Per shard, written by the shard only; read by main after the shards joined. */
struct stats {
    uint64_t calls[M_COUNT]; /* calls served to completion (agent and direct) */
    uint64_t tunnel_calls, direct_calls;
    uint64_t calls_failed;        /* bound/accepted but ended with an error before finishing */
    uint64_t bytes_in, bytes_out; /* request and response payload bytes */
    uint64_t tunnels_opened, tunnels_failed, tunnels_unused_at_exit;
    uint64_t registers_ok, registers_failed;
    uint64_t connects, reconnects, connect_failures;
    uint64_t protocol_errors;
};

struct simshard;

struct agent {
    struct simshard *sh;
    int64_t id;
    char auth[8 + BENCH_TOKEN_MAX];
    struct kd_h2_header md;
    struct kd_grpc_channel *ch;
    kd_grpc_call *reg_call; /* the Register call in flight on ch */
    uint32_t gen;           /* bumped on reconnect: calls of an older channel no longer count */
    unsigned idle;          /* tunnels opened on this channel, not bound, not ended */
    unsigned accepted;      /* of those, kasd answered with response headers */
    unsigned reconnects;
    bool registered, ready, given_up, reconnect_pending;
    struct kd_timer timer;  /* reconnect or re-open tunnels later */
    struct kd_list tunnels; /* every live tunnel call (struct svc.link) */
};

/* One served call: a tunnel (agent mode) or a server call (direct mode). */
struct svc {
    kd_grpc_call *call;
    struct simshard *sh;
    struct agent *a; /* tunnel only */
    uint32_t gen;
    enum method m;
    bool tunnel, bound, accepted, header_sent, finished, held, source_started;
    struct kd_list link; /* tunnel: agent->tunnels */
    uint8_t *buf;        /* Unary: [u32 len][bytes]... to echo after the half-close */
    size_t len, cap;
    uint64_t left, seq; /* Source */
    uint32_t size;
    uint64_t total; /* Sink */
};

struct simshard {
    struct kd_shard *s;
    struct agent *agents;
    size_t nagents, next, connecting;
    struct kd_timer kick;
    bool drained;
    uint8_t *scratch;
    size_t scratch_cap;
    struct stats st;
};

static struct opts O = {.first_agent = 1,
                        .tunnels = 2,
                        .shards = 1,
                        .connect_window = 256,
                        .duration_s = 3600,
                        .ready_timeout_s = 120};
static struct simshard *SH;
static uint8_t descriptor[256];
static size_t descriptor_len;
static _Atomic int64_t g_ready, g_given_up, g_live_tunnels;
static _Atomic bool g_stopping;

static void agent_connect(struct agent *a);
static void replenish(struct agent *a);

static uint8_t *scratch(struct simshard *sh, size_t n)
{
    if (n > sh->scratch_cap) {
        size_t cap = sh->scratch_cap ? sh->scratch_cap : 65536;
        while (cap < n)
            cap *= 2;
        uint8_t *p = realloc(sh->scratch, cap);
        if (p == NULL)
            abort(); /* a benchmark tool: running out of memory is fatal */
        sh->scratch = p;
        sh->scratch_cap = cap;
    }
    return sh->scratch;
}

static struct simshard *shard_of_call(kd_grpc_call *call)
{
    return kd_shard_user(kd_conn_shard(kd_grpc_call_conn(call)));
}

/* ---- the service, for tunnels and direct calls alike ---- */

static int out_header(struct svc *v)
{
    if (v->header_sent)
        return 0;
    v->header_sent = true;
    if (v->tunnel)
        return kd_grpc_send_message(v->call, bench_tun_header_empty, sizeof(bench_tun_header_empty));
    return kd_grpc_send_headers(v->call, NULL, 0);
}

static int out_msg(struct svc *v, const uint8_t *d, size_t n)
{
    out_header(v);
    v->sh->st.bytes_out += n;
    if (!v->tunnel)
        return kd_grpc_send_message(v->call, d, n);
    size_t need = bench_tun_message_size(n);
    uint8_t *b = scratch(v->sh, need);
    bench_tun_put_message(b, d, n);
    return kd_grpc_send_message(v->call, b, need);
}

/* A pattern message written straight into the send buffer. */
static int out_pattern(struct svc *v, size_t n, uint64_t seq)
{
    out_header(v);
    v->sh->st.bytes_out += n;
    size_t need = v->tunnel ? bench_tun_message_size(n) : n;
    uint8_t *b = scratch(v->sh, need);
    uint8_t *d = v->tunnel ? bench_tun_put_message_prefix(b, n) : b;
    bench_pattern_fill(d, n, seq);
    return kd_grpc_send_message(v->call, b, need);
}

static void out_finish(struct svc *v, int status, const char *msg)
{
    if (v->finished)
        return;
    v->finished = true;
    if (status == KD_GRPC_OK) {
        out_header(v);
        if (v->m < M_COUNT)
            v->sh->st.calls[v->m]++;
        if (v->tunnel)
            v->sh->st.tunnel_calls++;
        else
            v->sh->st.direct_calls++;
    }
    if (!v->tunnel) {
        kd_grpc_finish(v->call, status, msg, NULL, 0);
        return;
    }
    if (status == KD_GRPC_OK) {
        kd_grpc_send_message(v->call, bench_tun_trailer_empty, sizeof(bench_tun_trailer_empty));
    } else {
        size_t ml = strlen(msg);
        uint8_t *b = scratch(v->sh, bench_tun_error_size(ml));
        uint8_t *e = bench_tun_put_error(b, status, msg, ml);
        kd_grpc_send_message(v->call, b, (size_t)(e - b));
    }
    kd_grpc_close_send(v->call);
}

static void source_pump(struct svc *v)
{
    while (v->left > 0 && !v->finished) {
        v->left--;
        int rc = out_pattern(v, v->size, v->seq++);
        if (rc != 0)
            return; /* 1: wait for on_writable; <0: the call is over */
    }
    if (v->left == 0 && !v->finished)
        out_finish(v, KD_GRPC_OK, NULL);
}

static void svc_request_message(struct svc *v, const uint8_t *d, size_t n)
{
    v->sh->st.bytes_in += n;
    switch (v->m) {
    case M_UNARY:
        if (v->len + 4 + n > v->cap) {
            size_t cap = v->cap ? v->cap : 256;
            while (cap < v->len + 4 + n)
                cap *= 2;
            uint8_t *b = realloc(v->buf, cap);
            if (b == NULL)
                abort();
            v->buf = b;
            v->cap = cap;
        }
        memcpy(v->buf + v->len, &(uint32_t){(uint32_t)n}, 4);
        if (n)
            memcpy(v->buf + v->len + 4, d, n);
        v->len += 4 + n;
        break;
    case M_BULK:
        if (out_msg(v, d, n) == 1 && !v->held) {
            v->held = true; /* stop acknowledging input until our own output drains */
            kd_grpc_hold_input(v->call, true);
        }
        break;
    case M_SOURCE: {
        char req[64];
        unsigned long long cnt = 0;
        unsigned size = 0;
        size_t l = n < sizeof(req) - 1 ? n : sizeof(req) - 1;
        memcpy(req, d, l);
        req[l] = '\0';
        if (v->source_started)
            break;
        if (sscanf(req, "%llu %u", &cnt, &size) != 2 || size > (4u << 20) - 64) {
            out_finish(v, KD_GRPC_INVALID_ARGUMENT, "want \"N SIZE\"");
            break;
        }
        v->source_started = true;
        v->left = cnt;
        v->size = size;
        source_pump(v);
        break;
    }
    case M_SINK:
        v->total += n;
        break;
    default:
        break;
    }
}

static void svc_request_end(struct svc *v)
{
    switch (v->m) {
    case M_UNARY: {
        size_t off = 0;
        while (off < v->len) {
            uint32_t n;
            memcpy(&n, v->buf + off, 4);
            out_msg(v, v->buf + off + 4, n);
            off += 4 + n;
        }
        free(v->buf);
        v->buf = NULL;
        v->len = v->cap = 0;
        out_finish(v, KD_GRPC_OK, NULL);
        break;
    }
    case M_BULK:
        out_finish(v, KD_GRPC_OK, NULL);
        break;
    case M_SOURCE:
        if (!v->source_started)
            out_finish(v, KD_GRPC_INVALID_ARGUMENT, "Source wants one request message \"N SIZE\"");
        break; /* otherwise the pump finishes */
    case M_SINK: {
        char txt[32];
        int l = snprintf(txt, sizeof(txt), "%llu", (unsigned long long)v->total);
        out_msg(v, (const uint8_t *)txt, (size_t)l);
        out_finish(v, KD_GRPC_OK, NULL);
        break;
    }
    default:
        out_finish(v, KD_GRPC_UNIMPLEMENTED, "no such bench method");
        break;
    }
}

static void svc_writable(struct svc *v)
{
    if (v->held) {
        v->held = false;
        kd_grpc_hold_input(v->call, false);
    }
    if (v->m == M_SOURCE && v->source_started)
        source_pump(v);
}

static enum method method_of(const char *path, size_t len)
{
    static const char prefix[] = "/" SERVICE "/";
    if (len <= sizeof(prefix) - 1 || memcmp(path, prefix, sizeof(prefix) - 1) != 0)
        return M_NONE;
    path += sizeof(prefix) - 1;
    len -= sizeof(prefix) - 1;
    for (int i = 0; i < M_COUNT; i++)
        if (strlen(method_names[i]) == len && memcmp(method_names[i], path, len) == 0)
            return (enum method)i;
    return M_NONE;
}

/* ---- direct mode: a plain gRPC server ---- */

static int direct_message(kd_grpc_call *call, const uint8_t *m, size_t n)
{
    svc_request_message(kd_h2_call_user(call), m, n);
    return 0;
}

static void direct_half_close(kd_grpc_call *call)
{
    svc_request_end(kd_h2_call_user(call));
}

static void direct_writable(kd_grpc_call *call)
{
    svc_writable(kd_h2_call_user(call));
}

static void direct_done(kd_grpc_call *call, int status, const char *message)
{
    struct svc *v = kd_h2_call_user(call);
    if (!v->finished || status != KD_GRPC_OK)
        v->sh->st.calls_failed += status != KD_GRPC_OK;
    free(v->buf);
    free(v);
}

static const struct kd_h2_handler direct_handler = {
    .on_message = direct_message,
    .on_half_close = direct_half_close,
    .on_writable = direct_writable,
    .on_done = direct_done,
};

static int direct_start(kd_grpc_call *call, void *ud)
{
    struct svc *v = calloc(1, sizeof(*v));
    if (v == NULL)
        return KD_GRPC_RESOURCE_EXHAUSTED;
    v->call = call;
    v->sh = shard_of_call(call);
    v->m = (enum method)(intptr_t)ud;
    kd_grpc_accept(call, &direct_handler, v);
    return 0;
}

/* ---- agent mode: tunnels ---- */

static void check_ready(struct agent *a)
{
    if (a->ready || !a->registered || a->accepted < O.tunnels)
        return;
    a->ready = true;
    g_ready++;
    struct simshard *sh = a->sh;
    sh->connecting--;
    kd_timerwheel_add(kd_shard_timers(sh->s), &sh->kick, kd_shard_now_ms(sh->s));
}

static void give_up(struct agent *a)
{
    if (a->given_up || a->ready)
        return;
    a->given_up = true;
    g_given_up++;
    a->sh->connecting--;
    kd_timerwheel_add(kd_shard_timers(a->sh->s), &a->sh->kick, kd_shard_now_ms(a->sh->s));
}

/* The channel failed: start over on a new one after a backoff (100 ms doubling to 2 s). */
static void schedule_reconnect(struct agent *a)
{
    if (a->reconnect_pending || atomic_load(&g_stopping))
        return;
    a->reconnect_pending = true;
    unsigned shift = a->reconnects < 5 ? a->reconnects : 5;
    uint64_t delay = 100u << shift;
    if (delay > 2000)
        delay = 2000;
    kd_timerwheel_add(kd_shard_timers(a->sh->s), &a->timer, kd_shard_now_ms(a->sh->s) + delay);
}

static void agent_timer(struct kd_timer *t)
{
    struct agent *a = KD_CONTAINER_OF(t, struct agent, timer);
    if (atomic_load(&g_stopping))
        return;
    if (!a->reconnect_pending) {
        replenish(a); /* tunnels ended by kasd: open new ones */
        return;
    }
    a->reconnect_pending = false;
    if (++a->reconnects > MAX_RECONNECTS) {
        give_up(a);
        return;
    }
    a->sh->st.reconnects++;
    if (a->ch != NULL)
        kd_grpc_channel_close(a->ch); /* its calls end as UNAVAILABLE with an old generation */
    a->ch = NULL;
    agent_connect(a);
}

static int tun_headers(kd_grpc_call *call)
{
    struct svc *v = kd_h2_call_user(call);
    if (!v->accepted && !v->bound && v->gen == v->a->gen) {
        v->accepted = true;
        v->a->accepted++;
        check_ready(v->a);
    }
    return 0;
}

static int tun_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct svc *v = kd_h2_call_user(call);
    struct agent *a = v->a;
    struct bench_tun_resp r;
    if (bench_tun_decode_response(msg, len, &r) < 0) {
        v->sh->st.protocol_errors++;
        return -EPROTO; /* the call is cancelled */
    }
    switch (r.kind) {
    case BENCH_TUN_REQUEST_INFO:
        if (v->bound) {
            v->sh->st.protocol_errors++;
            return -EPROTO;
        }
        v->bound = true;
        if (v->gen == a->gen) {
            a->idle--;
            if (v->accepted)
                a->accepted--;
            replenish(a); /* agentk: fewer than the minimum idle -> open more at once */
        }
        v->m = method_of(r.method, r.method_len);
        if (v->m == M_NONE)
            out_finish(v, KD_GRPC_UNIMPLEMENTED, "no such bench method");
        else if (v->m == M_BULK)
            out_header(v);
        break;
    case BENCH_TUN_MESSAGE:
        if (!v->bound) {
            v->sh->st.protocol_errors++;
            return -EPROTO;
        }
        if (!v->finished)
            svc_request_message(v, r.data, r.data_len);
        break;
    case BENCH_TUN_CLOSE_SEND:
        if (!v->bound) {
            v->sh->st.protocol_errors++;
            return -EPROTO;
        }
        if (!v->finished)
            svc_request_end(v);
        break;
    }
    return 0;
}

static void tun_writable(kd_grpc_call *call)
{
    svc_writable(kd_h2_call_user(call));
}

static void tun_done(kd_grpc_call *call, int status, const char *message)
{
    struct svc *v = kd_h2_call_user(call);
    struct agent *a = v->a;
    struct simshard *sh = v->sh;
    bool current = v->gen == a->gen;
    kd_list_unlink(&v->link);
    g_live_tunnels--;
    if (!v->bound) {
        if (current) {
            a->idle--;
            if (v->accepted)
                a->accepted--;
        }
        if (atomic_load(&g_stopping))
            sh->st.tunnels_unused_at_exit++;
        else
            sh->st.tunnels_failed++;
    } else if (!v->finished || status != KD_GRPC_OK) {
        sh->st.calls_failed++;
    }
    free(v->buf);
    free(v);
    if (!current || atomic_load(&g_stopping))
        return;
    if (a->ch == NULL || !kd_grpc_channel_usable(a->ch))
        schedule_reconnect(a);
    else if (a->idle < O.tunnels && !kd_timer_is_armed(&a->timer))
        /* kasd ended an idle tunnel (or the call failed): re-open a little later, not in a loop */
        kd_timerwheel_add(kd_shard_timers(sh->s), &a->timer, kd_shard_now_ms(sh->s) + 50);
}

static const struct kd_h2_handler tunnel_handler = {
    .on_headers = tun_headers,
    .on_message = tun_message,
    .on_writable = tun_writable,
    .on_done = tun_done,
};

static bool open_tunnel(struct agent *a)
{
    struct svc *v = calloc(1, sizeof(*v));
    if (v == NULL)
        return false;
    v->sh = a->sh;
    v->a = a;
    v->gen = a->gen;
    v->tunnel = true;
    v->m = M_NONE;
    v->call = kd_grpc_channel_call(a->ch, CONNECT_PATH, &a->md, 1, 0, &tunnel_handler, v);
    if (v->call == NULL) {
        free(v);
        return false;
    }
    a->idle++;
    a->sh->st.tunnels_opened++;
    kd_list_push_back(&a->tunnels, &v->link);
    g_live_tunnels++;
    kd_grpc_send_message(v->call, descriptor, descriptor_len);
    if (O.trace_tunnels) {
        /* The stream's HEADERS and its descriptor are queued on a connection that is up (Register
         * has succeeded) and leave in this loop turn: kasd can register the tunnel from here on.
         * CLOCK_MONOTONIC, comparable with loadgen's timestamps (bench/run S3). */
        printf("{\"event\":\"tunnel_open\",\"agent\":%lld,\"mono_ns\":%llu}\n", (long long)a->id,
               (unsigned long long)kd_clock_ns());
        fflush(stdout);
    }
    return true;
}

static void replenish(struct agent *a)
{
    if (a->ch == NULL || atomic_load(&g_stopping))
        return;
    while (a->idle < O.tunnels)
        if (!open_tunnel(a)) {
            schedule_reconnect(a);
            return;
        }
}

static int reg_message(kd_grpc_call *call, const uint8_t *m, size_t n)
{
    return 0; /* RegisterResponse {} */
}

static void reg_done(kd_grpc_call *call, int status, const char *message)
{
    struct agent *a = kd_h2_call_user(call);
    if (call != a->reg_call)
        return; /* the Register of a channel given up since */
    a->reg_call = NULL;
    if (status == KD_GRPC_OK) {
        a->sh->st.registers_ok++;
        a->registered = true;
        if (O.trace_tunnels)
            replenish(a); /* the connection is up: open the tunnels now */
        check_ready(a);
        return;
    }
    a->sh->st.registers_failed++;
    if (atomic_load(&g_stopping))
        return;
    if (status == KD_GRPC_UNAUTHENTICATED) {
        if (a->reconnects == 0) {
            struct kd_logline l;
            kd_log_begin(&l, KD_LOG_WARN, "agent_unauthenticated");
            kd_log_int(&l, "agent_id", a->id);
            kd_log_str(&l, "message", message);
            kd_log_end(&l);
        }
        give_up(a); /* retrying will not help */
        return;
    }
    schedule_reconnect(a);
}

static const struct kd_h2_handler register_handler = {.on_message = reg_message, .on_done = reg_done};

static void agent_connect(struct agent *a)
{
    struct simshard *sh = a->sh;
    struct kd_grpc_channel_opts o = {
        .addr = (const struct sockaddr *)&O.target,
        .addrlen = sizeof(O.target),
        .authority = O.authority,
        .tls = O.tls,
        .server_name = O.server_name,
        .compression = O.gzip ? KD_COMPRESS_GZIP : KD_COMPRESS_IDENTITY,
    };
    a->gen++;
    a->idle = a->accepted = 0;
    a->registered = false;
    a->ch = kd_grpc_channel_open(sh->s, &o);
    if (a->ch == NULL) {
        sh->st.connect_failures++;
        schedule_reconnect(a);
        return;
    }
    sh->st.connects++;
    kd_grpc_call *reg = kd_grpc_channel_call(a->ch, REGISTER_PATH, &a->md, 1, 20000000, &register_handler, a);
    a->reg_call = reg;
    if (reg == NULL) {
        schedule_reconnect(a);
        return;
    }
    uint8_t buf[256];
    char pod[48];
    snprintf(pod, sizeof(pod), "agentsim-%lld", (long long)a->id);
    long n = bench_register_request(buf, sizeof(buf), "bench-agentsim", pod,
                                    (int64_t)(kd_hash_u64((uint64_t)a->id) >> 1));
    kd_grpc_send_message(reg, buf, (size_t)n);
    kd_grpc_close_send(reg);
    if (!O.trace_tunnels)
        replenish(a); /* as agentk: tunnels at once, alongside Register */
}

/* Start agents while fewer than connect_window are connecting (not yet ready). */
static void kick(struct kd_timer *t)
{
    struct simshard *sh = KD_CONTAINER_OF(t, struct simshard, kick);
    while (!atomic_load(&g_stopping) && sh->next < sh->nagents && sh->connecting < O.connect_window) {
        struct agent *a = &sh->agents[sh->next++];
        sh->connecting++;
        agent_connect(a);
    }
}

static int shard_start(struct kd_shard *s)
{
    struct simshard *sh = &SH[kd_shard_id(s)];
    sh->s = s;
    kd_shard_set_user(s, sh);
    kd_timer_init(&sh->kick, kick);
    for (size_t i = 0; i < sh->nagents; i++) {
        sh->agents[i].sh = sh;
        kd_list_init(&sh->agents[i].tunnels);
        kd_timer_init(&sh->agents[i].timer, agent_timer);
    }
    if (sh->nagents > 0)
        kd_timerwheel_add(kd_shard_timers(s), &sh->kick, kd_shard_now_ms(s));
    return 0;
}

/* Stopping, step 1 (before the connections close): half-close every idle tunnel, as an agent
 * leaving gracefully does, so kasd retires them as finished streams rather than as streams of a
 * connection that vanished. Calls being served finish on their own. */
static void shard_turn(struct kd_shard *s)
{
    struct simshard *sh = kd_shard_user(s);
    if (sh == NULL || sh->drained || !atomic_load(&g_stopping))
        return;
    sh->drained = true;
    for (size_t i = 0; i < sh->nagents; i++) {
        struct agent *a = &sh->agents[i];
        kd_timerwheel_cancel(kd_shard_timers(s), &a->timer);
        for (struct kd_list *n = a->tunnels.next; n != &a->tunnels; n = n->next) {
            struct svc *v = KD_CONTAINER_OF(n, struct svc, link);
            if (!v->bound && !v->finished) {
                v->finished = true;
                kd_grpc_close_send(v->call);
            }
        }
    }
}

static void shard_stop(struct kd_shard *s)
{
    struct simshard *sh = kd_shard_user(s);
    kd_timerwheel_cancel(kd_shard_timers(s), &sh->kick);
    for (size_t i = 0; i < sh->nagents; i++) {
        struct agent *a = &sh->agents[i];
        kd_timerwheel_cancel(kd_shard_timers(s), &a->timer);
        if (a->ch != NULL)
            kd_grpc_channel_close(a->ch);
        a->ch = NULL;
    }
}

/* ---- main ---- */

static void print_stats(uint64_t elapsed_ms)
{
    struct stats t = {0};
    for (unsigned i = 0; i < O.shards; i++) {
        const struct stats *s = &SH[i].st;
        for (int m = 0; m < M_COUNT; m++)
            t.calls[m] += s->calls[m];
        t.tunnel_calls += s->tunnel_calls;
        t.direct_calls += s->direct_calls;
        t.calls_failed += s->calls_failed;
        t.bytes_in += s->bytes_in;
        t.bytes_out += s->bytes_out;
        t.tunnels_opened += s->tunnels_opened;
        t.tunnels_failed += s->tunnels_failed;
        t.tunnels_unused_at_exit += s->tunnels_unused_at_exit;
        t.registers_ok += s->registers_ok;
        t.registers_failed += s->registers_failed;
        t.connects += s->connects;
        t.reconnects += s->reconnects;
        t.connect_failures += s->connect_failures;
        t.protocol_errors += s->protocol_errors;
    }
    printf("{\"event\":\"stats\",\"elapsed_ms\":%llu,\"agents\":%lld,\"ready\":%lld,\"given_up\":%lld,"
           "\"calls\":{\"unary\":%llu,\"bulk\":%llu,\"source\":%llu,\"sink\":%llu},\"tunnel_calls\":%llu,"
           "\"direct_calls\":%llu,\"calls_failed\":%llu,\"bytes_in\":%llu,\"bytes_out\":%llu,"
           "\"tunnels_opened\":%llu,\"tunnels_failed\":%llu,\"tunnels_unused_at_exit\":%llu,"
           "\"registers_ok\":%llu,\"registers_failed\":%llu,\"connects\":%llu,\"reconnects\":%llu,"
           "\"connect_failures\":%llu,\"protocol_errors\":%llu,\"cpu_us\":%llu,\"rss_kib\":%llu}\n",
           (unsigned long long)elapsed_ms, (long long)O.nagents, (long long)atomic_load(&g_ready),
           (long long)atomic_load(&g_given_up), (unsigned long long)t.calls[M_UNARY],
           (unsigned long long)t.calls[M_BULK], (unsigned long long)t.calls[M_SOURCE],
           (unsigned long long)t.calls[M_SINK], (unsigned long long)t.tunnel_calls,
           (unsigned long long)t.direct_calls, (unsigned long long)t.calls_failed,
           (unsigned long long)t.bytes_in, (unsigned long long)t.bytes_out,
           (unsigned long long)t.tunnels_opened, (unsigned long long)t.tunnels_failed,
           (unsigned long long)t.tunnels_unused_at_exit, (unsigned long long)t.registers_ok,
           (unsigned long long)t.registers_failed, (unsigned long long)t.connects,
           (unsigned long long)t.reconnects, (unsigned long long)t.connect_failures,
           (unsigned long long)t.protocol_errors, (unsigned long long)bench_cpu_us(),
           (unsigned long long)bench_rss_kib());
    fflush(stdout);
}

/* One TCP connection per agent, all from 127.0.0.1 to one address: the ephemeral port range and
 * the open-file limit cap the agent count. Say so plainly rather than failing halfway. */
static int check_limits(char *err, size_t errlen)
{
    long lo = 32768, hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f != NULL) {
        if (fscanf(f, "%ld %ld", &lo, &hi) != 2) {
            lo = 32768;
            hi = 60999;
        }
        fclose(f);
    }
    if (O.nagents > hi - lo + 1 - 500) {
        snprintf(err, errlen,
                 "%lld agents need as many connections from 127.0.0.1 to %s, but the ephemeral port range "
                 "(net.ipv4.ip_local_port_range %ld-%ld) allows about %ld; kd_conn_connect cannot bind other "
                 "127.x source addresses yet",
                 (long long)O.nagents, O.authority, lo, hi, hi - lo + 1 - 500);
        return -1;
    }
    struct rlimit rl;
    rlim_t need = (rlim_t)O.nagents + 256;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < need) {
        rl.rlim_cur = need <= rl.rlim_max ? need : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < need) {
            snprintf(
                err, errlen,
                "%lld agents need %llu open files, but RLIMIT_NOFILE allows %llu (hard limit %llu): raise it "
                "(ulimit -n) or run fewer agents",
                (long long)O.nagents, (unsigned long long)need, (unsigned long long)rl.rlim_cur,
                (unsigned long long)rl.rlim_max);
            return -1;
        }
    }
    return 0;
}

static void usage(FILE *f)
{
    fprintf(
        f, "usage: agentsim --write-tokens FILE --agents N [--first-agent ID] [--seed S]\n"
           "       agentsim [--target 127.0.0.1:PORT --agents N] [--listen 127.0.0.1:PORT] [options]\n"
           "  --tunnels K          idle tunnels per agent (default 2)\n"
           "  --first-agent ID     first agent id (default 1); agents are ID..ID+N-1\n"
           "  --seed S             token seed (default 1); --tokens FILE reads tokens instead\n"
           "  --ca FILE            TLS to the target, verifying with this CA (--server-name, default host)\n"
           "  --shards S           event-loop threads (default 1)\n"
           "  --gzip               compress every call (grpc-encoding: gzip), as agentk does\n"
           "  --connect-window W   agents connecting at once per shard (default 256)\n"
           "  --duration SECONDS   exit after this long (default 3600)\n"
           "  --ready-timeout S    report not_ready after this long (default 120)\n"
           "  --trace-tunnels      open tunnels only once Register has succeeded (the connection is up) and\n"
           "                       print {\"event\":\"tunnel_open\",\"agent\":ID,\"mono_ns\":T} for each, T "
           "the\n"
           "                       CLOCK_MONOTONIC time its descriptor was queued (bench/run S3)\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"target", required_argument, NULL, 't'},   {"listen", required_argument, NULL, 'l'},
        {"agents", required_argument, NULL, 'n'},   {"first-agent", required_argument, NULL, 'f'},
        {"tunnels", required_argument, NULL, 'k'},  {"seed", required_argument, NULL, 'S'},
        {"tokens", required_argument, NULL, 'T'},   {"write-tokens", required_argument, NULL, 'W'},
        {"ca", required_argument, NULL, 'c'},       {"server-name", required_argument, NULL, 'N'},
        {"shards", required_argument, NULL, 's'},   {"connect-window", required_argument, NULL, 'w'},
        {"duration", required_argument, NULL, 'd'}, {"ready-timeout", required_argument, NULL, 'r'},
        {"gzip", no_argument, NULL, 'G'},           {"trace-tunnels", no_argument, NULL, 'P'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    const char *write_tokens = NULL, *tokens_file = NULL, *ca = NULL, *target = NULL;
    O.seed = 1;
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'G':
            O.gzip = true;
            break;
        case 'P':
            O.trace_tunnels = true;
            break;
        case 't':
            target = optarg;
            break;
        case 'l':
            if (bench_parse_loopback(optarg, &O.listen) < 0) {
                fprintf(stderr, "agentsim: --listen wants 127.x.y.z:PORT\n");
                return 2;
            }
            O.have_listen = true;
            break;
        case 'n':
            O.nagents = strtoll(optarg, NULL, 10);
            break;
        case 'f':
            O.first_agent = strtoll(optarg, NULL, 10);
            break;
        case 'k':
            O.tunnels = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'S':
            O.seed = strtoull(optarg, NULL, 10);
            break;
        case 'T':
            tokens_file = optarg;
            break;
        case 'W':
            write_tokens = optarg;
            break;
        case 'c':
            ca = optarg;
            break;
        case 'N':
            snprintf(O.server_name, sizeof(O.server_name), "%s", optarg);
            break;
        case 's':
            O.shards = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'w':
            O.connect_window = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'd':
            O.duration_s = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'r':
            O.ready_timeout_s = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (write_tokens != NULL) {
        if (O.nagents <= 0) {
            fprintf(stderr, "agentsim: --write-tokens needs --agents N\n");
            return 2;
        }
        int rc = bench_tokens_write(write_tokens, O.seed, O.first_agent, O.nagents);
        if (rc < 0) {
            fprintf(stderr, "agentsim: %s: %s\n", write_tokens, strerror(-rc));
            return 1;
        }
        return 0;
    }
    if (O.shards == 0 || O.shards > 64 || O.connect_window == 0 || (target == NULL && !O.have_listen)) {
        usage(stderr);
        return 2;
    }
    if (target != NULL) {
        if (bench_parse_loopback(target, &O.target) < 0 || O.nagents <= 0) {
            fprintf(stderr, "agentsim: --target wants 127.x.y.z:PORT and --agents N > 0\n");
            return 2;
        }
        O.have_target = true;
        snprintf(O.authority, sizeof(O.authority), "%s", target);
        if (O.server_name[0] == '\0') {
            snprintf(O.server_name, sizeof(O.server_name), "%s", target);
            *strrchr(O.server_name, ':') = '\0';
        }
        char why[512];
        if (check_limits(why, sizeof(why)) < 0) {
            fprintf(stderr, "agentsim: %s\n", why);
            return 1;
        }
    } else {
        O.nagents = 0;
    }
    if (tokens_file != NULL && O.have_target) {
        O.ids = calloc((size_t)O.nagents, sizeof(*O.ids));
        O.tokens = calloc((size_t)O.nagents, BENCH_TOKEN_MAX);
        long n =
            O.ids && O.tokens ? bench_tokens_read(tokens_file, O.ids, O.tokens, (size_t)O.nagents) : -ENOMEM;
        if (n < O.nagents) {
            fprintf(stderr, "agentsim: %s: %s\n", tokens_file,
                    n < 0 ? strerror((int)-n) : "fewer tokens in the file than --agents");
            return 1;
        }
    }
    static const char *const mnames[] = {"Unary", "Bulk", "Source", "Sink"};
    long dl = bench_tun_descriptor(descriptor, sizeof(descriptor), SERVICE, mnames, 4);
    if (dl < 0)
        return 1;
    descriptor_len = (size_t)dl;

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    kd_log_configure(KD_LOG_WARN, 2);
    kd_log_start();
    char err[512];
    if (ca != NULL) {
        struct kd_tls_ctx_opts to = {.server = false, .ca_file = ca, .alpn = "h2"};
        if (kd_tls_ctx_create(&to, &O.tls, err, sizeof(err)) < 0) {
            fprintf(stderr, "agentsim: tls: %s\n", err);
            return 1;
        }
    }

    /* Agents are dealt to shards round-robin; each shard owns its slice. */
    SH = calloc(O.shards, sizeof(*SH));
    if (SH == NULL)
        return 1;
    for (unsigned i = 0; i < O.shards; i++) {
        SH[i].nagents = (size_t)(O.nagents / O.shards + ((int64_t)i < O.nagents % O.shards));
        SH[i].agents = calloc(SH[i].nagents ? SH[i].nagents : 1, sizeof(struct agent));
        if (SH[i].agents == NULL)
            return 1;
    }
    for (int64_t k = 0; k < O.nagents; k++) {
        struct agent *a = &SH[k % O.shards].agents[k / O.shards];
        char tok[BENCH_TOKEN_MAX];
        a->id = O.ids ? O.ids[k] : O.first_agent + k;
        if (O.tokens)
            memcpy(tok, O.tokens + (size_t)k * BENCH_TOKEN_MAX, BENCH_TOKEN_MAX);
        else
            bench_token(O.seed, a->id, tok);
        int l = snprintf(a->auth, sizeof(a->auth), "Bearer %s", tok);
        a->md = (struct kd_h2_header){"authorization", 13, a->auth, (size_t)l};
    }

    struct kd_grpc_method methods[M_COUNT + 1];
    for (int i = 0; i < M_COUNT; i++) {
        static char paths[M_COUNT][48];
        snprintf(paths[i], sizeof(paths[i]), "/%s/%s", SERVICE, method_names[i]);
        methods[i] = (struct kd_grpc_method){paths[i], direct_start, (void *)(intptr_t)i};
    }
    methods[M_COUNT] = kd_grpc_health_method;
    struct kd_grpc_server_cfg cfg = {.name = "bench", .methods = methods, .nmethods = M_COUNT + 1};
    kd_grpc_server_cfg_defaults(&cfg);
    size_t per_shard = (size_t)(O.nagents / O.shards + 1);
    struct kd_server_opts so = {
        .shards = O.shards,
        .pin = false, /* the harness pins with taskset */
        .connections_per_shard = (uint32_t)(per_shard + (O.have_listen ? 4096 : 0) + 64),
        .recv_buffers = 1024,
        .recv_buffer_size = 16384,
        .ring_size = 1024,
        .shutdown_grace_ms = 500,
        .on_shard_start = shard_start,
        .on_shard_stop = shard_stop,
        .on_turn = shard_turn,
    };
    if (O.have_listen) {
        memcpy(&so.listeners[0].addr, &O.listen, sizeof(O.listen));
        so.listeners[0].addrlen = sizeof(O.listen);
        so.listeners[0].name = "bench";
        so.listeners[0].ops = &kd_grpc_server_ops;
        so.listeners[0].cfg = &cfg;
        so.nlisteners = 1;
    }
    struct kd_server *srv;
    if (kd_server_create(&so, &srv, err, sizeof(err)) < 0) {
        fprintf(stderr, "agentsim: %s\n", err);
        return 1;
    }
    uint64_t t0 = kd_clock_ms();
    if (kd_server_start(srv, err, sizeof(err)) < 0) {
        fprintf(stderr, "agentsim: %s\n", err);
        return 1;
    }
    if (O.have_listen) {
        char addr[80];
        kd_server_address(srv, 0, addr, sizeof(addr));
        printf("{\"event\":\"listening\",\"address\":\"%s\",\"port\":%d}\n", addr, kd_server_port(srv, 0));
        fflush(stdout);
    }
    bool reported = O.nagents == 0;
    uint64_t end = t0 + (uint64_t)O.duration_s * 1000u;
    for (;;) {
        struct timespec ts = {.tv_nsec = 20 * 1000000};
        if (sigtimedwait(&sigs, NULL, &ts) >= 0)
            break;
        uint64_t now = kd_clock_ms();
        if (now >= end)
            break;
        int64_t ready = atomic_load(&g_ready), given_up = atomic_load(&g_given_up);
        if (!reported && (ready + given_up >= O.nagents || now - t0 >= (uint64_t)O.ready_timeout_s * 1000u)) {
            reported = true;
            printf(
                "{\"event\":\"%s\",\"agents\":%lld,\"ready\":%lld,\"given_up\":%lld,\"tunnels_per_agent\":%u,"
                "\"ms\":%llu,\"rss_kib\":%llu}\n",
                ready == O.nagents ? "ready" : "not_ready", (long long)O.nagents, (long long)ready,
                (long long)given_up, O.tunnels, (unsigned long long)(now - t0),
                (unsigned long long)bench_rss_kib());
            fflush(stdout);
        }
    }
    /* Leave gracefully: tunnels first (shard_turn), then the connections, bounded by 3 s. */
    atomic_store(&g_stopping, true);
    for (unsigned i = 0; i < O.shards; i++)
        kd_server_wake(srv, i);
    for (int i = 0; i < 300 && atomic_load(&g_live_tunnels) > 0; i++) {
        struct timespec ts = {.tv_nsec = 10 * 1000000};
        nanosleep(&ts, NULL);
    }
    kd_server_stop(srv);
    kd_server_wait(srv);
    print_stats(kd_clock_ms() - t0);
    kd_server_destroy(srv);
    if (O.tls)
        kd_tls_ctx_destroy(O.tls);
    for (unsigned i = 0; i < O.shards; i++) {
        free(SH[i].agents);
        free(SH[i].scratch);
    }
    free(SH);
    free(O.ids);
    free(O.tokens);
    kd_log_stop();
    return 0;
}

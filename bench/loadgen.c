/* loadgen.c — the bench's load generator, on kasd's own shards and gRPC client code.
 *
 * Routed (--secret-file): calls kasd's api listener as GitLab does, with a JWT (HS256, audience
 * gitlab-kas, refreshed well before it expires) and `kas-hop-routing-agent-id`, spread round-robin
 * over --agents agents. Direct (no secret): calls a gRPC server (agentsim --listen, or haproxy in
 * front of it) with no JWT and no routing metadata.
 *
 * Load: a fixed number of calls in flight (--concurrency, closed loop) or a fixed rate (--rate,
 * calls/s, still capped by --concurrency), for --duration seconds after --warmup seconds, or until
 * --count calls completed. Modes (the methods of bench/agentsim.c):
 *   unary   /bench.Echo/Unary: one message of --size bytes, half-close, expect it echoed
 *   bulk    /bench.Echo/Bulk: a bidi stream echoing --size messages, as fast as flow control
 *           allows; --stream-messages N closes each stream after N messages (0: at the end)
 *   source  /bench.Echo/Source: ask for --stream-messages messages of --size bytes;
 *           --read-rate BYTES/S reads slowly (input held, window updates withheld)
 *   sink    /bench.Echo/Sink: send --stream-messages messages, expect the byte count back
 * Every call's grpc-status is checked, and every echoed byte (bench_pattern_check: a sequence
 * number and a fixed pattern, so a message delivered to the wrong call or out of order fails).
 *
 * Results: calls/s, a log-linear latency histogram (p50/p90/p99/p99.9/max, µs), errors by status,
 * MB/s; human-readable, or one JSON object with --json. Exit 0 when no call failed.
 *
 *   loadgen --target 127.0.0.1:PORT [--secret-file F --agents M] [--mode unary] [--size 100]
 *           [--concurrency 64] [--connections C] [--duration 5] [--warmup 1] [--json]
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/benchlib.h"
#include "core/clock.h"
#include "core/jwt.h"
#include "core/list.h"
#include "core/log.h"
#include "core/tls.h"
#include "core/compress.h"
#include "shards/grpc.h"
#include "shards/server.h"
#include "shards/shard.h"

enum mode { MODE_UNARY, MODE_BULK, MODE_SOURCE, MODE_SINK };
static const char *const mode_names[] = {"unary", "bulk", "source", "sink"};
static const char *const mode_paths[] = {"/bench.Echo/Unary", "/bench.Echo/Bulk", "/bench.Echo/Source",
                                         "/bench.Echo/Sink"};

enum phase { PH_WARMUP, PH_RUN, PH_DRAIN, PH_DONE };

struct opts {
    bool gzip; /* --gzip: grpc-encoding gzip and every message compressed, as agentk sends */
    struct sockaddr_in target;
    char authority[64];
    char server_name[64];
    uint8_t secret[512];
    size_t secret_len;
    bool routed;
    int64_t first_agent, nagents;
    unsigned concurrency, connections, shards;
    double duration_s, warmup_s, rate;
    uint64_t count;
    uint32_t size, stream_messages;
    uint64_t read_rate;
    uint64_t timeout_us;
    enum mode mode;
    const char *path;
    const char *label;
    bool json;
    struct kd_tls_ctx *tls;
};

struct lgshard;

struct lcall {
    struct lgshard *sh;
    kd_grpc_call *call;
    struct kd_list link; /* sh->live */
    uint64_t start_ns;
    uint64_t seq;
    uint64_t sent, recvd, recv_bytes;
    bool mismatch, closing, held;
    struct kd_timer timer; /* slow reader: stop holding input */
    uint64_t read_start_ns;
};

/* Per shard; main reads it after the shards joined. */
struct lgshard {
    struct kd_shard *s;
    unsigned id;
    struct kd_grpc_channel **ch;
    unsigned nch, next_ch;
    unsigned conc;
    double rate;
    unsigned inflight;
    uint64_t issued_phase; /* rate mode: calls started since the phase began */
    uint64_t issued_total;
    uint64_t completed_run;
    enum phase phase;
    uint64_t phase_ns, run_start_ns, run_end_ns, drain_deadline_ns, end_ns;
    struct kd_timer tick;
    struct kd_list live;
    char auth[KD_JWT_MAX_LEN + 16];
    size_t auth_len;
    uint64_t jwt_refresh_ms;
    uint64_t next_agent;
    uint64_t seq;
    uint8_t *payload;
    /* results */
    struct bench_hist *hist;
    uint64_t ok_total, ok_run, failed, mismatches, start_failures, late, channel_reopens;
    uint64_t first_start_ns, last_done_ns; /* CLOCK_MONOTONIC: first call issued, last OK call ended */
    uint64_t by_status[17];
    uint64_t bytes_sent_run, bytes_recv_run;
    char first_error[256];
};

static struct opts O = {.first_agent = 1,
                        .nagents = 1,
                        .concurrency = 64,
                        .shards = 1,
                        .duration_s = 5,
                        .warmup_s = 1,
                        .size = 100,
                        .stream_messages = 0,
                        .timeout_us = 30000000};
static struct lgshard *SH;
static _Atomic unsigned g_done;

static void issue(struct lgshard *sh);
static void bulk_pump(struct lcall *lc);

static uint64_t now_ns(void)
{
    return kd_clock_ns();
}

/* ---- JWT for the api listener ---- */

static int refresh_jwt(struct lgshard *sh)
{
    int64_t now = (int64_t)time(NULL);
    char payload[256];
    snprintf(payload, sizeof(payload),
             "{\"iss\":\"bench-loadgen\",\"aud\":\"gitlab-kas\",\"iat\":%lld,\"exp\":%lld}", (long long)now,
             (long long)(now + 60));
    memcpy(sh->auth, "Bearer ", 7);
    int n = kd_jwt_sign(KD_JWT_HS256, O.secret, O.secret_len, payload, sh->auth + 7, sizeof(sh->auth) - 7);
    if (n < 0)
        return n;
    sh->auth_len = 7 + (size_t)n;
    sh->jwt_refresh_ms = kd_shard_now_ms(sh->s) + 30000; /* half the lifetime */
    return 0;
}

/* ---- recording ---- */

static void fail(struct lgshard *sh, int status, const char *what)
{
    sh->failed++;
    sh->by_status[status >= 0 && status <= 16 ? status : 2]++;
    if (sh->first_error[0] == '\0')
        snprintf(sh->first_error, sizeof(sh->first_error), "%s: %s", kd_grpc_status_name(status), what);
}

static bool expected_complete(const struct lcall *lc)
{
    switch (O.mode) {
    case MODE_UNARY:
        return lc->recvd == 1;
    case MODE_BULK:
        return lc->recvd == lc->sent;
    case MODE_SOURCE:
        return lc->recvd == O.stream_messages;
    case MODE_SINK:
        return lc->recvd == 1;
    }
    return false;
}

/* ---- call handler ---- */

static void release_hold(struct kd_timer *t)
{
    struct lcall *lc = KD_CONTAINER_OF(t, struct lcall, timer);
    if (lc->held) {
        lc->held = false;
        kd_grpc_hold_input(lc->call, false);
    }
}

static int on_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct lcall *lc = kd_h2_call_user(call);
    struct lgshard *sh = lc->sh;
    if (sh->phase == PH_RUN)
        sh->bytes_recv_run += len;
    lc->recv_bytes += len;
    switch (O.mode) {
    case MODE_UNARY:
        if (lc->recvd > 0 || len != O.size || !bench_pattern_check(msg, len, lc->seq))
            lc->mismatch = true;
        break;
    case MODE_BULK:
    case MODE_SOURCE:
        if (len != O.size || !bench_pattern_check(msg, len, lc->recvd))
            lc->mismatch = true;
        break;
    case MODE_SINK: {
        char want[32];
        int n = snprintf(want, sizeof(want), "%llu", (unsigned long long)(lc->sent * O.size));
        if (lc->recvd > 0 || len != (size_t)n || memcmp(msg, want, len) != 0)
            lc->mismatch = true;
        break;
    }
    }
    lc->recvd++;
    if (O.read_rate > 0 && !lc->held) {
        /* A slow reader: once ahead of read_rate, stop acknowledging input until the schedule
         * catches up, so the sender sees a closed window. */
        uint64_t now = now_ns();
        uint64_t allowed = (uint64_t)((double)(now - lc->read_start_ns) * (double)O.read_rate / 1e9);
        if (lc->recv_bytes > allowed) {
            uint64_t wait_ms =
                (uint64_t)((double)(lc->recv_bytes - allowed) * 1000.0 / (double)O.read_rate) + 1;
            lc->held = true;
            kd_grpc_hold_input(call, true);
            kd_timerwheel_add(kd_shard_timers(sh->s), &lc->timer, kd_shard_now_ms(sh->s) + wait_ms);
        }
    }
    return 0;
}

static void on_writable(kd_grpc_call *call)
{
    struct lcall *lc = kd_h2_call_user(call);
    if (O.mode == MODE_BULK || O.mode == MODE_SINK)
        bulk_pump(lc);
}

static void on_done(kd_grpc_call *call, int status, const char *message)
{
    struct lcall *lc = kd_h2_call_user(call);
    struct lgshard *sh = lc->sh;
    uint64_t end = now_ns();
    kd_list_unlink(&lc->link);
    kd_timerwheel_cancel(kd_shard_timers(sh->s), &lc->timer);
    sh->inflight--;
    if (status != KD_GRPC_OK) {
        fail(sh, status, message);
    } else if (lc->mismatch || !expected_complete(lc)) {
        sh->mismatches++;
        char what[128];
        snprintf(what, sizeof(what), "echo mismatch (sent %llu messages, received %llu)",
                 (unsigned long long)lc->sent, (unsigned long long)lc->recvd);
        fail(sh, KD_GRPC_OK, what);
    } else {
        sh->ok_total++;
        if (end > sh->last_done_ns)
            sh->last_done_ns = end;
        if (sh->phase == PH_RUN) {
            sh->ok_run++;
            bench_hist_add(sh->hist, (end - lc->start_ns) / 1000u);
        }
    }
    if (sh->phase == PH_RUN)
        sh->completed_run++;
    free(lc);
    /* closed loop: the next call starts as this one ends */
    if (O.rate <= 0 && sh->phase <= PH_RUN)
        issue(sh);
}

static const struct kd_h2_handler handler = {
    .on_message = on_message,
    .on_writable = on_writable,
    .on_done = on_done,
};

/* ---- issuing ---- */

static struct kd_grpc_channel *open_channel(struct lgshard *sh)
{
    struct kd_grpc_channel_opts o = {
        .addr = (const struct sockaddr *)&O.target,
        .addrlen = sizeof(O.target),
        .authority = O.authority,
        .tls = O.tls,
        .server_name = O.server_name,
        .compression = O.gzip ? KD_COMPRESS_GZIP : KD_COMPRESS_IDENTITY,
    };
    return kd_grpc_channel_open(sh->s, &o);
}

static struct kd_grpc_channel *pick_channel(struct lgshard *sh)
{
    for (unsigned i = 0; i < sh->nch; i++) {
        struct kd_grpc_channel *ch = sh->ch[sh->next_ch++ % sh->nch];
        if (ch != NULL && kd_grpc_channel_usable(ch))
            return ch;
    }
    return NULL;
}

/* Send stream messages while the call's queue is under the high-water mark. */
static void bulk_pump(struct lcall *lc)
{
    struct lgshard *sh = lc->sh;
    while (!lc->closing) {
        if ((O.stream_messages && lc->sent >= O.stream_messages) || sh->phase >= PH_DRAIN) {
            lc->closing = true;
            kd_grpc_close_send(lc->call);
            return;
        }
        bench_pattern_fill(sh->payload, O.size, lc->sent);
        int rc = kd_grpc_send_message(lc->call, sh->payload, O.size);
        if (rc < 0)
            return;
        lc->sent++;
        if (sh->phase == PH_RUN)
            sh->bytes_sent_run += O.size;
        if (rc == 1)
            return; /* on_writable resumes */
    }
}

static void issue(struct lgshard *sh)
{
    if (sh->inflight >= sh->conc || (O.count && sh->issued_total >= O.count))
        return;
    struct kd_grpc_channel *ch = pick_channel(sh);
    if (ch == NULL) {
        sh->start_failures++;
        return; /* the tick re-opens channels and tries again */
    }
    struct lcall *lc = calloc(1, sizeof(*lc));
    if (lc == NULL)
        abort();
    lc->sh = sh;
    lc->seq = ((uint64_t)sh->id << 48) | sh->seq++;
    kd_timer_init(&lc->timer, release_hold);
    struct kd_h2_header md[2];
    size_t nmd = 0;
    char agent[24];
    if (O.routed) {
        if (kd_shard_now_ms(sh->s) >= sh->jwt_refresh_ms)
            refresh_jwt(sh);
        int64_t id = O.first_agent + (int64_t)(sh->next_agent++ % (uint64_t)O.nagents);
        int al = snprintf(agent, sizeof(agent), "%lld", (long long)id);
        md[nmd++] = (struct kd_h2_header){"authorization", 13, sh->auth, sh->auth_len};
        md[nmd++] = (struct kd_h2_header){"kas-hop-routing-agent-id", 24, agent, (size_t)al};
    }
    lc->start_ns = now_ns();
    lc->read_start_ns = lc->start_ns;
    if (sh->first_start_ns == 0)
        sh->first_start_ns = lc->start_ns;
    lc->call = kd_grpc_channel_call(ch, O.path, md, nmd, O.timeout_us, &handler, lc);
    if (lc->call == NULL) {
        free(lc);
        sh->start_failures++;
        return;
    }
    kd_list_push_back(&sh->live, &lc->link);
    sh->inflight++;
    sh->issued_total++;
    sh->issued_phase++;
    switch (O.mode) {
    case MODE_UNARY:
        bench_pattern_fill(sh->payload, O.size, lc->seq);
        kd_grpc_send_message(lc->call, sh->payload, O.size);
        kd_grpc_close_send(lc->call);
        lc->sent = 1;
        if (sh->phase == PH_RUN)
            sh->bytes_sent_run += O.size;
        break;
    case MODE_BULK:
    case MODE_SINK:
        bulk_pump(lc);
        break;
    case MODE_SOURCE: {
        char req[48];
        int n = snprintf(req, sizeof(req), "%u %u", O.stream_messages, O.size);
        kd_grpc_send_message(lc->call, (const uint8_t *)req, (size_t)n);
        kd_grpc_close_send(lc->call);
        break;
    }
    }
}

static void finish_shard(struct lgshard *sh)
{
    sh->phase = PH_DONE;
    sh->end_ns = now_ns();
    for (unsigned i = 0; i < sh->nch; i++)
        if (sh->ch[i] != NULL)
            kd_grpc_channel_close(sh->ch[i]);
    sh->nch = 0;
    g_done++;
}

/* Fixed rate: start every call whose time has come, then ask the shard to wake at the next one's
 * time. Call k of the phase is due at phase_ns + k / rate; the timer wheel ticks every millisecond,
 * so starting calls only on ticks sent them in bursts (20 at once at 20k calls/s per shard), and the
 * latency measured at a fixed rate was mostly queueing behind the burst, not the path under test.
 * kd_shard_wake_at wakes the loop between ticks; this runs from the loop's on_turn hook (and the
 * tick), so each call starts within microseconds of its time. */
static void pace(struct lgshard *sh)
{
    if (sh->phase > PH_RUN || sh->rate <= 0)
        return;
    uint64_t now = now_ns();
    double due = sh->rate * (double)(now - sh->phase_ns) / 1e9;
    while ((double)sh->issued_phase < due && sh->inflight < sh->conc) {
        uint64_t before = sh->issued_phase;
        issue(sh);
        if (sh->issued_phase == before)
            return; /* no usable channel, or the count is reached: the tick tries again in 1 ms */
    }
    if (sh->inflight < sh->conc) {
        double next = (double)sh->issued_phase / sh->rate * 1e9;
        kd_shard_wake_at(sh->s, sh->phase_ns + (uint64_t)next + 1);
    }
}

static void on_turn(struct kd_shard *s)
{
    /* Stopping (a signal): no new wake, so the shard's own operations can drain. */
    if (O.rate > 0 && !s->stopping)
        pace(kd_shard_user(s));
}

/* Every millisecond: phase changes, the rate schedule, channel repair. */
static void tick(struct kd_timer *t)
{
    struct lgshard *sh = KD_CONTAINER_OF(t, struct lgshard, tick);
    uint64_t now = now_ns();
    if (sh->phase == PH_WARMUP && now >= sh->run_start_ns) {
        sh->phase = PH_RUN;
        sh->phase_ns = now;
        sh->run_start_ns = now;
        sh->run_end_ns = now + (uint64_t)(O.duration_s * 1e9);
        sh->issued_phase = 0;
    }
    if (sh->phase == PH_RUN &&
        (now >= sh->run_end_ns ||
         (O.count && sh->completed_run >= O.count / O.shards + (sh->id < O.count % O.shards)))) {
        sh->phase = PH_DRAIN;
        sh->run_end_ns = now;
        sh->drain_deadline_ns = now + O.timeout_us * 1000u + 2000000000ull;
        if (O.rate > 0) {
            double due = sh->rate * (double)(now - sh->phase_ns) / 1e9;
            if (due > (double)sh->issued_phase)
                sh->late += (uint64_t)(due - (double)sh->issued_phase);
        }
        /* open-ended streams end now: half-close, let the echo finish */
        for (struct kd_list *n = sh->live.next; n != &sh->live; n = n->next) {
            struct lcall *lc = KD_CONTAINER_OF(n, struct lcall, link);
            if (O.mode == MODE_BULK || O.mode == MODE_SINK)
                bulk_pump(lc);
        }
    }
    if (sh->phase == PH_DRAIN) {
        if (sh->inflight > 0 && now >= sh->drain_deadline_ns) {
            struct kd_list *n;
            while ((n = sh->live.next) != &sh->live) {
                struct lcall *lc = KD_CONTAINER_OF(n, struct lcall, link);
                kd_grpc_cancel(lc->call, KD_GRPC_DEADLINE_EXCEEDED, "still running after the drain deadline");
            }
        }
        if (sh->inflight == 0) {
            finish_shard(sh);
            return;
        }
    }
    /* repair channels that failed or got GOAWAY */
    for (unsigned i = 0; i < sh->nch; i++)
        if (sh->ch[i] == NULL || !kd_grpc_channel_usable(sh->ch[i])) {
            if (sh->ch[i] != NULL)
                kd_grpc_channel_close(sh->ch[i]);
            sh->ch[i] = open_channel(sh);
            sh->channel_reopens++;
        }
    if (sh->phase <= PH_RUN) {
        if (O.rate > 0) {
            pace(sh);
        } else {
            while (sh->inflight < sh->conc && (!O.count || sh->issued_total < O.count)) {
                uint64_t before = sh->issued_total;
                issue(sh);
                if (sh->issued_total == before)
                    break;
            }
        }
    }
    kd_timerwheel_add(kd_shard_timers(sh->s), &sh->tick, kd_shard_now_ms(sh->s) + 1);
}

static int shard_start(struct kd_shard *s)
{
    struct lgshard *sh = &SH[kd_shard_id(s)];
    sh->s = s;
    kd_shard_set_user(s, sh);
    kd_list_init(&sh->live);
    kd_timer_init(&sh->tick, tick);
    if (O.routed && refresh_jwt(sh) < 0)
        return -EINVAL;
    for (unsigned i = 0; i < sh->nch; i++) {
        sh->ch[i] = open_channel(sh);
        if (sh->ch[i] == NULL)
            return -ENOMEM;
    }
    uint64_t now = now_ns();
    sh->phase = O.warmup_s > 0 ? PH_WARMUP : PH_RUN;
    sh->phase_ns = now;
    sh->run_start_ns = now + (uint64_t)(O.warmup_s * 1e9);
    sh->run_end_ns = sh->run_start_ns + (uint64_t)(O.duration_s * 1e9);
    kd_timerwheel_add(kd_shard_timers(s), &sh->tick, kd_shard_now_ms(s));
    return 0;
}

/* ---- output ---- */

struct totals {
    struct bench_hist *hist;
    uint64_t ok_total, ok_run, failed, mismatches, start_failures, late, reopens;
    uint64_t first_start_ns, last_done_ns;
    uint64_t by_status[17];
    uint64_t bytes_sent, bytes_recv;
    double run_s;
    const char *first_error;
};

static void print_human(const struct totals *t, uint64_t cpu_us)
{
    const struct bench_hist *h = t->hist;
    printf("loadgen %s %s %s: concurrency %u, %u connection(s), size %u B%s\n", O.label ? O.label : "",
           mode_names[O.mode], O.routed ? "routed" : "direct", O.concurrency, O.connections, O.size,
           O.rate > 0 ? " (fixed rate)" : "");
    printf("  %.2f s: %llu ok (%.0f calls/s), %llu failed, %llu mismatched\n", t->run_s,
           (unsigned long long)t->ok_run, t->run_s > 0 ? (double)t->ok_run / t->run_s : 0.0,
           (unsigned long long)t->failed, (unsigned long long)t->mismatches);
    printf("  latency us: p50 %llu  p90 %llu  p99 %llu  p99.9 %llu  max %llu  (n %llu)\n",
           (unsigned long long)bench_hist_quantile(h, 0.5), (unsigned long long)bench_hist_quantile(h, 0.9),
           (unsigned long long)bench_hist_quantile(h, 0.99),
           (unsigned long long)bench_hist_quantile(h, 0.999), (unsigned long long)h->max,
           (unsigned long long)h->n);
    if (t->bytes_recv > 0)
        printf("  payload: %.1f MB/s received, %.1f MB/s sent\n", (double)t->bytes_recv / 1e6 / t->run_s,
               (double)t->bytes_sent / 1e6 / t->run_s);
    for (int i = 0; i <= 16; i++)
        if (t->by_status[i])
            printf("  errors %s: %llu\n", kd_grpc_status_name(i), (unsigned long long)t->by_status[i]);
    if (t->first_error)
        printf("  first error: %s\n", t->first_error);
    printf("  loadgen cpu %.2f s\n", (double)cpu_us / 1e6);
}

static void print_json(const struct totals *t, uint64_t cpu_us)
{
    const struct bench_hist *h = t->hist;
    printf("{\"label\":");
    bench_json_str(stdout, O.label ? O.label : "");
    printf(
        ",\"mode\":\"%s\",\"target\":\"%s\",\"routed\":%s,\"concurrency\":%u,\"connections\":%u,"
        "\"shards\":%u,\"agents\":%lld,\"size\":%u,\"stream_messages\":%u,\"rate\":%.1f,\"read_rate\":%llu,"
        "\"run_s\":%.4f,\"calls_ok\":%llu,\"calls_ok_total\":%llu,\"calls_failed\":%llu,\"mismatches\":%llu,"
        "\"start_failures\":%llu,\"late\":%llu,\"channel_reopens\":%llu,\"calls_per_s\":%.1f,",
        mode_names[O.mode], O.authority, O.routed ? "true" : "false", O.concurrency, O.connections, O.shards,
        (long long)(O.routed ? O.nagents : 0), O.size, O.stream_messages, O.rate,
        (unsigned long long)O.read_rate, t->run_s, (unsigned long long)t->ok_run,
        (unsigned long long)t->ok_total, (unsigned long long)t->failed, (unsigned long long)t->mismatches,
        (unsigned long long)t->start_failures, (unsigned long long)t->late, (unsigned long long)t->reopens,
        t->run_s > 0 ? (double)t->ok_run / t->run_s : 0.0);
    printf("\"latency_us\":{\"p50\":%llu,\"p90\":%llu,\"p99\":%llu,\"p999\":%llu,\"max\":%llu,\"min\":%llu,"
           "\"mean\":%.1f,\"n\":%llu},",
           (unsigned long long)bench_hist_quantile(h, 0.5), (unsigned long long)bench_hist_quantile(h, 0.9),
           (unsigned long long)bench_hist_quantile(h, 0.99),
           (unsigned long long)bench_hist_quantile(h, 0.999), (unsigned long long)h->max,
           (unsigned long long)(h->n ? h->min : 0), h->n ? (double)h->sum / (double)h->n : 0.0,
           (unsigned long long)h->n);
    printf(
        "\"bytes_sent\":%llu,\"bytes_recv\":%llu,\"mb_per_s_sent\":%.2f,\"mb_per_s_recv\":%.2f,\"errors\":{",
        (unsigned long long)t->bytes_sent, (unsigned long long)t->bytes_recv,
        t->run_s > 0 ? (double)t->bytes_sent / 1e6 / t->run_s : 0.0,
        t->run_s > 0 ? (double)t->bytes_recv / 1e6 / t->run_s : 0.0);
    bool first = true;
    for (int i = 0; i <= 16; i++)
        if (t->by_status[i]) {
            printf("%s\"%s\":%llu", first ? "" : ",", i == 0 ? "ECHO_MISMATCH" : kd_grpc_status_name(i),
                   (unsigned long long)t->by_status[i]);
            first = false;
        }
    printf("},\"first_error\":");
    bench_json_str(stdout, t->first_error ? t->first_error : "");
    /* CLOCK_MONOTONIC (ns), comparable with agentsim's tunnel_open lines and Python's
     * time.monotonic_ns() on the same machine (the S3 discovery timing) */
    printf(",\"first_start_mono_ns\":%llu,\"last_done_mono_ns\":%llu", (unsigned long long)t->first_start_ns,
           (unsigned long long)t->last_done_ns);
    printf(",\"cpu_us\":%llu}\n", (unsigned long long)cpu_us);
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen --target 127.0.0.1:PORT [options]\n"
            "  --secret-file F       route through kasd's api listener: JWT signed with this secret (base64 "
            "file)\n"
            "  --agents M            spread routed calls over agents FIRST..FIRST+M-1 (default 1)\n"
            "  --first-agent ID      (default 1)\n"
            "  --mode MODE           unary | bulk | source | sink (default unary)\n"
            "  --size BYTES          message size (default 100)\n"
            "  --stream-messages N   messages per stream (bulk: 0 = until the end; source/sink: required)\n"
            "  --read-rate B/S       source: read slowly\n"
            "  --concurrency N       calls in flight (default 64)\n"
            "  --connections C       HTTP/2 connections (default: one per 64 calls in flight)\n"
            "  --rate R              calls/s (default: closed loop)\n"
            "  --duration S          measured seconds (default 5); --count N ends after N calls\n"
            "  --warmup S            unmeasured seconds first (default 1)\n"
            "  --timeout S           per-call deadline (default 30)\n"
            "  --ca FILE             TLS, verifying the server with this CA (--server-name NAME)\n"
            "  --shards S            event-loop threads (default 1)\n"
            "  --label TEXT          copied to the output\n"
            "  --json                one JSON object on stdout\n"
            "  --gzip                compress every call (grpc-encoding: gzip)\n"
            "  --self-check          check the histogram maths and exit\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"target", required_argument, NULL, 't'},
        {"secret-file", required_argument, NULL, 'K'},
        {"agents", required_argument, NULL, 'n'},
        {"first-agent", required_argument, NULL, 'f'},
        {"mode", required_argument, NULL, 'm'},
        {"size", required_argument, NULL, 'z'},
        {"stream-messages", required_argument, NULL, 'M'},
        {"read-rate", required_argument, NULL, 'R'},
        {"concurrency", required_argument, NULL, 'c'},
        {"connections", required_argument, NULL, 'C'},
        {"rate", required_argument, NULL, 'r'},
        {"duration", required_argument, NULL, 'd'},
        {"count", required_argument, NULL, 'N'},
        {"warmup", required_argument, NULL, 'w'},
        {"timeout", required_argument, NULL, 'T'},
        {"ca", required_argument, NULL, 'A'},
        {"server-name", required_argument, NULL, 'S'},
        {"shards", required_argument, NULL, 's'},
        {"label", required_argument, NULL, 'L'},
        {"json", no_argument, NULL, 'j'},
        {"self-check", no_argument, NULL, 'X'},
        {"gzip", no_argument, NULL, 'G'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *target = NULL, *secret_file = NULL, *ca = NULL, *mode = "unary";
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'G':
            O.gzip = true;
            break;
        case 't':
            target = optarg;
            break;
        case 'K':
            secret_file = optarg;
            break;
        case 'n':
            O.nagents = strtoll(optarg, NULL, 10);
            break;
        case 'f':
            O.first_agent = strtoll(optarg, NULL, 10);
            break;
        case 'm':
            mode = optarg;
            break;
        case 'z':
            O.size = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'M':
            O.stream_messages = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'R':
            O.read_rate = strtoull(optarg, NULL, 10);
            break;
        case 'c':
            O.concurrency = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'C':
            O.connections = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'r':
            O.rate = strtod(optarg, NULL);
            break;
        case 'd':
            O.duration_s = strtod(optarg, NULL);
            break;
        case 'N':
            O.count = strtoull(optarg, NULL, 10);
            break;
        case 'w':
            O.warmup_s = strtod(optarg, NULL);
            break;
        case 'T':
            O.timeout_us = (uint64_t)(strtod(optarg, NULL) * 1e6);
            break;
        case 'A':
            ca = optarg;
            break;
        case 'S':
            snprintf(O.server_name, sizeof(O.server_name), "%s", optarg);
            break;
        case 's':
            O.shards = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'L':
            O.label = optarg;
            break;
        case 'j':
            O.json = true;
            break;
        case 'X': {
            char err[200];
            if (bench_hist_selfcheck(err, sizeof(err)) < 0) {
                fprintf(stderr, "loadgen: histogram self-check failed: %s\n", err);
                return 1;
            }
            printf("histogram self-check ok\n");
            return 0;
        }
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    for (int i = 0; i < 4; i++)
        if (strcmp(mode, mode_names[i]) == 0) {
            O.mode = (enum mode)i;
            O.path = mode_paths[i];
        }
    if (O.path == NULL || target == NULL || bench_parse_loopback(target, &O.target) < 0) {
        usage(stderr);
        return 2;
    }
    if (O.concurrency == 0 || O.shards == 0 || O.shards > 64 || O.nagents <= 0 || O.duration_s <= 0 ||
        O.size > (4u << 20) - 64 ||
        ((O.mode == MODE_SOURCE || O.mode == MODE_SINK) && O.stream_messages == 0)) {
        fprintf(stderr, "loadgen: bad option values (see --help)\n");
        return 2;
    }
    if (O.concurrency < O.shards)
        O.shards = O.concurrency;
    if (O.connections == 0)
        O.connections = (O.concurrency + 63) / 64;
    if (O.connections < O.shards)
        O.connections = O.shards;
    snprintf(O.authority, sizeof(O.authority), "%s", target);
    if (O.server_name[0] == '\0') {
        snprintf(O.server_name, sizeof(O.server_name), "%s", target);
        *strrchr(O.server_name, ':') = '\0';
    }
    char err[512];
    if (secret_file != NULL) {
        if (kd_jwt_secret_load(secret_file, O.secret, sizeof(O.secret), &O.secret_len, err, sizeof(err)) <
            0) {
            fprintf(stderr, "loadgen: %s\n", err);
            return 1;
        }
        O.routed = true;
    }
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    kd_log_configure(KD_LOG_WARN, 2);
    kd_log_start();
    if (ca != NULL) {
        struct kd_tls_ctx_opts to = {.server = false, .ca_file = ca, .alpn = "h2"};
        if (kd_tls_ctx_create(&to, &O.tls, err, sizeof(err)) < 0) {
            fprintf(stderr, "loadgen: tls: %s\n", err);
            return 1;
        }
    }
    SH = calloc(O.shards, sizeof(*SH));
    if (SH == NULL)
        return 1;
    for (unsigned i = 0; i < O.shards; i++) {
        struct lgshard *sh = &SH[i];
        sh->id = i;
        sh->conc = O.concurrency / O.shards + (i < O.concurrency % O.shards);
        sh->rate = O.rate / O.shards;
        sh->nch = O.connections / O.shards + (i < O.connections % O.shards);
        sh->ch = calloc(sh->nch, sizeof(*sh->ch));
        sh->hist = malloc(sizeof(*sh->hist));
        sh->payload = malloc(O.size + 8);
        if (sh->ch == NULL || sh->hist == NULL || sh->payload == NULL)
            return 1;
        bench_hist_init(sh->hist);
        sh->next_agent = i; /* shards interleave over the agents */
    }
    struct kd_server_opts so = {
        .shards = O.shards,
        .pin = false, /* the harness pins with taskset */
        .connections_per_shard = O.connections + 16,
        .recv_buffers = 1024,
        .recv_buffer_size = 16384,
        .ring_size = 1024,
        .shutdown_grace_ms = 500,
        .on_shard_start = shard_start,
        .on_turn = on_turn,
    };
    struct kd_server *srv;
    uint64_t cpu0 = bench_cpu_us();
    if (kd_server_create(&so, &srv, err, sizeof(err)) < 0 || kd_server_start(srv, err, sizeof(err)) < 0) {
        fprintf(stderr, "loadgen: %s\n", err);
        return 1;
    }
    /* bounded: warmup + duration + drain; a stuck run is reported, never a hang */
    uint64_t limit_ms = (uint64_t)((O.warmup_s + O.duration_s) * 1000.0) + O.timeout_us / 1000u + 15000;
    uint64_t t0 = kd_clock_ms();
    bool interrupted = false;
    while (atomic_load(&g_done) < O.shards) {
        struct timespec ts = {.tv_nsec = 10 * 1000000};
        if (sigtimedwait(&sigs, NULL, &ts) >= 0 || kd_clock_ms() - t0 > limit_ms) {
            interrupted = true;
            break;
        }
    }
    uint64_t cpu_us = bench_cpu_us() - cpu0;
    kd_server_stop(srv);
    kd_server_wait(srv);

    struct totals t = {.hist = malloc(sizeof(struct bench_hist))};
    if (t.hist == NULL)
        return 1;
    bench_hist_init(t.hist);
    uint64_t start = UINT64_MAX, end = 0;
    for (unsigned i = 0; i < O.shards; i++) {
        struct lgshard *sh = &SH[i];
        bench_hist_merge(t.hist, sh->hist);
        t.ok_total += sh->ok_total;
        t.ok_run += sh->ok_run;
        t.failed += sh->failed;
        t.mismatches += sh->mismatches;
        t.start_failures += sh->start_failures;
        t.late += sh->late;
        t.reopens += sh->channel_reopens;
        if (sh->first_start_ns && (t.first_start_ns == 0 || sh->first_start_ns < t.first_start_ns))
            t.first_start_ns = sh->first_start_ns;
        if (sh->last_done_ns > t.last_done_ns)
            t.last_done_ns = sh->last_done_ns;
        for (int k = 0; k <= 16; k++)
            t.by_status[k] += sh->by_status[k];
        t.bytes_sent += sh->bytes_sent_run;
        t.bytes_recv += sh->bytes_recv_run;
        if (sh->first_error[0] && t.first_error == NULL)
            t.first_error = sh->first_error;
        if (sh->run_start_ns < start)
            start = sh->run_start_ns;
        uint64_t e = sh->phase >= PH_DRAIN ? sh->run_end_ns : now_ns();
        if (e > end)
            end = e;
    }
    t.run_s = end > start ? (double)(end - start) / 1e9 : 0;
    if (interrupted) {
        t.failed++;
        t.first_error = "interrupted (signal or time limit) before every call ended";
    }
    if (O.json)
        print_json(&t, cpu_us);
    else
        print_human(&t, cpu_us);
    fflush(stdout);
    kd_server_destroy(srv);
    if (O.tls)
        kd_tls_ctx_destroy(O.tls);
    for (unsigned i = 0; i < O.shards; i++) {
        free(SH[i].ch);
        free(SH[i].hist);
        free(SH[i].payload);
    }
    free(SH);
    free(t.hist);
    kd_log_stop();
    return t.failed == 0 && t.mismatches == 0 && t.ok_total > 0 ? 0 : 1;
}

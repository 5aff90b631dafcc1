/* control.c — the control thread (contract in control.h).
 *
 * Rounds: every endpoint that needs the shards (/metrics, /liveness, /readiness) queues its request
 * for the NEXT round, so an answer never reflects state from before the request arrived:
 *
 *   idle ── request ──> round k: STATS_REQ(k) to shards 0..n-1, deadline = now + 2 s
 *   round k: requests arriving now wait in `next`
 *   STATS(k) from shard i: snapshot i stored (answers of an older round are just released)
 *   all n answered or deadline ──> answer `cur` ──> `next` non-empty? start round k+1 : idle
 *
 * Invariants: in_round iff a round is open; have[i] iff snaps[i] holds round `round`'s answer of
 * shard i; answered == number of have[i]. Every KD_RT_STATS payload is released at once (it goes
 * home to be freed on its shard).
 *
 * The loop follows the router's sleep protocol (router.h): drain, then prepare_sleep before blocking
 * in h2o's epoll wait; a shard that sends while we sleep writes our eventfd, which h2o watches.
 */
#include "control/control.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/httpd.h"
#include "core/log.h"
#include "router/router.h"
#include "shards/kas.h"
#include "control/gitlab.h"
#include "control/kubeapi.h"
#include "shards/server.h"
#include "shards/shard.h"

#define DRAIN_BUDGET 1024

struct pending {
    struct pending *next;
    struct kd_httpd_req *req;
    enum kd_control_endpoint ep;
};

struct kd_control {
    struct kd_server *srv;
    struct kd_router *router;
    unsigned n;    /* shards */
    unsigned self; /* router participant: n */
    int listen_fd, efd;
    struct sockaddr_storage bound;
    pthread_t thread;
    sem_t done; /* posted by the control thread when it has stopped (then it parks) */
    bool started;
    _Atomic bool stop;
    struct kd_httpd *httpd;
    /* The Kubernetes API front door (kubernetes_api.listen), if configured. */
    int kube_fd;
    struct sockaddr_storage kube_bound;
    struct kd_kubeapi_cfg kube_cfg;
    size_t kube_max_body;
    const char *kube_cert, *kube_key; /* TLS (NULL: h2c and HTTP/1.1 in the clear) */
    struct kd_kubeapi *kube;
    /* Agent tokens resolved by GitLab (agent.token_source: gitlab), if configured. */
    bool gitlab_on;
    struct kd_gitlab_cfg gitlab_cfg;
    struct kd_gitlab *gitlab;

    /* round state, control thread only */
    uint64_t round;
    bool in_round;
    uint64_t deadline_ms;
    unsigned answered;
    bool *have;
    struct kd_kas_snapshot *snaps;
    struct pending *cur, *next; /* LIFO lists; order of answers within a round does not matter */
};

/* ---- text buffer ---- */

struct buf {
    char *p;
    size_t len, cap;
    bool oom;
};

__attribute__((format(printf, 2, 3))) static void bprintf(struct buf *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int w = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (w < 0) {
            b->oom = true;
            return;
        }
        if ((size_t)w < b->cap - b->len) {
            b->len += (size_t)w;
            return;
        }
        size_t ncap = (b->cap ? b->cap * 2 : 16384) + (size_t)w;
        char *np = realloc(b->p, ncap);
        if (np == NULL) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = ncap;
    }
}

static void family(struct buf *b, const char *name, const char *type, const char *help)
{
    bprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* ---- process figures ---- */

static uint64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    uint64_t kb = 0;
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof(line), f) != NULL)
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = strtoull(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kb * 1024;
}

static uint64_t open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    uint64_t n = 0;
    if (d == NULL)
        return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n > 0 ? n - 1 : 0; /* minus the directory's own fd */
}

/* ---- /metrics ---- */

/* One family of per-shard counters read straight from kd_shard_stats (single writer, relaxed). */
#define SHARD_COUNTER(field, name, help)                                                                     \
    do {                                                                                                     \
        family(b, name, "counter", help);                                                                    \
        for (unsigned i = 0; i < c->n; i++)                                                                  \
            bprintf(b, name "{shard=\"%u\"} %llu\n", i,                                                      \
                    (unsigned long long)kd_stat_get(&kd_server_shard_stats(c->srv, i)->field));              \
    } while (0)

#define ROUTER_COUNTER(field, name, help)                                                                    \
    do {                                                                                                     \
        family(b, name, "counter", help);                                                                    \
        for (unsigned i = 0; i <= c->n; i++) {                                                               \
            const struct kd_router_stats *rs = kd_router_stats(c->router, i);                                \
            if (i < c->n)                                                                                    \
                bprintf(b, name "{shard=\"%u\"} %llu\n", i, (unsigned long long)kd_stat_get(&rs->field));    \
            else                                                                                             \
                bprintf(b, name "{shard=\"control\"} %llu\n", (unsigned long long)kd_stat_get(&rs->field));  \
        }                                                                                                    \
    } while (0)

/* A per-shard value from the snapshots; shards that did not answer this round are left out. */
#define KAS_SERIES(type, expr, name, help)                                                                   \
    do {                                                                                                     \
        family(b, name, type, help);                                                                         \
        for (unsigned i = 0; i < c->n; i++)                                                                  \
            if (c->have[i]) {                                                                                \
                const struct kd_kas_snapshot *sn = &c->snaps[i];                                             \
                bprintf(b, name "{shard=\"%u\"} %llu\n", i, (unsigned long long)(expr));                     \
            }                                                                                                \
    } while (0)

static void render_metrics(struct kd_control *c, struct buf *b)
{
    family(b, "kasd_build_info", "gauge", "Always 1; the version label is kasd's version.");
    bprintf(b, "kasd_build_info{version=\"%s\"} 1\n", KD_VERSION);
    family(b, "kasd_shards", "gauge", "Number of shard threads.");
    bprintf(b, "kasd_shards %u\n", c->n);
    family(b, "kasd_shard_responsive", "gauge",
           "1 if the shard answered the control thread's request for this scrape within 2 s, else 0.");
    for (unsigned i = 0; i < c->n; i++)
        bprintf(b, "kasd_shard_responsive{shard=\"%u\"} %d\n", i, c->have[i] ? 1 : 0);
    family(b, "process_resident_memory_bytes", "gauge", "Resident set size of the kasd process (VmRSS).");
    bprintf(b, "process_resident_memory_bytes %llu\n", (unsigned long long)rss_bytes());
    family(b, "process_open_fds", "gauge", "Open file descriptors of the kasd process.");
    bprintf(b, "process_open_fds %llu\n", (unsigned long long)open_fds());
    family(b, "kasd_log_lines_dropped_total", "counter", "Log lines dropped because the log pipe was full.");
    bprintf(b, "kasd_log_lines_dropped_total %llu\n", (unsigned long long)kd_log_dropped());

    SHARD_COUNTER(accepted, "kasd_connections_accepted_total",
                  "Connections accepted on the shard's listeners (all listeners).");
    SHARD_COUNTER(refused, "kasd_connections_refused_total",
                  "Connections accepted then closed at once because the connection table was full.");
    SHARD_COUNTER(closed, "kasd_connections_closed_total", "Connections closed on the shard.");
    SHARD_COUNTER(accept_errors, "kasd_accept_errors_total", "accept() errors (EMFILE, ENFILE, ...).");
    SHARD_COUNTER(handoffs_out, "kasd_connection_handoffs_out_total",
                  "Agent connections handed from this shard to the agent's owner shard.");
    SHARD_COUNTER(handoffs_in, "kasd_connection_handoffs_in_total",
                  "Agent connections adopted by this shard.");
    SHARD_COUNTER(handoffs_refused, "kasd_connection_handoffs_refused_total",
                  "Hand-offs that arrived when this shard's connection table was full.");
    SHARD_COUNTER(recv_bytes, "kasd_received_bytes_total", "Bytes received from sockets (before TLS).");
    SHARD_COUNTER(sent_bytes, "kasd_sent_bytes_total", "Bytes sent to sockets (after TLS).");
    SHARD_COUNTER(recvs, "kasd_receives_total",
                  "Socket receives that carried bytes (one provided buffer each).");
    SHARD_COUNTER(sends, "kasd_sends_total",
                  "Socket sends submitted (one per connection per loop turn at most).");
    SHARD_COUNTER(enobufs, "kasd_recv_buffers_exhausted_total",
                  "Receives re-armed because the shard's provided buffer ring ran dry.");
    SHARD_COUNTER(stale_cqes, "kasd_stale_completions_total",
                  "io_uring completions for a connection slot that was already reused (dropped).");
    SHARD_COUNTER(loops, "kasd_shard_loop_turns_total", "Turns of the shard's event loop.");
    SHARD_COUNTER(sleeps, "kasd_shard_sleeps_total", "Times the shard blocked waiting for work.");
    SHARD_COUNTER(
        memory_trims, "kasd_shard_memory_trims_total",
        "Times the shard gave freed heap back to the kernel (idle, after 256 or more connections left).");
    SHARD_COUNTER(buffer_sheds, "kasd_shard_buffer_sheds_total",
                  "Times the shard returned its receive buffers' pages to the kernel (quiet for a second "
                  "after 64 or more receives).");
    SHARD_COUNTER(quiet_sheds, "kasd_shard_quiet_sheds_total",
                  "Times a connection that had sent nothing for one to two seconds gave back its HTTP/2 "
                  "output buffer's pages.");

    SHARD_COUNTER(redis.commands, "kasd_redis_commands_total",
                  "Commands issued on the shard's Redis connection (accepted for sending).");
    SHARD_COUNTER(redis.errors, "kasd_redis_errors_total",
                  "Redis commands that did not complete (not connected, connection lost, timeout) or got an "
                  "error reply.");
    SHARD_COUNTER(redis.reconnects, "kasd_redis_reconnects_total",
                  "Dial attempts of the shard's Redis connection after a failure or a lost connection.");
    family(b, "kasd_redis_up", "gauge",
           "1 while the shard's Redis connection is up (handshake done), else 0.");
    for (unsigned i = 0; i < c->n; i++)
        bprintf(b, "kasd_redis_up{shard=\"%u\"} %llu\n", i,
                (unsigned long long)kd_stat_get(&kd_server_shard_stats(c->srv, i)->redis.up));

    /* gRPC listeners: per listener, per shard (a connection handed to its owner shard counts as
     * opened where it was accepted and closed where it ended: sum over shards). */
    static const struct {
        size_t off;
        const char *name, *help;
    } lfields[] = {
        {offsetof(struct kd_listener_stats, opened), "kasd_listener_connections_opened_total",
         "Connections accepted on the gRPC listener."},
        {offsetof(struct kd_listener_stats, closed), "kasd_listener_connections_closed_total",
         "Connections of the gRPC listener closed (opened - closed, summed over shards, is the number "
         "open)."},
        {offsetof(struct kd_listener_stats, streams), "kasd_listener_streams_total",
         "gRPC calls (HTTP/2 streams) started on the listener."},
        {offsetof(struct kd_listener_stats, tls_handshakes), "kasd_listener_tls_handshakes_total",
         "TLS handshakes completed on the listener (ALPN h2)."},
        {offsetof(struct kd_listener_stats, tls_failures), "kasd_listener_tls_handshake_failures_total",
         "TLS handshakes that failed (bad certificate, protocol, no ALPN h2, not TLS)."},
        {offsetof(struct kd_listener_stats, keepalive_timeouts), "kasd_listener_keepalive_timeouts_total",
         "Connections closed because a keepalive PING got no ACK within the listener's keepalive_timeout "
         "(a dead or unreachable peer)."},
        {offsetof(struct kd_listener_stats, ws_upgrades), "kasd_listener_websocket_upgrades_total",
         "Connections upgraded to WebSocket (ws-tunnel: HTTP/2 inside binary messages)."},
        {offsetof(struct kd_listener_stats, ws_refused), "kasd_listener_websocket_refused_total",
         "WebSocket upgrade requests answered with an HTTP error (bad request, version, head too large)."},
        {offsetof(struct kd_listener_stats, ws_bad_frames), "kasd_listener_websocket_bad_frames_total",
         "WebSocket connections closed on a frame the protocol does not allow (unmasked, text, "
         "oversize...)."},
    };
    for (size_t f = 0; f < sizeof(lfields) / sizeof(lfields[0]); f++) {
        family(b, lfields[f].name, "counter", lfields[f].help);
        for (unsigned l = 0; l < c->srv->opts.nlisteners && l < KD_MAX_LISTENERS; l++)
            for (unsigned i = 0; i < c->n; i++) {
                const struct kd_listener_stats *ls = &kd_server_shard_stats(c->srv, i)->listener[l];
                bprintf(
                    b, "%s{listener=\"%s\",shard=\"%u\"} %llu\n", lfields[f].name,
                    c->srv->opts.listeners[l].name, i,
                    (unsigned long long)kd_stat_get((const kd_stat *)((const char *)ls + lfields[f].off)));
            }
    }

    family(b, "kasd_listener_http2_abuse_total", "counter",
           "HTTP/2 abuse on the gRPC listener by reason (docs/operations.md): rapid_reset, ping_flood, "
           "settings_flood (connection ended with GOAWAY), header_overflow, hpack (request refused, or "
           "GOAWAY COMPRESSION_ERROR), protocol_error (connection error).");
    for (unsigned l = 0; l < c->srv->opts.nlisteners && l < KD_MAX_LISTENERS; l++)
        for (unsigned i = 0; i < c->n; i++)
            for (unsigned r = 0; r < KD_H2_ABUSE_COUNT; r++)
                bprintf(b,
                        "kasd_listener_http2_abuse_total{listener=\"%s\",shard=\"%u\",reason=\"%s\"} %llu\n",
                        c->srv->opts.listeners[l].name, i, kd_h2_abuse_name((enum kd_h2_abuse)r),
                        (unsigned long long)kd_stat_get(
                            &kd_server_shard_stats(c->srv, i)->listener[l].http2_abuse[r]));

    ROUTER_COUNTER(sent, "kasd_router_messages_sent_total", "Cross-shard messages sent (including to self).");
    ROUTER_COUNTER(received, "kasd_router_messages_received_total", "Cross-shard messages handled.");
    ROUTER_COUNTER(overflowed, "kasd_router_messages_overflowed_total",
                   "Messages that found the ring full and waited in the sender's overflow queue.");
    ROUTER_COUNTER(doorbells_sent, "kasd_router_doorbells_sent_total",
                   "Wake-ups sent to a sleeping participant (msg_ring or eventfd).");
    ROUTER_COUNTER(doorbells_saved, "kasd_router_doorbells_saved_total",
                   "Sends that needed no wake-up because the target was awake.");
    ROUTER_COUNTER(released_remote, "kasd_router_payloads_released_remote_total",
                   "Payloads sent back to the participant that allocated them, to be freed there.");

    KAS_SERIES("gauge", sn->kas.agents, "kasd_agents",
               "Agents with a tunnel, a pod or a waiting call on the shard.");
    family(b, "kasd_tunnels", "gauge", "Reverse tunnels on the shard, by state (idle: ready for a call).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            bprintf(b, "kasd_tunnels{shard=\"%u\",state=\"idle\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.tunnels_idle);
            bprintf(b, "kasd_tunnels{shard=\"%u\",state=\"busy\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.tunnels_busy);
        }
    KAS_SERIES("gauge", sn->kas.waiting_calls, "kasd_waiting_calls",
               "Routed calls waiting on their agent's owner shard for a tunnel.");
    family(b, "kasd_routed_calls_total", "counter",
           "Routed calls finished on the agent's owner shard, by outcome (ok: gRPC status OK).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            bprintf(b, "kasd_routed_calls_total{shard=\"%u\",outcome=\"ok\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.routed_ok);
            bprintf(b, "kasd_routed_calls_total{shard=\"%u\",outcome=\"failed\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.routed_failed);
        }
    KAS_SERIES("counter", sn->kas.routed_no_tunnel, "kasd_routed_calls_no_tunnel_total",
               "Routed calls that found no tunnel before their deadline (also counted as failed).");
    static const char *const codes[17] = {
        "OK",        "CANCELLED",       "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
        "NOT_FOUND", "ALREADY_EXISTS",  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED",   "OUT_OF_RANGE",    "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
        "DATA_LOSS", "UNAUTHENTICATED",
    };
    family(
        b, "kasd_routed_calls_by_code_total", "counter",
        "Routed calls finished on the agent's owner shard, by the gRPC status the caller got (codes seen so "
        "far).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i])
            for (int k = 0; k < 17; k++)
                if (c->snaps[i].kas.routed_by_status[k] != 0)
                    bprintf(b, "kasd_routed_calls_by_code_total{shard=\"%u\",code=\"%s\"} %llu\n", i,
                            codes[k], (unsigned long long)c->snaps[i].kas.routed_by_status[k]);
    family(
        b, "kasd_fleet_forwarded_total", "counter",
        "Offers of a routed call to a peer instance, by answer: ready (delivered there), no_tunnel (the peer "
        "had none: the next candidate was tried), failed (unreachable, refused or broken: likewise).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            const struct kd_kas_stats *k = &c->snaps[i].kas;
            bprintf(b, "kasd_fleet_forwarded_total{shard=\"%u\",result=\"ready\"} %llu\n", i,
                    (unsigned long long)k->fwd_ready);
            bprintf(b, "kasd_fleet_forwarded_total{shard=\"%u\",result=\"no_tunnel\"} %llu\n", i,
                    (unsigned long long)k->fwd_no_tunnel);
            bprintf(b, "kasd_fleet_forwarded_total{shard=\"%u\",result=\"failed\"} %llu\n", i,
                    (unsigned long long)k->fwd_failed);
        }
    family(b, "kasd_fleet_gateway_total", "counter",
           "Calls from peer instances (private listener), by answer: ready (bound to a local tunnel) or "
           "no_tunnel (none here, or draining).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            const struct kd_kas_stats *k = &c->snaps[i].kas;
            bprintf(b, "kasd_fleet_gateway_total{shard=\"%u\",result=\"ready\"} %llu\n", i,
                    (unsigned long long)k->gw_ready);
            bprintf(b, "kasd_fleet_gateway_total{shard=\"%u\",result=\"no_tunnel\"} %llu\n", i,
                    (unsigned long long)k->gw_no_tunnel);
        }
    family(b, "kasd_routing_woken_total", "counter",
           "Routed calls that had to wait for their agent, by what got them routed: tunnel (one registered "
           "here), event (a presence event named a peer), recheck (the safety re-check found what events "
           "missed), poll (fleet.discovery: poll), retry (read again soon after an offer to a peer failed).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            const struct kd_kas_stats *k = &c->snaps[i].kas;
            static const char *const by[5] = {"tunnel", "event", "recheck", "poll", "retry"};
            const uint64_t v[5] = {k->woken_tunnel, k->woken_event, k->woken_recheck, k->woken_poll,
                                   k->woken_retry};
            for (int j = 0; j < 5; j++)
                bprintf(b, "kasd_routing_woken_total{shard=\"%u\",by=\"%s\"} %llu\n", i, by[j],
                        (unsigned long long)v[j]);
        }
    KAS_SERIES("counter", sn->kas.holder_handoffs, "kasd_shared_connection_handoffs_total",
               "Routed calls the agent's owner shard handed to the shard holding the agent's tunnels on a "
               "connection shared with other agents (an L7 proxy in front of kasd).");
    KAS_SERIES("counter", sn->kas.holder_bounces, "kasd_shared_connection_bounces_total",
               "Of those, calls the holder shard sent back (its idle tunnels were taken meanwhile).");
    KAS_SERIES("counter", sn->kas.token_redis_hits, "kasd_gitlab_agent_info_redis_hits_total",
               "Agent tokens (agent.token_source: gitlab) this shard found in Redis, shared by another "
               "instance (or this one before a restart), instead of asking GitLab.");
    KAS_SERIES("counter", sn->kas.fwd_raced, "kasd_fleet_raced_total",
               "Second candidates offered a call while the first had not answered within "
               "fleet.second_candidate_delay (the loser is cancelled before any request byte).");
    KAS_SERIES("counter", sn->kas.fwd_race_won, "kasd_fleet_race_won_total",
               "Of those, the races the second candidate won.");
    KAS_SERIES(
        "counter", sn->kas.recheck_found, "kasd_fleet_recheck_found_total",
        "Safety re-checks of a waiting call that found a peer holding its agent's tunnel (events missed "
        "it; expected 0).");
    KAS_SERIES("gauge", sn->kas.peer_channels, "kasd_fleet_peer_connections",
               "Connections to peer instances' private listeners open on the shard.");
    KAS_SERIES("gauge", sn->kas.forwarding, "kasd_fleet_forwarding_calls",
               "Routed calls being offered to a peer instance now (not yet ready).");
    KAS_SERIES("gauge", sn->kas.pr_subscriptions, "kasd_presence_subscriptions",
               "Agents' presence channels the shard is subscribed to now (calls waiting or a cached route).");
    KAS_SERIES("counter", sn->kas.pr_events, "kasd_presence_events_received_total",
               "Presence events received on the shard's subscriber connection.");
    KAS_SERIES("counter", sn->kas.pr_lookups, "kasd_presence_lookups_total",
               "Reads of an agent's tunnel holders in Redis (a route cache miss, or the safety re-check).");
    KAS_SERIES("counter", sn->kas.pr_lookup_failures, "kasd_presence_lookup_failures_total",
               "Those reads that failed (Redis down or erroring).");
    KAS_SERIES("counter", sn->kas.pr_cache_hits, "kasd_presence_cache_hits_total",
               "Routed calls that found their agent's route in the shard's route cache.");
    KAS_SERIES("counter", sn->kas.pr_cache_stale_hits, "kasd_presence_cache_stale_hits_total",
               "Route cache hits used while Redis was down (events may have been missed).");
    KAS_SERIES(
        "counter", sn->kas.pr_sub_unconfirmed, "kasd_presence_subscribe_unconfirmed_total",
        "Route lookups that read Redis without a confirmed SUBSCRIBE of the agent's presence channel "
        "(refused: an ACL without channel rights; or slower than 1 s). Non-zero: events are not relied on.");
    KAS_SERIES("gauge", sn->kas.pr_cache_entries, "kasd_presence_cache_entries",
               "Agents with a cached route on the shard (at most fleet.route_cache_size).");
    KAS_SERIES("counter", sn->kas.pr_cache_evictions, "kasd_presence_cache_evictions_total",
               "Cached routes evicted to keep within fleet.route_cache_size (least recently used).");
    KAS_SERIES("counter", sn->kas.api_auth_failures, "kasd_api_auth_failures_total",
               "Calls on the api listener refused because GitLab's JWT was missing, invalid or expired.");
    KAS_SERIES("counter", sn->kas.auth_failures, "kasd_agent_auth_failures_total",
               "Agent calls refused because the agent token was missing or unknown.");
    KAS_SERIES("counter", sn->kas.protocol_violations, "kasd_agent_protocol_violations_total",
               "Tunnels closed because the agent broke the tunnel protocol.");
    family(b, "kasd_agent_pods_refused_total", "counter",
           "Register calls refused RESOURCE_EXHAUSTED because a new pod_id would pass a limit, or its "
           "AgentMeta is larger than limits.agent_meta_max_size (the limits key).");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            bprintf(b, "kasd_agent_pods_refused_total{shard=\"%u\",limit=\"pods_per_connection\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.pods_refused_conn);
            bprintf(b, "kasd_agent_pods_refused_total{shard=\"%u\",limit=\"pods_per_agent\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.pods_refused_agent);
            bprintf(b, "kasd_agent_pods_refused_total{shard=\"%u\",limit=\"agent_meta_max_size\"} %llu\n", i,
                    (unsigned long long)c->snaps[i].kas.meta_refused);
        }

    KAS_SERIES("gauge", sn->tracker.conns, "kasd_tracker_connections",
               "Agent connections (agentk pods) this shard advertises in Redis for GetConnectedAgents.");
    KAS_SERIES("gauge", sn->tracker.tunnels_flags, "kasd_tracker_tunnel_agents",
               "Agents for which this shard advertises in Redis that the instance holds tunnels.");
    KAS_SERIES("counter", sn->tracker.writes, "kasd_tracker_redis_commands_total",
               "Redis commands issued by the fleet tracker (writes, re-syncs, heartbeats, sweeps, lookups).");
    KAS_SERIES("counter", sn->tracker.write_failures, "kasd_tracker_redis_failures_total",
               "Fleet tracker commands that failed; each one schedules a full re-sync of the shard's state.");
    KAS_SERIES(
        "counter", sn->tracker.resyncs, "kasd_tracker_resyncs_total",
        "Full re-syncs of the shard's state to Redis (after every reconnect and after failed writes).");
    KAS_SERIES("counter", sn->tracker.swept_instances, "kasd_tracker_swept_instances_total",
               "Dead instances whose Redis entries this shard swept.");
    family(b, "kasd_get_connected_agents_total", "counter",
           "AgentTracker/GetConnectedAgents calls answered from Redis, by outcome.");
    for (unsigned i = 0; i < c->n; i++)
        if (c->have[i]) {
            const struct kd_tracker_stats *ts = &c->snaps[i].tracker;
            bprintf(b, "kasd_get_connected_agents_total{shard=\"%u\",outcome=\"ok\"} %llu\n", i,
                    (unsigned long long)(ts->lookups - ts->lookup_failures));
            bprintf(b, "kasd_get_connected_agents_total{shard=\"%u\",outcome=\"failed\"} %llu\n", i,
                    (unsigned long long)ts->lookup_failures);
        }
    KAS_SERIES("counter", sn->tracker.lookups_truncated, "kasd_get_connected_agents_truncated_total",
               "GetConnectedAgents answers cut to limits.connected_agents_max_size (also counted as ok; "
               "trailer kasd-truncated: true).");

    /* The histogram is merged over the shards that answered (no shard label: buckets add up). */
    static const char *const outcome[KD_KAS_ROUTE_OUTCOMES] = {"success", "timeout", "aborted"};
    family(b, "k8s_api_proxy_routing_duration_seconds", "histogram",
           "Routing decision time on the agent's owner shard: from the routed call's arrival there to "
           "its binding to a tunnel (success), its deadline (timeout) or its cancellation (aborted).");
    for (int o = 0; o < KD_KAS_ROUTE_OUTCOMES; o++) {
        struct kd_kas_route_hist h = {0};
        for (unsigned i = 0; i < c->n; i++)
            if (c->have[i]) {
                const struct kd_kas_route_hist *s = &c->snaps[i].route[o];
                for (int k = 0; k <= KD_KAS_ROUTE_BUCKETS; k++)
                    h.buckets[k] += s->buckets[k];
                h.count += s->count;
                h.sum_ns += s->sum_ns;
            }
        uint64_t cum = 0;
        for (int k = 0; k < KD_KAS_ROUTE_BUCKETS; k++) {
            cum += h.buckets[k];
            bprintf(b, "k8s_api_proxy_routing_duration_seconds_bucket{status=\"%s\",le=\"%g\"} %llu\n",
                    outcome[o], kd_kas_route_bucket_le[k], (unsigned long long)cum);
        }
        cum += h.buckets[KD_KAS_ROUTE_BUCKETS];
        bprintf(b, "k8s_api_proxy_routing_duration_seconds_bucket{status=\"%s\",le=\"+Inf\"} %llu\n",
                outcome[o], (unsigned long long)cum);
        bprintf(b, "k8s_api_proxy_routing_duration_seconds_sum{status=\"%s\"} %.9f\n", outcome[o],
                (double)h.sum_ns / 1e9);
        bprintf(b, "k8s_api_proxy_routing_duration_seconds_count{status=\"%s\"} %llu\n", outcome[o],
                (unsigned long long)h.count);
    }
    if (c->gitlab != NULL) {
        struct kd_gitlab_stats gs;
        kd_gitlab_stats(c->gitlab, &gs);
        family(
            b, "kasd_gitlab_agent_info_requests_total", "counter",
            "agent_info requests to GitLab (agent.token_source: gitlab), by outcome: ok (a known agent), "
            "unauthenticated (401/403/404), failed (no answer, another status, an answer not understood).");
        bprintf(b, "kasd_gitlab_agent_info_requests_total{outcome=\"ok\"} %llu\n", (unsigned long long)gs.ok);
        bprintf(b, "kasd_gitlab_agent_info_requests_total{outcome=\"unauthenticated\"} %llu\n",
                (unsigned long long)gs.unauthenticated);
        bprintf(b, "kasd_gitlab_agent_info_requests_total{outcome=\"failed\"} %llu\n",
                (unsigned long long)gs.failed);
        family(b, "kasd_gitlab_agent_info_cache_hits_total", "counter",
               "Token lookups from the shards answered from the control thread's cache.");
        bprintf(b, "kasd_gitlab_agent_info_cache_hits_total %llu\n", (unsigned long long)gs.cache_hits);
        family(b, "kasd_gitlab_agent_info_coalesced_total", "counter",
               "Token lookups that joined a request already in flight for the same token (single flight).");
        bprintf(b, "kasd_gitlab_agent_info_coalesced_total %llu\n", (unsigned long long)gs.coalesced);
        family(b, "kasd_gitlab_proxy_auth_total", "counter",
               "Kubernetes API front door credentials checked by GitLab (authorize_proxy_user, "
               "job/allowed_agents), by outcome: ok, denied (401/403 to the user), failed (503).");
        bprintf(b, "kasd_gitlab_proxy_auth_total{outcome=\"ok\"} %llu\n", (unsigned long long)gs.auth_ok);
        bprintf(b, "kasd_gitlab_proxy_auth_total{outcome=\"denied\"} %llu\n",
                (unsigned long long)gs.auth_denied);
        bprintf(b, "kasd_gitlab_proxy_auth_total{outcome=\"failed\"} %llu\n",
                (unsigned long long)gs.auth_failed);
        family(b, "kasd_gitlab_proxy_auth_cache_hits_total", "counter",
               "Front door credentials answered from the cache (no request to GitLab).");
        bprintf(b, "kasd_gitlab_proxy_auth_cache_hits_total %llu\n", (unsigned long long)gs.auth_cache_hits);
    }
    if (c->kube != NULL) {
        struct kd_kubeapi_stats ks;
        kd_kubeapi_stats(c->kube, &ks);
        family(b, "kasd_kubernetes_api_requests_total", "counter",
               "Requests to the Kubernetes API front door, by outcome (proxied: the agent's answer "
               "started; no_tunnel: no tunnel within limits.routing_timeout).");
        static const char *const names[] = {"proxied",     "unauthorized", "forbidden",
                                            "bad_request", "no_tunnel",    "failed"};
        const uint64_t vals[] = {ks.proxied,      ks.unauthorized, ks.forbidden,
                                 ks.bad_requests, ks.no_tunnel,    ks.failed};
        for (size_t i = 0; i < 6; i++)
            bprintf(b, "kasd_kubernetes_api_requests_total{outcome=\"%s\"} %llu\n", names[i],
                    (unsigned long long)vals[i]);
        family(b, "kasd_kubernetes_api_upgrades_total", "counter",
               "Front door requests switched to another protocol (101: kubectl exec, attach, port-forward).");
        bprintf(b, "kasd_kubernetes_api_upgrades_total %llu\n", (unsigned long long)ks.upgraded);
        family(b, "kasd_kubernetes_api_requests_active", "gauge",
               "Front door requests open now (waiting for a tunnel, or streaming).");
        bprintf(b, "kasd_kubernetes_api_requests_active %llu\n", (unsigned long long)ks.active);
    }
}

/* ---- answering ---- */

static bool draining(const struct kd_control *c)
{
    /* The server's stop flag is an atomic written by main (kd_server_stop): not shard-local. */
    return atomic_load_explicit(&c->srv->stopping, memory_order_acquire);
}

static void answer(struct kd_control *c, struct pending *p)
{
    char msg[256];
    switch (p->ep) {
    case KD_CONTROL_METRICS: {
        struct buf b = {0};
        render_metrics(c, &b);
        if (b.oom)
            kd_httpd_respond(p->req, 503, "text/plain; charset=utf-8", "out of memory\n", 14);
        else
            kd_httpd_respond(p->req, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len);
        free(b.p);
        break;
    }
    case KD_CONTROL_LIVENESS: {
        /* While draining, a shard with nothing left to serve exits its loop and can no longer answer;
         * shard threads are not observable from here otherwise, so a silent shard is presumed
         * finished, not stuck (the grace period bounds the drain anyway). */
        int len = 0;
        for (unsigned i = 0; i < c->n && len < (int)sizeof(msg) - 64 && !draining(c); i++)
            if (!c->have[i])
                len += snprintf(msg + len, sizeof(msg) - (size_t)len,
                                "shard %u did not answer within %d ms\n", i, KD_CONTROL_ROUND_TIMEOUT_MS);
        if (len == 0)
            kd_httpd_respond(p->req, 200, "text/plain; charset=utf-8", "ok\n", 3);
        else
            kd_httpd_respond(p->req, 503, "text/plain; charset=utf-8", msg, (size_t)len);
        break;
    }
    case KD_CONTROL_READINESS: {
        /* Not ready while any shard's Redis connection is down: that shard cannot publish its
         * agents, so the fleet would not route to them (locally held tunnels keep working). */
        int len = 0;
        if (draining(c))
            len = snprintf(msg, sizeof(msg), "draining: kasd is stopping\n");
        for (unsigned i = 0; i < c->n && len == 0; i++) {
            if (!c->have[i])
                len = snprintf(msg, sizeof(msg), "shard %u did not answer\n", i);
            else if (c->snaps[i].stopping)
                len = snprintf(msg, sizeof(msg), "draining: shard %u is stopping\n", i);
            else if (c->snaps[i].listeners_open < c->srv->opts.nlisteners)
                len = snprintf(msg, sizeof(msg), "shard %u has %u of %u listeners open\n", i,
                               c->snaps[i].listeners_open, c->srv->opts.nlisteners);
            else if (kd_stat_get(&kd_server_shard_stats(c->srv, i)->redis.configured) &&
                     !kd_stat_get(&kd_server_shard_stats(c->srv, i)->redis.up))
                len = snprintf(msg, sizeof(msg), "shard %u: redis connection is down\n", i);
        }
        if (len == 0 && c->gitlab != NULL) {
            /* GitLab unavailable does not make kasd unready: agents and credentials it knows keep
             * working, and another instance could not reach GitLab either. The body says it. */
            char body[300] = "ok\n";
            size_t bl = 3 + kd_gitlab_health(c->gitlab, body + 3, sizeof(body) - 3);
            kd_httpd_respond(p->req, 200, "text/plain; charset=utf-8", body, bl);
        } else if (len == 0)
            kd_httpd_respond(p->req, 200, "text/plain; charset=utf-8", "ok\n", 3);
        else
            kd_httpd_respond(p->req, 503, "text/plain; charset=utf-8", msg, (size_t)len);
        break;
    }
    }
    free(p);
}

static void start_round(struct kd_control *c)
{
    c->round++;
    c->in_round = true;
    c->answered = 0;
    memset(c->have, 0, c->n * sizeof(*c->have));
    c->cur = c->next;
    c->next = NULL;
    c->deadline_ms = kd_clock_ms() + KD_CONTROL_ROUND_TIMEOUT_MS;
    for (unsigned i = 0; i < c->n; i++) {
        struct kd_msg m = {.type = KD_RT_STATS_REQ, .u64 = c->round};
        kd_router_send(c->router, c->self, i, &m);
    }
}

static void finish_round(struct kd_control *c)
{
    c->in_round = false;
    struct pending *p = c->cur;
    c->cur = NULL;
    while (p != NULL) {
        struct pending *next = p->next;
        answer(c, p);
        p = next;
    }
    if (c->next != NULL && !atomic_load(&c->stop))
        start_round(c);
}

static void on_router_msg(void *ud, const struct kd_msg *m)
{
    struct kd_control *c = ud;
    if ((c->kube != NULL && kd_kubeapi_on_message(c->kube, m)) ||
        (c->gitlab != NULL && kd_gitlab_on_message(c->gitlab, m))) {
        /* after the handler, which may have sent (FRONT_DONE): the stop barrier's count */
        atomic_fetch_add_explicit(&c->srv->ctl_handled, 1, memory_order_release);
        return;
    }
    if (m->type != KD_RT_STATS) {
        kd_log_msg(KD_LOG_ERROR, "router_unknown_message", "control: type %u from %u dropped", m->type,
                   m->from);
        return;
    }
    if (c->in_round && m->u64 == c->round && m->from < c->n && !c->have[m->from]) {
        memcpy(&c->snaps[m->from], m->ptr, sizeof(c->snaps[0]));
        c->have[m->from] = true;
        c->answered++;
    }
    kd_router_payload_release(c->router, c->self, m->ptr);
    if (c->in_round && c->answered == c->n)
        finish_round(c);
}

/* An answer kd_control_route gives at once: -1, *now filled. */
static int answer_now(struct kd_control_answer *now, int status, const char *body)
{
    *now = (struct kd_control_answer){
        .status = status, .content_type = "text/plain; charset=utf-8", .body = body, .len = strlen(body)};
    return -1;
}

int kd_control_route(const char *method, size_t mlen, const char *path, size_t plen, bool draining,
                     struct kd_control_answer *now)
{
    enum kd_control_endpoint ep;
#define IS(s) (plen == sizeof(s) - 1 && memcmp(path, s, plen) == 0)
    if (IS("/metrics"))
        ep = KD_CONTROL_METRICS;
    else if (IS("/liveness"))
        ep = KD_CONTROL_LIVENESS;
    else if (IS("/readiness"))
        ep = KD_CONTROL_READINESS;
    else
        return answer_now(now, 404, "not found: try /metrics, /liveness, /readiness\n");
#undef IS
    if (!((mlen == 3 && memcmp(method, "GET", 3) == 0) || (mlen == 4 && memcmp(method, "HEAD", 4) == 0)))
        return answer_now(now, 405, "method not allowed\n");
    if (ep == KD_CONTROL_READINESS && draining) /* no need to ask anyone */
        return answer_now(now, 503, "draining: kasd is stopping\n");
    if (ep == KD_CONTROL_LIVENESS && draining) /* see answer(): silent shards count as finished */
        return answer_now(now, 200, "ok (draining)\n");
    return (int)ep;
}

static void on_request(void *ud, struct kd_httpd_req *req, const char *method, size_t mlen, const char *path,
                       size_t plen)
{
    struct kd_control *c = ud;
    struct kd_control_answer now;
    int ep = kd_control_route(method, mlen, path, plen, draining(c), &now);
    if (ep < 0) {
        kd_httpd_respond(req, now.status, now.content_type, now.body, now.len);
        return;
    }
    struct pending *p = malloc(sizeof(*p));
    if (p == NULL) {
        kd_httpd_respond(req, 503, "text/plain; charset=utf-8", "out of memory\n", 14);
        return;
    }
    p->req = req;
    p->ep = (enum kd_control_endpoint)ep;
    p->next = c->next;
    c->next = p;
    if (!c->in_round)
        start_round(c);
}

static void on_wake(void *ud)
{
    (void)ud; /* the loop drains the router after every turn */
}

static void fail_all(struct pending *p)
{
    while (p != NULL) {
        struct pending *next = p->next;
        kd_httpd_respond(p->req, 503, "text/plain; charset=utf-8", "kasd is stopping\n", 17);
        free(p);
        p = next;
    }
}

static void *control_main(void *arg)
{
    struct kd_control *c = arg;
    pthread_setname_np(pthread_self(), "kasd-control");
    while (!atomic_load_explicit(&c->stop, memory_order_acquire)) {
        kd_router_drain(c->router, c->self, DRAIN_BUDGET);
        uint64_t now = kd_clock_ms();
        if (c->in_round && now >= c->deadline_ms)
            finish_round(c);
        int timeout = -1;
        if (c->in_round)
            timeout = (int)(c->deadline_ms - now);
        if (c->gitlab != NULL) {
            uint64_t next = kd_gitlab_tick(c->gitlab, now);
            if (next != UINT64_MAX && (timeout < 0 || next - now < (uint64_t)timeout))
                timeout = next > now ? (int)(next - now) : 0;
        }
        if (kd_router_has_backlog(c->router, c->self))
            timeout = 1; /* overflow: nobody rings for it, retry soon */
        if (!kd_router_prepare_sleep(c->router, c->self))
            timeout = 0;
        kd_httpd_run(c->httpd, timeout);
        kd_router_awake(c->router, c->self);
    }
    /* Stop: nothing more is accepted; pending requests get 503; connections get a moment to
     * flush their last answers. */
    kd_httpd_close_listener(c->httpd);
    fail_all(c->cur);
    fail_all(c->next);
    c->cur = c->next = NULL;
    c->in_round = false;
    uint64_t until = kd_clock_ms() + 300;
    while (kd_httpd_connections(c->httpd) != 0 && kd_clock_ms() < until) {
        kd_router_drain(c->router, c->self, DRAIN_BUDGET); /* release late answers */
        kd_httpd_run(c->httpd, 20);
    }
    kd_router_drain(c->router, c->self, DRAIN_BUDGET);
    kd_kubeapi_destroy(c->kube); /* the shards are gone: what is still open is answered here */
    c->kube = NULL;
    kd_gitlab_destroy(c->gitlab);
    c->gitlab = NULL;
    for (int i = 0; i < 5 && kd_httpd_connections(c->httpd) != 0; i++)
        kd_httpd_run(c->httpd, 20);
    if (!kd_httpd_destroy(c->httpd))
        kd_log_msg(KD_LOG_DEBUG, "observability_stop",
                   "connections still open at exit: h2o context left allocated");
    c->httpd = NULL;
    /* Done: from here on the thread touches nothing of c. It parks instead of exiting because h2o
     * 2.2 keeps per-thread caches in private thread-locals it never frees (memory pool chunks,
     * HTTP/2 write buffers, ~90 KB): reachable only from this thread's TLS, they would turn into
     * leaks (and LeakSanitizer reports) if the thread exited. Blocked with every handled signal
     * masked, it costs no CPU and ends with the process. */
    sem_post(&c->done);
    for (;;)
        pause();
    return NULL;
}

int kd_control_create(struct kd_server *srv, const struct sockaddr_storage *addr, socklen_t addrlen,
                      struct kd_control **out, char *err, size_t errlen)
{
    *out = NULL;
    struct kd_control *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    c->srv = srv;
    c->router = kd_server_router(srv);
    c->n = kd_server_nshards(srv);
    c->self = c->n;
    c->listen_fd = c->efd = c->kube_fd = -1;
    sem_init(&c->done, 0, 0);
    c->have = calloc(c->n, sizeof(*c->have));
    c->snaps = calloc(c->n, sizeof(*c->snaps));
    if (c->have == NULL || c->snaps == NULL) {
        snprintf(err, errlen, "out of memory");
        kd_control_destroy(c);
        return -ENOMEM;
    }
    int rc = kd_listener_bind(addr, addrlen, &c->listen_fd, err, errlen);
    if (rc < 0) {
        size_t used = strlen(err);
        snprintf(err + used, errlen - used, " (observability listener)");
        kd_control_destroy(c);
        return rc;
    }
    socklen_t len = sizeof(c->bound);
    getsockname(c->listen_fd, (struct sockaddr *)&c->bound, &len);
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->efd < 0) {
        rc = -errno;
        snprintf(err, errlen, "eventfd: %s", strerror(-rc));
        kd_control_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

void kd_control_address(const struct kd_control *c, char *buf, size_t len)
{
    kd_listener_format(&c->bound, buf, len);
}

int kd_control_add_kubeapi(struct kd_control *c, const struct sockaddr_storage *addr, socklen_t addrlen,
                           const struct kd_kubeapi_cfg *cfg, size_t max_body, const char *cert_file,
                           const char *key_file, char *err, size_t errlen)
{
    c->kube_cert = cert_file;
    c->kube_key = key_file;
    int rc = kd_listener_bind(addr, addrlen, &c->kube_fd, err, errlen);
    if (rc < 0) {
        size_t used = strlen(err);
        snprintf(err + used, errlen - used, " (kubernetes_api listener)");
        return rc;
    }
    socklen_t len = sizeof(c->kube_bound);
    getsockname(c->kube_fd, (struct sockaddr *)&c->kube_bound, &len);
    c->kube_cfg = *cfg;
    c->kube_max_body = max_body;
    return 0;
}

void kd_control_set_gitlab(struct kd_control *c, const struct kd_gitlab_cfg *cfg)
{
    c->gitlab_cfg = *cfg;
    c->gitlab_on = true;
}

void kd_control_kubeapi_address(const struct kd_control *c, char *buf, size_t len)
{
    kd_listener_format(&c->kube_bound, buf, len);
}

int kd_control_start(struct kd_control *c, char *err, size_t errlen)
{
    /* h2o closes the fds it watches, so it gets a duplicate of the eventfd: the original stays
     * valid for the shards' doorbells and for kd_control_stop until kd_control_destroy. */
    int wake = fcntl(c->efd, F_DUPFD_CLOEXEC, 0);
    if (wake < 0) {
        snprintf(err, errlen, "fcntl(F_DUPFD_CLOEXEC): %s", strerror(errno));
        return -errno;
    }
    struct kd_httpd_opts o = {
        .listen_fd = c->listen_fd,
        .wake_fd = wake,
        .on_wake = on_wake,
        .on_request = on_request,
        .ud = c,
    };
    int rc = kd_httpd_create(&o, &c->httpd, err, errlen);
    if (rc < 0) {
        close(wake);
        return rc;
    }
    c->listen_fd = -1; /* the httpd owns it now */
    if (c->gitlab_on && kd_gitlab_create(c->srv, c->httpd, &c->gitlab_cfg, &c->gitlab) < 0) {
        snprintf(err, errlen, "gitlab client: out of memory");
        return -ENOMEM;
    }
    if (c->kube_fd >= 0) {
        rc = kd_kubeapi_create(c->srv, &c->kube_cfg, &c->kube);
        if (rc < 0) {
            snprintf(err, errlen, "kubernetes_api: out of memory");
            return rc;
        }
        if (c->gitlab != NULL)
            kd_kubeapi_set_gitlab(c->kube, c->gitlab);
        struct kd_httpd_site_opts so = {
            .listen_fd = c->kube_fd,
            .on_request = kd_kubeapi_on_request,
            .ud = c->kube,
            .max_body = c->kube_max_body,
            .req_timeout_ms = 10000,    /* GitLab kas: ReadHeaderTimeout 10 s */
            .idle_timeout_ms = 3600000, /* watches may be quiet for long */
            .cert_file = c->kube_cert,
            .key_file = c->kube_key,
        };
        rc = kd_httpd_add_site(c->httpd, &so, err, errlen);
        if (rc < 0) {
            char why[400];
            snprintf(why, sizeof(why), "kubernetes_api.listen %s", err);
            snprintf(err, errlen, "%s", why);
            return rc;
        }
        c->kube_fd = -1; /* the httpd owns it now */
    }
    /* Attached here, before the thread exists: the router only asks that attach happen before the
     * participant sends or receives, and shards send to us only in answer to our requests. */
    rc = kd_router_attach(c->router, c->self, NULL, 0, c->efd, on_router_msg, c);
    if (rc < 0) {
        snprintf(err, errlen, "router attach (control): %s", strerror(-rc));
        return rc;
    }
    rc = pthread_create(&c->thread, NULL, control_main, c);
    if (rc != 0) {
        snprintf(err, errlen, "starting the control thread: %s", strerror(rc));
        return -rc;
    }
    c->started = true;
    return 0;
}

void kd_control_stop(struct kd_control *c)
{
    if (c == NULL || !c->started)
        return;
    atomic_store_explicit(&c->stop, true, memory_order_release);
    uint64_t one = 1;
    ssize_t w = write(c->efd, &one, sizeof(one));
    (void)w; /* EAGAIN: the counter is full, the thread wakes anyway */
    while (sem_wait(&c->done) < 0 && errno == EINTR)
        ;
    pthread_detach(c->thread); /* parked, see control_main */
    c->started = false;
}

void kd_control_destroy(struct kd_control *c)
{
    if (c == NULL)
        return;
    kd_control_stop(c);
    if (c->httpd != NULL) /* created, but the thread never started */
        kd_httpd_destroy(c->httpd);
    if (c->listen_fd >= 0)
        close(c->listen_fd);
    if (c->kube_fd >= 0)
        close(c->kube_fd);
    kd_kubeapi_destroy(c->kube);
    kd_gitlab_destroy(c->gitlab);
    if (c->efd >= 0)
        close(c->efd);
    free(c->have);
    free(c->snaps);
    sem_destroy(&c->done);
    free(c);
}

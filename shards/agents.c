/* agents.c — the owner shard's side: agents' tunnels (ReverseTunnel/Connect), pods
 * (AgentRegistrar/Register) and the back halves of routed calls. The agent records, idle pools
 * and wait lists are shards/pool.c's; see kas.h for the protocol with the front halves.
 *
 * A tunnel is in its agent's idle pool iff its state is IDLE; a back is on its agent's wait list
 * iff it is neither bound nor ended.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/chunkpool.h"
#include "core/clock.h"
#include "core/hash.h"
#include "core/list.h"
#include "core/log.h"
#include "core/pb.h"
#include "core/jwt.h"
#include "core/tokens.h"
#include "shards/agentconfig.h"
#include "shards/conn.h"
#include "shards/fleet.h"
#include "shards/kas.h"
#include "shards/pool.h"
#include "shards/presence.h"
#include "shards/redis.h"
#include "shards/tracker.h"
#include "shards/tunnel_codec.h"

typedef struct kd_pool_agent agent_t;

struct tunnel {
    struct kd_pool_tunnel pt; /* pool entry: agent, methods, idle link */
    kd_grpc_call *call;
    enum kd_tun_state st;
    char *methods;     /* "/svc/method\0/svc/method\0..." (pt.methods) */
    struct back *back; /* the bound call */
    uint64_t resp_unacked;
    bool held;
    uint64_t acks_owed; /* request bytes to acknowledge once the tunnel's send queue drains */
    /* A peer tunnel: the call forwarded to another instance's gateway (a client call), which
     * relays the agent's ConnectRequest messages; not in any pool. */
    bool peer;
    bool ready;                 /* peer: the gateway said "tunnel ready" */
    struct kd_presence_peer to; /* peer: the instance */
    struct kd_fleet_chan *chan; /* peer: the connection it runs on */
};

enum wake { WAKE_START, WAKE_EVENT, WAKE_RECHECK, WAKE_POLL, WAKE_RETRY };

struct back {
    struct kd_pool_wait pw; /* pool entry while waiting: agent, method, wait link */
    void *front;            /* R's handle: passed back in messages, never dereferenced here */
    unsigned r;             /* R's shard */
    int64_t agent_id;
    struct tunnel *t; /* while bound */
    char *method;
    size_t method_len;
    uint8_t *md;
    size_t md_len;
    struct kd_timer timer;
    uint64_t start_ns; /* START arrived here (routing duration histogram) */
    bool bound, ended;
    struct kd_kas_shard *ks;
    /* the fleet */
    bool gateway;  /* KD_RT_START_GATEWAY: a local tunnel or nothing; never forwarded */
    bool watching; /* counted in kd_presence_watch */
    bool waited;   /* routing found nothing at first: the call waited */
    bool looking;  /* lk pending */
    uint8_t wake;  /* enum wake: what started the current forwarding attempts */
    uint8_t ncand, icand;
    uint32_t poll_ms;    /* fleet.discovery poll: the next interval */
    /* An offer failed (unreachable, refused: not "no tunnel"): the holders are read again after
     * retry_ms (250 ms doubling up to fleet.recheck_interval) instead of at the next re-check, since
     * a peer that comes back (a healed link, a restart) announces nothing. */
    uint32_t retry_ms;
    bool retry_due, retry_armed;
    uint64_t event_gen;  /* the presence event that last offered it to a peer */
    uint64_t deadline_ms;
    struct kd_presence_lookup lk;
    struct kd_presence_peer cand[KD_PRESENCE_MAX_PEERS];
    struct kd_timer recheck;
    /* A second attempt raced against t (fleet.second_candidate_delay after t started without an
     * answer): the first to say "ready" gets the call, the other is cancelled before any request
     * byte. Both are NULL or unready peer tunnels while the back is on ks->forwarding. */
    struct tunnel *t2;
    struct kd_timer race;
    uint64_t tried; /* holder shards that had no tunnel for it (see KD_RT_START_HOLDER) */
    uint64_t relay_id; /* its relay to a holder shard (kd_rt_start.relay_id), 0: none */
    struct kd_list fwd_link; /* ks->forwarding while a peer is asked (off the wait list) */
};

struct pod {
    struct kd_list link;   /* agent->pods */
    struct pod *conn_next; /* the connection's pods */
    int64_t pod_id;
    uint64_t connected_at_us; /* wall clock */
    agent_t *agent;
    struct kd_tracker_conn *tracked; /* its entry in Redis (NULL: none) */
};

/* What an agent connection carries (kd_grpc_conn_user). */
struct agent_conn {
    int64_t agent_id;
    int64_t project_id; /* from the token */
    struct pod *pods;
    unsigned npods;      /* on pods (held to limits.pods_per_connection) */
    bool refusal_logged; /* one log line per connection, however often it retries */
};

struct kd_kas_shard {
    struct kd_shard *s;
    struct kd_kas *kas;
    bool stop_seen;
    struct kd_pool pool;
    struct kd_tracker *tracker; /* NULL without Redis */
    struct kd_agentconfig_shard *acfg;
    /* GitLab reuses one api JWT for many calls, and a full verification (base64, HMAC-SHA256,
     * JSON) per call was ~11 % of kasd's CPU on the routed path: verified tokens are cached here
     * (kd_jwt_cache: exact bytes compared, exp/nbf rechecked on every hit). Only for the api secret:
     * a token good there must not pass on the private listener. NULL: every call verified. */
    struct kd_jwt_cache *api_jwt;
    struct kd_kas_stats stats;
    struct kd_kas_route_hist route[KD_KAS_ROUTE_OUTCOMES];
    struct kd_presence *presence; /* NULL: no fleet */
    struct kd_fleet *fleet;
    struct kd_list forwarding; /* backs asking a peer */
    uint64_t event_gen;
    /* STARTs relayed to a holder shard, by relay id: a CANCEL_WAIT that finds no call here marks
     * the ones of its front, and one that comes back (KD_RT_START_BOUNCED, same id) marked is
     * ended at once instead of waiting for a tunnel nobody wants. A small ring: a bounce takes two
     * router hops; an entry overwritten only loses that shortcut (the call then ends at its
     * deadline, or its BOUND finds the caller gone). Ids are never reused, so a front address
     * reused by a later call cannot be mistaken for an earlier one. */
    struct away {
        uint64_t id;
        const void *front;
        uint16_t r;
        bool cancelled;
    } away[32];
    uint64_t relay_seq;
};

const double kd_kas_route_bucket_le[KD_KAS_ROUTE_BUCKETS] = {
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10,   20,
};

/* One observation of the routing decision time (see kas.h), shard-local, no lock. */
static void route_observe(struct kd_kas_shard *ks, struct back *b, int outcome)
{
    uint64_t ns = kd_clock_ns() - b->start_ns;
    struct kd_kas_route_hist *h = &ks->route[outcome];
    double sec = (double)ns / 1e9;
    size_t i = 0;
    while (i < KD_KAS_ROUTE_BUCKETS && sec > kd_kas_route_bucket_le[i])
        i++;
    h->buckets[i]++;
    h->count++;
    h->sum_ns += ns;
}

struct kd_kas_shard *kd_kas_shard_of(struct kd_shard *s)
{
    return kd_shard_user(s);
}

void *kd_kas_payload(struct kd_shard *s, size_t size)
{
    void *p = kd_router_payload_alloc(kd_shard_router(s), kd_shard_id(s), size);
    if (p == NULL)
        abort(); /* as the router's own queues: a lost message would corrupt a call */
    return p;
}

void kd_kas_release(struct kd_shard *s, void *payload)
{
    kd_router_payload_release(kd_shard_router(s), kd_shard_id(s), payload);
}

const char *kd_kas_bearer(kd_grpc_call *call, size_t *len)
{
    size_t n;
    const char *v = kd_h2_call_header_value(call, "authorization", &n);
    if (v == NULL || n < 8 || strncasecmp(v, "bearer ", 7) != 0)
        return NULL;
    v += 7;
    n -= 7;
    while (n > 0 && *v == ' ') {
        v++;
        n--;
    }
    *len = n;
    return n > 0 ? v : NULL;
}

/* ---- back halves ---- */

static void post(struct kd_kas_shard *ks, unsigned to, uint16_t type, void *ptr, void *ptr2, uint32_t u32,
                 uint64_t u64)
{
    struct kd_msg m = {.type = type, .u32 = u32, .u64 = u64, .ptr = ptr, .ptr2 = ptr2};
    kd_shard_post(ks->s, to, &m);
}

static const struct kd_h2_handler peer_handler;

/* ---- several agents on one connection: holder shards ----
 * A connection stays on the owner shard of its first agent. Another agent's tunnels on it are held
 * by that shard (the holder) for the agent's owner: the holder reports when it starts or stops
 * having ready and idle tunnels (KD_RT_HOLDER_STATE), the owner advertises the instance in Redis
 * for both, and hands calls it cannot serve itself to a holder with idle tunnels (START with
 * KD_RT_START_HOLDER), which binds one or sends the START back (KD_RT_START_BOUNCED). The front
 * follows whichever shard bound the call. */

#define MAX_HOLDER_SHARDS 64 /* holders are a bit per shard: more shards, no shared connections */

static unsigned owner_of(const struct kd_kas_shard *ks, int64_t agent_id)
{
    return kd_hash_owner((uint64_t)agent_id, ks->kas->nshards);
}

/* The agent's tunnels on this shard changed (ready count, idle list): the owner advertises the
 * instance in Redis while it or a holder has ready tunnels; a holder tells the owner what changed. */
static void tunnels_changed_ex(struct kd_kas_shard *ks, agent_t *a, bool force);
static void tunnels_changed(struct kd_kas_shard *ks, agent_t *a)
{
    tunnels_changed_ex(ks, a, false);
}

/* force (holder only): report even unchanged, asking the owner for its next call. */
static void tunnels_changed_ex(struct kd_kas_shard *ks, agent_t *a, bool force)
{
    if (owner_of(ks, a->id) == kd_shard_id(ks->s)) {
        bool want = a->nready > 0 || a->holders_ready != 0;
        if (want != a->advertised) {
            a->advertised = want;
            if (ks->tracker != NULL)
                kd_tracker_tunnels(ks->tracker, a->id, want);
        }
        return;
    }
    uint8_t bits = (uint8_t)((a->nready > 0 ? 1u : 0u) | (!kd_list_is_empty(&a->idle) ? 2u : 0u));
    if (bits != a->reported || (force && (bits & 2u))) {
        a->reported = bits;
        post(ks, owner_of(ks, a->id), KD_RT_HOLDER_STATE, NULL, NULL, bits, (uint64_t)a->id);
    }
}

static bool fleet_on(const struct kd_kas_shard *ks)
{
    return ks->presence != NULL && ks->fleet != NULL;
}

static bool fleet_poll(const struct kd_kas_shard *ks)
{
    return ks->kas->presence != NULL && ks->kas->presence->poll;
}

static void back_unwatch(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    if (b->looking) {
        kd_presence_lookup_cancel(ks->presence, &b->lk);
        b->looking = false;
    }
    if (b->watching) {
        kd_presence_unwatch(ks->presence, b->agent_id);
        b->watching = false;
    }
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->recheck);
}

/* A forwarding attempt that has not said "ready" is dropped: the peer sees a cancellation before
 * any request byte, so nothing was delivered there. */
static void attempt_cancel(struct tunnel *t, const char *why)
{
    t->back = NULL;
    kd_grpc_cancel(t->call, KD_GRPC_CANCELLED, why); /* runs peer_done now: frees t */
}

static void attempt_abort(struct back *b)
{
    kd_timerwheel_cancel(kd_shard_timers(b->ks->s), &b->race);
    struct tunnel *t2 = b->t2;
    b->t2 = NULL;
    if (t2 != NULL)
        attempt_cancel(t2, "routing gave up on this instance");
    struct tunnel *t = b->t;
    if (t == NULL || !t->peer || t->ready)
        return;
    b->t = NULL;
    if (kd_list_is_linked(&b->fwd_link))
        kd_list_unlink(&b->fwd_link);
    attempt_cancel(t, "routing gave up on this instance");
}

static void back_free(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    if (b->pw.agent != NULL)
        kd_pool_wait_cancel(&ks->pool, &b->pw);
    attempt_abort(b);
    if (kd_list_is_linked(&b->fwd_link))
        kd_list_unlink(&b->fwd_link);
    back_unwatch(b);
    kd_chunkpool_free(b->method);
    kd_chunkpool_free(b->md);
    kd_chunkpool_free(b);
}

/* The terminal message to R. A back that was never bound is freed here: R cannot name it. */
static void back_end(struct back *b, int status, const char *msg, const uint8_t *md, size_t mdlen)
{
    struct kd_kas_shard *ks = b->ks;
    if (b->ended)
        return;
    b->ended = true;
    if (b->gateway && !b->bound)
        ks->stats.gw_no_tunnel++;
    size_t ml = strlen(msg);
    struct kd_rt_end *e = kd_kas_payload(ks->s, sizeof(*e) + ml + mdlen);
    e->msg_len = (uint32_t)ml;
    e->md_len = (uint32_t)mdlen;
    memcpy(e->data, msg, ml);
    if (mdlen)
        memcpy(e->data + ml, md, mdlen);
    post(ks, b->r, KD_RT_END, e, b->front, (uint32_t)status, 0);
    if (status == 0)
        ks->stats.routed_ok++;
    else
        ks->stats.routed_failed++;
    ks->stats.routed_by_status[status >= 0 && status <= 16 ? status : KD_GRPC_UNKNOWN]++;
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    if (!b->bound)
        back_free(b); /* leaves the wait list, releases the agent */
}

static void back_deadline(struct kd_timer *t)
{
    struct back *b = KD_CONTAINER_OF(t, struct back, timer);
    b->ks->stats.routed_no_tunnel++;
    route_observe(b->ks, b, KD_KAS_ROUTE_TIMEOUT);
    back_end(b, KD_GRPC_DEADLINE_EXCEEDED,
             "agent connection not found: no tunnel for this agent and method "
             "became available before the deadline",
             NULL, 0);
}

static void tunnel_send(struct tunnel *t, const uint8_t *msg, size_t len)
{
    int rc = kd_grpc_send_message(t->call, msg, len);
    (void)rc; /* over the high-water mark: acks wait for on_writable (see tunnel_writable) */
}

static void count_woken(struct back *b, bool by_tunnel)
{
    struct kd_kas_stats *st = &b->ks->stats;
    if (!b->waited)
        return;
    if (by_tunnel)
        st->woken_tunnel++;
    else if (b->wake == WAKE_EVENT)
        st->woken_event++;
    else if (b->wake == WAKE_RECHECK)
        st->woken_recheck++;
    else if (b->wake == WAKE_POLL)
        st->woken_poll++;
    else if (b->wake == WAKE_RETRY)
        st->woken_retry++;
}

/* Hand the call to the tunnel (both already taken off the pool's lists): RequestInfo goes to the
 * agent, BOUND to R. */
static void bind_tunnel(struct back *b, struct tunnel *t)
{
    struct kd_kas_shard *ks = b->ks;
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    route_observe(ks, b, KD_KAS_ROUTE_SUCCESS);
    if (b->gateway)
        ks->stats.gw_ready++;
    else
        count_woken(b, true);
    back_unwatch(b);
    t->st = KD_TUN_BOUND;
    /* From now on the tunnel carries a call: at GOAWAY it gets the grace period to finish it. */
    kd_grpc_call_set_end_on_goaway(t->call, false);
    t->back = b;
    b->t = t;
    b->bound = true;
    b->pw.agent = NULL; /* the tunnel keeps the agent alive now */
    size_t n = kd_tun_request_info_size(b->method_len, b->md, b->md_len);
    uint8_t *buf = kd_chunkpool_malloc(n);
    if (buf == NULL)
        abort();
    kd_tun_put_request_info(buf, b->method, b->method_len, b->md, b->md_len);
    tunnel_send(t, buf, n);
    kd_chunkpool_free(buf);
    post(ks, b->r, KD_RT_BOUND, b, b->front, 0, 0);
    tunnels_changed(ks, t->pt.agent); /* it left the idle list */
}

/* ---- the fleet: offering a call to the instances that hold its agent's tunnels ---- */

static void wait_locally(struct back *b);
static void relay_start(struct back *b, unsigned to, uint32_t flag, uint64_t tried);

static uint32_t recheck_ms(const struct kd_kas_shard *ks)
{
    return ks->kas->presence->recheck_ms ? ks->kas->presence->recheck_ms : 5000;
}

/* The safety re-check of a waiting call (or, fleet.discovery: poll, its first poll). */
static void arm_recheck(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    if (fleet_on(ks) && b->retry_due && !fleet_poll(ks)) {
        b->retry_due = false;
        uint32_t cap = recheck_ms(ks);
        b->retry_ms = b->retry_ms == 0 ? 250 : b->retry_ms * 2 > cap ? cap : b->retry_ms * 2;
        b->retry_armed = true;
        kd_timerwheel_add(kd_shard_timers(ks->s), &b->recheck, kd_shard_now_ms(ks->s) + b->retry_ms);
        return;
    }
    if (!fleet_on(ks) || kd_list_is_linked(&b->recheck.link))
        return;
    b->poll_ms = 100;
    kd_timerwheel_add(kd_shard_timers(ks->s), &b->recheck,
                      kd_shard_now_ms(ks->s) + (fleet_poll(ks) ? 50 : recheck_ms(ks)));
}

/* Offer the call to one peer: the attempt, or NULL when it could not start (counted as failed). */
static struct tunnel *attempt_to(struct back *b, const struct kd_presence_peer *pp)
{
    struct kd_kas_shard *ks = b->ks;
    struct tunnel *t = kd_chunkpool_calloc(1, sizeof(*t));
    if (t == NULL) {
        ks->stats.fwd_failed++;
        return NULL;
    }
    t->peer = true;
    t->to = *pp;
    t->back = b;
    t->st = KD_TUN_BOUND; /* the agent's side of the automaton: Header, Message, Trailer, Error */
    /* No grpc-timeout: the call may stream for longer than routing may take; this instance
     * cancels the attempt at the routing deadline, and the caller's own deadline ends the call. */
    t->call = kd_fleet_call(ks->fleet, pp, b->agent_id, b->method, b->method_len, b->md, b->md_len, 0,
                            &peer_handler, t, &t->chan);
    if (t->call != NULL)
        return t;
    kd_chunkpool_free(t);
    ks->stats.fwd_failed++;
    return NULL;
}

/* Offer the call to the next candidate that can be dialled: its attempt, or NULL when none is left. */
static struct tunnel *attempt_start(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    while (b->icand < b->ncand && !ks->stop_seen) {
        struct tunnel *t = attempt_to(b, &b->cand[b->icand++]);
        if (t != NULL)
            return t;
    }
    return NULL;
}

static uint32_t race_ms(const struct kd_kas_shard *ks)
{
    return ks->kas->presence->second_delay_ms ? ks->kas->presence->second_delay_ms : 50;
}

/* No answer from the first candidate yet: race the next one. */
static void race_cb(struct kd_timer *tm)
{
    struct back *b = KD_CONTAINER_OF(tm, struct back, race);
    if (b->t == NULL || b->t->ready || b->t2 != NULL || b->bound || b->ended)
        return;
    b->t2 = attempt_start(b);
    if (b->t2 != NULL)
        b->ks->stats.fwd_raced++;
}

/* Ask the next candidate (racing the one after it if it is slow to answer); none left: wait (a
 * local tunnel, an event, the re-check). */
static void try_next(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    struct tunnel *t = attempt_start(b);
    if (t != NULL) {
        b->t = t;
        kd_list_push_back(&ks->forwarding, &b->fwd_link);
        if (b->icand < b->ncand)
            kd_timerwheel_add(kd_shard_timers(ks->s), &b->race, kd_shard_now_ms(ks->s) + race_ms(ks));
        return;
    }
    if (ks->stop_seen) {
        back_end(b, KD_GRPC_UNAVAILABLE, "kasd is shutting down", NULL, 0);
        return;
    }
    wait_locally(b);
}

/* Offer the call to these peers (random order already), in turn. */
static void forward(struct back *b, const struct kd_presence_peer *peers, size_t n, enum wake why)
{
    struct kd_kas_shard *ks = b->ks;
    if (b->bound || b->ended || b->t != NULL || b->t2 != NULL || n == 0)
        return;
    if (b->looking) {
        kd_presence_lookup_cancel(ks->presence, &b->lk);
        b->looking = false;
    }
    if (b->pw.agent != NULL)
        kd_pool_wait_cancel(&ks->pool, &b->pw); /* off the wait list while a peer is asked */
    if (n > KD_PRESENCE_MAX_PEERS)
        n = KD_PRESENCE_MAX_PEERS;
    memcpy(b->cand, peers, n * sizeof(*peers));
    b->ncand = (uint8_t)n;
    b->icand = 0;
    b->wake = (uint8_t)why;
    try_next(b);
}

static void lookup_done(struct kd_presence_lookup *lk, const struct kd_presence_peer *peers, size_t n,
                        const char *err)
{
    struct back *b = KD_CONTAINER_OF(lk, struct back, lk);
    b->looking = false;
    if (err != NULL || n == 0) {
        b->waited = true; /* Redis down or nobody has it: wait for a tunnel or an event */
        return;
    }
    if (b->wake == WAKE_RECHECK)
        b->ks->stats.recheck_found++;
    forward(b, peers, n, (enum wake)b->wake);
}

static void look_up(struct back *b, bool fresh, enum wake why)
{
    if (b->looking)
        return;
    b->looking = true;
    b->wake = (uint8_t)why;
    kd_presence_lookup(b->ks->presence, &b->lk, b->agent_id, fresh); /* may call lookup_done now */
}

static void recheck_cb(struct kd_timer *tm)
{
    struct back *b = KD_CONTAINER_OF(tm, struct back, recheck);
    struct kd_kas_shard *ks = b->ks;
    uint64_t next;
    if (fleet_poll(ks)) {
        /* GitLab kas's schedule: 50 ms, then 100 ms doubling to 1 s */
        next = b->poll_ms;
        b->poll_ms = b->poll_ms < 100 ? 100 : b->poll_ms * 2 > 1000 ? 1000 : b->poll_ms * 2;
    } else {
        next = recheck_ms(ks);
    }
    enum wake why = fleet_poll(ks) ? WAKE_POLL : b->retry_armed ? WAKE_RETRY : WAKE_RECHECK;
    b->retry_armed = false;
    kd_timerwheel_add(kd_shard_timers(ks->s), &b->recheck, kd_shard_now_ms(ks->s) + next);
    if (b->t == NULL && !b->bound && !b->ended)
        look_up(b, true, why);
}

/* (Back) on the wait list: a local tunnel may take it now; otherwise it waits with its deadline
 * armed, watching its agent's presence channel, with the safety re-check (or the poll) armed. */
static void wait_locally(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    agent_t *a = kd_pool_agent_get(&ks->pool, b->agent_id);
    if (a == NULL) {
        back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    struct kd_pool_tunnel *pt = kd_pool_wait_start(&ks->pool, a, &b->pw);
    if (pt != NULL) {
        bind_tunnel(b, KD_CONTAINER_OF(pt, struct tunnel, pt));
        return;
    }
    uint64_t holders = a->holders_idle & ~b->tried;
    if (holders != 0 && !ks->stop_seen) { /* a shard holding its tunnels on a shared connection */
        relay_start(b, (unsigned)__builtin_ctzll(holders), KD_RT_START_HOLDER, b->tried);
        return;
    }
    b->waited = true;
    arm_recheck(b);
}

/* A peer said it has a tunnel for agent_id (presence event): offer it this shard's waiting calls
 * for the agent, oldest first. Calls it cannot take come back to the wait list. */
static bool waiting_not_offered(struct kd_pool_wait *w, void *ud)
{
    struct back *b = KD_CONTAINER_OF(w, struct back, pw);
    return !b->gateway && b->event_gen != *(uint64_t *)ud;
}

static void presence_event(void *arg, int64_t agent_id, const struct kd_presence_peer *peer, bool up)
{
    struct kd_kas_shard *ks = arg;
    if (!up || ks->stop_seen)
        return;
    uint64_t gen = ++ks->event_gen;
    /* Calls of the agent being offered to a peer that has not answered yet (a slow or silent one)
     * are offered to the announced one too, raced. */
    for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next) {
        struct back *fb = KD_CONTAINER_OF(n, struct back, fwd_link);
        if (fb->agent_id == agent_id && !fb->gateway && fb->t != NULL && !fb->t->ready && fb->t2 == NULL &&
            strcmp(fb->t->to.id, peer->id) != 0 && (fb->t2 = attempt_to(fb, peer)) != NULL)
            ks->stats.fwd_raced++;
    }
    struct kd_pool_wait *w;
    while ((w = kd_pool_wait_find(&ks->pool, agent_id, waiting_not_offered, &gen)) != NULL) {
        struct back *b = KD_CONTAINER_OF(w, struct back, pw);
        b->event_gen = gen;
        forward(b, peer, 1, WAKE_EVENT);
    }
}

/* Send the call's START to another shard of this instance (owner -> holder, or holder -> owner)
 * and forget it here: the front hears from whichever shard binds or ends it. */
static void relay_start(struct back *b, unsigned to, uint32_t flag, uint64_t tried)
{
    struct kd_kas_shard *ks = b->ks;
    struct kd_rt_start *st = kd_kas_payload(ks->s, sizeof(*st) + b->method_len + b->md_len);
    st->agent_id = b->agent_id;
    st->deadline_ms = b->deadline_ms;
    st->method_len = (uint32_t)b->method_len;
    st->md_len = (uint32_t)b->md_len;
    st->flags = (b->gateway ? KD_RT_START_GATEWAY : 0) | flag;
    st->reply_to = b->r;
    st->tried = tried;
    if (flag == KD_RT_START_HOLDER) { /* remembered here until it comes back, if it does */
        st->relay_id = ++ks->relay_seq;
        ks->away[st->relay_id % 32] = (struct away){st->relay_id, b->front, (uint16_t)b->r, false};
    } else {
        st->relay_id = b->relay_id; /* bounced: the owner finds its record by it */
    }
    memcpy(st->data, b->method, b->method_len);
    memcpy(st->data + b->method_len, b->md, b->md_len);
    post(ks, to, KD_RT_START, st, b->front, 0, (uint64_t)b->agent_id);
    if (flag == KD_RT_START_HOLDER)
        ks->stats.holder_handoffs++;
    else
        ks->stats.holder_bounces++;
    back_free(b); /* off the wait list, timers and watches cancelled; nothing told to the front */
}

static bool any_wait(struct kd_pool_wait *w, void *ud)
{
    (void)w;
    (void)ud;
    return true;
}

static bool untried(struct kd_pool_wait *w, void *ud)
{
    return (KD_CONTAINER_OF(w, struct back, pw)->tried & *(const uint64_t *)ud) == 0;
}

/* A holder shard's tunnels of an agent this shard owns changed. */
static void holder_state(struct kd_kas_shard *ks, const struct kd_msg *m)
{
    int64_t id = (int64_t)m->u64;
    if (m->from >= MAX_HOLDER_SHARDS || owner_of(ks, id) != kd_shard_id(ks->s))
        return;
    agent_t *a = kd_pool_agent_get(&ks->pool, id);
    if (a == NULL)
        return; /* out of memory: the holder's tunnels are not used from here */
    uint64_t bit = 1ull << m->from;
    bool had_idle = (a->holders_idle & bit) != 0;
    a->holders_ready = m->u32 & 1 ? a->holders_ready | bit : a->holders_ready & ~bit;
    a->holders_idle = m->u32 & 2 ? a->holders_idle | bit : a->holders_idle & ~bit;
    tunnels_changed(ks, a);
    if ((a->holders_idle & bit) && !ks->stop_seen) {
        /* One call at a time goes to the holder (it reports again after binding it while it still
         * has idle tunnels, so the next one follows): the oldest waiting call it has not sent
         * back, else one being offered to a peer that has not answered (a tunnel of this instance
         * wins). New idle tunnels there (0 -> idle) are a fresh chance for calls it sent back. */
        if (!had_idle)
            for (struct kd_list *n = a->waiting.next; n != &a->waiting; n = n->next)
                KD_CONTAINER_OF(n, struct back, pw.link)->tried &= ~bit;
        struct kd_pool_wait *w = kd_pool_wait_find(&ks->pool, id, untried, &bit);
        if (w != NULL) {
            struct back *b = KD_CONTAINER_OF(w, struct back, pw);
            relay_start(b, m->from, KD_RT_START_HOLDER, b->tried);
        } else {
            for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next) {
                struct back *b = KD_CONTAINER_OF(n, struct back, fwd_link);
                if (b->agent_id != id || b->bound || b->ended || (b->tried & bit))
                    continue;
                attempt_abort(b); /* unlinks it from ks->forwarding */
                relay_start(b, m->from, KD_RT_START_HOLDER, b->tried);
                break;
            }
        }
    }
    kd_pool_agent_release(&ks->pool, a);
}

static void handle_start(struct kd_kas_shard *ks, const struct kd_msg *m)
{
    struct kd_rt_start *st = m->ptr;
    struct back *b = kd_chunkpool_calloc(1, sizeof(*b));
    if (b == NULL)
        abort();
    b->ks = ks;
    b->start_ns = kd_clock_ns();
    b->front = m->ptr2;
    b->r = st->reply_to; /* the front's shard, also when the owner relayed the START */
    b->agent_id = st->agent_id;
    b->gateway = (st->flags & KD_RT_START_GATEWAY) != 0;
    b->tried = st->tried;
    bool holder = (st->flags & KD_RT_START_HOLDER) != 0;
    bool cancelled = false;
    if ((st->flags & KD_RT_START_BOUNCED) && st->relay_id != 0) {
        struct away *w = &ks->away[st->relay_id % 32];
        if (w->id == st->relay_id) {
            cancelled = w->cancelled;
            w->id = 0;
        }
    }
    b->relay_id = st->relay_id;
    b->method_len = st->method_len;
    b->method = kd_chunkpool_malloc(st->method_len + 1);
    b->md_len = st->md_len;
    b->md = kd_chunkpool_malloc(st->md_len ? st->md_len : 1);
    if (b->method == NULL || b->md == NULL)
        abort();
    memcpy(b->method, st->data, st->method_len);
    b->method[st->method_len] = '\0';
    memcpy(b->md, st->data + st->method_len, st->md_len);
    uint64_t deadline = st->deadline_ms;
    b->deadline_ms = deadline;
    kd_kas_release(ks->s, st);
    kd_list_node_init(&b->pw.link);
    kd_list_node_init(&b->fwd_link);
    b->pw.method = b->method;
    b->pw.method_len = b->method_len;
    kd_timer_init(&b->timer, back_deadline);
    kd_timer_init(&b->recheck, recheck_cb);
    kd_timer_init(&b->race, race_cb);
    kd_presence_lookup_init(&b->lk, lookup_done);

    if (cancelled) { /* the caller cancelled while its START was away at a holder shard */
        route_observe(ks, b, KD_KAS_ROUTE_ABORTED);
        back_end(b, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
        return;
    }
    agent_t *a = kd_pool_agent_get(&ks->pool, b->agent_id);
    if (a == NULL) {
        back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    struct kd_pool_tunnel *pt =
        ks->stop_seen && (b->gateway || holder) ? NULL : kd_pool_wait_start(&ks->pool, a, &b->pw);
    if (pt != NULL) {
        struct tunnel *t = KD_CONTAINER_OF(pt, struct tunnel, pt);
        bind_tunnel(b, t);
        if (holder) /* still idle tunnels here: the owner may send its next waiting call */
            tunnels_changed_ex(ks, t->pt.agent, true);
        return;
    }
    if (holder) { /* handed here by the owner, but no idle tunnel serves it any more */
        if (b->pw.agent != NULL)
            kd_pool_wait_cancel(&ks->pool, &b->pw);
        else
            kd_pool_agent_release(&ks->pool, a);
        relay_start(b, owner_of(ks, b->agent_id), KD_RT_START_BOUNCED, b->tried | 1ull << kd_shard_id(ks->s));
        return;
    }
    uint64_t holders = a->holders_idle & ~b->tried;
    if (holders != 0 && !ks->stop_seen) {
        /* Idle tunnels of the agent on a connection another shard holds: that shard takes it. */
        relay_start(b, (unsigned)__builtin_ctzll(holders), KD_RT_START_HOLDER, b->tried);
        return;
    }
    if (b->gateway && (ks->stop_seen || (a->nready == 0 && a->holders_ready == 0))) {
        /* No tunnel of the agent here (or draining): say so at once; the routing instance tries
         * another. With busy tunnels only, the call waits here like a local one: agentk opens a
         * new tunnel as soon as one is taken. */
        if (b->pw.agent != NULL)
            kd_pool_wait_cancel(&ks->pool, &b->pw);
        else
            kd_pool_agent_release(&ks->pool, a);
        back_end(b, KD_GRPC_UNAVAILABLE, "no tunnel for this agent on this kasd instance", NULL, 0);
        return;
    }
    if (deadline <= kd_shard_now_ms(ks->s)) {
        back_deadline(&b->timer);
        return;
    }
    /* Queued on the wait list: woken by an event (a tunnel registering), never by polling. */
    kd_timerwheel_add(kd_shard_timers(ks->s), &b->timer, deadline);
    if (b->gateway || !fleet_on(ks))
        return;
    /* Not here: the instances that hold its tunnels. Watch first (subscribe before the lookup). */
    if (!fleet_poll(ks)) {
        kd_presence_watch(ks->presence, b->agent_id);
        b->watching = true;
        struct kd_presence_peer peers[KD_PRESENCE_MAX_PEERS];
        int n = kd_presence_cached(ks->presence, b->agent_id, peers, KD_PRESENCE_MAX_PEERS);
        if (n > 0) {
            forward(b, peers, (size_t)n, WAKE_START);
            return;
        }
        if (n == 0) {
            b->waited = true; /* known: no instance has it now */
            arm_recheck(b);
            return;
        }
    }
    arm_recheck(b);
    look_up(b, fleet_poll(ks), WAKE_START); /* may end b: nothing after this */
}

static bool same_front(struct kd_pool_wait *w, void *ud)
{
    const struct kd_msg *m = ud;
    const struct back *b = KD_CONTAINER_OF(w, struct back, pw);
    return b->front == m->ptr2 && b->r == m->from;
}

void kd_kas_back_message(struct kd_shard *s, const struct kd_msg *m)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    struct back *b = m->ptr2;
    switch (m->type) {
    case KD_RT_START:
        handle_start(ks, m);
        break;
    case KD_RT_DATA: {
        struct kd_rt_blob *d = m->ptr;
        uint32_t len = d->len;
        if (b->ended) {
            /* END is on its way to R (or there): nothing may follow it, not even a credit. */
            kd_kas_release(s, d);
            break;
        }
        if (b->t != NULL) {
            int rc;
            if (b->t->peer) {
                rc = kd_grpc_send_message(b->t->call, d->data, len); /* the gateway wraps it */
            } else {
                size_t n = kd_tun_message_size(len);
                uint8_t *buf = kd_chunkpool_malloc(n);
                if (buf == NULL)
                    abort();
                kd_tun_put_message(buf, d->data, len);
                rc = kd_grpc_send_message(b->t->call, buf, n);
                kd_chunkpool_free(buf);
            }
            if (rc == 1) {
                b->t->acks_owed += len; /* paid in tunnel_writable */
                kd_kas_release(s, d);
                break;
            }
        }
        kd_kas_release(s, d);
        post(ks, b->r, KD_RT_ACK_REQ, NULL, b->front, 0, len);
        break;
    }
    case KD_RT_HALF_CLOSE:
        if (b->t != NULL && !b->ended && b->t->peer) {
            kd_grpc_close_send(b->t->call);
        } else if (b->t != NULL && !b->ended) {
            uint8_t buf[4];
            kd_tun_put_close_send(buf);
            kd_grpc_send_message(b->t->call, buf, kd_tun_close_send_size());
        }
        break;
    case KD_RT_CANCEL:
        if (b->t != NULL && !b->ended) {
            /* The agent sees the cancellation as a reset of its tunnel stream. */
            struct tunnel *t = b->t;
            back_end(b, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
            kd_grpc_cancel(t->call, KD_GRPC_CANCELLED, "call cancelled by the caller");
        }
        break;
    case KD_RT_CANCEL_WAIT: {
        struct kd_pool_wait *w = kd_pool_wait_find(&ks->pool, (int64_t)m->u64, same_front, (void *)m);
        if (w != NULL) {
            struct back *wb = KD_CONTAINER_OF(w, struct back, pw);
            route_observe(ks, wb, KD_KAS_ROUTE_ABORTED);
            back_end(wb, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
            break;
        }
        /* A call being offered to a peer is on neither list of the pool. */
        for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next) {
            struct back *fb = KD_CONTAINER_OF(n, struct back, fwd_link);
            if (fb->front == m->ptr2 && fb->r == m->from) {
                route_observe(ks, fb, KD_KAS_ROUTE_ABORTED);
                back_end(fb, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
                break;
            }
        }
        /* not found: BOUND is on its way to R, which then sends CANCEL; or the call is away at a
         * holder shard and may come back (see ks->away) */
        for (unsigned i = 0; i < 32; i++)
            if (ks->away[i].id != 0 && ks->away[i].front == m->ptr2 && ks->away[i].r == m->from)
                ks->away[i].cancelled = true;
        break;
    }
    case KD_RT_FRONT_DONE:
        if (b->t != NULL) {
            struct tunnel *t = b->t;
            t->back = NULL;
            b->t = NULL;
            /* A peer's stream still open after the answer was complete (its trailers late, or a
             * peer that never ends it): nothing more is wanted from it. */
            if (t->peer)
                kd_grpc_cancel(t->call, KD_GRPC_CANCELLED, "call complete"); /* frees t */
        }
        back_free(b);
        break;
    case KD_RT_ACK_RESP:
        if (b->t != NULL) {
            struct tunnel *t = b->t;
            t->resp_unacked -= m->u64 < t->resp_unacked ? m->u64 : t->resp_unacked;
            if (t->held && t->resp_unacked < KD_RT_WINDOW / 2) {
                t->held = false;
                kd_grpc_hold_input(t->call, false);
            }
        }
        break;
    default:
        break;
    }
}

/* ---- tunnels (ReverseTunnel/Connect on the agent listener) ---- */

/* End the tunnel's stream: an agent's is answered; a peer tunnel (our client call) is cancelled,
 * which runs its on_done now (t is gone after this). */
static void tunnel_close(struct tunnel *t, int status, const char *msg)
{
    if (t->peer)
        kd_grpc_cancel(t->call, status, msg);
    else
        kd_grpc_finish(t->call, status, msg, NULL, 0);
}

static void tunnel_fail(struct tunnel *t, const char *why)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(kd_conn_shard(kd_grpc_call_conn(t->call)));
    ks->stats.protocol_violations++;
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, t->peer ? "fleet_peer_protocol_violation" : "tunnel_protocol_violation");
    kd_log_int(&l, "agent_id", t->peer ? (t->back ? t->back->agent_id : 0) : t->pt.agent->id);
    if (t->peer)
        kd_log_str(&l, "instance", t->to.id);
    kd_log_str(&l, "reason", why);
    kd_log_end(&l);
    if (t->back != NULL)
        back_end(t->back, KD_GRPC_UNAVAILABLE,
                 t->peer ? "peer instance broke the tunnel protocol" : "agent broke the tunnel protocol", NULL, 0);
    if (t->pt.idle) { /* never hand this stream to a call again */
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
        tunnels_changed(ks, t->pt.agent);
    }
    t->st = KD_TUN_DONE;
    char msg[160];
    snprintf(msg, sizeof(msg), "tunnel protocol violation: %s", why);
    tunnel_close(t, KD_GRPC_INVALID_ARGUMENT, msg);
}

struct methods_acc {
    char *buf;
    size_t len, cap;
};

static int add_method(void *ud, const char *svc, size_t svclen, const char *m, size_t mlen)
{
    struct methods_acc *acc = ud;
    size_t need = svclen + mlen + 3;
    if (acc->len + need > acc->cap) {
        size_t ncap = acc->cap ? acc->cap * 2 : 128;
        while (ncap < acc->len + need)
            ncap *= 2;
        if (ncap > 65536)
            return -E2BIG;
        char *nb = kd_chunkpool_realloc(acc->buf, ncap);
        if (nb == NULL)
            return -ENOMEM;
        acc->buf = nb;
        acc->cap = ncap;
    }
    char *o = acc->buf + acc->len;
    *o++ = '/';
    memcpy(o, svc, svclen);
    o += svclen;
    *o++ = '/';
    memcpy(o, m, mlen);
    o += mlen;
    *o++ = '\0';
    acc->len = (size_t)(o - acc->buf);
    return 0;
}

static void tunnel_idle(struct kd_kas_shard *ks, struct tunnel *t)
{
    t->st = KD_TUN_IDLE;
    /* A waiting call for one of its methods takes it at once (oldest first). */
    struct kd_pool_wait *w = kd_pool_tunnel_ready(&ks->pool, &t->pt);
    if (w != NULL) {
        bind_tunnel(KD_CONTAINER_OF(w, struct back, pw), t);
        return;
    }
    /* Or a call being offered to a peer that has not said "ready" yet (a slow one, or one whose
     * tunnels are all busy): a tunnel here beats any peer; the offer is withdrawn before any
     * request byte went there. */
    for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next) {
        struct back *b = KD_CONTAINER_OF(n, struct back, fwd_link);
        if (b->agent_id != t->pt.agent->id || b->bound || b->ended ||
            !kd_pool_tunnel_serves(&t->pt, b->method, b->method_len))
            continue;
        kd_list_unlink(&t->pt.link); /* off the idle list again: it is this call's */
        t->pt.idle = false;
        attempt_abort(b);
        bind_tunnel(b, t);
        return;
    }
}

/* Hold the tunnel's input while the caller owes more than a window of its answer. */
static void resp_sent(struct tunnel *t, size_t len)
{
    t->resp_unacked += len;
    if (!t->held && t->resp_unacked > KD_RT_WINDOW) {
        /* The caller is slower than the agent: stop reading the tunnel until it catches up. */
        t->held = true;
        kd_grpc_hold_input(t->call, true);
    }
}

/* A kas-to-kas call's tunnel (this is the gateway): the agent's messages go to the routing
 * instance as they are, which decodes them as if the tunnel were its own. The automaton still
 * runs here, so a broken agent is caught where it is connected. */
static int gateway_relay(struct kd_kas_shard *ks, struct tunnel *t, struct back *b, const uint8_t *msg,
                         size_t len, const struct kd_tun_msg *tm, int ns)
{
    uint32_t max = ks->kas->max_message ? ks->kas->max_message : 4u << 20;
    if (tm->kind == KD_TUN_MESSAGE && tm->data_len > max) {
        char m[160];
        snprintf(m, sizeof(m),
                 "agent's message larger than max (%zu vs. %u bytes); limits.grpc_max_message_size",
                 tm->data_len, max);
        back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        t->st = KD_TUN_DONE;
        kd_grpc_finish(t->call, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        return 0;
    }
    if (tm->kind == KD_TUN_ERROR && t->pt.idle) {
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
        tunnels_changed(ks, t->pt.agent);
    }
    t->st = (enum kd_tun_state)ns;
    struct kd_rt_blob *d = kd_kas_payload(ks->s, sizeof(*d) + len);
    d->len = (uint32_t)len;
    memcpy(d->data, msg, len);
    post(ks, b->r, KD_RT_RDATA, d, b->front, 0, 0);
    resp_sent(t, len);
    if (tm->kind == KD_TUN_TRAILER || tm->kind == KD_TUN_ERROR) {
        t->st = KD_TUN_DONE;
        back_end(b, KD_GRPC_OK, "", NULL, 0);
        kd_grpc_finish(t->call, KD_GRPC_OK, NULL, NULL, 0);
    }
    return 0;
}

static int tunnel_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct tunnel *t = kd_h2_call_user(call);
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    struct kd_tun_msg tm;
    const char *why = NULL;
    if (kd_tun_decode_request(msg, len, &tm) < 0) {
        tunnel_fail(t, "malformed ConnectRequest");
        return 0;
    }
    int ns = kd_tun_step(t->st, tm.kind, &why);
    if (ns < 0) {
        tunnel_fail(t, why);
        return 0;
    }
    struct back *b = t->back;
    if (tm.kind != KD_TUN_DESCRIPTOR && !(tm.kind == KD_TUN_ERROR && b == NULL) && (b == NULL || b->ended)) {
        /* the call is over (END sent): the rest of the agent's answer has nowhere to go */
        if (ns == KD_TUN_DONE && t->st != KD_TUN_DONE) {
            t->st = KD_TUN_DONE;
            if (!t->peer) /* a peer ends its call itself */
                kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
        }
        return 0;
    }
    if (b != NULL && b->gateway && tm.kind != KD_TUN_DESCRIPTOR)
        return gateway_relay(ks, t, b, msg, len, &tm, ns);
    switch (tm.kind) {
    case KD_TUN_DESCRIPTOR: {
        struct methods_acc acc = {0};
        int n = kd_tun_descriptor_each(tm.body, tm.len, add_method, &acc);
        if (n <= 0) {
            kd_chunkpool_free(acc.buf);
            tunnel_fail(t, n == 0 ? "descriptor lists no method" : "invalid descriptor");
            return 0;
        }
        t->methods = acc.buf;
        t->pt.methods = acc.buf;
        t->pt.methods_len = acc.len;
        t->pt.agent->nready++;
        tunnel_idle(ks, t);
        tunnels_changed(ks, t->pt.agent);
        break;
    }
    case KD_TUN_HEADER: {
        t->st = KD_TUN_RESPONDING;
        struct kd_rt_blob *h = kd_kas_payload(s, sizeof(*h) + tm.len);
        long bl = kd_tun_meta_to_blob(tm.body, tm.len, h->data, tm.len);
        if (bl < 0) {
            kd_kas_release(s, h);
            tunnel_fail(t, "malformed header metadata");
            return 0;
        }
        h->len = (uint32_t)bl;
        post(ks, b->r, KD_RT_HEADER, h, b->front, 0, 0);
        break;
    }
    case KD_TUN_MESSAGE: {
        uint32_t max = ks->kas->max_message ? ks->kas->max_message : 4u << 20;
        if (tm.data_len > max) {
            /* The listener let the wrapping through (limit + KD_TUN_WRAP_OVERHEAD); the answer
             * itself must still fit the limit the caller's side holds every message to. */
            char m[160];
            snprintf(m, sizeof(m),
                     "agent's message larger than max (%zu vs. %u bytes); limits.grpc_max_message_size",
                     tm.data_len, max);
            back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
            t->st = KD_TUN_DONE;
            tunnel_close(t, KD_GRPC_RESOURCE_EXHAUSTED, m);
            return 0;
        }
        struct kd_rt_blob *d = kd_kas_payload(s, sizeof(*d) + tm.data_len);
        d->len = (uint32_t)tm.data_len;
        memcpy(d->data, tm.data, tm.data_len);
        post(ks, b->r, KD_RT_RDATA, d, b->front, 0, 0);
        resp_sent(t, tm.data_len);
        break;
    }
    case KD_TUN_TRAILER: {
        uint8_t *blob = kd_chunkpool_malloc(tm.len ? tm.len : 1);
        long bl = blob ? kd_tun_meta_to_blob(tm.body, tm.len, blob, tm.len) : -1;
        t->st = KD_TUN_DONE;
        back_end(b, KD_GRPC_OK, "", blob, bl > 0 ? (size_t)bl : 0);
        kd_chunkpool_free(blob);
        if (!t->peer)
            kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
        break;
    }
    case KD_TUN_ERROR: {
        char text[512];
        size_t tl = tm.text_len < sizeof(text) - 1 ? tm.text_len : sizeof(text) - 1;
        memcpy(text, tm.text, tl);
        text[tl] = '\0';
        if (t->pt.idle) { /* an idle tunnel the agent gave up */
            kd_list_unlink(&t->pt.link);
            t->pt.idle = false;
        }
        t->st = KD_TUN_DONE;
        if (b != NULL) {
            /* The agent's own status passes through; 0 in an Error is not a success. */
            int code = tm.code > 0 && tm.code <= 16 ? tm.code : KD_GRPC_UNKNOWN;
            back_end(b, code, text, NULL, 0);
        }
        if (!t->peer)
            kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
        break;
    }
    }
    return 0;
}

static void tunnel_half_close(kd_grpc_call *call)
{
    struct tunnel *t = kd_h2_call_user(call);
    if (t->st == KD_TUN_DONE)
        return;
    if (t->back != NULL)
        back_end(t->back, KD_GRPC_UNAVAILABLE, "agent closed the tunnel before answering", NULL, 0);
    if (t->pt.idle) {
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
    }
    t->st = KD_TUN_DONE;
    kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
}

static void tunnel_writable(kd_grpc_call *call)
{
    struct tunnel *t = kd_h2_call_user(call);
    if (t->acks_owed > 0 && t->back != NULL && !t->back->ended) {
        struct kd_kas_shard *ks = kd_kas_shard_of(kd_conn_shard(kd_grpc_call_conn(call)));
        post(ks, t->back->r, KD_RT_ACK_REQ, NULL, t->back->front, 0, t->acks_owed);
    }
    t->acks_owed = 0;
}

static void tunnel_done(kd_grpc_call *call, int status, const char *message)
{
    struct tunnel *t = kd_h2_call_user(call);
    struct kd_kas_shard *ks = kd_kas_shard_of(kd_conn_shard(kd_grpc_call_conn(call)));
    if (t->back != NULL) {
        struct back *b = t->back;
        if (!b->ended && status == KD_GRPC_RESOURCE_EXHAUSTED && message != NULL) {
            /* kasd refused an agent's message over the agent listener's limit: say so. */
            back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, message, NULL, 0);
        } else if (!b->ended) {
            back_end(b, KD_GRPC_UNAVAILABLE, "agent disconnected during the call", NULL, 0);
        }
        /* The back waits for FRONT_DONE; a bound back holds neither tunnel nor agent. */
        b->t = NULL;
    }
    if (t->methods != NULL)
        t->pt.agent->nready--;
    if (t->pt.idle) { /* reported gone before the agent record may go with the detach */
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
    }
    tunnels_changed(ks, t->pt.agent);
    kd_pool_tunnel_detach(&ks->pool, &t->pt); /* a closed tunnel is never picked */
    kd_chunkpool_free(t->methods);
    kd_chunkpool_free(t);
}

static const struct kd_h2_handler tunnel_handler = {
    .on_message = tunnel_message,
    .on_half_close = tunnel_half_close,
    .on_writable = tunnel_writable,
    .on_done = tunnel_done,
};

/* ---- peer tunnels: a call offered to another instance's gateway ---- */

static bool header_is(kd_grpc_call *call, bool trailer, const char *name, const char *value, size_t vlen)
{
    struct kd_h2_header h;
    size_t nl = strlen(name);
    for (size_t i = 0; trailer ? kd_h2_call_trailer(call, i, &h) : kd_h2_call_header(call, i, &h); i++)
        if (h.namelen == nl && memcmp(h.name, name, nl) == 0)
            return h.valuelen == vlen && memcmp(h.value, value, vlen) == 0;
    return false;
}

/* "tunnel ready" (and from the instance we meant): the call is delivered there from now on. */
static int peer_headers(kd_grpc_call *call)
{
    struct tunnel *t = kd_h2_call_user(call);
    struct back *b = t->back;
    if (b == NULL || b->ended)
        return -1;
    if (!header_is(call, false, "kas-hop-gateway", "ready", 5))
        return -1; /* not a kasd gateway */
    if (!header_is(call, false, "kas-hop-instance", t->to.id, strlen(t->to.id))) {
        kd_log_msg(KD_LOG_WARN, "fleet_peer_wrong_instance",
                   "%s answered as another instance than %s: its address is not used any more", t->to.address,
                   t->to.id);
        kd_presence_peer_bad(b->ks->presence, t->to.id);
        kd_fleet_peer_reset(b->ks->fleet, t->to.id);
        return -1;
    }
    struct kd_kas_shard *ks = b->ks;
    if (t == b->t2) { /* the raced attempt won */
        b->t2 = b->t;
        b->t = t;
        ks->stats.fwd_race_won++;
    }
    t->ready = true;
    kd_list_unlink(&b->fwd_link);
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->race);
    if (b->t2 != NULL) { /* the loser: cancelled before any request byte went there */
        struct tunnel *l = b->t2;
        b->t2 = NULL;
        attempt_cancel(l, "another instance took the call");
    }
    ks->stats.fwd_ready++;
    count_woken(b, false);
    route_observe(ks, b, KD_KAS_ROUTE_SUCCESS);
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    back_unwatch(b);
    b->bound = true;
    post(ks, b->r, KD_RT_BOUND, b, b->front, 0, 0);
    return 0;
}

static int peer_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct tunnel *t = kd_h2_call_user(call);
    if (!t->ready)
        return -1; /* a message before "ready": not a kasd gateway */
    return tunnel_message(call, msg, len);
}

static void peer_done(kd_grpc_call *call, int status, const char *message)
{
    struct tunnel *t = kd_h2_call_user(call);
    struct kd_kas_shard *ks = kd_kas_shard_of(kd_conn_shard(kd_grpc_call_conn(call)));
    struct back *b = t->back;
    kd_fleet_call_end(ks->fleet, t->chan);
    if (b != NULL && !t->ready) {
        /* Ended before "ready": nothing was delivered there; the other attempt, the next
         * candidate, or wait. */
        if (t == b->t) {
            b->t = b->t2;
            b->t2 = NULL;
        } else {
            b->t2 = NULL;
        }
        bool no_tunnel = header_is(call, true, "kas-hop-gateway", "no-tunnel", 9) ||
                         header_is(call, false, "kas-hop-gateway", "no-tunnel", 9);
        if (no_tunnel) {
            ks->stats.fwd_no_tunnel++;
        } else {
            ks->stats.fwd_failed++;
            struct kd_logline l;
            kd_log_begin(&l, KD_LOG_INFO, "fleet_forward_failed");
            kd_log_int(&l, "agent_id", b->agent_id);
            kd_log_str(&l, "instance", t->to.id);
            kd_log_str(&l, "address", t->to.address);
            kd_log_int(&l, "status", status);
            kd_log_str(&l, "message", message);
            kd_log_end(&l);
            if (status == KD_GRPC_UNAVAILABLE)
                kd_presence_peer_bad(ks->presence, t->to.id); /* unreachable: read its record again */
            b->retry_due = true;
        }
        kd_chunkpool_free(t);
        if (b->t != NULL) {
            /* the other attempt runs on; the next candidate, if any, races it at once */
            if (b->t2 == NULL && b->icand < b->ncand && (b->t2 = attempt_start(b)) != NULL)
                ks->stats.fwd_raced++;
            return;
        }
        kd_list_unlink(&b->fwd_link);
        kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->race);
        try_next(b);
        return;
    }
    if (b != NULL) {
        if (!b->ended) {
            /* The gateway ended the call without the agent's answer: its status says why (the
             * agent went away there, the peer drained past its grace, or the link broke). */
            if (status == KD_GRPC_OK)
                back_end(b, KD_GRPC_UNAVAILABLE, "peer instance ended the call without the agent's answer", NULL,
                         0);
            else
                back_end(b, status, message[0] ? message : "peer instance lost during the call", NULL, 0);
        }
        b->t = NULL; /* the back waits for FRONT_DONE */
    }
    kd_chunkpool_free(t);
}

static const struct kd_h2_handler peer_handler = {
    .on_headers = peer_headers,
    .on_message = peer_message,
    .on_writable = tunnel_writable,
    .on_done = peer_done,
};

/* Authenticate an agent call and make sure it runs on the agent's owner shard (kas.h). */
int kd_kas_agent_call_gate(kd_grpc_call *call, struct kd_agent_ident *ident)
{
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    size_t tlen;
    const char *tok = kd_kas_bearer(call, &tlen);
    const struct kd_tokens *table = ks->kas->tokens ? kd_tokens_handle_get(ks->kas->tokens) : NULL;
    if (tok == NULL || table == NULL || kd_tokens_lookup(table, tok, tlen, ident) < 0) {
        ks->stats.auth_failures++;
        kd_log_msg(KD_LOG_INFO, "agent_auth_failed", "%s",
                   tok == NULL ? "missing bearer token" : "unknown or revoked agent token");
        kd_grpc_finish(call, KD_GRPC_UNAUTHENTICATED, "unauthenticated", NULL, 0);
        return KD_GRPC_UNAUTHENTICATED;
    }
    struct agent_conn *ac = kd_grpc_conn_user(call);
    if (ac != NULL && ac->agent_id != ident->agent_id) {
        /* Another agent on a connection that stays here (an L7 proxy multiplexing agents on one
         * upstream connection; kas authenticates every call): its calls run here, and its tunnels
         * are held here for its owner shard. */
        if (ks->kas->nshards > MAX_HOLDER_SHARDS) {
            kd_grpc_finish(call, KD_GRPC_PERMISSION_DENIED,
                           "connection belongs to another agent (more than 64 shards: not shared)", NULL, 0);
            return KD_GRPC_PERMISSION_DENIED;
        }
        return 0;
    }
    unsigned owner = kd_hash_owner((uint64_t)ident->agent_id, ks->kas->nshards);
    if (owner != kd_shard_id(s)) {
        /* Once per connection: afterwards every call on it starts on the owner. */
        if (kd_grpc_call_move(call, owner) == 0)
            return 1;
        kd_grpc_finish(call, KD_GRPC_INTERNAL, "connection hand-off failed", NULL, 0);
        return KD_GRPC_INTERNAL;
    }
    if (ac == NULL) {
        ac = calloc(1, sizeof(*ac));
        if (ac == NULL)
            return KD_GRPC_RESOURCE_EXHAUSTED;
        ac->agent_id = ident->agent_id;
        ac->project_id = ident->project_id;
        kd_grpc_conn_set_user(call, ac);
    }
    return 0;
}

static int connect_start(kd_grpc_call *call, void *ud)
{
    struct kd_agent_ident ident;
    if (kd_kas_agent_call_gate(call, &ident) != 0)
        return 0; /* moved to the owner shard, or answered */
    struct kd_kas_shard *ks = kd_kas_shard_of(kd_conn_shard(kd_grpc_call_conn(call)));
    agent_t *a = kd_pool_agent_get(&ks->pool, ident.agent_id);
    struct tunnel *t = kd_chunkpool_calloc(1, sizeof(*t));
    if (a == NULL || t == NULL) {
        kd_chunkpool_free(t);
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return 0;
    }
    a->project_id = ident.project_id;
    kd_pool_tunnel_attach(&ks->pool, a, &t->pt);
    t->call = call;
    t->st = KD_TUN_WAIT_DESCRIPTOR;
    kd_grpc_accept(call, &tunnel_handler, t);
    /* Unbound (waiting for its descriptor, then idle) it holds nothing: at max connection age or
     * shutdown it ends with OK right after the GOAWAY, so agentk opens its replacement on the new
     * connection before the grace period runs out (as GitLab kas does). */
    kd_grpc_call_set_end_on_goaway(call, true);
    /* Response headers now: agentk waits for them before it sends the descriptor? No, but a
     * stream with headers sent is plainly alive for proxies in between. */
    kd_grpc_send_headers(call, NULL, 0);
    return 0;
}

const struct kd_grpc_method kd_kas_connect_method = {
    .path = "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect",
    .start = connect_start,
};

/* ---- AgentRegistrar/Register ---- */

/* The agent a Register call authenticated as (a connection may carry several). */
struct register_call {
    int64_t agent_id, project_id;
};

static int register_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    struct agent_conn *ac = kd_grpc_conn_user(call);
    const struct register_call *rc_id = kd_h2_call_user(call);
    struct kd_pb_reader r;
    struct kd_pb_field f;
    const uint8_t *meta = NULL;
    size_t meta_len = 0;
    int64_t pod_id = 0;
    int rc;
    kd_pb_reader_init(&r, msg, len);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num == 1 && f.wt == KD_PB_LEN) {
            meta = f.data;
            meta_len = f.len;
        } else if (f.num == 2 && f.wt == KD_PB_VARINT) {
            pod_id = (int64_t)f.v;
        }
    }
    if (rc < 0) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "malformed RegisterRequest", NULL, 0);
        return 0;
    }
    /* The meta is stored in Redis for every pod and sent back in GetConnectedAgents: an agent's
     * real one is a few hundred bytes (version, commit, pod name, Kubernetes version). */
    uint32_t meta_max = ks->kas->agent_meta_max ? ks->kas->agent_meta_max : 16384;
    if (meta_len > meta_max) {
        char m[160];
        snprintf(m, sizeof(m), "agent_meta too large (%zu bytes; limits.agent_meta_max_size is %u)", meta_len,
                 meta_max);
        ks->stats.meta_refused++;
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        return 0;
    }
    agent_t *a = kd_pool_agent_get(&ks->pool, rc_id->agent_id);
    if (a != NULL)
        a->project_id = rc_id->project_id;
    struct pod *p = NULL;
    for (p = ac->pods; p != NULL && (p->pod_id != pod_id || p->agent != a); p = p->conn_next)
        ;
    if (p == NULL && a != NULL) {
        /* Every pod is an entry in Redis and in GetConnectedAgents: a connection registering pod_ids
         * without end must not grow either. A new pod past a limit is refused; the ones registered
         * before it stay (no silent eviction of a real pod by a flood). */
        uint32_t per_conn = ks->kas->pods_per_connection ? ks->kas->pods_per_connection : 16;
        uint32_t per_agent = ks->kas->pods_per_agent ? ks->kas->pods_per_agent : 1000;
        const char *key = NULL;
        uint32_t lim = 0;
        if (ac->npods >= per_conn) {
            key = "limits.pods_per_connection";
            lim = per_conn;
            ks->stats.pods_refused_conn++;
        } else if (a->npods >= per_agent) {
            key = "limits.pods_per_agent";
            lim = per_agent;
            ks->stats.pods_refused_agent++;
        }
        if (key != NULL) {
            char m[160];
            snprintf(m, sizeof(m), "too many pods registered (%s is %u); pod_id %" PRId64 " refused", key,
                     lim, pod_id);
            if (!ac->refusal_logged) {
                ac->refusal_logged = true;
                struct kd_logline l;
                kd_log_begin(&l, KD_LOG_WARN, "agent_pods_refused");
                kd_log_int(&l, "agent_id", a->id);
                kd_log_str(&l, "limit", key);
                kd_log_int(&l, "max", lim);
                kd_log_end(&l);
            }
            kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
            return 0;
        }
    }
    if (p == NULL) {
        p = calloc(1, sizeof(*p));
        if (p == NULL || a == NULL) {
            free(p);
            kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
            return 0;
        }
        p->pod_id = pod_id;
        p->agent = a;
        p->connected_at_us = kd_clock_wall_us();
        p->conn_next = ac->pods;
        ac->pods = p;
        ac->npods++;
        kd_list_push_back(&a->pods, &p->link);
        a->npods++;
    }
    /* The pod's AgentMeta lives in its tracker entry (the ConnectedAgentInfo GitLab reads). */
    if (ks->tracker != NULL)
        p->tracked = kd_tracker_conn_up(ks->tracker, p->tracked, a->id, a->project_id, pod_id,
                                        p->connected_at_us, meta, meta_len);
    kd_grpc_send_message(call, (const uint8_t *)"", 0); /* RegisterResponse {} */
    kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
    return 0;
}

static void register_half_close(kd_grpc_call *call)
{
    kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "missing RegisterRequest", NULL, 0);
}

static void register_done(kd_grpc_call *call, int status, const char *message)
{
    kd_chunkpool_free(kd_h2_call_user(call));
}

static const struct kd_h2_handler register_handler = {
    .on_message = register_message, .on_half_close = register_half_close, .on_done = register_done};

static int register_start(kd_grpc_call *call, void *ud)
{
    struct kd_agent_ident ident;
    if (kd_kas_agent_call_gate(call, &ident) != 0)
        return 0;
    struct register_call *rc = kd_chunkpool_malloc(sizeof(*rc));
    if (rc == NULL) {
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return 0;
    }
    rc->agent_id = ident.agent_id;
    rc->project_id = ident.project_id;
    kd_grpc_accept(call, &register_handler, rc);
    return 0;
}

const struct kd_grpc_method kd_kas_register_method = {
    .path = "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register",
    .start = register_start,
};

void kd_kas_agent_conn_close(struct kd_shard *s, void *user)
{
    struct agent_conn *ac = user;
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    if (ac == NULL)
        return;
    struct pod *p = ac->pods;
    while (p != NULL) {
        struct pod *next = p->conn_next;
        agent_t *a = p->agent;
        kd_list_unlink(&p->link);
        a->npods--;
        if (ks->tracker != NULL)
            kd_tracker_conn_down(ks->tracker, p->tracked);
        free(p);
        kd_pool_agent_release(&ks->pool, a);
        p = next;
    }
    free(ac);
}

/* ---- per shard ---- */

static void tracker_up(void *arg)
{
    kd_tracker_redis_up(arg);
}

static void tracker_down(void *arg, const char *reason)
{
    (void)reason; /* logged by the connection (redis_down) */
    kd_tracker_redis_down(arg);
}

static const struct kd_redis_hooks tracker_hooks = {.on_up = tracker_up, .on_down = tracker_down};

int kd_kas_shard_start(struct kd_shard *s)
{
    struct kd_kas_shard *ks = calloc(1, sizeof(*ks));
    if (ks == NULL)
        return -ENOMEM;
    ks->s = s;
    ks->kas = kd_server_user(s->srv);
    if (kd_pool_init(&ks->pool) < 0) {
        free(ks);
        return -ENOMEM;
    }
    if ((ks->acfg = kd_agentconfig_shard_new(s)) == NULL) {
        kd_pool_fini(&ks->pool, NULL);
        free(ks);
        return -ENOMEM;
    }
    struct kd_redis *r = kd_shard_redis(s);
    if (ks->kas->tracker != NULL && r != NULL) {
        ks->tracker = kd_tracker_new(s, ks->kas->tracker, r);
        if (ks->tracker == NULL) {
            kd_agentconfig_shard_free(ks->acfg);
            kd_pool_fini(&ks->pool, NULL);
            free(ks);
            return -ENOMEM;
        }
        kd_redis_set_hooks(r, &tracker_hooks, ks->tracker);
        if (kd_redis_up(r))
            kd_tracker_redis_up(ks->tracker);
        if (ks->kas->presence != NULL) {
            ks->presence = kd_presence_new(s, ks->kas->presence, r, presence_event, ks);
            ks->fleet = kd_fleet_new(s, ks->kas);
            if (ks->presence == NULL || ks->fleet == NULL) {
                kd_fleet_free(ks->fleet);
                if (ks->presence != NULL)
                    kd_presence_free(ks->presence);
                kd_redis_set_hooks(r, NULL, NULL);
                kd_tracker_free(ks->tracker);
                kd_agentconfig_shard_free(ks->acfg);
                kd_pool_fini(&ks->pool, NULL);
                free(ks);
                return -ENOMEM;
            }
        }
    }
    kd_list_init(&ks->forwarding);
    ks->api_jwt = kd_jwt_cache_new(KD_JWT_CACHE_ENTRIES); /* NULL: no cache, every call verified */
    kd_shard_set_user(s, ks);
    return 0;
}

struct kd_jwt_cache *kd_kas_api_jwt_cache(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    return ks != NULL ? ks->api_jwt : NULL;
}

struct kd_agentconfig_shard *kd_kas_agentconfig(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    return ks != NULL ? ks->acfg : NULL;
}

static void drop_waiting(struct kd_pool_wait *w)
{
    struct back *b = KD_CONTAINER_OF(w, struct back, pw);
    kd_timerwheel_cancel(kd_shard_timers(b->ks->s), &b->timer);
    kd_timerwheel_cancel(kd_shard_timers(b->ks->s), &b->recheck);
    kd_chunkpool_free(b->method);
    kd_chunkpool_free(b->md);
    kd_chunkpool_free(b);
}

void kd_kas_shard_stop(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    if (ks == NULL)
        return;
    if (ks->kas->epoch != NULL)
        kd_epoch_offline(ks->kas->epoch, kd_shard_id(s));
    /* Every connection is closed by now: no forwarded call is left. */
    kd_fleet_free(ks->fleet);
    ks->fleet = NULL;
    if (ks->presence != NULL) {
        kd_presence_free(ks->presence);
        ks->presence = NULL;
    }
    if (ks->tracker != NULL) {
        /* The shard's Redis connection is closed by now (the loop waited for it); it is freed
         * after this, so it must not call into the tracker any more. */
        kd_redis_set_hooks(kd_shard_redis(s), NULL, NULL);
        kd_tracker_free(ks->tracker);
        ks->tracker = NULL;
    }
    /* Every connection is closed by now, so every tunnel, pod and bound back is gone; waiting
     * backs may remain (their R shard is stopping too). */
    kd_pool_fini(&ks->pool, drop_waiting);
    kd_agentconfig_shard_free(ks->acfg);
    kd_jwt_cache_free(ks->api_jwt);
    free(ks);
    kd_shard_set_user(s, NULL);
}

/* Stopping: calls waiting for a tunnel will not get one here; answer them now, while their front
 * shards still run, instead of leaving them to the grace period. */
static void end_waiting(struct kd_kas_shard *ks)
{
    for (size_t i = 0; i < ks->pool.nbuckets; i++) {
        struct kd_pool_agent *a = ks->pool.buckets[i];
        while (a != NULL) {
            struct kd_pool_agent *next = a->hnext; /* ending the last wait may free a */
            struct kd_pool_wait *w;
            while ((w = kd_pool_wait_find(&ks->pool, a->id, any_wait, NULL)) != NULL) {
                bool last =
                    a->ntunnels == 0 && kd_list_is_empty(&a->pods) && a->waiting.next->next == &a->waiting;
                back_end(KD_CONTAINER_OF(w, struct back, pw), KD_GRPC_UNAVAILABLE, "kasd is shutting down",
                         NULL, 0);
                if (last)
                    break;
            }
            a = next;
        }
    }
    while (!kd_list_is_empty(&ks->forwarding)) {
        struct back *b = KD_CONTAINER_OF(ks->forwarding.next, struct back, fwd_link);
        back_end(b, KD_GRPC_UNAVAILABLE, "kasd is shutting down", NULL, 0); /* aborts the attempt */
    }
}

void kd_kas_on_turn(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    if (ks == NULL)
        return;
    if (ks->kas->epoch != NULL)
        kd_epoch_quiescent(ks->kas->epoch, kd_shard_id(s));
    kd_agentconfig_on_turn(ks->acfg);
    if (s->stopping && !ks->stop_seen) {
        ks->stop_seen = true;
        end_waiting(ks);
        /* Stop advertising at once: this shard's entries leave Redis before its agents do. */
        if (ks->tracker != NULL)
            kd_tracker_stop(ks->tracker);
        kd_presence_stop(ks->presence); /* no more waiting calls: events are of no use */
    }
    if (ks->tracker != NULL)
        kd_tracker_flush(ks->tracker);
}

void kd_kas_count_api_auth_failure(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    if (ks != NULL)
        ks->stats.api_auth_failures++;
}

struct kd_tracker *kd_kas_tracker(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    return ks != NULL ? ks->tracker : NULL;
}

/* The control thread's stats request: answer with a snapshot built here, on this shard's thread
 * (the control thread never reads shard-local structures). The payload is ours and comes back to be
 * freed here. Never blocks: kd_shard_send queues in overflow if the ring is full. */
static void answer_stats(struct kd_shard *s, const struct kd_msg *m)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    struct kd_kas_snapshot *snap = kd_kas_payload(s, sizeof(*snap));
    memset(snap, 0, sizeof(*snap));
    if (ks != NULL) {
        kd_kas_stats(s, &snap->kas);
        memcpy(snap->route, ks->route, sizeof(snap->route));
        if (ks->tracker != NULL)
            kd_tracker_stats(ks->tracker, &snap->tracker);
    }
    snap->listeners_open = s->listeners_open;
    snap->stopping = s->stopping;
    struct kd_msg r = {.type = KD_RT_STATS, .u64 = m->u64, .ptr = snap};
    kd_shard_send(s, m->from, &r);
}

/* Every message type by name (a type added to the enum without a case here is an unknown one,
 * never a neighbour's): the back half of routed calls, the front half, the service's own. */
void kd_kas_on_message(struct kd_shard *s, const struct kd_msg *m)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    switch (m->type) {
    case KD_RT_START:
    case KD_RT_DATA:
    case KD_RT_HALF_CLOSE:
    case KD_RT_CANCEL:
    case KD_RT_CANCEL_WAIT:
    case KD_RT_FRONT_DONE:
    case KD_RT_ACK_RESP:
        kd_kas_back_message(s, m);
        return;
    case KD_RT_BOUND:
    case KD_RT_HEADER:
    case KD_RT_RDATA:
    case KD_RT_END:
    case KD_RT_ACK_REQ:
        kd_kas_front_message(s, m);
        return;
    case KD_RT_STATS_REQ:
        answer_stats(s, m);
        return;
    case KD_RT_TRACKER_RESYNC:
        if (ks != NULL && ks->tracker != NULL)
            kd_tracker_request_resync(ks->tracker);
        return;
    case KD_RT_HOLDER_STATE:
        if (ks != NULL)
            holder_state(ks, m);
        return;
    default:
        kd_log_msg(KD_LOG_ERROR, "router_unknown_message", "type %u from %u dropped", m->type, m->from);
        return;
    }
}

void kd_kas_stats(struct kd_shard *s, struct kd_kas_stats *out)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    *out = ks->stats;
    out->agents = ks->pool.nagents;
    out->peer_channels = kd_fleet_channels(ks->fleet);
    if (ks->presence != NULL) {
        struct kd_presence_stats ps;
        kd_presence_stats(ks->presence, &ps);
        out->pr_subscriptions = ps.subscriptions;
        out->pr_events = ps.events_received;
        out->pr_lookups = ps.lookups;
        out->pr_lookup_failures = ps.lookup_failures;
        out->pr_cache_hits = ps.cache_hits;
        out->pr_cache_stale_hits = ps.cache_stale_hits;
        out->pr_cache_entries = ps.cache_entries;
        out->pr_cache_evictions = ps.cache_evictions;
        out->pr_sub_unconfirmed = ps.sub_unconfirmed;
    }
    out->forwarding = 0;
    for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next)
        out->forwarding++;
    out->tunnels_idle = out->tunnels_busy = out->waiting_calls = 0;
    for (size_t i = 0; i < ks->pool.nbuckets; i++)
        for (agent_t *a = ks->pool.buckets[i]; a != NULL; a = a->hnext) {
            size_t idle = 0, waiting = 0;
            for (struct kd_list *n = a->idle.next; n != &a->idle; n = n->next)
                idle++;
            for (struct kd_list *n = a->waiting.next; n != &a->waiting; n = n->next)
                waiting++;
            out->tunnels_idle += idle;
            out->tunnels_busy += a->ntunnels - idle;
            out->waiting_calls += waiting;
        }
}

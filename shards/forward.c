/* forward.c — the fleet on the routing instance (see service.h, docs/architecture.md "The fleet"):
 * a call offered to the peer instances holding its agent's tunnels, one at a time with a raced
 * second, retried after failures, woken by presence events; the peer tunnel that carries it. */
#include "shards/service.h"

static const struct kd_h2_handler peer_handler;

bool kas_fleet_on(const struct kd_kas_shard *ks)
{
    return ks->presence != NULL && ks->fleet != NULL;
}

bool kas_fleet_poll(const struct kd_kas_shard *ks)
{
    return ks->kas->presence != NULL && ks->kas->presence->poll;
}

/* A forwarding attempt that has not said "ready" is dropped: the peer sees a cancellation before
 * any request byte, so nothing was delivered there. */
static void attempt_cancel(struct tunnel *t, const char *why)
{
    t->back = NULL;
    kd_grpc_cancel(t->call, KD_GRPC_CANCELLED, why); /* runs peer_done now: frees t */
}

void kas_attempt_abort(struct back *b)
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

/* ---- the fleet: offering a call to the instances that hold its agent's tunnels ---- */

static uint32_t recheck_ms(const struct kd_kas_shard *ks)
{
    return ks->kas->presence->recheck_ms ? ks->kas->presence->recheck_ms : 5000;
}

/* The safety re-check of a waiting call (or, fleet.discovery: poll, its first poll). */
void kas_arm_recheck(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    if (kas_fleet_on(ks) && b->retry_due && !kas_fleet_poll(ks)) {
        b->retry_due = false;
        uint32_t cap = recheck_ms(ks);
        b->retry_ms = b->retry_ms == 0 ? 250 : b->retry_ms * 2 > cap ? cap : b->retry_ms * 2;
        b->retry_armed = true;
        kd_timerwheel_add(kd_shard_timers(ks->s), &b->recheck, kd_shard_now_ms(ks->s) + b->retry_ms);
        return;
    }
    if (!kas_fleet_on(ks) || kd_list_is_linked(&b->recheck.link))
        return;
    b->poll_ms = 100;
    kd_timerwheel_add(kd_shard_timers(ks->s), &b->recheck,
                      kd_shard_now_ms(ks->s) + (kas_fleet_poll(ks) ? 50 : recheck_ms(ks)));
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
void kas_race_cb(struct kd_timer *tm)
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
        kas_back_end(b, KD_GRPC_UNAVAILABLE, "kasd is shutting down", NULL, 0);
        return;
    }
    kas_wait_locally(b);
}

/* Offer the call to these peers (random order already), in turn. */
void kas_forward(struct back *b, const struct kd_presence_peer *peers, size_t n, enum wake why)
{
    struct kd_kas_shard *ks = b->ks;
    if (b->bound || b->ended || b->t != NULL || b->t2 != NULL || n == 0)
        return;
    if (b->cand == NULL && (b->cand = kd_chunkpool_malloc(KD_PRESENCE_MAX_PEERS * sizeof(*b->cand))) == NULL)
        return; /* out of memory: it keeps waiting (a local tunnel, the re-check) */
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

void kas_lookup_done(struct kd_presence_lookup *lk, const struct kd_presence_peer *peers, size_t n,
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
    kas_forward(b, peers, n, (enum wake)b->wake);
}

void kas_look_up(struct back *b, bool fresh, enum wake why)
{
    if (b->looking)
        return;
    b->looking = true;
    b->wake = (uint8_t)why;
    kd_presence_lookup(b->ks->presence, &b->lk, b->agent_id, fresh); /* may call kas_lookup_done now */
}

void kas_recheck_cb(struct kd_timer *tm)
{
    struct back *b = KD_CONTAINER_OF(tm, struct back, recheck);
    struct kd_kas_shard *ks = b->ks;
    uint64_t next;
    if (kas_fleet_poll(ks)) {
        /* GitLab kas's schedule: 50 ms, then 100 ms doubling to 1 s */
        next = b->poll_ms;
        b->poll_ms = b->poll_ms < 100 ? 100 : b->poll_ms * 2 > 1000 ? 1000 : b->poll_ms * 2;
    } else {
        next = recheck_ms(ks);
    }
    enum wake why = kas_fleet_poll(ks) ? WAKE_POLL : b->retry_armed ? WAKE_RETRY : WAKE_RECHECK;
    b->retry_armed = false;
    kd_timerwheel_add(kd_shard_timers(ks->s), &b->recheck, kd_shard_now_ms(ks->s) + next);
    if (b->t == NULL && !b->bound && !b->ended)
        kas_look_up(b, true, why);
}

/* A peer said it has a tunnel for agent_id (presence event): offer it this shard's waiting calls
 * for the agent, oldest first. Calls it cannot take come back to the wait list. */
static bool waiting_not_offered(struct kd_pool_wait *w, void *ud)
{
    struct back *b = KD_CONTAINER_OF(w, struct back, pw);
    return !b->gateway && b->event_gen != *(uint64_t *)ud;
}

void kas_presence_event(void *arg, int64_t agent_id, const struct kd_presence_peer *peer, bool up)
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
        kas_forward(b, peer, 1, WAKE_EVENT);
    }
}

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
    kas_count_woken(b, false);
    kas_route_observe(ks, b, KD_KAS_ROUTE_SUCCESS);
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    kas_back_unwatch(b);
    b->bound = true;
    kas_post(ks, b->r, KD_RT_BOUND, b, b->front, 0, 0);
    return 0;
}

static int peer_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct tunnel *t = kd_h2_call_user(call);
    if (!t->ready)
        return -1; /* a message before "ready": not a kasd gateway */
    return kas_tunnel_message(call, msg, len);
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
                kas_back_end(b, KD_GRPC_UNAVAILABLE,
                             "peer instance ended the call without the agent's answer", NULL, 0);
            else
                kas_back_end(b, status, message[0] ? message : "peer instance lost during the call", NULL, 0);
        }
        b->t = NULL; /* the back waits for FRONT_DONE */
    }
    kd_chunkpool_free(t);
}

static const struct kd_h2_handler peer_handler = {
    .on_headers = peer_headers,
    .on_message = peer_message,
    .on_writable = kas_tunnel_writable,
    .on_done = peer_done,
};

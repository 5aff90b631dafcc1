/* service.c — the kas service of one shard: its state, start and stop, the turn, the router
 * messages it takes, its stats (see service.h). */
#include "shards/service.h"

const double kd_kas_route_bucket_le[KD_KAS_ROUTE_BUCKETS] = {
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05,    0.1,    0.25,    0.5,    1,     2.5,    5,     10,   20,
};

/* One observation of the routing decision time (see kas.h), shard-local, no lock. */
void kas_route_observe(struct kd_kas_shard *ks, struct back *b, int outcome)
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

void kas_post(struct kd_kas_shard *ks, unsigned to, uint16_t type, void *ptr, void *ptr2, uint32_t u32,
              uint64_t u64)
{
    struct kd_msg m = {.type = type, .u32 = u32, .u64 = u64, .ptr = ptr, .ptr2 = ptr2};
    kd_shard_post(ks->s, to, &m);
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
            ks->presence = kd_presence_new(s, ks->kas->presence, r, kas_presence_event, ks);
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
    kd_chunkpool_free(b->cand);
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
    kas_token_cache_free(ks);
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
            while ((w = kd_pool_wait_find(&ks->pool, a->id, kas_any_wait, NULL)) != NULL) {
                bool last =
                    a->ntunnels == 0 && kd_list_is_empty(&a->pods) && a->waiting.next->next == &a->waiting;
                kas_back_end(KD_CONTAINER_OF(w, struct back, pw), KD_GRPC_UNAVAILABLE,
                             "kasd is shutting down", NULL, 0);
                if (last)
                    break;
            }
            a = next;
        }
    }
    while (!kd_list_is_empty(&ks->forwarding)) {
        struct back *b = KD_CONTAINER_OF(ks->forwarding.next, struct back, fwd_link);
        kas_back_end(b, KD_GRPC_UNAVAILABLE, "kasd is shutting down", NULL, 0); /* aborts the attempt */
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
        kas_token_stop(ks); /* agent calls waiting for GitLab's answer about their token */
        /* Stop advertising at once: this shard's entries leave Redis before its agents do. */
        if (ks->tracker != NULL)
            kd_tracker_stop(ks->tracker);
        kd_presence_stop(ks->presence); /* no more waiting calls: events are of no use */
    }
    if (ks->tracker != NULL)
        kd_tracker_flush(ks->tracker);
}

void kd_kas_count_meta_refused(struct kd_shard *s)
{
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    if (ks != NULL)
        ks->stats.meta_refused++;
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
    kd_router_send(kd_shard_router(s), kd_shard_id(s), m->from, &r); /* outside the stop barrier */
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
            kas_holder_state(ks, m);
        return;
    case KD_RT_TOKEN_RESOLVED:
        if (ks != NULL)
            kas_token_resolved(ks, m);
        else
            kd_kas_release(s, m->ptr);
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

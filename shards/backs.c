/* backs.c — the back halves of routed calls on the agent's owner shard (see service.h and kas.h):
 * a call matched to an idle tunnel, or waiting for one; holder shards of agents that share a
 * connection. */
#include "shards/service.h"

/* ---- several agents on one connection: holder shards ----
 * A connection stays on the owner shard of its first agent. Another agent's tunnels on it are held
 * by that shard (the holder) for the agent's owner: the holder reports when it starts or stops
 * having ready and idle tunnels (KD_RT_HOLDER_STATE), the owner advertises the instance in Redis
 * for both, and hands calls it cannot serve itself to a holder with idle tunnels (START with
 * KD_RT_START_HOLDER), which binds one or sends the START back (KD_RT_START_BOUNCED). The front
 * follows whichever shard bound the call. */

static unsigned owner_of(const struct kd_kas_shard *ks, int64_t agent_id)
{
    return kd_hash_owner((uint64_t)agent_id, ks->kas->nshards);
}

/* The agent's tunnels on this shard changed (ready count, idle list): the owner advertises the
 * instance in Redis while it or a holder has ready tunnels; a holder tells the owner what changed. */
static void tunnels_changed_ex(struct kd_kas_shard *ks, agent_t *a, bool force);
void kas_tunnels_changed(struct kd_kas_shard *ks, agent_t *a)
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
        kas_post(ks, owner_of(ks, a->id), KD_RT_HOLDER_STATE, NULL, NULL, bits, (uint64_t)a->id);
    }
}

void kas_back_unwatch(struct back *b)
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

static void back_free(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    if (b->pw.agent != NULL)
        kd_pool_wait_cancel(&ks->pool, &b->pw);
    kas_attempt_abort(b);
    if (kd_list_is_linked(&b->fwd_link))
        kd_list_unlink(&b->fwd_link);
    kas_back_unwatch(b);
    kd_chunkpool_free(b->method);
    kd_chunkpool_free(b->md);
    kd_chunkpool_free(b->cand);
    kd_chunkpool_free(b);
}

/* The terminal message to R. A back that was never bound is freed here: R cannot name it. */
void kas_back_end(struct back *b, int status, const char *msg, const uint8_t *md, size_t mdlen)
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
    kas_post(ks, b->r, KD_RT_END, e, b->front, (uint32_t)status, 0);
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
    kas_route_observe(b->ks, b, KD_KAS_ROUTE_TIMEOUT);
    kas_back_end(b, KD_GRPC_DEADLINE_EXCEEDED,
                 "agent connection not found: no tunnel for this agent and method "
                 "became available before the deadline",
                 NULL, 0);
}

void kas_count_woken(struct back *b, bool by_tunnel)
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
void kas_bind_tunnel(struct back *b, struct tunnel *t)
{
    struct kd_kas_shard *ks = b->ks;
    kd_timerwheel_cancel(kd_shard_timers(ks->s), &b->timer);
    kas_route_observe(ks, b, KD_KAS_ROUTE_SUCCESS);
    if (b->gateway)
        ks->stats.gw_ready++;
    else
        kas_count_woken(b, true);
    kas_back_unwatch(b);
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
    kas_tunnel_send(t, buf, n);
    kd_chunkpool_free(buf);
    kas_post(ks, b->r, KD_RT_BOUND, b, b->front, 0, 0);
    kas_tunnels_changed(ks, t->pt.agent); /* it left the idle list */
}

/* (Back) on the wait list: a local tunnel may take it now; otherwise it waits with its deadline
 * armed, watching its agent's presence channel, with the safety re-check (or the poll) armed. */
void kas_wait_locally(struct back *b)
{
    struct kd_kas_shard *ks = b->ks;
    agent_t *a = kd_pool_agent_get(&ks->pool, b->agent_id);
    if (a == NULL) {
        kas_back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    struct kd_pool_tunnel *pt = kd_pool_wait_start(&ks->pool, a, &b->pw);
    if (pt != NULL) {
        kas_bind_tunnel(b, KD_CONTAINER_OF(pt, struct tunnel, pt));
        return;
    }
    uint64_t holders = a->holders_idle & ~b->tried;
    if (holders != 0 && !ks->stop_seen) { /* a shard holding its tunnels on a shared connection */
        kas_relay_start(b, (unsigned)__builtin_ctzll(holders), KD_RT_START_HOLDER, b->tried);
        return;
    }
    b->waited = true;
    kas_arm_recheck(b);
}
/* Send the call's START to another shard of this instance (owner -> holder, or holder -> owner)
 * and forget it here: the front hears from whichever shard binds or ends it. */
void kas_relay_start(struct back *b, unsigned to, uint32_t flag, uint64_t tried)
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
    kas_post(ks, to, KD_RT_START, st, b->front, 0, (uint64_t)b->agent_id);
    if (flag == KD_RT_START_HOLDER)
        ks->stats.holder_handoffs++;
    else
        ks->stats.holder_bounces++;
    back_free(b); /* off the wait list, timers and watches cancelled; nothing told to the front */
}

bool kas_any_wait(struct kd_pool_wait *w, void *ud)
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
void kas_holder_state(struct kd_kas_shard *ks, const struct kd_msg *m)
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
    kas_tunnels_changed(ks, a);
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
            kas_relay_start(b, m->from, KD_RT_START_HOLDER, b->tried);
        } else {
            for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next) {
                struct back *b = KD_CONTAINER_OF(n, struct back, fwd_link);
                if (b->agent_id != id || b->bound || b->ended || (b->tried & bit))
                    continue;
                kas_attempt_abort(b); /* unlinks it from ks->forwarding */
                kas_relay_start(b, m->from, KD_RT_START_HOLDER, b->tried);
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
    kd_timer_init(&b->recheck, kas_recheck_cb);
    kd_timer_init(&b->race, kas_race_cb);
    kd_presence_lookup_init(&b->lk, kas_lookup_done);

    if (cancelled) { /* the caller cancelled while its START was away at a holder shard */
        kas_route_observe(ks, b, KD_KAS_ROUTE_ABORTED);
        kas_back_end(b, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
        return;
    }
    agent_t *a = kd_pool_agent_get(&ks->pool, b->agent_id);
    if (a == NULL) {
        kas_back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    struct kd_pool_tunnel *pt =
        ks->stop_seen && (b->gateway || holder) ? NULL : kd_pool_wait_start(&ks->pool, a, &b->pw);
    if (pt != NULL) {
        struct tunnel *t = KD_CONTAINER_OF(pt, struct tunnel, pt);
        kas_bind_tunnel(b, t);
        if (holder) /* still idle tunnels here: the owner may send its next waiting call */
            tunnels_changed_ex(ks, t->pt.agent, true);
        return;
    }
    if (holder) { /* handed here by the owner, but no idle tunnel serves it any more */
        if (b->pw.agent != NULL)
            kd_pool_wait_cancel(&ks->pool, &b->pw);
        else
            kd_pool_agent_release(&ks->pool, a);
        kas_relay_start(b, owner_of(ks, b->agent_id), KD_RT_START_BOUNCED,
                        b->tried | 1ull << kd_shard_id(ks->s));
        return;
    }
    uint64_t holders = a->holders_idle & ~b->tried;
    if (holders != 0 && !ks->stop_seen) {
        /* Idle tunnels of the agent on a connection another shard holds: that shard takes it. */
        kas_relay_start(b, (unsigned)__builtin_ctzll(holders), KD_RT_START_HOLDER, b->tried);
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
        kas_back_end(b, KD_GRPC_UNAVAILABLE, "no tunnel for this agent on this kasd instance", NULL, 0);
        return;
    }
    if (deadline <= kd_shard_now_ms(ks->s)) {
        back_deadline(&b->timer);
        return;
    }
    /* Queued on the wait list: woken by an event (a tunnel registering), never by polling. */
    kd_timerwheel_add(kd_shard_timers(ks->s), &b->timer, deadline);
    if (b->gateway || !kas_fleet_on(ks))
        return;
    /* Not here: the instances that hold its tunnels. Watch first (subscribe before the lookup). */
    if (!kas_fleet_poll(ks)) {
        kd_presence_watch(ks->presence, b->agent_id);
        b->watching = true;
        struct kd_presence_peer peers[KD_PRESENCE_MAX_PEERS];
        int n = kd_presence_cached(ks->presence, b->agent_id, peers, KD_PRESENCE_MAX_PEERS);
        if (n > 0) {
            kas_forward(b, peers, (size_t)n, WAKE_START);
            return;
        }
        if (n == 0) {
            b->waited = true; /* known: no instance has it now */
            kas_arm_recheck(b);
            return;
        }
    }
    kas_arm_recheck(b);
    kas_look_up(b, kas_fleet_poll(ks), WAKE_START); /* may end b: nothing after this */
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
                b->t->acks_owed += len; /* paid in kas_tunnel_writable */
                kd_kas_release(s, d);
                break;
            }
        }
        kd_kas_release(s, d);
        kas_post(ks, b->r, KD_RT_ACK_REQ, NULL, b->front, 0, len);
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
            kas_back_end(b, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
            kd_grpc_cancel(t->call, KD_GRPC_CANCELLED, "call cancelled by the caller");
        }
        break;
    case KD_RT_CANCEL_WAIT: {
        struct kd_pool_wait *w = kd_pool_wait_find(&ks->pool, (int64_t)m->u64, same_front, (void *)m);
        if (w != NULL) {
            struct back *wb = KD_CONTAINER_OF(w, struct back, pw);
            kas_route_observe(ks, wb, KD_KAS_ROUTE_ABORTED);
            kas_back_end(wb, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
            break;
        }
        /* A call being offered to a peer is on neither list of the pool. */
        for (struct kd_list *n = ks->forwarding.next; n != &ks->forwarding; n = n->next) {
            struct back *fb = KD_CONTAINER_OF(n, struct back, fwd_link);
            if (fb->front == m->ptr2 && fb->r == m->from) {
                kas_route_observe(ks, fb, KD_KAS_ROUTE_ABORTED);
                kas_back_end(fb, KD_GRPC_CANCELLED, "call cancelled by the caller", NULL, 0);
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

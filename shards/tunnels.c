/* tunnels.c — agents' reverse tunnels (ReverseTunnel/Connect): the tunnel automaton, relaying a
 * bound call's messages both ways with flow control (see service.h). */
#include "shards/service.h"

void kas_tunnel_send(struct tunnel *t, const uint8_t *msg, size_t len)
{
    int rc = kd_grpc_send_message(t->call, msg, len);
    (void)rc; /* over the high-water mark: acks wait for on_writable (see kas_tunnel_writable) */
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
        kas_back_end(t->back, KD_GRPC_UNAVAILABLE,
                     t->peer ? "peer instance broke the tunnel protocol" : "agent broke the tunnel protocol",
                     NULL, 0);
    if (t->pt.idle) { /* never hand this stream to a call again */
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
        kas_tunnels_changed(ks, t->pt.agent);
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
        kas_bind_tunnel(KD_CONTAINER_OF(w, struct back, pw), t);
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
        kas_attempt_abort(b);
        kas_bind_tunnel(b, t);
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
        kas_back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        t->st = KD_TUN_DONE;
        kd_grpc_finish(t->call, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        return 0;
    }
    if (tm->kind == KD_TUN_ERROR && t->pt.idle) {
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
        kas_tunnels_changed(ks, t->pt.agent);
    }
    t->st = (enum kd_tun_state)ns;
    struct kd_rt_blob *d = kd_kas_payload(ks->s, sizeof(*d) + len);
    d->len = (uint32_t)len;
    memcpy(d->data, msg, len);
    kas_post(ks, b->r, KD_RT_RDATA, d, b->front, 0, 0);
    resp_sent(t, len);
    if (tm->kind == KD_TUN_TRAILER || tm->kind == KD_TUN_ERROR) {
        t->st = KD_TUN_DONE;
        kas_back_end(b, KD_GRPC_OK, "", NULL, 0);
        kd_grpc_finish(t->call, KD_GRPC_OK, NULL, NULL, 0);
    }
    return 0;
}

int kas_tunnel_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
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
        kas_tunnels_changed(ks, t->pt.agent);
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
        kas_post(ks, b->r, KD_RT_HEADER, h, b->front, 0, 0);
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
            kas_back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
            t->st = KD_TUN_DONE;
            tunnel_close(t, KD_GRPC_RESOURCE_EXHAUSTED, m);
            return 0;
        }
        struct kd_rt_blob *d = kd_kas_payload(s, sizeof(*d) + tm.data_len);
        d->len = (uint32_t)tm.data_len;
        memcpy(d->data, tm.data, tm.data_len);
        kas_post(ks, b->r, KD_RT_RDATA, d, b->front, 0, 0);
        resp_sent(t, tm.data_len);
        break;
    }
    case KD_TUN_TRAILER: {
        uint8_t *blob = kd_chunkpool_malloc(tm.len ? tm.len : 1);
        long bl = blob ? kd_tun_meta_to_blob(tm.body, tm.len, blob, tm.len) : -1;
        t->st = KD_TUN_DONE;
        kas_back_end(b, KD_GRPC_OK, "", blob, bl > 0 ? (size_t)bl : 0);
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
            kas_back_end(b, code, text, NULL, 0);
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
        kas_back_end(t->back, KD_GRPC_UNAVAILABLE, "agent closed the tunnel before answering", NULL, 0);
    if (t->pt.idle) {
        kd_list_unlink(&t->pt.link);
        t->pt.idle = false;
    }
    t->st = KD_TUN_DONE;
    kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
}

void kas_tunnel_writable(kd_grpc_call *call)
{
    struct tunnel *t = kd_h2_call_user(call);
    if (t->acks_owed > 0 && t->back != NULL && !t->back->ended) {
        struct kd_kas_shard *ks = kd_kas_shard_of(kd_conn_shard(kd_grpc_call_conn(call)));
        kas_post(ks, t->back->r, KD_RT_ACK_REQ, NULL, t->back->front, 0, t->acks_owed);
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
            kas_back_end(b, KD_GRPC_RESOURCE_EXHAUSTED, message, NULL, 0);
        } else if (!b->ended) {
            kas_back_end(b, KD_GRPC_UNAVAILABLE, "agent disconnected during the call", NULL, 0);
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
    kas_tunnels_changed(ks, t->pt.agent);
    kd_pool_tunnel_detach(&ks->pool, &t->pt); /* a closed tunnel is never picked */
    kd_chunkpool_free(t->methods);
    kd_chunkpool_free(t);
}

static const struct kd_h2_handler tunnel_handler = {
    .on_message = kas_tunnel_message,
    .on_half_close = tunnel_half_close,
    .on_writable = kas_tunnel_writable,
    .on_done = tunnel_done,
};

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

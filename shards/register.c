/* register.c — agent calls' gate (token, hand-off to the owner shard, shared connections) and
 * AgentRegistrar/Register with its pods (see service.h). */
#include "shards/requests.h"
#include "shards/service.h"

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
    struct kd_register_req req;
    if (kd_req_register(msg, len, &req) < 0) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "malformed RegisterRequest", NULL, 0);
        return 0;
    }
    /* The meta is stored in Redis for every pod and sent back in GetConnectedAgents: an agent's
     * real one is a few hundred bytes (version, commit, pod name, Kubernetes version). */
    uint32_t meta_max = ks->kas->agent_meta_max ? ks->kas->agent_meta_max : 16384;
    if (req.meta_len > meta_max) {
        char m[160];
        snprintf(m, sizeof(m), "agent_meta too large (%zu bytes; limits.agent_meta_max_size is %u)", req.meta_len,
                 meta_max);
        ks->stats.meta_refused++;
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        return 0;
    }
    agent_t *a = kd_pool_agent_get(&ks->pool, rc_id->agent_id);
    if (a != NULL)
        a->project_id = rc_id->project_id;
    struct pod *p = NULL;
    for (p = ac->pods; p != NULL && (p->pod_id != req.pod_id || p->agent != a); p = p->conn_next)
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
                     lim, req.pod_id);
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
        p->pod_id = req.pod_id;
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
        p->tracked = kd_tracker_conn_up(ks->tracker, p->tracked, a->id, a->project_id, req.pod_id,
                                        p->connected_at_us, req.meta, req.meta_len);
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

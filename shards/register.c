#include <time.h>
/* register.c — agent calls' gate (token, hand-off to the owner shard, shared connections) and
 * AgentRegistrar/Register with its pods (see service.h). */
#include "core/resp.h"
#include "core/sha2.h"
#include "shards/redis.h"
#include "shards/tracker.h"
#include "shards/requests.h"
#include "shards/service.h"

/* ---- agent tokens resolved by GitLab (agent.token_source: gitlab) ----
 *
 * A shard keeps what the control thread told it (by SHA-256 of the token, never the token) until
 * the answer's TTL. A call whose token it does not know is suspended (kd_grpc_call_suspend) and the
 * control thread asked once per token; its answer resumes every call waiting for that token, whose
 * start() then finds the answer here. */
struct tok_entry {
    struct tok_entry *next;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    int32_t status;
    uint64_t expires_ms;
    int64_t agent_id, project_id;
    char why[160];
    char name[256];
};

struct tok_wait {
    struct tok_wait *next;
    struct kd_kas_shard *ks;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    kd_grpc_call *call;
    bool asked; /* this shard's request for the digest went with this waiter */
};

#define TOK_CACHE_MAX 65536

static struct tok_entry *tok_get(struct kd_kas_shard *ks, const uint8_t *d, uint64_t now)
{
    for (struct tok_entry *e = ks->tok_cache[d[0]]; e != NULL; e = e->next)
        if (memcmp(e->digest, d, KD_TOKEN_DIGEST_LEN) == 0)
            return e->expires_ms > now ? e : NULL;
    return NULL;
}

static void tok_drop_expired(struct kd_kas_shard *ks, uint64_t now)
{
    for (unsigned b = 0; b < 256; b++) {
        struct tok_entry **pp = &ks->tok_cache[b];
        while (*pp != NULL) {
            struct tok_entry *e = *pp;
            if (e->expires_ms <= now) {
                *pp = e->next;
                free(e);
                ks->tok_entries--;
            } else {
                pp = &e->next;
            }
        }
    }
}

/* The cache is full of live answers: forget whole buckets, starting at `first`, until it is 1/16
 * below its bound, so a flood of distinct tokens keeps the cache bounded and sweeps once per
 * ~4096 answers, not once per answer. They are only copies: a forgotten token is asked for again. */
static void tok_evict(struct kd_kas_shard *ks, unsigned first)
{
    for (unsigned i = 0; i < 256 && ks->tok_entries + TOK_CACHE_MAX / 16 >= TOK_CACHE_MAX; i++) {
        struct tok_entry **head = &ks->tok_cache[(first + i) & 255];
        while (*head != NULL) {
            struct tok_entry *e = *head;
            *head = e->next;
            free(e);
            ks->tok_entries--;
        }
    }
}

/* Stopping: no answer about a token comes any more (the control thread sends none once the stop
 * began); every call still waiting for one starts again now and is answered UNAVAILABLE. */
void kas_token_stop(struct kd_kas_shard *ks)
{
    for (unsigned b = 0; b < 256; b++)
        while (ks->tok_waiting[b] != NULL) {
            struct tok_wait *w = ks->tok_waiting[b];
            ks->tok_waiting[b] = w->next;
            kd_grpc_call *call = w->call;
            free(w);
            kd_grpc_call_resume(call); /* its gate sees stop_seen */
        }
}

void kas_token_cache_free(struct kd_kas_shard *ks)
{
    for (unsigned b = 0; b < 256; b++)
        while (ks->tok_cache[b] != NULL) {
            struct tok_entry *e = ks->tok_cache[b];
            ks->tok_cache[b] = e->next;
            free(e);
        }
    for (unsigned b = 0; b < 256; b++)
        while (ks->tok_waiting[b] != NULL) { /* their calls ended with their connections */
            struct tok_wait *w = ks->tok_waiting[b];
            ks->tok_waiting[b] = w->next;
            free(w);
        }
}

static void tok_wait_unlink(struct tok_wait *w)
{
    struct tok_wait **pp = &w->ks->tok_waiting[w->digest[0]];
    while (*pp != NULL && *pp != w)
        pp = &(*pp)->next;
    if (*pp == w)
        *pp = w->next;
}

/* The suspended call ended, or left with its connection: forget it. */
static void tok_wait_gone(void *ud)
{
    struct tok_wait *w = ud;
    tok_wait_unlink(w);
    free(w);
}

static void redis_share(struct kd_kas_shard *ks, const struct kd_rt_token_ans *a);

void kas_token_resolved(struct kd_kas_shard *ks, const struct kd_msg *m)
{
    const struct kd_rt_token_ans *a = m->ptr;
    uint64_t now = kd_shard_now_ms(ks->s);
    if (m->from == ks->kas->nshards)
        redis_share(ks, a);                          /* from the control thread (not from Redis itself) */
    struct tok_entry *e = tok_get(ks, a->digest, 0); /* also an expired one: refreshed in place */
    if (e == NULL) {
        if (ks->tok_entries >= TOK_CACHE_MAX)
            tok_drop_expired(ks, now);
        if (ks->tok_entries >= TOK_CACHE_MAX)
            tok_evict(ks, a->digest[0]);
        e = calloc(1, sizeof(*e));
        if (e != NULL) {
            memcpy(e->digest, a->digest, KD_TOKEN_DIGEST_LEN);
            e->next = ks->tok_cache[e->digest[0]];
            ks->tok_cache[e->digest[0]] = e;
            ks->tok_entries++;
        }
    }
    if (e != NULL) {
        e->status = a->status;
        /* An UNAVAILABLE answer is kept just long enough for the calls resumed now to see it. */
        e->expires_ms = now + (a->ttl_ms ? a->ttl_ms : 1);
        e->agent_id = a->agent_id;
        e->project_id = a->project_id;
        snprintf(e->why, sizeof(e->why), "%s", a->why);
        size_t nl = a->name_len < sizeof(e->name) - 1 ? a->name_len : sizeof(e->name) - 1;
        memcpy(e->name, a->name, nl);
        e->name[nl] = '\0';
    }
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    memcpy(digest, a->digest, sizeof(digest));
    kd_kas_release(ks->s, m->ptr);
    if (e == NULL) {
        /* nowhere to keep the answer (out of memory): the waiting calls start again and ask again
         * (each once: a call suspended again goes to the head of the list, behind this walk) */
        for (struct tok_wait **pp = &ks->tok_waiting[digest[0]]; *pp != NULL;) {
            struct tok_wait *w = *pp;
            if (memcmp(w->digest, digest, KD_TOKEN_DIGEST_LEN) != 0) {
                pp = &w->next;
                continue;
            }
            *pp = w->next;
            kd_grpc_call *call = w->call;
            free(w);
            kd_grpc_call_resume(call);
        }
        return;
    }
    /* Resume the calls waiting for this token (each runs start() again, which finds the answer).
     * The bucket is searched again after each one: resuming a call can hand its connection to
     * another shard, whose other waiting calls then leave the bucket (their gone hooks). */
    for (;;) {
        struct tok_wait *w = ks->tok_waiting[digest[0]];
        while (w != NULL && memcmp(w->digest, digest, KD_TOKEN_DIGEST_LEN) != 0)
            w = w->next;
        if (w == NULL)
            break;
        tok_wait_unlink(w);
        kd_grpc_call *call = w->call;
        free(w);
        kd_grpc_call_resume(call);
    }
}

static void ask_control(struct kd_kas_shard *ks, const uint8_t *d, const char *tok, size_t tlen)
{
    struct kd_rt_token_req *q = kd_kas_payload(ks->s, sizeof(*q) + tlen);
    memcpy(q->digest, d, KD_TOKEN_DIGEST_LEN);
    q->len = (uint32_t)tlen;
    memcpy(q->token, tok, tlen);
    struct kd_msg m = {.type = KD_RT_TOKEN_RESOLVE, .ptr = q};
    kd_shard_post(ks->s, ks->kas->nshards, &m); /* to the control thread */
}

/* ---- the fleet's shared answers: <prefix>:agent_info:<hex SHA-256 of the token> in Redis ----
 * value "<expiry unix ms> <agent_id> <project_id> <agent_name>", set with PX by a shard that got a
 * known agent from the control thread; a shard that misses its own cache looks there before asking
 * the control thread (so an agent that moves to another instance costs GitLab nothing). Only known
 * agents are shared, never tokens. */
struct redis_lookup {
    struct kd_kas_shard *ks;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    size_t tlen;
    char token[]; /* wiped when done */
};

static void redis_key(const struct kd_kas_shard *ks, const uint8_t *d, char *key, size_t cap)
{
    static const char hex[] = "0123456789abcdef";
    int n = snprintf(key, cap, "%s:agent_info:", ks->kas->tracker->prefix);
    for (size_t i = 0; i < KD_TOKEN_DIGEST_LEN && (size_t)n + 2 < cap; i++) {
        key[n++] = hex[d[i] >> 4];
        key[n++] = hex[d[i] & 15];
    }
    key[n] = '\0';
}

static void redis_got(void *arg, const struct kd_resp *reply, const char *err)
{
    struct redis_lookup *lk = arg;
    struct kd_kas_shard *ks = lk->ks;
    long long exp_ms = 0, agent_id = 0, project_id = 0;
    int name_at = 0;
    char buf[400];
    bool hit = false;
    if (err == NULL && reply != NULL && reply->type == KD_RESP_STRING && reply->len < sizeof(buf)) {
        memcpy(buf, reply->str, reply->len);
        buf[reply->len] = '\0';
        hit = sscanf(buf, "%lld %lld %lld %n", &exp_ms, &agent_id, &project_id, &name_at) == 3 &&
              name_at > 0 && agent_id > 0 && project_id > 0;
    }
    uint64_t now_wall = (uint64_t)time(NULL) * 1000;
    if (hit && (uint64_t)exp_ms > now_wall) {
        /* as the control thread would answer: the same message, handled by the same code */
        size_t nl = strlen(buf + name_at);
        struct kd_rt_token_ans *a = kd_kas_payload(ks->s, sizeof(*a) + nl);
        memset(a, 0, sizeof(*a));
        memcpy(a->digest, lk->digest, KD_TOKEN_DIGEST_LEN);
        a->ttl_ms = (uint32_t)((uint64_t)exp_ms - now_wall);
        a->agent_id = agent_id;
        a->project_id = project_id;
        a->name_len = (uint32_t)nl;
        memcpy(a->name, buf + name_at, nl);
        ks->stats.token_redis_hits++;
        struct kd_msg m = {.type = KD_RT_TOKEN_RESOLVED, .ptr = a};
        kd_shard_post(ks->s, kd_shard_id(ks->s), &m); /* handled at the next mailbox step, as any answer */
    } else {
        ask_control(ks, lk->digest, lk->token, lk->tlen);
    }
    explicit_bzero(lk->token, lk->tlen);
    free(lk);
}

/* Look the token's digest up in Redis first (true: asked; the answer or the control thread follows). */
static bool ask_redis(struct kd_kas_shard *ks, const uint8_t *d, const char *tok, size_t tlen)
{
    struct kd_redis *r = kd_shard_redis(ks->s);
    if (ks->kas->tracker == NULL || r == NULL || !kd_redis_up(r))
        return false;
    struct redis_lookup *lk = malloc(sizeof(*lk) + tlen);
    if (lk == NULL)
        return false;
    lk->ks = ks;
    memcpy(lk->digest, d, KD_TOKEN_DIGEST_LEN);
    lk->tlen = tlen;
    memcpy(lk->token, tok, tlen);
    char key[300];
    redis_key(ks, d, key, sizeof(key));
    const char *argv[] = {"GET", key};
    size_t lens[] = {3, strlen(key)};
    if (kd_redis_cmd(r, redis_got, lk, 2, argv, lens) != 0) {
        explicit_bzero(lk->token, tlen);
        free(lk);
        return false;
    }
    return true;
}

/* A known agent from the control thread: shared with the fleet for the rest of its TTL. */
static void redis_share(struct kd_kas_shard *ks, const struct kd_rt_token_ans *a)
{
    struct kd_redis *r = kd_shard_redis(ks->s);
    if (ks->kas->tracker == NULL || r == NULL || !kd_redis_up(r) || a->status != 0 || a->ttl_ms < 1000 ||
        a->name_len > 255)
        return;
    char key[300], val[400], px[24];
    redis_key(ks, a->digest, key, sizeof(key));
    int vl = snprintf(val, sizeof(val), "%llu %lld %lld %.*s",
                      (unsigned long long)((uint64_t)time(NULL) * 1000 + a->ttl_ms), (long long)a->agent_id,
                      (long long)a->project_id, (int)a->name_len, a->name);
    snprintf(px, sizeof(px), "%u", a->ttl_ms);
    const char *argv[] = {"SET", key, val, "PX", px};
    size_t lens[] = {3, strlen(key), (size_t)vl, 2, strlen(px)};
    kd_redis_cmd(r, NULL, NULL, 5, argv, lens);
}

/* The token's identity from the shard's cache (1), or the call suspended until the control thread
 * answers (0), or the call answered (< 0). */
static int gitlab_ident(struct kd_kas_shard *ks, kd_grpc_call *call, const char *tok, size_t tlen,
                        struct kd_agent_ident *ident)
{
    uint8_t d[KD_TOKEN_DIGEST_LEN];
    kd_sha256(tok, tlen, d);
    struct tok_entry *e = tok_get(ks, d, kd_shard_now_ms(ks->s));
    if (e != NULL) {
        if (e->status == 0) {
            ident->agent_id = e->agent_id;
            ident->project_id = e->project_id;
            ident->agent_name = e->name;
            return 1;
        }
        if (e->status == KD_GRPC_UNAVAILABLE) {
            /* GitLab could not say: not the agent's fault (it retries), not UNAUTHENTICATED. */
            char msg[200];
            snprintf(msg, sizeof(msg), "GitLab unavailable: %s", e->why);
            kd_grpc_finish(call, KD_GRPC_UNAVAILABLE, msg, NULL, 0);
            return -KD_GRPC_UNAVAILABLE;
        }
        return -KD_GRPC_UNAUTHENTICATED;
    }
    if (ks->stop_seen) {
        kd_grpc_finish(call, KD_GRPC_UNAVAILABLE, "kasd is stopping", NULL, 0);
        return -KD_GRPC_UNAVAILABLE;
    }
    struct tok_wait *w = calloc(1, sizeof(*w));
    if (w == NULL) {
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return -KD_GRPC_RESOURCE_EXHAUSTED;
    }
    w->ks = ks;
    memcpy(w->digest, d, sizeof(d));
    w->call = call;
    bool asked = false;
    for (struct tok_wait *o = ks->tok_waiting[d[0]]; o != NULL && !asked; o = o->next)
        asked = memcmp(o->digest, d, sizeof(d)) == 0;
    if (kd_grpc_call_suspend(call, tok_wait_gone, w) < 0) {
        free(w);
        kd_grpc_finish(call, KD_GRPC_INTERNAL, "call could not wait for its token", NULL, 0);
        return -KD_GRPC_INTERNAL;
    }
    w->next = ks->tok_waiting[d[0]];
    ks->tok_waiting[d[0]] = w;
    if (!asked && !ask_redis(ks, d, tok, tlen))
        ask_control(ks, d, tok, tlen);
    return 0;
}

/* Authenticate an agent call and make sure it runs on the agent's owner shard (kas.h). */
int kd_kas_agent_call_gate(kd_grpc_call *call, struct kd_agent_ident *ident)
{
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas_shard *ks = kd_kas_shard_of(s);
    size_t tlen;
    const char *tok = kd_kas_bearer(call, &tlen);
    bool known = false;
    if (ks->kas->gitlab_tokens) {
        if (tok != NULL && tlen > 0 && tlen <= 4096) {
            int g = gitlab_ident(ks, call, tok, tlen, ident);
            if (g == 0)
                return 1; /* suspended: start() runs again when GitLab has answered */
            if (g == 1)
                known = true;
            else if (g != -KD_GRPC_UNAUTHENTICATED) {
                ks->stats.auth_failures++;
                return -g; /* answered (GitLab unavailable, out of memory) */
            }
        }
    } else {
        const struct kd_tokens *table = ks->kas->tokens ? kd_tokens_handle_get(ks->kas->tokens) : NULL;
        known = tok != NULL && table != NULL && kd_tokens_lookup(table, tok, tlen, ident) == 0;
    }
    if (!known) {
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
        snprintf(m, sizeof(m), "agent_meta too large (%zu bytes; limits.agent_meta_max_size is %u)",
                 req.meta_len, meta_max);
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

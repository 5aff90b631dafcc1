/* gitlab.c — agent tokens resolved by GitLab, on the control thread (contract in gitlab.h).
 *
 * A request (struct req) is one HTTP/1.1 exchange on its own connection (Connection: close):
 *   QUEUED ─(a slot among max_requests)─> CONNECTING ─OPEN─> written ─DATA...─> DONE | failed
 * Its waiters are the shards that asked; the answer goes to each, then into the cache.
 */
#include "control/gitlab.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/http1.h"
#include "core/httpd.h"
#include "core/json.h"
#include "core/jwt.h"
#include "core/log.h"
#include "router/router.h"
#include "shards/grpc.h"
#include "shards/kas.h"
#include "shards/server.h"
#include "shards/shard.h"

#define CACHE_BUCKETS   4096
#define CACHE_MAX       100000
#define BODY_MAX        (64u * 1024)
#define AGENT_INFO_PATH "/api/v4/internal/kubernetes/agent_info"

struct entry {
    struct entry *next;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    int32_t status;
    uint64_t expires_ms;
    int64_t agent_id, project_id;
    char name[256];
};

struct req {
    struct req *next;
    struct kd_gitlab *g;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    char *token; /* wiped and freed once written */
    size_t token_len;
    unsigned *waiters; /* shards */
    size_t nwaiters, capwaiters;
    bool started;
    uint64_t deadline_ms;
    struct kd_httpd_upgraded *conn;
    char *out; /* the request bytes, until written */
    size_t out_len;
    struct kd_h1_parser *parser;
    int status;
    uint8_t body[BODY_MAX];
    size_t body_len;
    bool done;
};

struct kd_gitlab {
    struct kd_server *srv;
    struct kd_router *router;
    unsigned self;
    struct kd_httpd *httpd;
    struct kd_gitlab_cfg cfg;
    struct entry *buckets[CACHE_BUCKETS];
    size_t nentries;
    struct req *reqs; /* in flight and queued, oldest first is not kept: any order */
    unsigned running;
    bool starting;
    struct kd_gitlab_stats stats;
};

static unsigned bucket_of(const uint8_t *d)
{
    return (unsigned)(d[0] | d[1] << 8) % CACHE_BUCKETS;
}

static struct entry *cache_get(struct kd_gitlab *g, const uint8_t *d, uint64_t now)
{
    for (struct entry *e = g->buckets[bucket_of(d)]; e != NULL; e = e->next)
        if (memcmp(e->digest, d, KD_TOKEN_DIGEST_LEN) == 0)
            return e->expires_ms > now ? e : NULL;
    return NULL;
}

static void cache_sweep(struct kd_gitlab *g, uint64_t now)
{
    for (unsigned b = 0; b < CACHE_BUCKETS; b++) {
        struct entry **pp = &g->buckets[b];
        while (*pp != NULL) {
            struct entry *e = *pp;
            if (e->expires_ms <= now) {
                *pp = e->next;
                free(e);
                g->nentries--;
            } else {
                pp = &e->next;
            }
        }
    }
}

static void cache_put(struct kd_gitlab *g, const struct entry *tmpl, uint64_t now)
{
    struct entry **pp = &g->buckets[bucket_of(tmpl->digest)];
    for (struct entry *e = *pp; e != NULL; e = e->next)
        if (memcmp(e->digest, tmpl->digest, KD_TOKEN_DIGEST_LEN) == 0) {
            struct entry *next = e->next;
            *e = *tmpl;
            e->next = next;
            return;
        }
    if (g->nentries >= CACHE_MAX)
        cache_sweep(g, now);
    if (g->nentries >= CACHE_MAX)
        return; /* full of live answers: this one is not kept */
    struct entry *e = malloc(sizeof(*e));
    if (e == NULL)
        return;
    *e = *tmpl;
    e->next = *pp;
    *pp = e;
    g->nentries++;
}

/* ---- answers to the shards ---- */

static void answer_shard(struct kd_gitlab *g, unsigned shard, const struct entry *e, uint32_t ttl_ms,
                         const char *why)
{
    if (atomic_load_explicit(&g->srv->stopping, memory_order_acquire))
        return; /* the shards are ending their calls: no new work for them */
    size_t nl = strlen(e->name);
    struct kd_rt_token_ans *a = kd_router_payload_alloc(g->router, g->self, sizeof(*a) + nl);
    if (a == NULL)
        abort();
    memset(a, 0, sizeof(*a));
    memcpy(a->digest, e->digest, KD_TOKEN_DIGEST_LEN);
    a->status = e->status;
    a->ttl_ms = ttl_ms;
    a->agent_id = e->agent_id;
    a->project_id = e->project_id;
    snprintf(a->why, sizeof(a->why), "%s", why ? why : "");
    a->name_len = (uint32_t)nl;
    memcpy(a->name, e->name, nl);
    struct kd_msg m = {.type = KD_RT_TOKEN_RESOLVED, .u32 = KD_MSG_BARRIER, .ptr = a};
    atomic_fetch_add_explicit(&g->srv->ctl_sent, 1, memory_order_release);
    kd_router_send(g->router, g->self, shard, &m);
}

static void req_free(struct kd_gitlab *g, struct req *r)
{
    struct req **pp = &g->reqs;
    while (*pp != NULL && *pp != r)
        pp = &(*pp)->next;
    if (*pp == r)
        *pp = r->next;
    if (r->conn != NULL)
        kd_httpd_up_close(r->conn);
    if (r->token != NULL) {
        explicit_bzero(r->token, r->token_len);
        free(r->token);
    }
    if (r->out != NULL) {
        explicit_bzero(r->out, r->out_len);
        free(r->out);
    }
    kd_h1_parser_free(r->parser);
    free(r->waiters);
    if (r->started)
        g->running--;
    free(r);
}

static void start_queued(struct kd_gitlab *g);

/* The request is over: its answer goes to every waiting shard, and into the cache. */
static void finish(struct req *r, int32_t status, int64_t agent_id, int64_t project_id, const char *name,
                   const char *why)
{
    struct kd_gitlab *g = r->g;
    uint64_t now = kd_clock_ms();
    struct entry e = {.status = status, .agent_id = agent_id, .project_id = project_id};
    memcpy(e.digest, r->digest, KD_TOKEN_DIGEST_LEN);
    snprintf(e.name, sizeof(e.name), "%s", name ? name : "");
    uint32_t ttl = status == 0                         ? g->cfg.cache_ttl_ms
                   : status == KD_GRPC_UNAUTHENTICATED ? g->cfg.error_ttl_ms
                                                       : 0;
    e.expires_ms = now + ttl;
    if (ttl > 0)
        cache_put(g, &e, now);
    if (status == 0)
        g->stats.ok++;
    else if (status == KD_GRPC_UNAUTHENTICATED)
        g->stats.unauthenticated++;
    else {
        g->stats.failed++;
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_WARN, "gitlab_request_failed");
        kd_log_str(&l, "endpoint", "agent_info");
        kd_log_str(&l, "reason", why);
        kd_log_end(&l);
    }
    for (size_t i = 0; i < r->nwaiters; i++)
        answer_shard(g, r->waiters[i], &e, ttl, why);
    req_free(g, r);
    start_queued(g);
}

/* The body of a 200: {"agent_id": N, "project_id": N, "agent_name": "..."} (and more, ignored). */
static void finish_ok(struct req *r)
{
    struct kd_json root;
    struct kd_json_err err;
    int64_t agent_id = 0, project_id = 0;
    char name[256];
    if (kd_json_parse((const char *)r->body, r->body_len, &root, &err) < 0 ||
        kd_json_get_int64(&root, "agent_id", &agent_id) < 0 || agent_id <= 0 ||
        kd_json_get_int64(&root, "project_id", &project_id) < 0 || project_id <= 0 ||
        kd_json_get_str(&root, "agent_name", name, sizeof(name)) < 0) {
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, "agent_info answer not understood");
        return;
    }
    finish(r, 0, agent_id, project_id, name, NULL);
}

static void on_conn(void *ud, int ev, const uint8_t *data, size_t len)
{
    struct req *r = ud;
    char why[200];
    switch (ev) {
    case KD_HTTPD_UP_OPEN:
        kd_httpd_up_write(r->conn, r->out, r->out_len);
        break;
    case KD_HTTPD_UP_WRITTEN:
        explicit_bzero(r->out, r->out_len); /* it held the token */
        explicit_bzero(r->token, r->token_len);
        break;
    case KD_HTTPD_UP_DATA:
        while (len > 0 && !r->done) {
            size_t used = 0;
            struct kd_h1_slice body;
            int rc = kd_h1_parser_feed(r->parser, data, len, &used, &body);
            data += used;
            len -= used;
            if (rc < 0) {
                snprintf(why, sizeof(why), "agent_info: %s", kd_h1_strerror(rc));
                r->done = true;
                finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, why);
                return;
            }
            if (rc == KD_H1_EV_HEAD)
                r->status = kd_h1_parser_response(r->parser)->status;
            else if (rc == KD_H1_EV_BODY) {
                if (r->body_len + body.len > BODY_MAX) {
                    r->done = true;
                    finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, "agent_info answer over 64 KiB");
                    return;
                }
                memcpy(r->body + r->body_len, body.p, body.len);
                r->body_len += body.len;
            } else if (rc == KD_H1_EV_DONE) {
                r->done = true;
            } else if (rc == KD_H1_EV_NEED_MORE) {
                break;
            }
        }
        if (!r->done)
            break;
        /* fall through: a complete answer */
        goto complete;
    case KD_HTTPD_UP_EOF:
        if (!r->done && kd_h1_parser_eof(r->parser) != KD_H1_EV_DONE) {
            r->done = true;
            finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL,
                   "agent_info: GitLab closed the connection before answering");
            return;
        }
        r->done = true;
        goto complete;
    case KD_HTTPD_UP_ERROR:
    default:
        r->done = true;
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, "agent_info: connection to GitLab failed");
        return;
    }
    return;
complete:
    if (r->status == 200) {
        finish_ok(r);
    } else if (r->status == 401 || r->status == 403 || r->status == 404) {
        finish(r, KD_GRPC_UNAUTHENTICATED, 0, 0, NULL, NULL);
    } else {
        snprintf(why, sizeof(why), "agent_info answered HTTP %d", r->status);
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, why);
    }
}

/* The request bytes: GET agent_info with the agent's token and the kas JWT. */
static int build_request(struct kd_gitlab *g, struct req *r)
{
    char jwt[512], payload[200], target[300], auth[1100];
    int64_t now = (int64_t)time(NULL);
    snprintf(payload, sizeof(payload),
             "{\"iss\":\"gitlab-kas\",\"aud\":\"gitlab\",\"iat\":%" PRId64 ",\"nbf\":%" PRId64
             ",\"exp\":%" PRId64 "}",
             now, now - 5, now + 60);
    if (kd_jwt_sign(KD_JWT_HS256, g->cfg.secret, g->cfg.secret_len, payload, jwt, sizeof(jwt)) < 0)
        return -EINVAL;
    snprintf(target, sizeof(target), "%s%s", g->cfg.prefix, AGENT_INFO_PATH);
    int an = snprintf(auth, sizeof(auth), "Bearer %.*s", (int)r->token_len, r->token);
    struct kd_h1_header hs[] = {
        {"Authorization", 13, auth, (size_t)an}, {"Gitlab-Kas-Api-Request", 22, jwt, strlen(jwt)},
        {"Accept", 6, "application/json", 16},   {"User-Agent", 10, "kasd", 4},
        {"Connection", 10, "close", 5},
    };
    struct kd_h1_request rq = {.method = "GET",
                               .target = target,
                               .host = g->cfg.host,
                               .headers = hs,
                               .nheaders = sizeof(hs) / sizeof(hs[0])};
    size_t need = 0;
    char err[120];
    int rc = kd_h1_request_write(&rq, NULL, 0, &need, err, sizeof(err));
    if (rc != KD_H1_E_NOSPACE && rc != 0) {
        explicit_bzero(auth, sizeof(auth));
        return -EINVAL; /* a token with bytes HTTP forbids: never a valid agent token */
    }
    r->out = malloc(need);
    if (r->out == NULL || kd_h1_request_write(&rq, r->out, need, &r->out_len, err, sizeof(err)) != 0) {
        explicit_bzero(auth, sizeof(auth));
        return -ENOMEM;
    }
    explicit_bzero(auth, sizeof(auth));
    return 0;
}

static void start(struct kd_gitlab *g, struct req *r)
{
    r->started = true;
    g->running++;
    g->stats.requests++;
    r->deadline_ms = kd_clock_ms() + g->cfg.timeout_ms;
    struct kd_h1_limits lim = {.body_max = BODY_MAX, .allow_close_delimited = true};
    r->parser = kd_h1_parser_new(&lim);
    int rc = r->parser != NULL ? build_request(g, r) : -ENOMEM;
    if (rc == -EINVAL) {
        finish(r, KD_GRPC_UNAUTHENTICATED, 0, 0, NULL, NULL);
        return;
    }
    if (rc == 0)
        r->conn =
            kd_httpd_connect(g->httpd, (const struct sockaddr *)&g->cfg.addr, g->cfg.addrlen, on_conn, r);
    if (rc < 0 || r->conn == NULL)
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, "agent_info: no connection to GitLab could be made");
}

static void start_queued(struct kd_gitlab *g)
{
    if (g->starting)
        return; /* the loop below is running further up the stack: it goes on */
    g->starting = true;
    while (g->running < g->cfg.max_requests) {
        struct req *r = g->reqs;
        while (r != NULL && r->started)
            r = r->next;
        if (r == NULL)
            break;
        start(g, r); /* may finish (and free) it at once: the list is walked again */
    }
    g->starting = false;
}

static int add_waiter(struct req *r, unsigned shard)
{
    for (size_t i = 0; i < r->nwaiters; i++)
        if (r->waiters[i] == shard)
            return 0;
    if (r->nwaiters == r->capwaiters) {
        size_t cap = r->capwaiters ? r->capwaiters * 2 : 4;
        unsigned *w = realloc(r->waiters, cap * sizeof(*w));
        if (w == NULL)
            return -ENOMEM;
        r->waiters = w;
        r->capwaiters = cap;
    }
    r->waiters[r->nwaiters++] = shard;
    return 0;
}

bool kd_gitlab_on_message(struct kd_gitlab *g, const struct kd_msg *m)
{
    if (m->type != KD_RT_TOKEN_RESOLVE)
        return false;
    struct kd_rt_token_req *q = m->ptr;
    unsigned shard = m->from;
    uint64_t now = kd_clock_ms();
    struct entry *e = cache_get(g, q->digest, now);
    if (e != NULL) {
        g->stats.cache_hits++;
        answer_shard(g, shard, e, (uint32_t)(e->expires_ms - now), NULL);
    } else {
        struct req *r = g->reqs;
        while (r != NULL && memcmp(r->digest, q->digest, KD_TOKEN_DIGEST_LEN) != 0)
            r = r->next;
        if (r != NULL) {
            g->stats.coalesced++;
            add_waiter(r, shard);
        } else if ((r = calloc(1, sizeof(*r))) != NULL && (r->token = malloc(q->len + 1)) != NULL &&
                   add_waiter(r, shard) == 0) {
            r->g = g;
            memcpy(r->digest, q->digest, KD_TOKEN_DIGEST_LEN);
            memcpy(r->token, q->token, q->len);
            r->token_len = q->len;
            r->next = g->reqs;
            g->reqs = r;
            start_queued(g);
        } else {
            if (r != NULL) {
                free(r->token);
                free(r->waiters);
                free(r);
            }
            struct entry oom = {.status = KD_GRPC_UNAVAILABLE};
            memcpy(oom.digest, q->digest, KD_TOKEN_DIGEST_LEN);
            answer_shard(g, shard, &oom, 0, "out of memory");
        }
    }
    explicit_bzero(q->token, q->len);
    kd_router_payload_release(g->router, g->self, q);
    return true;
}

uint64_t kd_gitlab_tick(struct kd_gitlab *g, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (struct req *r = g->reqs; r != NULL;) {
        struct req *n = r->next;
        if (r->started && now >= r->deadline_ms) {
            char why[120];
            snprintf(why, sizeof(why), "agent_info: no answer from GitLab within %u ms", g->cfg.timeout_ms);
            r->done = true;
            finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, why);
        } else if (r->started && r->deadline_ms < next) {
            next = r->deadline_ms;
        }
        r = n;
    }
    return next;
}

int kd_gitlab_create(struct kd_server *srv, struct kd_httpd *httpd, const struct kd_gitlab_cfg *cfg,
                     struct kd_gitlab **out)
{
    struct kd_gitlab *g = calloc(1, sizeof(*g));
    if (g == NULL)
        return -ENOMEM;
    g->srv = srv;
    g->router = kd_server_router(srv);
    g->self = kd_server_nshards(srv);
    g->httpd = httpd;
    g->cfg = *cfg;
    if (g->cfg.max_requests == 0)
        g->cfg.max_requests = 16;
    *out = g;
    return 0;
}

void kd_gitlab_stats(const struct kd_gitlab *g, struct kd_gitlab_stats *out)
{
    *out = g->stats;
    out->cached = g->nentries;
}

void kd_gitlab_destroy(struct kd_gitlab *g)
{
    if (g == NULL)
        return;
    while (g->reqs != NULL)
        req_free(g, g->reqs);
    for (unsigned b = 0; b < CACHE_BUCKETS; b++)
        while (g->buckets[b] != NULL) {
            struct entry *e = g->buckets[b];
            g->buckets[b] = e->next;
            free(e);
        }
    free(g);
}

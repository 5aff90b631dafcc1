/* gitlab.c — agent tokens resolved by GitLab, on the control thread (contract in gitlab.h).
 *
 * A request (struct req) is one HTTP/1.1 exchange on its own connection (Connection: close):
 *   QUEUED ─(a slot among max_requests)─> CONNECTING ─OPEN─> written ─DATA...─> DONE | failed
 * Its waiters are the shards that asked; the answer goes to each, then into the cache.
 */
#include "control/gitlab.h"

#include <errno.h>
#include <stdarg.h>
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
#include "core/sha2.h"
#include "router/router.h"
#include "shards/grpc.h"
#include "shards/kas.h"
#include "shards/server.h"
#include "shards/shard.h"

#define CACHE_BUCKETS   4096
#define CACHE_MAX       100000
#define BODY_MAX        (64u * 1024)
#define QUEUE_MAX       1024 /* requests waiting for a slot; more are answered UNAVAILABLE / 503 at once */
#define AGENT_INFO_PATH "/api/v4/internal/kubernetes/agent_info"

struct entry {
    struct entry *next;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    int32_t status;
    uint64_t expires_ms;
    int64_t agent_id, project_id;
    char name[256];
};

enum { REQ_AGENT_INFO, REQ_AUTH_USER, REQ_AUTH_JOB };

struct kd_gitlab_wait {
    struct kd_gitlab_wait *next;
    struct req *r;
    kd_gitlab_auth_fn fn;
    void *ud;
};

/* A front door credential's answer: cached by SHA-256 of (kind, agent id, token). */
struct auth_entry {
    struct auth_entry *next;
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    uint64_t expires_ms;
    struct kd_gitlab_auth ans; /* its strings point into the arrays below */
    char why[160];
    char username[300];
    char uid[64];
    char groups_buf[4096];
    const char *groups[64];
};

struct req {
    struct req *next;
    struct kd_gitlab *g;
    int kind;
    bool in_callbacks;               /* finish_auth is calling the waiters */
    int64_t for_agent;               /* REQ_AUTH_*: the agent the credential names */
    struct kd_gitlab_wait *uwaiters; /* REQ_AUTH_*: the front door's requests waiting */
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    char *token; /* wiped and freed once written */
    size_t token_len;
    unsigned *waiters; /* shards */
    size_t nwaiters, capwaiters;
    bool started;
    uint64_t deadline_ms;
    struct kd_httpd_upgraded *conn;
    unsigned addr_idx; /* the address being tried (GitLab's name may resolve to several) */
    bool opened;
    char *out; /* the request bytes, until written */
    size_t out_len;
    struct kd_h1_parser *parser;
    int status;
    uint8_t *body; /* grows as the answer arrives, up to BODY_MAX */
    size_t body_len, body_cap;
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
    struct auth_entry *auth[256];
    size_t nauth;
    struct req *reqs; /* in flight and queued, oldest first is not kept: any order */
    unsigned running, queued;
    bool starting;
    struct kd_gitlab_stats stats;
    /* For /readiness: when GitLab last answered, and when and why it last failed. */
    uint64_t last_ok_ms, last_fail_ms;
    char last_why[160];
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
    free(r->body);
    free(r->waiters);
    while (r->uwaiters != NULL) { /* only at destroy: the front door answers its own requests */
        struct kd_gitlab_wait *w = r->uwaiters;
        r->uwaiters = w->next;
        free(w);
    }
    if (r->started)
        g->running--;
    else
        g->queued--;
    free(r);
}

static void start_queued(struct kd_gitlab *g);

static void finish_auth(struct req *r, struct auth_entry *e);
static void finish_auth_fail(struct req *r, int status, const char *why);
static void finish_auth_answer(struct req *r);

/* The request is over: its answer goes to every waiting shard, and into the cache. */
static void finish(struct req *r, int32_t status, int64_t agent_id, int64_t project_id, const char *name,
                   const char *why)
{
    struct kd_gitlab *g = r->g;
    if (r->kind != REQ_AGENT_INFO) {
        finish_auth_fail(r, status == KD_GRPC_UNAUTHENTICATED ? 401 : 503, why);
        return;
    }
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
    if (status == 0 || status == KD_GRPC_UNAUTHENTICATED) {
        g->last_ok_ms = now;
    } else {
        g->last_fail_ms = now;
        snprintf(g->last_why, sizeof(g->last_why), "%s", why ? why : "");
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

static void on_conn(void *ud, int ev, const uint8_t *data, size_t len);

static struct kd_httpd_upgraded *connect_to(struct req *r)
{
    const struct kd_gitlab_cfg *c = &r->g->cfg;
    return kd_httpd_connect(r->g->httpd, (const struct sockaddr *)&c->addrs[r->addr_idx],
                            c->addrlens[r->addr_idx], c->tls, c->tls != NULL ? c->server_name : NULL, on_conn,
                            r);
}

static void on_conn(void *ud, int ev, const uint8_t *data, size_t len)
{
    struct req *r = ud;
    char why[200];
    switch (ev) {
    case KD_HTTPD_UP_OPEN:
        r->opened = true;
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
                    finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, "GitLab's answer is over 64 KiB");
                    return;
                }
                if (r->body_len + body.len > r->body_cap) {
                    size_t cap = r->body_cap ? r->body_cap : 1024;
                    while (cap < r->body_len + body.len)
                        cap *= 2;
                    uint8_t *nb = realloc(r->body, cap);
                    if (nb == NULL) {
                        r->done = true;
                        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, "out of memory");
                        return;
                    }
                    r->body = nb;
                    r->body_cap = cap;
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
        if (!r->opened && r->addr_idx + 1 < r->g->cfg.naddrs) {
            /* the next address of GitLab's name */
            kd_httpd_up_close(r->conn);
            r->addr_idx++;
            r->conn = connect_to(r);
            if (r->conn != NULL)
                return;
        }
        snprintf(why, sizeof(why), "connection to GitLab failed: %.*s", (int)(len < 120 ? len : 120),
                 data != NULL ? (const char *)data : "");
        r->done = true;
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, why);
        return;
    }
    return;
complete:
    if (r->kind != REQ_AGENT_INFO) {
        finish_auth_answer(r);
    } else if (r->status == 200) {
        finish_ok(r);
    } else if (r->status == 401 || r->status == 403 || r->status == 404) {
        finish(r, KD_GRPC_UNAUTHENTICATED, 0, 0, NULL, NULL);
    } else {
        snprintf(why, sizeof(why), "agent_info answered HTTP %d", r->status);
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, why);
    }
}

/* JSON string content for a token: tokens are printable ASCII; '"' and '\\' escaped. */
static size_t json_escape(const char *in, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 2 < cap; i++) {
        if (in[i] == '"' || in[i] == '\\')
            out[o++] = '\\';
        out[o++] = in[i];
    }
    out[o] = '\0';
    return o;
}

/* The request bytes: the call for the request's kind, with its credential and the kas JWT. */
static int build_request(struct kd_gitlab *g, struct req *r)
{
    char jwt[512], payload[200], target[320], auth[1100], body[2300];
    int64_t now = (int64_t)time(NULL);
    snprintf(payload, sizeof(payload),
             "{\"iss\":\"gitlab-kas\",\"aud\":\"gitlab\",\"iat\":%" PRId64 ",\"nbf\":%" PRId64
             ",\"exp\":%" PRId64 "}",
             now, now - 5, now + 60);
    if (kd_jwt_sign(KD_JWT_HS256, g->cfg.secret, g->cfg.secret_len, payload, jwt, sizeof(jwt)) < 0)
        return -ENOMEM;
    if (r->token_len == 0 || r->token_len > 1024)
        return -EINVAL; /* longer than any GitLab token, and than the buffers below: never cut */
    for (size_t i = 0; i < r->token_len; i++)
        if (r->token[i] <= ' ' || r->token[i] >= 0x7f)
            return -EINVAL; /* bytes HTTP (and GitLab) would never take in a token */
    struct kd_h1_header hs[6];
    size_t nh = 0, blen = 0;
    const char *method = "GET", *path = AGENT_INFO_PATH;
    int an = 0;
    if (r->kind == REQ_AGENT_INFO) {
        an = snprintf(auth, sizeof(auth), "Bearer %.*s", (int)r->token_len, r->token);
        hs[nh++] = (struct kd_h1_header){"Authorization", 13, auth, (size_t)an};
    } else if (r->kind == REQ_AUTH_USER) {
        char esc[2100];
        json_escape(r->token, r->token_len, esc, sizeof(esc));
        blen = (size_t)snprintf(body, sizeof(body),
                                "{\"agent_id\":%" PRId64
                                ",\"access_type\":\"personal_access_token\",\"access_key\":\"%s\"}",
                                r->for_agent, esc);
        explicit_bzero(esc, sizeof(esc));
        method = "POST";
        path = "/api/v4/internal/kubernetes/authorize_proxy_user";
        hs[nh++] = (struct kd_h1_header){"Content-Type", 12, "application/json", 16};
    } else {
        an = snprintf(auth, sizeof(auth), "%.*s", (int)r->token_len, r->token);
        path = "/api/v4/job/allowed_agents";
        hs[nh++] = (struct kd_h1_header){"Job-Token", 9, auth, (size_t)an};
    }
    snprintf(target, sizeof(target), "%s%s", g->cfg.prefix, path);
    hs[nh++] = (struct kd_h1_header){"Gitlab-Kas-Api-Request", 22, jwt, strlen(jwt)};
    hs[nh++] = (struct kd_h1_header){"Accept", 6, "application/json", 16};
    hs[nh++] = (struct kd_h1_header){"User-Agent", 10, "kasd", 4};
    hs[nh++] = (struct kd_h1_header){"Connection", 10, "close", 5};
    struct kd_h1_request rq = {.method = method,
                               .target = target,
                               .host = g->cfg.host,
                               .headers = hs,
                               .nheaders = nh,
                               .body = r->kind == REQ_AUTH_USER ? body : NULL,
                               .body_len = blen};
    size_t need = 0;
    char err[120];
    int rc = kd_h1_request_write(&rq, NULL, 0, &need, err, sizeof(err));
    if (rc == 0 || rc == KD_H1_E_NOSPACE) {
        r->out = malloc(need);
        rc = r->out != NULL ? kd_h1_request_write(&rq, r->out, need, &r->out_len, err, sizeof(err)) : -ENOMEM;
    }
    explicit_bzero(auth, sizeof(auth));
    explicit_bzero(body, sizeof(body));
    return rc == 0 ? 0 : rc == -ENOMEM ? -ENOMEM : -EINVAL;
}

static void start(struct kd_gitlab *g, struct req *r)
{
    r->started = true;
    g->queued--;
    g->running++;
    g->stats.requests++;
    struct kd_h1_limits lim = {.body_max = BODY_MAX, .allow_close_delimited = true};
    r->parser = kd_h1_parser_new(&lim);
    int rc = r->parser != NULL ? build_request(g, r) : -ENOMEM;
    if (rc == -EINVAL) {
        finish(r, KD_GRPC_UNAUTHENTICATED, 0, 0, NULL, NULL);
        return;
    }
    if (rc == 0)
        r->conn = connect_to(r);
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

/* Requests are kept in arrival order: the oldest waiting one starts first. */
static void req_append(struct kd_gitlab *g, struct req *r)
{
    struct req **pp = &g->reqs;
    while (*pp != NULL)
        pp = &(*pp)->next;
    r->next = NULL;
    *pp = r;
    g->queued++;
    r->deadline_ms = kd_clock_ms() + g->cfg.timeout_ms; /* waiting counts against the timeout too */
}

/* Room for one more request (at most QUEUE_MAX waiting for a slot among max_requests). */
static bool req_room(const struct kd_gitlab *g)
{
    return g->queued < QUEUE_MAX;
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
        if (r != NULL && add_waiter(r, shard) == 0) {
            g->stats.coalesced++;
        } else if (r == NULL && req_room(g) && (r = calloc(1, sizeof(*r))) != NULL &&
                   (r->token = malloc(q->len + 1)) != NULL && add_waiter(r, shard) == 0) {
            r->g = g;
            memcpy(r->digest, q->digest, KD_TOKEN_DIGEST_LEN);
            memcpy(r->token, q->token, q->len);
            r->token_len = q->len;
            req_append(g, r);
            start_queued(g);
        } else {
            if (r != NULL && r->g != NULL)
                r = NULL; /* an existing request: not ours to free */
            if (r != NULL) {
                free(r->token);
                free(r->waiters);
                free(r);
            }
            struct entry oom = {.status = KD_GRPC_UNAVAILABLE};
            memcpy(oom.digest, q->digest, KD_TOKEN_DIGEST_LEN);
            answer_shard(g, shard, &oom, 0,
                         req_room(g) ? "out of memory" : "too many requests waiting for GitLab");
        }
    }
    explicit_bzero(q->token, q->len);
    kd_router_payload_release(g->router, g->self, q);
    return true;
}

/* ---- the front door's credentials ---- */

static struct auth_entry *auth_get(struct kd_gitlab *g, const uint8_t *d, uint64_t now)
{
    for (struct auth_entry *e = g->auth[d[0]]; e != NULL; e = e->next)
        if (memcmp(e->digest, d, KD_TOKEN_DIGEST_LEN) == 0)
            return e->expires_ms > now ? e : NULL;
    return NULL;
}

static void auth_put(struct kd_gitlab *g, struct auth_entry *tmpl, uint64_t now)
{
    if (g->nauth >= CACHE_MAX)
        for (unsigned b = 0; b < 256; b++) {
            struct auth_entry **pp = &g->auth[b];
            while (*pp != NULL) {
                struct auth_entry *e = *pp;
                if (e->expires_ms <= now) {
                    *pp = e->next;
                    free(e);
                    g->nauth--;
                } else {
                    pp = &e->next;
                }
            }
        }
    struct auth_entry **pp = &g->auth[tmpl->digest[0]];
    for (; *pp != NULL; pp = &(*pp)->next)
        if (memcmp((*pp)->digest, tmpl->digest, KD_TOKEN_DIGEST_LEN) == 0) {
            struct auth_entry *old = *pp;
            *pp = old->next;
            free(old);
            g->nauth--;
            break;
        }
    if (g->nauth >= CACHE_MAX)
        return;
    struct auth_entry *e = malloc(sizeof(*e));
    if (e == NULL)
        return;
    memcpy(e, tmpl, sizeof(*e));
    /* the answer's strings point into the entry itself */
    e->ans.why = e->why;
    e->ans.username = tmpl->ans.username ? e->username : NULL;
    e->ans.uid = tmpl->ans.uid ? e->uid : NULL;
    for (size_t i = 0; i < e->ans.ngroups; i++)
        e->groups[i] = e->groups_buf + (tmpl->groups[i] - tmpl->groups_buf);
    e->ans.groups = e->groups;
    e->next = g->auth[e->digest[0]];
    g->auth[e->digest[0]] = e;
    g->nauth++;
}

static void auth_entry_init(struct auth_entry *e, const uint8_t *digest, int status, const char *why)
{
    memset(e, 0, sizeof(*e));
    memcpy(e->digest, digest, KD_TOKEN_DIGEST_LEN);
    e->ans.status = status;
    snprintf(e->why, sizeof(e->why), "%s", why ? why : "");
    e->ans.why = e->why;
    e->ans.groups = e->groups;
}

static void add_group(struct auth_entry *e, size_t *used, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void add_group(struct auth_entry *e, size_t *used, const char *fmt, ...)
{
    if (e->ans.ngroups >= sizeof(e->groups) / sizeof(e->groups[0]) || *used >= sizeof(e->groups_buf) - 1)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->groups_buf + *used, sizeof(e->groups_buf) - *used, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(e->groups_buf) - *used)
        return; /* does not fit: left out rather than cut */
    e->groups[e->ans.ngroups++] = e->groups_buf + *used;
    *used += (size_t)n + 1;
}

/* Each role of each project (or group) of access_as.user: gitlab:<what>_role:<id>:<role>. */
static void user_roles(struct auth_entry *e, size_t *used, const struct kd_json *list, const char *what)
{
    struct kd_json_iter it, rit;
    struct kd_json item, roles, role;
    if (kd_json_enter(list, &it) < 0)
        return;
    while (kd_json_next(&it, NULL, &item)) {
        int64_t id;
        char rname[64];
        if (kd_json_get_int64(&item, "id", &id) < 0 || kd_json_get(&item, "roles", &roles) < 0 ||
            kd_json_enter(&roles, &rit) < 0)
            continue;
        while (kd_json_next(&rit, NULL, &role))
            if (kd_json_str(&role, rname, sizeof(rname)) > 0)
                add_group(e, used, "gitlab:%s_role:%" PRId64 ":%s", what, id, rname);
    }
}

/* authorize_proxy_user's 200: the agent must be the one asked for; access_as says how. */
static int parse_user(struct req *r, const struct kd_json *root, struct auth_entry *e)
{
    int64_t aid;
    struct kd_json aa, v;
    char uname[200];
    if (kd_json_get_int64(root, "agent.id", &aid) < 0 || kd_json_get(root, "access_as", &aa) < 0)
        return -EBADMSG;
    if (aid != r->for_agent) {
        auth_entry_init(e, r->digest, 403, "Forbidden: agentId is not allowed");
        return 0;
    }
    auth_entry_init(e, r->digest, 200, NULL);
    if (kd_json_get(&aa, "agent", &v) == 0)
        return 0; /* access as the agent: no impersonation */
    if (kd_json_get(&aa, "user", &v) < 0 || kd_json_get_str(root, "user.username", uname, sizeof(uname)) <= 0)
        return -EBADMSG;
    snprintf(e->username, sizeof(e->username), "gitlab:user:%s", uname);
    e->ans.username = e->username;
    size_t used = 0;
    add_group(e, &used, "gitlab:user");
    struct kd_json list;
    if (kd_json_get(&v, "projects", &list) == 0)
        user_roles(e, &used, &list, "project");
    if (kd_json_get(&v, "groups", &list) == 0)
        user_roles(e, &used, &list, "group");
    return 0;
}

/* job/allowed_agents's 200: the agent must be among the allowed ones; its access_as says how. */
static int parse_job(struct req *r, const struct kd_json *root, struct auth_entry *e)
{
    struct kd_json list, a, aa, v, groups, gitem;
    struct kd_json_iter it, git;
    if (kd_json_get(root, "allowed_agents", &list) < 0 || kd_json_enter(&list, &it) < 0)
        return -EBADMSG;
    bool found = false;
    while (!found && kd_json_next(&it, NULL, &a)) {
        int64_t id;
        found = kd_json_get_int64(&a, "id", &id) == 0 && id == r->for_agent;
    }
    if (!found) {
        auth_entry_init(e, r->digest, 403, "Forbidden: agentId is not allowed");
        return 0;
    }
    auth_entry_init(e, r->digest, 200, NULL);
    if (kd_json_get(&a, "configuration.access_as", &aa) < 0 || kd_json_get(&aa, "agent", &v) == 0)
        return 0; /* access as the agent (GitLab's default for CI) */
    size_t used = 0;
    if (kd_json_get(&aa, "impersonate", &v) == 0) {
        if (kd_json_get_str(&v, "username", e->username, sizeof(e->username)) <= 0)
            return -EBADMSG;
        e->ans.username = e->username;
        if (kd_json_get_str(&v, "uid", e->uid, sizeof(e->uid)) > 0)
            e->ans.uid = e->uid;
        struct kd_json g;
        char gname[256];
        if (kd_json_get(&v, "groups", &groups) == 0 && kd_json_enter(&groups, &git) == 0)
            while (kd_json_next(&git, NULL, &g))
                if (kd_json_str(&g, gname, sizeof(gname)) > 0)
                    add_group(e, &used, "%s", gname);
        return 0;
    }
    if (kd_json_get(&aa, "ci_job", &v) < 0)
        return -EBADMSG; /* an access_as this kasd does not know */
    int64_t job_id, project_id;
    if (kd_json_get_int64(root, "job.id", &job_id) < 0 ||
        kd_json_get_int64(root, "project.id", &project_id) < 0)
        return -EBADMSG;
    snprintf(e->username, sizeof(e->username), "gitlab:ci_job:%" PRId64, job_id);
    e->ans.username = e->username;
    add_group(e, &used, "gitlab:ci_job");
    if (kd_json_get(root, "project.groups", &groups) == 0 && kd_json_enter(&groups, &git) == 0)
        while (kd_json_next(&git, NULL, &gitem)) {
            int64_t gid;
            if (kd_json_get_int64(&gitem, "id", &gid) == 0)
                add_group(e, &used, "gitlab:group:%" PRId64, gid);
        }
    add_group(e, &used, "gitlab:project:%" PRId64, project_id);
    char slug[128], tier[64];
    if (kd_json_get_str(root, "environment.slug", slug, sizeof(slug)) > 0)
        add_group(e, &used, "gitlab:project_env:%" PRId64 ":%s", project_id, slug);
    if (kd_json_get_str(root, "environment.tier", tier, sizeof(tier)) > 0) {
        add_group(e, &used, "gitlab:project_env_tier:%" PRId64 ":%s", project_id, tier);
        if (kd_json_get(root, "project.groups", &groups) == 0 && kd_json_enter(&groups, &git) == 0)
            while (kd_json_next(&git, NULL, &gitem)) {
                int64_t gid;
                if (kd_json_get_int64(&gitem, "id", &gid) == 0)
                    add_group(e, &used, "gitlab:group_env_tier:%" PRId64 ":%s", gid, tier);
            }
    }
    return 0;
}

static void finish_auth_answer(struct req *r)
{
    static struct auth_entry e; /* large: one at a time, on this thread only */
    if (r->status == 200) {
        struct kd_json root;
        int rc = kd_json_parse((const char *)r->body, r->body_len, &root, NULL);
        if (rc == 0)
            rc = r->kind == REQ_AUTH_USER ? parse_user(r, &root, &e) : parse_job(r, &root, &e);
        if (rc < 0) {
            finish_auth_fail(r, 503,
                             r->kind == REQ_AUTH_USER ? "authorize_proxy_user answer not understood"
                                                      : "job/allowed_agents answer not understood");
            return;
        }
    } else if (r->status == 400 || r->status == 401 || r->status == 403 || r->status == 404) {
        /* as kas: an unknown or revoked credential (GitLab answers 400 for an unknown personal
         * access token), an unknown agent, or no access to it are all 401 to the user */
        auth_entry_init(&e, r->digest, 401, "Unauthorized");
    } else {
        char why[120];
        snprintf(why, sizeof(why), "%s answered HTTP %d",
                 r->kind == REQ_AUTH_USER ? "authorize_proxy_user" : "job/allowed_agents", r->status);
        finish_auth_fail(r, 503, why);
        return;
    }
    finish_auth(r, &e);
}

static void finish_auth_fail(struct req *r, int status, const char *why)
{
    static struct auth_entry e;
    auth_entry_init(&e, r->digest, status, why);
    if (status == 503) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_WARN, "gitlab_request_failed");
        kd_log_str(&l, "endpoint", r->kind == REQ_AUTH_USER ? "authorize_proxy_user" : "job/allowed_agents");
        kd_log_str(&l, "reason", why);
        kd_log_end(&l);
    }
    finish_auth(r, &e);
}

/* Every front door request waiting for this credential gets the answer; cached unless GitLab failed. */
static void finish_auth(struct req *r, struct auth_entry *e)
{
    struct kd_gitlab *g = r->g;
    uint64_t now = kd_clock_ms();
    int st = e->ans.status;
    if (st == 200)
        g->stats.auth_ok++;
    else if (st == 401 || st == 403)
        g->stats.auth_denied++;
    else
        g->stats.auth_failed++;
    if (st == 503) {
        g->last_fail_ms = now;
        snprintf(g->last_why, sizeof(g->last_why), "%s", e->why);
    } else {
        g->last_ok_ms = now;
    }
    uint32_t ttl = st == 200 ? g->cfg.cache_ttl_ms : st == 503 ? 0 : g->cfg.error_ttl_ms;
    e->expires_ms = now + ttl;
    if (ttl > 0)
        auth_put(g, e, now);
    /* Out of the list first: a callback that asks again for the same credential makes a new
     * request, and one that cancels a waiter of this request only marks it. */
    struct req **pp = &g->reqs;
    while (*pp != NULL && *pp != r)
        pp = &(*pp)->next;
    if (*pp == r)
        *pp = r->next;
    r->next = NULL;
    r->in_callbacks = true;
    for (struct kd_gitlab_wait *w = r->uwaiters; w != NULL; w = w->next)
        if (w->fn != NULL)
            w->fn(w->ud, &e->ans);
    req_free(g, r); /* frees the waiters */
    start_queued(g);
}

int kd_gitlab_authorize(struct kd_gitlab *g, enum kd_gitlab_cred kind, const char *token, size_t len,
                        int64_t agent_id, kd_gitlab_auth_fn fn, void *ud, struct kd_gitlab_wait **wp)
{
    struct kd_sha256 h;
    uint8_t d[KD_TOKEN_DIGEST_LEN], k = (uint8_t)(kind == KD_GITLAB_PAT ? 'p' : 'c');
    kd_sha256_init(&h);
    kd_sha256_update(&h, &k, 1);
    kd_sha256_update(&h, &agent_id, sizeof(agent_id));
    kd_sha256_update(&h, token, len);
    kd_sha256_final(&h, d);
    struct auth_entry *e = auth_get(g, d, kd_clock_ms());
    if (e != NULL) {
        g->stats.auth_cache_hits++;
        fn(ud, &e->ans);
        return 1;
    }
    struct kd_gitlab_wait *w = calloc(1, sizeof(*w));
    struct req *r = g->reqs;
    while (r != NULL && memcmp(r->digest, d, KD_TOKEN_DIGEST_LEN) != 0)
        r = r->next;
    if (w == NULL || (r == NULL && (!req_room(g) || (r = calloc(1, sizeof(*r))) == NULL ||
                                    (r->token = malloc(len + 1)) == NULL))) {
        if (r != NULL && r->g == NULL) {
            free(r->token);
            free(r);
        }
        free(w);
        struct kd_gitlab_auth oom = {
            .status = 503, .why = req_room(g) ? "out of memory" : "too many requests waiting for GitLab"};
        fn(ud, &oom);
        return 1;
    }
    if (r->g == NULL) { /* a new request */
        r->g = g;
        r->kind = kind == KD_GITLAB_PAT ? REQ_AUTH_USER : REQ_AUTH_JOB;
        r->for_agent = agent_id;
        memcpy(r->digest, d, KD_TOKEN_DIGEST_LEN);
        memcpy(r->token, token, len);
        r->token_len = len;
        req_append(g, r);
    } else {
        g->stats.coalesced++;
    }
    w->r = r;
    w->fn = fn;
    w->ud = ud;
    w->next = r->uwaiters;
    r->uwaiters = w;
    *wp = w;
    start_queued(g); /* may answer at once (no connection could be made): then w is gone */
    return 0;
}

void kd_gitlab_cancel(struct kd_gitlab_wait *w)
{
    struct req *r = w->r;
    if (r->in_callbacks) {
        w->fn = NULL; /* its answer is being given out: freed with the request */
        return;
    }
    struct kd_gitlab_wait **pp = &r->uwaiters;
    while (*pp != NULL && *pp != w)
        pp = &(*pp)->next;
    if (*pp == w)
        *pp = w->next;
    free(w);
    if (r->uwaiters == NULL && !r->started)
        req_free(r->g, r); /* nobody waits for it any more: it is not sent */
}

uint64_t kd_gitlab_tick(struct kd_gitlab *g, uint64_t now)
{
    /* Finishing a request may start or free others: one expired request at a time, the list
     * walked again from the start each time, nothing started until the end. */
    bool was = g->starting;
    g->starting = true;
    for (;;) {
        struct req *r = g->reqs;
        while (r != NULL && now < r->deadline_ms)
            r = r->next;
        if (r == NULL)
            break;
        char why[160];
        snprintf(why, sizeof(why), "%s: no answer from GitLab within %u ms",
                 r->kind == REQ_AGENT_INFO  ? "agent_info"
                 : r->kind == REQ_AUTH_USER ? "authorize_proxy_user"
                                            : "job/allowed_agents",
                 g->cfg.timeout_ms);
        r->done = true;
        finish(r, KD_GRPC_UNAVAILABLE, 0, 0, NULL, why);
    }
    g->starting = was;
    if (!was)
        start_queued(g);
    uint64_t next = UINT64_MAX;
    for (struct req *r = g->reqs; r != NULL; r = r->next)
        if (r->deadline_ms < next)
            next = r->deadline_ms;
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

size_t kd_gitlab_health(const struct kd_gitlab *g, char *buf, size_t cap)
{
    uint64_t now = kd_clock_ms();
    int n;
    if (g->last_fail_ms != 0 && g->last_fail_ms >= g->last_ok_ms)
        n = snprintf(buf, cap,
                     "gitlab: the last request failed %llu ms ago (%s); known agents keep working\n",
                     (unsigned long long)(now - g->last_fail_ms), g->last_why);
    else if (g->last_ok_ms != 0)
        n = snprintf(buf, cap, "gitlab: ok (last answer %llu ms ago)\n",
                     (unsigned long long)(now - g->last_ok_ms));
    else
        n = snprintf(buf, cap, "gitlab: no request yet\n");
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
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
    for (unsigned b = 0; b < 256; b++)
        while (g->auth[b] != NULL) {
            struct auth_entry *e = g->auth[b];
            g->auth[b] = e->next;
            free(e);
        }
    for (unsigned b = 0; b < CACHE_BUCKETS; b++)
        while (g->buckets[b] != NULL) {
            struct entry *e = g->buckets[b];
            g->buckets[b] = e->next;
            free(e);
        }
    free(g);
}

/* kubeapi.c — the Kubernetes API front door (contract in kubeapi.h).
 *
 * A request's life (struct kreq), on the control thread:
 *   on_request: CORS, prefix, credential, header message built ─> START to the owner shard
 *   BOUND:      header message, body chunks up to the window, trailer, HALF_CLOSE
 *   RDATA:      queued; pump() turns them into h2o calls, one chunk in flight: its payload is
 *               released and acknowledged (ACK_RESP) when h2o asks for more (PROCEED)
 *   END:        status kept; pump() finishes the answer (final, or a Status object, or abort);
 *               FRONT_DONE to the back if it was bound
 *   GONE:       the client left: CANCEL (bound) or CANCEL_WAIT; queued chunks released
 * A kreq is freed when it has seen END and its HTTP request is released (answered or gone).
 */
#include "control/kubeapi.h"

#include "control/gitlab.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/clock.h"
#include "core/hash.h"
#include "core/httpd.h"
#include "core/httpmap.h"
#include "core/log.h"
#include "router/router.h"
#include "shards/kas.h"
#include "shards/server.h"
#include "shards/shard.h"

#define MAKE_REQUEST     "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest"
#define BODY_CHUNK       (32u * 1024)
#define MAX_CORS_HEADERS 6

struct chunk {
    struct chunk *next;
    struct kd_rt_blob *blob; /* the RDATA payload */
};

struct kd_kubeapi {
    struct kd_server *srv;
    struct kd_gitlab *gitlab; /* credentials checked by GitLab when no access-token file is set */
    struct kd_router *router;
    unsigned self, n;
    struct kd_kubeapi_cfg cfg;
    size_t prefix_len;
    struct kd_kubeapi_stats stats;
    struct kreq *all; /* every live kreq (for destroy) */
};

struct kreq {
    struct kreq *prev, *next;
    struct kd_kubeapi *k;
    struct kd_httpd_req *req; /* NULL once released */
    int64_t agent_id;
    unsigned o;
    void *back;
    bool bound, got_end, started, finished;
    int end_status;
    char end_msg[200];
    uint8_t *hdr; /* header message, until BOUND */
    size_t hdr_len;
    size_t body_off;
    bool body_done;
    uint64_t req_unacked;
    struct chunk *head, *tail, *inflight;
    /* A protocol upgrade (kubectl exec/attach/port-forward): asked for by the client; taken over
     * after the agent's 101 (up), bytes both ways as upgradeData. */
    const char *upgrade;
    size_t upgrade_len;
    struct kd_httpd_upgraded *up;
    bool up_open, up_eof_sent, read_held;
    /* the credential checked by GitLab (kd_gitlab_authorize): the request waits for the answer */
    struct kd_gitlab_wait *auth_wait;
    bool in_auth, free_after_auth;
    const char *method; /* h2o's, valid while req is */
    size_t mlen;
    /* CORS headers to add to the answer */
    char origin[256];
    bool cors;
};

/* ---- router ---- */

/* Counted for the shards' stop barrier before it can be seen (shards/shard.h, ctl_sent). */
static void send_msg(struct kreq *q, uint16_t type, void *ptr, void *ptr2, uint64_t u64)
{
    struct kd_msg m = {.type = type, .u32 = KD_MSG_BARRIER, .u64 = u64, .ptr = ptr, .ptr2 = ptr2};
    atomic_fetch_add_explicit(&q->k->srv->ctl_sent, 1, memory_order_release);
    kd_router_send(q->k->router, q->k->self, q->o, &m);
}

static void *payload(struct kd_kubeapi *k, size_t size)
{
    void *p = kd_router_payload_alloc(k->router, k->self, size);
    if (p == NULL)
        abort(); /* as the shards: a lost message would corrupt a call */
    return p;
}

static void release(struct kd_kubeapi *k, void *p)
{
    kd_router_payload_release(k->router, k->self, p);
}

/* ---- answers kasd gives itself ---- */

static size_t cors_headers(const struct kreq *q, struct kd_httpd_header *h)
{
    if (!q->cors)
        return 0;
    h[0] = (struct kd_httpd_header){"access-control-allow-origin", 27, q->origin, strlen(q->origin)};
    h[1] = (struct kd_httpd_header){"access-control-allow-credentials", 32, "true", 4};
    h[2] = (struct kd_httpd_header){"vary", 4, "Origin", 6};
    return 3;
}

/* A Kubernetes Status object; 401 says Gitlab-Unauthorized. Releases the request. */
static void status_answer(struct kreq *q, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void status_answer(struct kreq *q, int code, const char *fmt, ...)
{
    char msg[512], body[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t len = kd_hm_status_json(code, msg, body, sizeof(body));
    struct kd_httpd_header h[MAX_CORS_HEADERS + 2];
    size_t n = cors_headers(q, h);
    if (code == 401)
        h[n++] = (struct kd_httpd_header){"gitlab-unauthorized", 19, "true", 4};
    if (q->req != NULL) {
        kd_httpd_respond_headers(q->req, code, "application/json", h, n, body, len);
        q->req = NULL;
    }
    q->finished = true;
}

/* ---- life ---- */

static void kreq_free(struct kreq *q)
{
    struct kd_kubeapi *k = q->k;
    for (struct chunk *c = q->head; c != NULL;) {
        struct chunk *n = c->next;
        release(k, c->blob);
        free(c);
        c = n;
    }
    if (q->inflight != NULL) {
        release(k, q->inflight->blob);
        free(q->inflight);
    }
    free(q->hdr);
    if (q->auth_wait != NULL)
        kd_gitlab_cancel(q->auth_wait);
    if (q->up != NULL)
        kd_httpd_up_close(q->up);
    if (q->prev)
        q->prev->next = q->next;
    else
        k->all = q->next;
    if (q->next)
        q->next->prev = q->prev;
    k->stats.active--;
    free(q);
}

static void maybe_free(struct kreq *q)
{
    if (q->got_end && q->req == NULL && q->up == NULL)
        kreq_free(q);
}

/* The HTTP side is over (answered, failed or gone). */
static void http_done(struct kreq *q)
{
    if (q->req != NULL) {
        kd_httpd_release(q->req);
        q->req = NULL;
    }
    q->finished = true;
}

static void abort_answer(struct kreq *q)
{
    if (q->req != NULL && !q->finished) {
        if (!q->started) {
            status_answer(q, 502, "HTTP->gRPC: the agent's answer was not a valid HTTP response");
            return;
        }
        kd_httpd_abort(q->req);
    }
    http_done(q);
}

/* ---- request body to the agent ---- */

static void send_blob(struct kreq *q, const uint8_t *msg, size_t len)
{
    struct kd_rt_blob *d = payload(q->k, sizeof(*d) + len);
    d->len = (uint32_t)len;
    memcpy(d->data, msg, len);
    send_msg(q, KD_RT_DATA, d, q->back, 0);
    q->req_unacked += len;
}

static void push_body(struct kreq *q)
{
    if (q->body_done || q->got_end || q->req == NULL)
        return;
    const uint8_t *body;
    size_t len;
    kd_httpd_req_body(q->req, &body, &len);
    while (q->body_off < len && q->req_unacked < KD_RT_WINDOW) {
        size_t n = len - q->body_off < BODY_CHUNK ? len - q->body_off : BODY_CHUNK;
        size_t sz = kd_hm_data_size(n);
        struct kd_rt_blob *d = payload(q->k, sizeof(*d) + sz);
        d->len = (uint32_t)sz;
        kd_hm_put_data(d->data, body + q->body_off, n);
        send_msg(q, KD_RT_DATA, d, q->back, 0);
        q->req_unacked += sz;
        q->body_off += n;
    }
    if (q->body_off == len) {
        send_blob(q, kd_hm_trailer, sizeof(kd_hm_trailer));
        if (q->upgrade == NULL) /* an upgrade's request stream goes on with upgradeData */
            send_msg(q, KD_RT_HALF_CLOSE, NULL, q->back, 0);
        q->body_done = true;
    }
}

/* ---- the agent's answer to the client ---- */

struct hdrs {
    struct kd_httpd_header h[128];
    size_t n;
};

static int add_hdr(void *ud, const char *name, size_t nlen, const char *value, size_t vlen)
{
    struct hdrs *hs = ud;
    if (hs->n < sizeof(hs->h) / sizeof(hs->h[0]) - MAX_CORS_HEADERS - 1)
        hs->h[hs->n++] = (struct kd_httpd_header){name, nlen, value, vlen};
    return 0;
}

static void ack(struct kreq *q, uint32_t len)
{
    if (!q->got_end)
        send_msg(q, KD_RT_ACK_RESP, NULL, q->back, len);
}

static void finish_without_trailer(struct kreq *q)
{
    if (q->finished)
        return;
    if (q->end_status == KD_GRPC_OK && q->started) {
        /* the agent ended the call without a trailer message: the body is what it sent */
        kd_httpd_send(q->req, NULL, 0, true);
        http_done(q);
        return;
    }
    if (!q->started) {
        if (q->end_status == KD_GRPC_DEADLINE_EXCEEDED && !q->bound) {
            q->k->stats.no_tunnel++;
            status_answer(q, 504, "agent %lld is not connected (no tunnel within %u ms)",
                          (long long)q->agent_id, q->k->cfg.routing_timeout_ms);
        } else if (q->end_status == KD_GRPC_UNAVAILABLE) {
            q->k->stats.failed++;
            status_answer(q, 503, "HTTP->gRPC: %s", q->end_msg[0] ? q->end_msg : "agent unavailable");
        } else {
            q->k->stats.failed++;
            status_answer(q, 502, "HTTP->gRPC: failed to read gRPC response: status %d: %s", q->end_status,
                          q->end_msg);
        }
        return;
    }
    q->k->stats.failed++;
    kd_httpd_abort(q->req); /* headers are out: a cut body must not look whole */
    http_done(q);
}

/* h2o has written the chunk in flight: its payload goes home and the agent's side may send more. */
static void chunk_done(struct kreq *q, struct chunk *c);

static void complete_inflight(struct kreq *q)
{
    struct chunk *c = q->inflight;
    if (c != NULL) {
        q->inflight = NULL;
        chunk_done(q, c);
    }
}

/* The client left: cancel the agent's side. Never frees q (the callers' maybe_free does). */
static void client_gone(struct kreq *q)
{
    http_done(q);
    complete_inflight(q);
    if (!q->got_end) {
        if (q->bound)
            send_msg(q, KD_RT_CANCEL, NULL, q->back, 0);
        else
            send_msg(q, KD_RT_CANCEL_WAIT, NULL, q, (uint64_t)q->agent_id);
    }
}

/* A chunk the client has (or will never need): its payload goes home, the agent's side may send more. */
static void chunk_done(struct kreq *q, struct chunk *c)
{
    uint32_t len = c->blob->len;
    release(q->k, c->blob);
    free(c);
    ack(q, len);
}

/* The agent answered something that is not an HTTP response (or not in order): the client's answer
 * fails and the agent's call is cancelled. */
static void agent_broke(struct kreq *q)
{
    q->k->stats.failed++;
    abort_answer(q);
    if (!q->got_end)
        send_msg(q, KD_RT_CANCEL, NULL, q->back, 0);
}

static bool start_answer(struct kreq *q, const struct kd_hm_response *r)
{
    struct hdrs hs = {.n = 0};
    int64_t cl = -1;
    if (kd_hm_response_headers(r, &cl, add_hdr, &hs) < 0 || r->status_code < 200 || r->status_code > 999)
        return false;
    hs.h[hs.n++] = (struct kd_httpd_header){"via", 3, q->k->cfg.via, strlen(q->k->cfg.via)};
    hs.n += cors_headers(q, hs.h + hs.n);
    /* The agent's Content-Length is not passed on: h2o 2.2 does not hold a body to a declared length,
     * so an agent that sent more (or less) than it declared could write a second response into a
     * kept-alive HTTP/1.1 connection. The body is framed by h2o (chunked, or HTTP/2 DATA) instead. */
    (void)cl;
    kd_httpd_start(q->req, r->status_code, hs.h, hs.n, -1);
    q->started = true;
    q->k->stats.proxied++;
    return true;
}

static void on_up(void *ud, int ev, const uint8_t *data, size_t len);

/* The agent's API server switched protocols (kubectl exec/attach/port-forward): 101 to the client,
 * then the connection's bytes go both ways as upgradeData. */
static bool switch_protocols(struct kreq *q, const struct kd_hm_response *r)
{
    struct hdrs hs = {.n = 0};
    int64_t cl = -1;
    const char *up;
    size_t ul;
    if (kd_hm_response_headers(r, &cl, add_hdr, &hs) < 0 || !kd_hm_response_header(r, "upgrade", &up, &ul))
        return false;
    hs.h[hs.n++] = (struct kd_httpd_header){"upgrade", 7, up, ul};
    hs.h[hs.n++] = (struct kd_httpd_header){"via", 3, q->k->cfg.via, strlen(q->k->cfg.via)};
    hs.n += cors_headers(q, hs.h + hs.n);
    q->up = kd_httpd_upgrade(q->req, hs.h, hs.n, on_up, q); /* the request handle is released */
    q->req = NULL;
    q->started = true;
    if (q->up == NULL)
        return false;
    q->k->stats.proxied++;
    q->k->stats.upgraded++;
    return true;
}

/* The upgraded connection failed, or the agent broke the protocol after the 101. */
static void up_broke(struct kreq *q)
{
    if (q->up != NULL) {
        kd_httpd_up_close(q->up);
        q->up = NULL;
    }
    q->finished = true;
    complete_inflight(q);
    if (!q->got_end)
        send_msg(q, KD_RT_CANCEL, NULL, q->back, 0);
}

/* After the 101: the agent's upgradeData to the client, one write at a time. */
static void pump_upgraded(struct kreq *q)
{
    while (q->inflight == NULL && q->head != NULL && q->up != NULL && q->up_open) {
        struct chunk *c = q->head;
        q->head = c->next;
        if (q->head == NULL)
            q->tail = NULL;
        struct kd_hm_response r;
        bool ok = kd_hm_parse_response(c->blob->data, c->blob->len, &r) == 0 &&
                  (r.kind == KD_HM_UPGRADE || r.kind == KD_HM_TRAILER);
        if (ok && r.kind == KD_HM_UPGRADE && r.data_len > 0) {
            q->inflight = c; /* released and acknowledged when written */
            kd_httpd_up_write(q->up, r.data, r.data_len);
            continue;
        }
        chunk_done(q, c);
        if (!ok) {
            q->k->stats.failed++;
            up_broke(q);
            return;
        }
    }
    if (q->got_end && q->head == NULL && q->inflight == NULL && q->up != NULL) {
        kd_httpd_up_close(q->up); /* the agent's side is over: so is the connection */
        q->up = NULL;
        q->finished = true;
    }
}

static void pump(struct kreq *q)
{
    if (q->up != NULL) {
        pump_upgraded(q);
        return;
    }
    while (q->inflight == NULL && q->head != NULL && !q->finished && q->req != NULL) {
        struct chunk *c = q->head;
        q->head = c->next;
        if (q->head == NULL)
            q->tail = NULL;
        struct kd_hm_response r;
        if (kd_hm_parse_response(c->blob->data, c->blob->len, &r) < 0) {
            chunk_done(q, c);
            agent_broke(q);
            break;
        }
        if (r.kind == KD_HM_DATA && q->started && r.data_len > 0) {
            q->inflight = c; /* released and acknowledged at PROCEED */
            kd_httpd_send(q->req, r.data, r.data_len, false);
            if (!kd_httpd_req_alive(q->req)) {
                client_gone(q);
                return;
            }
            if (kd_httpd_can_send(q->req))
                complete_inflight(q); /* written at once */
            continue;
        }
        if (r.kind == KD_HM_HEADER && !q->started && r.status_code == 101 && q->upgrade != NULL) {
            bool ok = switch_protocols(q, &r);
            chunk_done(q, c);
            if (!ok)
                up_broke(q);
            else
                pump_upgraded(q);
            return;
        }
        bool ok = (r.kind == KD_HM_HEADER && !q->started && start_answer(q, &r)) ||
                  (r.kind == KD_HM_DATA && q->started) || (r.kind == KD_HM_TRAILER && q->started);
        chunk_done(q, c); /* upgrade data without a 101: out of order like the rest */
        if (!ok) {
            agent_broke(q);
            break;
        }
        if (r.kind == KD_HM_TRAILER) {
            kd_httpd_send(q->req, NULL, 0, true);
            http_done(q);
        }
    }
    if (q->got_end && q->head == NULL && q->inflight == NULL && !q->finished)
        finish_without_trailer(q);
}

static void on_event(void *ud, int ev)
{
    struct kreq *q = ud;
    if (ev == KD_HTTPD_PROCEED) {
        complete_inflight(q);
        pump(q);
    } else {
        /* GONE: the client left (or its connection broke) before the answer was complete; h2o freed
         * its request, the handle is still ours to release. */
        client_gone(q);
    }
    maybe_free(q);
}

/* The upgraded connection's events. */
static void on_up(void *ud, int ev, const uint8_t *data, size_t len)
{
    struct kreq *q = ud;
    switch (ev) {
    case KD_HTTPD_UP_OPEN:
        q->up_open = true;
        pump(q);
        break;
    case KD_HTTPD_UP_DATA:
        while (len > 0 && !q->got_end) {
            size_t n = len < BODY_CHUNK ? len : BODY_CHUNK;
            size_t sz = kd_hm_upgrade_size(n);
            struct kd_rt_blob *d = payload(q->k, sizeof(*d) + sz);
            d->len = (uint32_t)sz;
            kd_hm_put_upgrade(d->data, data, n);
            send_msg(q, KD_RT_DATA, d, q->back, 0);
            q->req_unacked += sz;
            data += n;
            len -= n;
        }
        if (q->req_unacked > KD_RT_WINDOW && !q->read_held && q->up != NULL) {
            q->read_held = true; /* the agent is slower than the client */
            kd_httpd_up_read(q->up, false);
        }
        break;
    case KD_HTTPD_UP_EOF:
        if (!q->got_end && !q->up_eof_sent) {
            q->up_eof_sent = true;
            send_msg(q, KD_RT_HALF_CLOSE, NULL, q->back, 0);
        }
        break;
    case KD_HTTPD_UP_ERROR:
        up_broke(q);
        break;
    case KD_HTTPD_UP_WRITTEN:
        complete_inflight(q);
        pump(q);
        break;
    default:
        break;
    }
    maybe_free(q);
}

/* ---- router messages ---- */

bool kd_kubeapi_on_message(struct kd_kubeapi *k, const struct kd_msg *m)
{
    if (m->type < KD_RT_BOUND || m->type > KD_RT_ACK_REQ)
        return false;
    struct kreq *q = m->ptr2;
    switch (m->type) {
    case KD_RT_BOUND:
        q->back = m->ptr;
        q->bound = true;
        q->o = m->from;
        if (q->req == NULL) {
            /* gone while waiting: its CANCEL_WAIT crossed BOUND */
            send_msg(q, KD_RT_CANCEL, NULL, q->back, 0);
            break;
        }
        send_blob(q, q->hdr, q->hdr_len);
        free(q->hdr);
        q->hdr = NULL;
        push_body(q);
        break;
    case KD_RT_HEADER:
        release(k, m->ptr); /* the agent's gRPC headers: nothing for the HTTP client */
        break;
    case KD_RT_RDATA: {
        struct kd_rt_blob *b = m->ptr;
        if ((q->finished && q->up == NULL) || q->got_end) {
            uint32_t len = b->len;
            release(k, b);
            ack(q, len);
            break;
        }
        struct chunk *c = malloc(sizeof(*c));
        if (c == NULL)
            abort();
        c->next = NULL;
        c->blob = b;
        if (q->tail)
            q->tail->next = c;
        else
            q->head = c;
        q->tail = c;
        pump(q);
        break;
    }
    case KD_RT_END: {
        struct kd_rt_end *e = m->ptr;
        q->got_end = true;
        q->end_status = (int)m->u32;
        size_t ml = e->msg_len < sizeof(q->end_msg) - 1 ? e->msg_len : sizeof(q->end_msg) - 1;
        memcpy(q->end_msg, e->data, ml);
        q->end_msg[ml] = '\0';
        release(k, e);
        if (q->bound)
            send_msg(q, KD_RT_FRONT_DONE, NULL, q->back, 0);
        pump(q);
        break;
    }
    case KD_RT_ACK_REQ:
        q->req_unacked -= m->u64 < q->req_unacked ? m->u64 : q->req_unacked;
        push_body(q);
        if (q->read_held && q->req_unacked < KD_RT_WINDOW / 2 && q->up != NULL) {
            q->read_held = false;
            kd_httpd_up_read(q->up, true);
        }
        break;
    default:
        break;
    }
    maybe_free(q);
    return true;
}

/* ---- requests ---- */

static bool header_get(struct kd_httpd_req *req, const char *name, struct kd_httpd_header *out, size_t *count)
{
    size_t nl = strlen(name), c = 0;
    struct kd_httpd_header h;
    for (size_t i = 0; kd_httpd_req_header(req, i, &h); i++)
        if (h.name_len == nl && strncasecmp(h.name, name, nl) == 0) {
            if (c++ == 0)
                *out = h;
        }
    if (count)
        *count = c;
    return c > 0;
}

static bool origin_allowed(const struct kd_kubeapi *k, const char *o, size_t len)
{
    for (size_t i = 0; i < k->cfg.norigins; i++)
        if (strlen(k->cfg.origins[i]) == len && memcmp(k->cfg.origins[i], o, len) == 0)
            return true;
    return false;
}

/* "Bearer <pat|ci>:<agent id>:<token>" -> agent id and token. */
static const char *parse_credential(const struct kd_httpd_header *h, int64_t *agent_id, const char **tok,
                                    size_t *tlen)
{
    const char *v = h->value, *end = v + h->value_len;
    if (h->value_len < 7 || strncasecmp(v, "Bearer ", 7) != 0)
        return "authorization header: expected Bearer <type>:<agent id>:<token>";
    v += 7;
    const char *c1 = memchr(v, ':', (size_t)(end - v));
    if (c1 == NULL)
        return "authorization header: expected Bearer <type>:<agent id>:<token>";
    if (!((c1 - v == 3 && memcmp(v, "pat", 3) == 0) || (c1 - v == 2 && memcmp(v, "ci", 2) == 0)))
        return "authorization header: unknown token type (expected pat or ci)";
    const char *id = c1 + 1;
    const char *c2 = memchr(id, ':', (size_t)(end - id));
    if (c2 == NULL)
        return "authorization header: expected Bearer <type>:<agent id>:<token>";
    int64_t a = 0;
    bool ok = c2 > id && c2 - id <= 18;
    for (const char *p = id; ok && p < c2; p++) {
        ok = *p >= '0' && *p <= '9';
        a = a * 10 + (*p - '0');
    }
    if (!ok || a <= 0)
        return "authorization header: invalid agent id";
    if (c2 + 1 == end)
        return "authorization header: empty token";
    *agent_id = a;
    *tok = c2 + 1;
    *tlen = (size_t)(end - c2 - 1);
    return NULL;
}

static void unauthorized(struct kreq *q, const char *why)
{
    q->k->stats.unauthorized++;
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "kubernetes_api_unauthorized");
    kd_log_str(&l, "reason", why);
    kd_log_end(&l);
    status_answer(q, 401, "Unauthorized");
}

/* The credential is good: the request becomes a routed call (its header message now, sent at
 * BOUND; START to the agent's owner shard). false: answered with an error (the caller frees q). */
static bool route_request(struct kreq *q, const struct kd_hm_imp *imp)
{
    struct kd_kubeapi *k = q->k;
    struct kd_httpd_req *req = q->req;
    struct kd_httpd_header h;
    if (req == NULL)
        return false; /* gone while its credential was checked */
    const char *raw, *query;
    size_t rawlen, qlen;
    kd_httpd_req_target(req, &raw, &rawlen, &query, &qlen);
    size_t keep = k->prefix_len - 1; /* keep the prefix's last '/' */
    char *url_path = malloc(rawlen - keep + 1);
    long ulen = url_path ? kd_hm_path_decode(raw + keep, rawlen - keep, url_path) : -1;
    if (ulen < 0) {
        free(url_path);
        k->stats.bad_requests++;
        status_answer(q, 400, "Bad request: invalid percent-encoding in the URL path");
        return false;
    }
    q->upgrade = kd_httpd_req_upgrade_value(req, &q->upgrade_len);
    if (q->upgrade == NULL && header_get(req, "upgrade", &h, NULL)) {
        free(url_path);
        k->stats.bad_requests++;
        status_answer(q, 400, "Bad request: a protocol upgrade needs HTTP/1.1");
        return false;
    }

    /* The header message, sent at BOUND. */
    struct kd_hm_header hs[256];
    size_t nh = 0;
    for (size_t i = 0; nh < 256 && kd_httpd_req_header(req, i, &h); i++)
        hs[nh++] = (struct kd_hm_header){h.name, h.name_len, h.value, h.value_len};
    const uint8_t *body;
    size_t blen;
    kd_httpd_req_body(req, &body, &blen);
    struct kd_hm_request rq = {
        .method = q->method,
        .method_len = q->mlen,
        .url_path = url_path,
        .url_path_len = (size_t)ulen,
        .query = query,
        .query_len = qlen,
        .headers = hs,
        .nheaders = nh,
        .via = k->cfg.via,
        .upgrade = q->upgrade,
        .upgrade_len = q->upgrade_len,
        .imp = imp,
        .content_length = (int64_t)blen,
    };
    int rc = kd_hm_encode_request_header(&rq, k->cfg.max_header_message, &q->hdr, &q->hdr_len);
    free(url_path);
    if (rc < 0) {
        k->stats.bad_requests++;
        status_answer(q, rc == -E2BIG ? 431 : 503, "%s",
                      rc == -E2BIG ? "Request header fields too large" : "out of memory");
        return false;
    }

    /* START, as an api-listener call would. */
    q->o = kd_hash_owner((uint64_t)q->agent_id, k->n);
    size_t ml = sizeof(MAKE_REQUEST) - 1;
    struct kd_rt_start *st = payload(k, sizeof(*st) + ml);
    memset(st, 0, sizeof(*st));
    st->agent_id = q->agent_id;
    st->deadline_ms = kd_clock_ms() + k->cfg.routing_timeout_ms;
    st->method_len = (uint32_t)ml;
    st->md_len = 0;
    st->flags = 0;
    st->reply_to = k->self;
    memcpy(st->data, MAKE_REQUEST, ml);
    q->got_end = false;
    kd_httpd_watch(req, on_event, q);
    send_msg(q, KD_RT_START, st, q, (uint64_t)q->agent_id);
    return true;
}

/* GitLab's answer for the request's credential (kd_gitlab_authorize). */
static void on_authorized(void *ud, const struct kd_gitlab_auth *a)
{
    struct kreq *q = ud;
    struct kd_kubeapi *k = q->k;
    q->auth_wait = NULL;
    bool ok = false;
    if (q->req == NULL) {
        /* the client left while GitLab was asked */
    } else if (kd_kubeapi_stopping(k)) {
        k->stats.failed++;
        status_answer(q, 503, "kasd is stopping"); /* no START to shards that may be gone */
    } else if (a->status == 401) {
        unauthorized(q, "GitLab refused the credential");
    } else if (a->status == 403) {
        k->stats.forbidden++;
        status_answer(q, 403, "%s", a->why && a->why[0] ? a->why : "Forbidden: agentId is not allowed");
    } else if (a->status != 200) {
        k->stats.failed++;
        status_answer(q, 503, "GitLab unavailable: %s", a->why ? a->why : "");
    } else {
        struct kd_hm_imp imp = {
            .username = a->username, .groups = a->groups, .ngroups = a->ngroups, .uid = a->uid};
        ok = route_request(q, &imp);
    }
    if (!ok) {
        if (q->in_auth)
            q->free_after_auth = true;
        else
            kreq_free(q);
    }
}

void kd_kubeapi_set_gitlab(struct kd_kubeapi *k, struct kd_gitlab *g)
{
    k->gitlab = g;
}

void kd_kubeapi_on_request(void *ud, struct kd_httpd_req *req, const char *method, size_t mlen,
                           const char *path, size_t plen)
{
    (void)path;
    (void)plen;
    struct kd_kubeapi *k = ud;
    struct kreq *q = calloc(1, sizeof(*q));
    if (q == NULL) {
        kd_httpd_respond(req, 503, "text/plain; charset=utf-8", "out of memory\n", 14);
        return;
    }
    q->k = k;
    q->req = req;
    q->next = k->all;
    if (k->all)
        k->all->prev = q;
    k->all = q;
    k->stats.requests++;
    k->stats.active++;
    q->got_end = true; /* until START is sent, nothing is owed by a shard */

    if (kd_kubeapi_stopping(k)) {
        k->stats.failed++;
        status_answer(q, 503, "kasd is stopping");
        kreq_free(q);
        return;
    }

    /* CORS: an Origin must be allowed; a preflight is answered here. */
    struct kd_httpd_header h;
    if (header_get(req, "origin", &h, NULL)) {
        if (!origin_allowed(k, h.value, h.value_len) || h.value_len >= sizeof(q->origin)) {
            k->stats.forbidden++;
            kd_httpd_respond(req, 403, "text/plain; charset=utf-8", "", 0);
            q->req = NULL;
            kreq_free(q);
            return;
        }
        memcpy(q->origin, h.value, h.value_len);
        q->cors = true;
        if (mlen == 7 && memcmp(method, "OPTIONS", 7) == 0) {
            struct kd_httpd_header ph[MAX_CORS_HEADERS + 3];
            size_t n = cors_headers(q, ph);
            struct kd_httpd_header rh;
            if (header_get(req, "access-control-request-headers", &rh, NULL))
                ph[n++] =
                    (struct kd_httpd_header){"access-control-allow-headers", 28, rh.value, rh.value_len};
            static const char methods[] = "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH";
            ph[n++] =
                (struct kd_httpd_header){"access-control-allow-methods", 28, methods, sizeof(methods) - 1};
            ph[n++] = (struct kd_httpd_header){"access-control-max-age", 22, "86400", 5};
            kd_httpd_respond_headers(req, 200, "text/plain; charset=utf-8", ph, n, "", 0);
            q->req = NULL;
            kreq_free(q);
            return;
        }
    }

    /* The prefix. */
    const char *raw, *query;
    size_t rawlen, qlen;
    kd_httpd_req_target(req, &raw, &rawlen, &query, &qlen);
    if (rawlen < k->prefix_len || memcmp(raw, k->cfg.prefix, k->prefix_len) != 0) {
        k->stats.bad_requests++;
        status_answer(q, 400, "Bad request: URL does not start with expected prefix %s", k->cfg.prefix);
        kreq_free(q);
        return;
    }

    /* The credential: exactly one Authorization header. */
    size_t nauth = 0;
    const char *why = NULL, *tok = NULL;
    size_t tlen = 0;
    int64_t agent_id = 0;
    if (!header_get(req, "authorization", &h, &nauth) || nauth != 1)
        why = nauth == 0 ? "no valid credentials provided" : "more than one authorization header";
    else
        why = parse_credential(&h, &agent_id, &tok, &tlen);
    q->agent_id = agent_id;
    q->method = method;
    q->mlen = mlen;
    if (why == NULL && k->cfg.authorize == NULL && k->gitlab != NULL) {
        /* GitLab decides: the request waits (GONE is watched meanwhile). */
        bool pat = h.value_len > 7 + 3 && memcmp(h.value + 7, "pat", 3) == 0;
        q->in_auth = true;
        kd_httpd_watch(req, on_event, q);
        kd_gitlab_authorize(k->gitlab, pat ? KD_GITLAB_PAT : KD_GITLAB_CI, tok, tlen, agent_id, on_authorized,
                            q, &q->auth_wait);
        q->in_auth = false;
        if (q->free_after_auth)
            kreq_free(q);
        return;
    }
    struct kd_hm_imp imp = {0};
    int arc = -ENOENT;
    if (why == NULL && k->cfg.authorize != NULL)
        arc = k->cfg.authorize(k->cfg.authorize_ud, tok, tlen, agent_id, &imp);
    if (why != NULL || arc == -ENOENT) {
        unauthorized(q, why ? why : "unknown token");
        kreq_free(q);
        return;
    }
    if (arc != 0) {
        k->stats.forbidden++;
        status_answer(q, 403, "Forbidden: agentId is not allowed");
        kreq_free(q);
        return;
    }
    if (!route_request(q, &imp))
        kreq_free(q);
}

int kd_kubeapi_create(struct kd_server *srv, const struct kd_kubeapi_cfg *cfg, struct kd_kubeapi **out)
{
    struct kd_kubeapi *k = calloc(1, sizeof(*k));
    if (k == NULL)
        return -ENOMEM;
    k->srv = srv;
    k->router = kd_server_router(srv);
    k->n = kd_server_nshards(srv);
    k->self = k->n;
    k->cfg = *cfg;
    if (k->cfg.prefix == NULL)
        k->cfg.prefix = "/k8s-proxy/";
    if (k->cfg.via == NULL)
        k->cfg.via = "gRPC/1.0 kasd";
    if (k->cfg.max_header_message == 0)
        k->cfg.max_header_message = 4u << 20;
    k->prefix_len = strlen(k->cfg.prefix);
    *out = k;
    return 0;
}

bool kd_kubeapi_stopping(const struct kd_kubeapi *k)
{
    return atomic_load_explicit(&k->srv->stopping, memory_order_acquire);
}

void kd_kubeapi_stats(const struct kd_kubeapi *k, struct kd_kubeapi_stats *out)
{
    *out = k->stats;
}

void kd_kubeapi_destroy(struct kd_kubeapi *k)
{
    if (k == NULL)
        return;
    while (k->all != NULL) {
        struct kreq *q = k->all;
        if (q->req != NULL && !q->finished) {
            if (q->started)
                kd_httpd_abort(q->req);
            else
                status_answer(q, 503, "kasd is stopping");
        }
        http_done(q);
        kreq_free(q);
    }
    free(k);
}

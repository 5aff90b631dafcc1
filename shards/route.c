/* route.c — the front half of a routed call, on the shard that accepted GitLab's call (api
 * listener): authentication, the routing metadata, and the relay with the back half on the
 * agent's owner shard. See kas.h for the protocol and the life rules. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/base64.h"
#include "core/chunkpool.h"
#include "core/clock.h"
#include "core/hash.h"
#include "core/jwt.h"
#include "core/log.h"
#include "shards/conn.h"
#include "shards/kas.h"
#include "shards/tunnel_codec.h"

#define ROUTING_HEADER "kas-hop-routing-agent-id"

struct pmsg {
    struct pmsg *next;
    size_t len;
    uint8_t data[];
};

struct front {
    kd_grpc_call *call; /* NULL once GitLab's call is over */
    struct kd_shard *s;
    unsigned o;
    int64_t agent_id;
    void *back; /* from BOUND */
    bool bound, got_end, half_close_pending, held;
    bool gateway; /* a kas-to-kas call (private listener): see KD_RT_START_GATEWAY */
    char instance_id[17]; /* gateway: this instance's id, told in the "ready" headers */
    uint64_t req_unacked;
    uint64_t resp_owed;
    struct pmsg *head, *tail; /* request messages that arrived before BOUND */
};

static void post(struct front *f, uint16_t type, void *ptr, void *ptr2, uint64_t u64)
{
    struct kd_msg m = {.type = type, .u64 = u64, .ptr = ptr, .ptr2 = ptr2};
    kd_shard_post(f->s, f->o, &m);
}

static void front_free(struct front *f)
{
    struct pmsg *p = f->head;
    while (p != NULL) {
        struct pmsg *n = p->next;
        kd_chunkpool_free(p);
        p = n;
    }
    kd_chunkpool_free(f);
}

static void send_data(struct front *f, const uint8_t *msg, size_t len)
{
    struct kd_rt_blob *d = kd_kas_payload(f->s, sizeof(*d) + len);
    d->len = (uint32_t)len;
    memcpy(d->data, msg, len);
    post(f, KD_RT_DATA, d, f->back, 0);
    f->req_unacked += len;
    if (!f->held && f->req_unacked > KD_RT_WINDOW && f->call != NULL) {
        f->held = true; /* the agent is slower than GitLab: let HTTP/2 flow control push back */
        kd_grpc_hold_input(f->call, true);
    }
}

/* ---- metadata: HTTP/2 headers <-> md blob ---- */

static bool ends_with_bin(const char *k, size_t n)
{
    return n > 4 && memcmp(k + n - 4, "-bin", 4) == 0;
}

/* Headers that are HTTP/2 or gRPC transport, not call metadata, in either direction. */
static bool transport_header(const char *k, size_t n)
{
    static const char *const names[] = {
        "content-type", "te",           "grpc-timeout",    "grpc-encoding", "grpc-accept-encoding",
        "grpc-status",  "grpc-message", "connection",      "keep-alive",    "transfer-encoding",
        "upgrade",      "host",         "proxy-connection"};
    if (n > 0 && k[0] == ':')
        return true;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strlen(names[i]) == n && memcmp(names[i], k, n) == 0)
            return true;
    return false;
}

/* The caller's metadata for RequestInfo.meta (kas.h): everything but transport headers, kas-hop-*
 * and the caller's authorization; -bin values decoded to raw bytes. Values of one key stay together
 * (a protobuf map keeps only the last entry of a key). Returns a kd_chunkpool_malloc'd blob or NULL. */
uint8_t *kd_kas_request_md_blob(kd_kas_header_fn get, void *ud, size_t *out_len)
{
    struct kd_h2_header h, h2;
    size_t cap = 64, len = 0;
    uint8_t *blob = kd_chunkpool_malloc(cap);
    if (blob == NULL)
        return NULL;
    for (size_t i = 0; get(ud, i, &h); i++) {
        if (transport_header(h.name, h.namelen) || (h.namelen >= 8 && memcmp(h.name, "kas-hop-", 8) == 0) ||
            (h.namelen == 13 && memcmp(h.name, "authorization", 13) == 0))
            continue;
        /* first occurrence of this key only; gather all its values */
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            if (get(ud, j, &h2) && h2.namelen == h.namelen && memcmp(h2.name, h.name, h.namelen) == 0)
                seen = true;
        if (seen)
            continue;
        const uint8_t *vals[64];
        size_t vlens[64], nv = 0, total = 0;
        uint8_t *decoded[64];
        bool bin = ends_with_bin(h.name, h.namelen);
        for (size_t j = i; get(ud, j, &h2) && nv < 64; j++) {
            if (h2.namelen != h.namelen || memcmp(h2.name, h.name, h.namelen) != 0)
                continue;
            decoded[nv] = NULL;
            if (bin) {
                decoded[nv] = kd_chunkpool_malloc(h2.valuelen + 1);
                /* as grpc-go reads binary metadata: standard alphabet, padding optional */
                long dl = decoded[nv] ? kd_base64_decode(h2.value, h2.valuelen, decoded[nv], h2.valuelen + 1, 0)
                                      : -1;
                if (dl < 0) {
                    kd_chunkpool_free(decoded[nv]);
                    continue; /* not base64: not a value grpc would have sent; drop it */
                }
                vals[nv] = decoded[nv];
                vlens[nv] = (size_t)dl;
            } else {
                vals[nv] = (const uint8_t *)h2.value;
                vlens[nv] = h2.valuelen;
            }
            total += vlens[nv];
            nv++;
        }
        size_t need = kd_tun_blob_entry_size(h.namelen, vlens, nv);
        if (len + need > cap) {
            while (cap < len + need)
                cap *= 2;
            uint8_t *nb = kd_chunkpool_realloc(blob, cap);
            if (nb == NULL) {
                for (size_t j = 0; j < nv; j++)
                    kd_chunkpool_free(decoded[j]);
                kd_chunkpool_free(blob);
                return NULL;
            }
            blob = nb;
        }
        len = (size_t)(kd_tun_blob_put_entry(blob + len, h.name, h.namelen, vals, vlens, nv) - blob);
        for (size_t j = 0; j < nv; j++)
            kd_chunkpool_free(decoded[j]);
        (void)total;
    }
    *out_len = len;
    return blob;
}

struct md_out {
    struct kd_h2_header *h;
    size_t n, cap;
    char *arena;
    size_t alen, acap;
    bool oom;
    const char *last_k; /* the blob key last copied, and its copy (the values of an entry share it) */
    size_t last_klen;
    char *last_kp;
};

static bool printable(const uint8_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] < 0x20 || v[i] > 0x7e)
            return false;
    return true;
}

static int md_collect(void *ud, const char *k, size_t klen, const uint8_t *v, size_t vlen)
{
    struct md_out *o = ud;
    bool bin = ends_with_bin(k, klen);
    if (transport_header(k, klen) || !kd_grpc_metadata_key_valid(k, klen) || (!bin && !printable(v, vlen)))
        return 0; /* never let an agent inject transport headers or bytes HTTP/2 forbids */
    if (o->n == o->cap || o->n >= 64)
        return 0;
    /* kd_tun_blob_each passes the same key pointer for every value of an entry: the key is copied
     * once per entry, as it is in the blob once per entry. Then the arena never needs more than twice
     * the blob: a value costs at least vlen + 2 bytes there and at most (vlen + 2) / 3 * 4 here, a key
     * klen + 2 there and klen here. (Copied per value, a long key with many short values overflowed
     * the arena and values were dropped.) */
    bool same = k == o->last_k && klen == o->last_klen;
    size_t need = (same ? 0 : klen) + (bin ? (vlen + 2) / 3 * 4 : vlen);
    if (o->alen + need > o->acap) {
        o->oom = true;
        return 0;
    }
    char *kp = same ? o->last_kp : o->arena + o->alen;
    if (!same) {
        memcpy(kp, k, klen);
        o->alen += klen;
        o->last_k = k;
        o->last_klen = klen;
        o->last_kp = kp;
    }
    char *vp = o->arena + o->alen;
    size_t vl = bin ? kd_base64_encode_ex(v, vlen, vp, KD_B64_NOPAD) : (memcpy(vp, v, vlen), vlen);
    o->alen += vl;
    o->h[o->n++] = (struct kd_h2_header){kp, klen, vp, vl};
    return 0;
}

/* md blob -> headers; arena sized 2x the blob (why that is enough: md_collect). Caller frees o->arena. */
static void blob_to_headers(const uint8_t *blob, size_t len, struct md_out *o, struct kd_h2_header *h,
                            size_t cap)
{
    memset(o, 0, sizeof(*o));
    o->h = h;
    o->cap = cap;
    o->acap = len * 2 + 16;
    o->arena = kd_chunkpool_malloc(o->acap);
    if (o->arena == NULL)
        return;
    kd_tun_blob_each(blob, len, md_collect, o);
}

size_t kd_kas_md_headers(const uint8_t *blob, size_t len, struct kd_h2_header *h, size_t cap, char **arena)
{
    struct md_out o;
    blob_to_headers(blob, len, &o, h, cap);
    *arena = o.arena;
    return o.arena != NULL ? o.n : 0;
}

/* ---- GitLab's call ---- */

static int front_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct front *f = kd_h2_call_user(call);
    if (f->got_end)
        return 0;
    if (f->bound) {
        send_data(f, msg, len);
        return 0;
    }
    struct pmsg *p = kd_chunkpool_malloc(sizeof(*p) + len);
    if (p == NULL)
        return -ENOMEM;
    p->next = NULL;
    p->len = len;
    memcpy(p->data, msg, len);
    if (f->tail)
        f->tail->next = p;
    else
        f->head = p;
    f->tail = p;
    return 0;
}

static void front_half_close(kd_grpc_call *call)
{
    struct front *f = kd_h2_call_user(call);
    if (f->got_end)
        return;
    if (f->bound)
        post(f, KD_RT_HALF_CLOSE, NULL, f->back, 0);
    else
        f->half_close_pending = true;
}

static void front_writable(kd_grpc_call *call)
{
    struct front *f = kd_h2_call_user(call);
    if (f->resp_owed > 0 && f->bound && !f->got_end)
        post(f, KD_RT_ACK_RESP, NULL, f->back, f->resp_owed);
    f->resp_owed = 0;
}

static void front_done(kd_grpc_call *call, int status, const char *message)
{
    struct front *f = kd_h2_call_user(call);
    f->call = NULL;
    if (f->got_end) {
        front_free(f);
        return;
    }
    /* GitLab went away (cancelled, deadline, connection lost): cancel on the agent's side. */
    if (f->bound)
        post(f, KD_RT_CANCEL, NULL, f->back, 0);
    else
        post(f, KD_RT_CANCEL_WAIT, NULL, f, (uint64_t)f->agent_id);
}

static const struct kd_h2_handler front_handler = {
    .on_message = front_message,
    .on_half_close = front_half_close,
    .on_writable = front_writable,
    .on_done = front_done,
};

void kd_kas_front_message(struct kd_shard *s, const struct kd_msg *m)
{
    struct front *f = m->ptr2;
    switch (m->type) {
    case KD_RT_BOUND: {
        f->back = m->ptr;
        f->bound = true;
        f->o = m->from; /* the owner, or a holder shard the owner handed the call to */
        struct pmsg *p = f->head;
        f->head = f->tail = NULL;
        while (p != NULL) {
            struct pmsg *n = p->next;
            if (f->call != NULL)
                send_data(f, p->data, p->len);
            kd_chunkpool_free(p);
            p = n;
        }
        if (f->call == NULL) {
            post(f, KD_RT_CANCEL, NULL, f->back, 0);
        } else {
            if (f->gateway) {
                /* "tunnel ready": the routing instance sends the request only after this. */
                const char *id = f->instance_id;
                struct kd_h2_header h[2] = {
                    {"kas-hop-gateway", 15, "ready", 5},
                    {"kas-hop-instance", 16, id, strlen(id)},
                };
                kd_grpc_send_headers(f->call, h, 2);
            }
            if (f->half_close_pending)
                post(f, KD_RT_HALF_CLOSE, NULL, f->back, 0);
            if (!f->held)
                kd_grpc_hold_input(f->call, false);
        }
        break;
    }
    case KD_RT_HEADER: {
        struct kd_rt_blob *b = m->ptr;
        if (f->call != NULL && !f->got_end) {
            struct kd_h2_header h[64];
            struct md_out o;
            blob_to_headers(b->data, b->len, &o, h, 64);
            kd_grpc_send_headers(f->call, o.h, o.n);
            kd_chunkpool_free(o.arena);
        }
        kd_kas_release(s, b);
        break;
    }
    case KD_RT_RDATA: {
        struct kd_rt_blob *d = m->ptr;
        uint32_t len = d->len;
        int rc = 0;
        if (f->call != NULL && !f->got_end)
            rc = kd_grpc_send_message(f->call, d->data, len);
        kd_kas_release(s, d);
        if (rc == 1)
            f->resp_owed += len; /* acknowledged when GitLab's window lets it drain */
        else if (!f->got_end)
            post(f, KD_RT_ACK_RESP, NULL, f->back, len);
        break;
    }
    case KD_RT_END: {
        struct kd_rt_end *e = m->ptr;
        f->got_end = true;
        if (f->call != NULL) {
            char msg[1024];
            size_t ml = e->msg_len < sizeof(msg) - 1 ? e->msg_len : sizeof(msg) - 1;
            memcpy(msg, e->data, ml);
            msg[ml] = '\0';
            struct kd_h2_header h[64];
            struct md_out o;
            if (f->gateway && !f->bound) {
                /* Ended before a tunnel was bound: nothing was delivered; the routing instance may
                 * try another one. */
                static const struct kd_h2_header nt = {"kas-hop-gateway", 15, "no-tunnel", 9};
                kd_grpc_finish(f->call, (int)m->u32, ml ? msg : NULL, &nt, 1);
            } else {
                blob_to_headers((const uint8_t *)e->data + e->msg_len, e->md_len, &o, h, 64);
                kd_grpc_finish(f->call, (int)m->u32, ml ? msg : NULL, o.h, o.n);
                kd_chunkpool_free(o.arena);
            }
        }
        kd_kas_release(s, e);
        if (f->bound)
            post(f, KD_RT_FRONT_DONE, NULL, f->back, 0);
        if (f->call == NULL)
            front_free(f);
        break;
    }
    case KD_RT_ACK_REQ:
        f->req_unacked -= m->u64 < f->req_unacked ? m->u64 : f->req_unacked;
        if (f->held && f->req_unacked < KD_RT_WINDOW / 2 && f->call != NULL) {
            f->held = false;
            kd_grpc_hold_input(f->call, false);
        }
        break;
    default:
        break;
    }
}

/* ---- the api listener's fallback: every method with kas-hop-routing-agent-id ---- */

static int reject(kd_grpc_call *call, int status, const char *msg)
{
    kd_grpc_finish(call, status, msg, NULL, 0);
    return 0;
}

int kd_kas_api_authenticate(kd_grpc_call *call)
{
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas *kas = kd_server_user(s->srv);
    size_t tlen;
    const char *tok = kd_kas_bearer(call, &tlen);
    char why[160];
    if (kas->api_secret_len == 0) {
        kd_log_msg(KD_LOG_WARN, "api_auth_failed", "no api.listen.authentication_secret_file configured");
        kd_kas_count_api_auth_failure(s);
        reject(call, KD_GRPC_UNAUTHENTICATED, "unauthenticated");
        return -1;
    }
    struct kd_jwt_opts jo = {
        .secret = kas->api_secret,
        .secret_len = kas->api_secret_len,
        .audience = "gitlab-kas",
        .issuer = NULL, /* GitLab puts its own host there; GitLab kas does not check it */
        .leeway = 5,
        .now = (int64_t)time(NULL),
    };
    struct kd_jwt_claims claims;
    if (tok == NULL ||
        kd_jwt_cache_verify(kd_kas_api_jwt_cache(kd_conn_shard(kd_grpc_call_conn(call))), tok, tlen, &jo, &claims, why, sizeof(why)) < 0) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "api_auth_failed");
        kd_log_str(&l, "reason", tok == NULL ? "missing bearer token" : why);
        kd_log_str(&l, "method", kd_h2_call_path(call));
        kd_log_end(&l);
        kd_kas_count_api_auth_failure(s);
        reject(call, KD_GRPC_UNAUTHENTICATED, "unauthenticated");
        return -1;
    }
    return 0;
}

/* The kas-hop-* metadata (kas.h). */
int kd_kas_parse_hop(kd_kas_header_fn get, void *ud, bool gateway, struct kd_kas_hop *out, const char **why)
{
    struct kd_h2_header h;
    size_t count = 0, nmethod = 0, ninst = 0;
    memset(out, 0, sizeof(*out));
    const char *idv = NULL;
    size_t idlen = 0;
    for (size_t i = 0; get(ud, i, &h); i++) {
        if (h.namelen == sizeof(ROUTING_HEADER) - 1 && memcmp(h.name, ROUTING_HEADER, h.namelen) == 0) {
            idv = h.value;
            idlen = h.valuelen;
            count++;
        } else if (gateway && h.namelen == 14 && memcmp(h.name, "kas-hop-method", 14) == 0) {
            out->method = h.value;
            out->method_len = h.valuelen;
            nmethod++;
        } else if (gateway && h.namelen == 16 && memcmp(h.name, "kas-hop-instance", 16) == 0) {
            out->instance = h.value;
            out->instance_len = h.valuelen;
            ninst++;
        }
    }
    if (count != 1) {
        *why = count == 0 ? "missing " ROUTING_HEADER " metadata" : "repeated " ROUTING_HEADER " metadata";
        return KD_GRPC_INVALID_ARGUMENT;
    }
    int64_t agent_id = 0;
    bool digits = idlen > 0 && idlen <= 18;
    for (size_t i = 0; digits && i < idlen; i++) {
        if (idv[i] < '0' || idv[i] > '9')
            digits = false;
        else
            agent_id = agent_id * 10 + (idv[i] - '0');
    }
    if (!digits) {
        *why = "invalid " ROUTING_HEADER ": not a decimal agent id";
        return KD_GRPC_INVALID_ARGUMENT;
    }
    if (agent_id <= 0) {
        *why = "invalid " ROUTING_HEADER ": agent ids are positive";
        return KD_GRPC_INVALID_ARGUMENT;
    }
    out->agent_id = agent_id;
    if (!gateway)
        return 0;
    bool ok = nmethod == 1 && out->method_len >= 3 && out->method_len <= 1024 && out->method[0] == '/';
    for (size_t i = 0; ok && i < out->method_len; i++)
        ok = out->method[i] > 0x20 && out->method[i] < 0x7f;
    if (!ok) {
        *why = "missing, repeated or invalid kas-hop-method metadata";
        return KD_GRPC_INVALID_ARGUMENT;
    }
    bool hex = ninst == 1 && out->instance_len == 16;
    for (size_t i = 0; hex && i < 16; i++)
        hex = (out->instance[i] >= '0' && out->instance[i] <= '9') || (out->instance[i] >= 'a' && out->instance[i] <= 'f');
    if (!hex) {
        *why = "missing, repeated or invalid kas-hop-instance metadata (16 hex digits)";
        return KD_GRPC_INVALID_ARGUMENT;
    }
    return 0;
}

static bool call_header(void *ud, size_t i, struct kd_h2_header *out)
{
    return kd_h2_call_header(ud, i, out);
}

/* Accept the call as the front half of a routed call for agent_id/method and send START to the
 * agent's owner shard. */
static int start_routed(kd_grpc_call *call, int64_t agent_id, const char *path, size_t plen, uint32_t flags)
{
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas *kas = kd_server_user(s->srv);

    /* Deadline: the caller's, capped; the wait ends a little before the call's own expiry so
     * the caller hears "agent connection not found" rather than a bare deadline. */
    uint64_t now = kd_shard_now_ms(s);
    uint64_t deadline = now + kas->routing_timeout_ms;
    uint64_t cd = kd_h2_call_deadline(call);
    if (cd != 0) {
        uint64_t cdm = cd / 1000;
        cdm = cdm > 5 ? cdm - 5 : 0;
        if (cdm < deadline)
            deadline = cdm;
    }

    size_t mdlen = 0;
    uint8_t *md = kd_kas_request_md_blob(call_header, call, &mdlen);
    struct front *f = kd_chunkpool_calloc(1, sizeof(*f));
    if (md == NULL || f == NULL) {
        kd_chunkpool_free(md);
        kd_chunkpool_free(f);
        return reject(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory");
    }
    struct kd_rt_start *st = kd_kas_payload(s, sizeof(*st) + plen + mdlen);
    st->agent_id = agent_id;
    st->deadline_ms = deadline;
    st->method_len = (uint32_t)plen;
    st->md_len = (uint32_t)mdlen;
    st->flags = flags;
    st->reply_to = kd_shard_id(s);
    st->tried = 0;
    st->relay_id = 0;
    memcpy(st->data, path, plen);
    memcpy(st->data + plen, md, mdlen);
    kd_chunkpool_free(md);

    f->call = call;
    f->s = s;
    f->agent_id = agent_id;
    f->gateway = (flags & KD_RT_START_GATEWAY) != 0;
    if (f->gateway && kas->tracker != NULL)
        memcpy(f->instance_id, kas->tracker->instance_id, sizeof(f->instance_id));
    f->o = kd_hash_owner((uint64_t)agent_id, kas->nshards);
    kd_grpc_accept(call, &front_handler, f);
    kd_grpc_hold_input(call, true); /* until BOUND: at most one window is buffered here */
    post(f, KD_RT_START, st, f, (uint64_t)agent_id);
    return 0;
}

static int route_start(kd_grpc_call *call, void *ud)
{
    /* 1. GitLab's JWT. */
    if (kd_kas_api_authenticate(call) != 0)
        return 0;
    /* 2. Exactly one decimal agent id. */
    struct kd_kas_hop hop;
    const char *why;
    int st = kd_kas_parse_hop(call_header, call, false, &hop, &why);
    if (st != 0)
        return reject(call, st, why);
    const char *path = kd_h2_call_path(call);
    return start_routed(call, hop.agent_id, path, strlen(path), 0);
}

const struct kd_grpc_method kd_kas_route_method = {
    .path = NULL,
    .start = route_start,
};

/* ---- the private listener: kas-to-kas calls (docs/operations.md, "Running a fleet") ---- */

/* The peers' JWT: HS256 with the fleet's private secret, issuer and audience gitlab-kas. 0, or
 * the call was answered UNAUTHENTICATED. */
static int private_authenticate(kd_grpc_call *call, const struct kd_kas *kas)
{
    size_t tlen;
    const char *tok = kd_kas_bearer(call, &tlen);
    char why[160] = "no private_api.listen.authentication_secret_file configured";
    struct kd_jwt_opts jo = {
        .secret = kas->private_secret,
        .secret_len = kas->private_secret_len,
        .audience = "gitlab-kas",
        .issuer = "gitlab-kas",
        .leeway = 5,
        .now = (int64_t)time(NULL),
    };
    if (kas->private_secret_len > 0 && tok != NULL && kd_jwt_verify(tok, tlen, &jo, NULL, why, sizeof(why)) == 0)
        return 0;
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "private_api_auth_failed");
    kd_log_str(&l, "reason", tok == NULL && kas->private_secret_len > 0 ? "missing bearer token" : why);
    kd_log_end(&l);
    kd_kas_count_api_auth_failure(kd_conn_shard(kd_grpc_call_conn(call)));
    reject(call, KD_GRPC_UNAUTHENTICATED, "unauthenticated");
    return -1;
}

static int gateway_start(kd_grpc_call *call, void *ud)
{
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_kas *kas = kd_server_user(s->srv);
    if (private_authenticate(call, kas) != 0)
        return 0;
    struct kd_kas_hop hop;
    const char *why;
    int st = kd_kas_parse_hop(call_header, call, true, &hop, &why);
    if (st != 0)
        return reject(call, st, why);
    /* The instance the caller meant: an address that moved to another instance (a restart, a
     * wrong advertise_address) must not receive calls meant for the old one. */
    if (kas->tracker == NULL || memcmp(hop.instance, kas->tracker->instance_id, 16) != 0)
        return reject(call, KD_GRPC_FAILED_PRECONDITION, "kas-hop-instance does not name this kasd instance");
    return start_routed(call, hop.agent_id, hop.method, hop.method_len, KD_RT_START_GATEWAY);
}

const struct kd_grpc_method kd_kas_gateway_method = {
    .path = "/kasd.fleet.v1.Gateway/Tunnel",
    .start = gateway_start,
};

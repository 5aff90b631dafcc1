/* httpmap.c — HTTP <-> KubernetesApi/MakeRequest messages (contract in httpmap.h). */
#include "core/httpmap.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/pb.h"

/* ---- a growable byte buffer ---- */

struct buf {
    uint8_t *p;
    size_t len, cap, max;
    int err; /* 0, -ENOMEM or -E2BIG; once set, appends do nothing */
};

static void reserve(struct buf *b, size_t n)
{
    if (b->err)
        return;
    if (b->len + n > b->max) {
        b->err = -E2BIG;
        return;
    }
    if (b->len + n <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL) {
        b->err = -ENOMEM;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void put(struct buf *b, const void *d, size_t n)
{
    reserve(b, n);
    if (!b->err && n > 0) {
        memcpy(b->p + b->len, d, n);
        b->len += n;
    }
}

static void put_varint(struct buf *b, uint64_t v)
{
    uint8_t tmp[10];
    put(b, tmp, (size_t)(kd_pb_put_varint(tmp, v) - tmp));
}

static void put_len(struct buf *b, uint32_t num, const void *d, size_t n)
{
    put_varint(b, (uint64_t)num << 3 | KD_PB_LEN);
    put_varint(b, n);
    put(b, d, n);
}

/* A nested message: its bytes were built in sub. */
static void put_sub(struct buf *b, uint32_t num, struct buf *sub)
{
    if (sub->err && !b->err)
        b->err = sub->err;
    put_len(b, num, sub->p, sub->len);
    free(sub->p);
    memset(sub, 0, sizeof(*sub));
}

static struct buf sub_of(const struct buf *b)
{
    return (struct buf){.max = b->max};
}

/* ---- names ---- */

static bool token_char(unsigned char c)
{
    if (c >= 'a' && c <= 'z')
        return true;
    if (c >= 'A' && c <= 'Z')
        return true;
    if (c >= '0' && c <= '9')
        return true;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

void kd_hm_canonical(const char *name, size_t len, char *out)
{
    for (size_t i = 0; i < len; i++)
        if (!token_char((unsigned char)name[i])) {
            memcpy(out, name, len);
            return;
        }
    bool upper = true;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        if (upper && c >= 'a' && c <= 'z')
            c = (char)(c - 32);
        else if (!upper && c >= 'A' && c <= 'Z')
            c = (char)(c + 32);
        out[i] = c;
        upper = c == '-';
    }
}

static bool name_is(const char *n, size_t len, const char *lit)
{
    return strlen(lit) == len && strncasecmp(n, lit, len) == 0;
}

/* Hop-by-hop headers (RFC 9110 7.6.1, and Go's httputil list). */
static bool hop_by_hop(const char *n, size_t len)
{
    static const char *const hop[] = {
        "connection", "proxy-connection",  "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer",    "transfer-encoding", "upgrade"};
    for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
        if (name_is(n, len, hop[i]))
            return true;
    return false;
}

/* Is name listed in one of the Connection header values? */
static bool connection_listed(const struct kd_hm_header *hs, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++) {
        if (!name_is(hs[i].name, hs[i].name_len, "connection"))
            continue;
        const char *v = hs[i].value, *end = v + hs[i].value_len;
        while (v < end) {
            while (v < end && (*v == ' ' || *v == '\t' || *v == ','))
                v++;
            const char *t = v;
            while (v < end && *v != ',' && *v != ' ' && *v != '\t')
                v++;
            if ((size_t)(v - t) == len && strncasecmp(t, name, len) == 0)
                return true;
        }
    }
    return false;
}

static bool request_header_dropped(const struct kd_hm_header *hs, size_t n, size_t i)
{
    const char *k = hs[i].name;
    size_t len = hs[i].name_len;
    if (len == 0 || k[0] == ':')
        return true; /* HTTP/2 pseudo-headers are not headers */
    static const char *const creds[] = {"host", "authorization", "cookie", "gitlab-agent-id", "x-csrf-token"};
    for (size_t j = 0; j < sizeof(creds) / sizeof(creds[0]); j++)
        if (name_is(k, len, creds[j]))
            return true;
    return hop_by_hop(k, len) || connection_listed(hs, n, k, len);
}

/* ---- request ---- */

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decoding; plus_space for query components. -1 on a bad escape. */
static long unescape(const char *in, size_t len, char *out, bool plus_space)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '%') {
            if (i + 2 >= len)
                return -1;
            int hi = hexval(in[i + 1]), lo = hexval(in[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            out[o++] = (char)(hi << 4 | lo);
            i += 2;
        } else if (c == '+' && plus_space) {
            out[o++] = ' ';
        } else {
            out[o++] = c;
        }
    }
    return (long)o;
}

long kd_hm_path_decode(const char *in, size_t len, char *out)
{
    long n = unescape(in, len, out, false);
    if (n < 0 || memchr(out, '\0', (size_t)n) != NULL)
        return -1;
    return n;
}

/* Values{value*} of one map entry, appended as map<string, Values> field num. */
static void put_map_entry(struct buf *b, uint32_t num, const char *key, size_t klen, const char *const *vals,
                          const size_t *vlens, size_t nv)
{
    struct buf entry = sub_of(b), values = sub_of(b);
    for (size_t i = 0; i < nv; i++)
        put_len(&values, 1, vals[i], vlens[i]);
    put_len(&entry, 1, key, klen);
    put_sub(&entry, 2, &values);
    put_sub(b, num, &entry);
}

#define MAX_VALUES 256

static void put_headers(struct buf *b, const struct kd_hm_request *rq)
{
    const struct kd_hm_header *hs = rq->headers;
    size_t n = rq->nheaders;
    char *canon = malloc(8192);
    if (canon == NULL) {
        b->err = -ENOMEM;
        return;
    }
    bool via_done = false;
    for (size_t i = 0; i < n && !b->err; i++) {
        if (request_header_dropped(hs, n, i) || hs[i].name_len > 8192)
            continue;
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen =
                hs[j].name_len == hs[i].name_len && strncasecmp(hs[j].name, hs[i].name, hs[i].name_len) == 0;
        if (seen)
            continue;
        const char *vals[MAX_VALUES + 1];
        size_t vlens[MAX_VALUES + 1], nv = 0;
        for (size_t j = i; j < n && nv < MAX_VALUES; j++)
            if (hs[j].name_len == hs[i].name_len &&
                strncasecmp(hs[j].name, hs[i].name, hs[i].name_len) == 0) {
                vals[nv] = hs[j].value;
                vlens[nv++] = hs[j].value_len;
            }
        bool via = name_is(hs[i].name, hs[i].name_len, "via");
        if (via && rq->via != NULL) {
            vals[nv] = rq->via;
            vlens[nv++] = strlen(rq->via);
            via_done = true;
        }
        kd_hm_canonical(hs[i].name, hs[i].name_len, canon);
        put_map_entry(b, 2, canon, hs[i].name_len, vals, vlens, nv);
    }
    free(canon);
    if (rq->upgrade != NULL) {
        const char *v = rq->upgrade, *c = "upgrade";
        size_t vl = rq->upgrade_len, cl = 7;
        put_map_entry(b, 2, "Upgrade", 7, &v, &vl, 1);
        put_map_entry(b, 2, "Connection", 10, &c, &cl, 1);
    }
    if (!via_done && rq->via != NULL) {
        const char *v = rq->via;
        size_t vl = strlen(v);
        put_map_entry(b, 2, "Via", 3, &v, &vl, 1);
    }
}

static bool query_key_dropped(const char *k, size_t n)
{
    return (n == 15 && memcmp(k, "gitlab-agent-id", 15) == 0) ||
           (n == 17 && memcmp(k, "gitlab-csrf-token", 17) == 0);
}

/* The query as Go's url.ParseQuery reads it: pairs split on '&', a pair holding ';' or a bad
 * escape is skipped, '+' is a space; values of one key grouped in order. */
static void put_query(struct buf *b, const char *q, size_t qlen)
{
    if (qlen == 0)
        return;
    /* decoded pairs, in one arena */
    char *arena = malloc(qlen * 2 + 2);
    size_t cap = qlen / 2 + 2, npairs = 0;
    struct pair {
        const char *k, *v;
        size_t kl, vl;
    } *pairs = malloc(cap * sizeof(*pairs));
    if (arena == NULL || pairs == NULL) {
        free(arena);
        free(pairs);
        b->err = -ENOMEM;
        return;
    }
    size_t used = 0;
    const char *p = q, *end = q + qlen;
    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *e = amp ? amp : end;
        if (e > p && memchr(p, ';', (size_t)(e - p)) == NULL) {
            const char *eq = memchr(p, '=', (size_t)(e - p));
            const char *ke = eq ? eq : e;
            char *k = arena + used;
            long kl = unescape(p, (size_t)(ke - p), k, true);
            if (kl >= 0) {
                char *v = k + kl;
                long vl = eq ? unescape(eq + 1, (size_t)(e - eq - 1), v, true) : 0;
                if (vl >= 0 && !query_key_dropped(k, (size_t)kl) && npairs < cap) {
                    pairs[npairs++] = (struct pair){k, v, (size_t)kl, (size_t)vl};
                    used += (size_t)kl + (size_t)vl;
                }
            }
        }
        p = amp ? amp + 1 : end;
    }
    for (size_t i = 0; i < npairs && !b->err; i++) {
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = pairs[j].kl == pairs[i].kl && memcmp(pairs[j].k, pairs[i].k, pairs[i].kl) == 0;
        if (seen)
            continue;
        const char *vals[MAX_VALUES];
        size_t vlens[MAX_VALUES], nv = 0;
        for (size_t j = i; j < npairs && nv < MAX_VALUES; j++)
            if (pairs[j].kl == pairs[i].kl && memcmp(pairs[j].k, pairs[i].k, pairs[i].kl) == 0) {
                vals[nv] = pairs[j].v;
                vlens[nv++] = pairs[j].vl;
            }
        put_map_entry(b, 4, pairs[i].k, pairs[i].kl, vals, vlens, nv);
    }
    free(arena);
    free(pairs);
}

#define HEADER_EXTRA_URL "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra"

int kd_hm_encode_request_header(const struct kd_hm_request *rq, size_t max, uint8_t **out, size_t *out_len)
{
    struct buf top = {.max = max}, header = sub_of(&top), req = sub_of(&top);
    /* prototool.HttpRequest */
    put_len(&req, 1, rq->method, rq->method_len);
    put_headers(&req, rq);
    put_len(&req, 3, rq->url_path, rq->url_path_len);
    put_query(&req, rq->query, rq->query_len);
    /* grpctool.HttpRequest.Header */
    put_sub(&header, 1, &req);
    if (rq->imp != NULL && rq->imp->username != NULL) {
        struct buf any = sub_of(&top), extra = sub_of(&top), imp = sub_of(&top);
        put_len(&imp, 1, rq->imp->username, strlen(rq->imp->username));
        for (size_t i = 0; i < rq->imp->ngroups; i++)
            put_len(&imp, 2, rq->imp->groups[i], strlen(rq->imp->groups[i]));
        if (rq->imp->uid != NULL)
            put_len(&imp, 3, rq->imp->uid, strlen(rq->imp->uid));
        put_sub(&extra, 1, &imp);
        put_len(&any, 1, HEADER_EXTRA_URL, sizeof(HEADER_EXTRA_URL) - 1);
        put_sub(&any, 2, &extra);
        put_sub(&header, 2, &any);
    }
    put_varint(&header, 3u << 3 | KD_PB_VARINT); /* explicit presence: always set, -1 = unknown */
    put_varint(&header, (uint64_t)rq->content_length);
    put_sub(&top, 1, &header);
    if (top.err) {
        free(top.p);
        return top.err;
    }
    *out = top.p;
    *out_len = top.len;
    return 0;
}

/* HttpRequest{<member>{data = 1}} */
static size_t bytes_member_size(uint32_t member, size_t n)
{
    return kd_pb_len_field_size(member, kd_pb_len_field_size(1, n));
}

static uint8_t *put_bytes_member(uint8_t *p, uint32_t member, const void *data, size_t n)
{
    p = kd_pb_put_len_header(p, member, kd_pb_len_field_size(1, n));
    return kd_pb_put_len_field(p, 1, data, n);
}

size_t kd_hm_data_size(size_t n)
{
    return bytes_member_size(KD_HM_DATA, n);
}

uint8_t *kd_hm_put_data(uint8_t *p, const void *data, size_t n)
{
    return put_bytes_member(p, KD_HM_DATA, data, n);
}

size_t kd_hm_upgrade_size(size_t n)
{
    return bytes_member_size(KD_HM_UPGRADE, n);
}

uint8_t *kd_hm_put_upgrade(uint8_t *p, const void *data, size_t n)
{
    return put_bytes_member(p, KD_HM_UPGRADE, data, n);
}

const uint8_t kd_hm_trailer[2] = {3u << 3 | KD_PB_LEN, 0};

/* ---- response ---- */

int kd_hm_parse_response(const uint8_t *msg, size_t len, struct kd_hm_response *out)
{
    memset(out, 0, sizeof(*out));
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc;
    kd_pb_reader_init(&r, msg, len);
    while ((rc = kd_pb_next(&r, &f)) == 1) {
        if (f.num < 1 || f.num > 4)
            continue; /* unknown fields are skipped, as protobuf does */
        if (f.wt != KD_PB_LEN)
            return -EBADMSG;
        out->kind = (enum kd_hm_kind)f.num; /* oneof: the last one wins, as protobuf does */
        out->data = NULL;
        out->data_len = 0;
        out->headers = NULL;
        out->headers_len = 0;
        out->status_code = 0;
        struct kd_pb_reader r2;
        struct kd_pb_field g;
        kd_pb_reader_init(&r2, f.data, f.len);
        while ((rc = kd_pb_next(&r2, &g)) == 1) {
            if (g.num != 1)
                continue;
            if (g.wt != KD_PB_LEN)
                return -EBADMSG;
            if (f.num == KD_HM_HEADER) {
                out->headers = g.data;
                out->headers_len = g.len;
            } else if (f.num == KD_HM_DATA || f.num == KD_HM_UPGRADE) {
                out->data = g.data;
                out->data_len = g.len;
            }
        }
        if (rc < 0)
            return -EBADMSG;
        if (f.num == KD_HM_HEADER) {
            struct kd_pb_reader r3;
            kd_pb_reader_init(&r3, out->headers, out->headers_len);
            while ((rc = kd_pb_next(&r3, &g)) == 1)
                if (g.num == 1 && g.wt == KD_PB_VARINT)
                    out->status_code = (int32_t)g.v;
            if (rc < 0)
                return -EBADMSG;
        }
    }
    if (rc < 0 || out->kind == 0)
        return -EBADMSG;
    return 0;
}

static bool value_ok(const uint8_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0')
            return false;
    return true;
}

static bool name_ok(const uint8_t *k, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!token_char(k[i]))
            return false;
    return true;
}

static bool response_header_dropped(const char *k, size_t n)
{
    static const char *const drop[] = {"server",
                                       "access-control-allow-origin",
                                       "access-control-allow-headers",
                                       "access-control-allow-credentials",
                                       "access-control-allow-methods",
                                       "access-control-max-age",
                                       "access-control-expose-headers"};
    for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
        if (name_is(k, n, drop[i]))
            return true;
    return hop_by_hop(k, n);
}

/* Each (key, value) of the header map field 3 of prototool.HttpResponse. */
static int each_entry(const struct kd_hm_response *r,
                      int (*fn)(void *ud, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl), void *ud)
{
    struct kd_pb_reader r1;
    struct kd_pb_field f;
    int rc;
    kd_pb_reader_init(&r1, r->headers, r->headers_len);
    while ((rc = kd_pb_next(&r1, &f)) == 1) {
        if (f.num != 3)
            continue;
        if (f.wt != KD_PB_LEN)
            return -EBADMSG;
        const uint8_t *k = NULL, *vals = NULL;
        size_t kl = 0, vsl = 0;
        struct kd_pb_reader r2;
        struct kd_pb_field g;
        kd_pb_reader_init(&r2, f.data, f.len);
        while ((rc = kd_pb_next(&r2, &g)) == 1) {
            if (g.wt != KD_PB_LEN)
                continue;
            if (g.num == 1) {
                k = g.data;
                kl = g.len;
            } else if (g.num == 2) {
                vals = g.data;
                vsl = g.len;
            }
        }
        if (rc < 0)
            return -EBADMSG;
        if (k == NULL)
            k = (const uint8_t *)"";
        struct kd_pb_reader r3;
        kd_pb_reader_init(&r3, vals, vsl);
        while ((rc = kd_pb_next(&r3, &g)) == 1) {
            if (g.num != 1 || g.wt != KD_PB_LEN)
                continue;
            int s = fn(ud, k, kl, g.data, g.len);
            if (s != 0)
                return s;
        }
        if (rc < 0)
            return -EBADMSG;
    }
    return rc < 0 ? -EBADMSG : 0;
}

struct conn_scan {
    const uint8_t *names[32];
    size_t lens[32];
    size_t n;
    int64_t content_length;
    int ncl;
};

static int scan_entry(void *ud, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct conn_scan *c = ud;
    if (name_is((const char *)k, kl, "content-length")) {
        int64_t x = 0;
        bool ok = vl > 0 && vl <= 18;
        for (size_t i = 0; ok && i < vl; i++) {
            ok = v[i] >= '0' && v[i] <= '9';
            x = x * 10 + (v[i] - '0');
        }
        if (c->ncl++ == 0 && ok)
            c->content_length = x;
        else if (!ok || x != c->content_length)
            c->content_length = -2; /* repeated and different, or not a number: not trusted */
        return 0;
    }
    if (!name_is((const char *)k, kl, "connection"))
        return 0;
    const uint8_t *p = v, *end = v + vl;
    while (p < end && c->n < 32) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        const uint8_t *t = p;
        while (p < end && *p != ',' && *p != ' ' && *p != '\t')
            p++;
        if (p > t) {
            c->names[c->n] = t;
            c->lens[c->n++] = (size_t)(p - t);
        }
    }
    return 0;
}

struct emit {
    const struct conn_scan *scan;
    int (*fn)(void *ud, const char *name, size_t nlen, const char *value, size_t vlen);
    void *ud;
};

static int emit_entry(void *ud, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct emit *e = ud;
    if (!name_ok(k, kl) || !value_ok(v, vl) || name_is((const char *)k, kl, "content-length") ||
        response_header_dropped((const char *)k, kl))
        return 0;
    for (size_t i = 0; i < e->scan->n; i++)
        if (e->scan->lens[i] == kl && strncasecmp((const char *)e->scan->names[i], (const char *)k, kl) == 0)
            return 0;
    return e->fn(e->ud, (const char *)k, kl, (const char *)v, vl);
}

int kd_hm_response_headers(const struct kd_hm_response *r, int64_t *content_length,
                           int (*fn)(void *ud, const char *name, size_t nlen, const char *value, size_t vlen),
                           void *ud)
{
    struct conn_scan scan = {.content_length = -1};
    *content_length = -1;
    int rc = each_entry(r, scan_entry, &scan);
    if (rc != 0)
        return rc;
    *content_length = scan.content_length >= 0 ? scan.content_length : -1;
    struct emit e = {&scan, fn, ud};
    return each_entry(r, emit_entry, &e);
}

struct find {
    const char *name;
    const char *value;
    size_t len;
    bool found;
};

static int find_entry(void *ud, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    struct find *f = ud;
    if (!name_is((const char *)k, kl, f->name) || !value_ok(v, vl))
        return 0;
    f->value = (const char *)v;
    f->len = vl;
    f->found = true;
    return 1; /* the first one */
}

bool kd_hm_response_header(const struct kd_hm_response *r, const char *name, const char **value, size_t *len)
{
    struct find f = {.name = name};
    if (each_entry(r, find_entry, &f) < 0 || !f.found)
        return false;
    *value = f.value;
    *len = f.len;
    return true;
}

/* ---- Status ---- */

static const char *status_reason(int code)
{
    switch (code) {
    case 400:
        return "BadRequest";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "NotFound";
    case 405:
        return "MethodNotAllowed";
    case 406:
        return "NotAcceptable";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 413:
        return "RequestEntityTooLarge";
    case 415:
        return "UnsupportedMediaType";
    case 422:
        return "Invalid";
    case 429:
        return "TooManyRequests";
    case 500:
        return "InternalError";
    case 503:
        return "ServiceUnavailable";
    case 504:
        return "Timeout";
    default:
        return NULL;
    }
}

size_t kd_hm_status_json(int code, const char *message, char *buf, size_t cap)
{
    if (cap < 256)
        return 0;
    /* the message, JSON-escaped, cut so the object always closes */
    char esc[1024];
    size_t e = 0;
    for (const unsigned char *m = (const unsigned char *)message; *m && e + 7 < sizeof(esc); m++) {
        if (*m == '"' || *m == '\\') {
            esc[e++] = '\\';
            esc[e++] = (char)*m;
        } else if (*m < 0x20) {
            e += (size_t)snprintf(esc + e, sizeof(esc) - e, "\\u%04x", *m);
        } else {
            esc[e++] = (char)*m;
        }
    }
    esc[e] = '\0';
    const char *reason = status_reason(code);
    int n;
    if (reason != NULL)
        n = snprintf(buf, cap,
                     "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\","
                     "\"message\":\"GitLab Agent Server: %s\",\"reason\":\"%s\",\"code\":%d}\n",
                     esc, reason, code);
    else
        n = snprintf(buf, cap,
                     "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\","
                     "\"message\":\"GitLab Agent Server: %s\",\"code\":%d}\n",
                     esc, code);
    if (n < 0)
        return 0;
    if ((size_t)n >= cap) { /* the message was too long for buf: say less */
        return kd_hm_status_json(code, "error (message too long)", buf, cap);
    }
    return (size_t)n;
}

/* http1.c — HTTP/1.1 client codec (see http1.h for the contract). Written from RFC 9112 (message
 * syntax and framing) and RFC 9110 (field values, lists, status codes). */
#include "core/http1.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const error_text[] = {
    [1] = "request field malformed",
    [2] = "output buffer too small",
    [3] = "malformed status line",
    [4] = "HTTP version is neither 1.1 nor 1.0",
    [5] = "status code outside 100..599",
    [6] = "bare CR or LF where CRLF belongs",
    [7] = "malformed header line",
    [8] = "control character in a header value",
    [9] = "obsolete line folding",
    [10] = "response head too large",
    [11] = "too many header lines",
    [12] = "malformed or too large Content-Length",
    [13] = "Content-Length values differ",
    [14] = "Transfer-Encoding other than chunked, or in HTTP/1.0",
    [15] = "both Transfer-Encoding and Content-Length",
    [16] = "body without length (delimited by close) not allowed",
    [17] = "malformed or too large chunk size",
    [18] = "malformed or too long chunk extension",
    [19] = "chunk data not followed by CRLF",
    [20] = "malformed or too large trailers",
    [21] = "body too large",
    [22] = "unexpected 101 Switching Protocols",
    [23] = "too many interim (1xx) responses",
    [24] = "connection closed before the response was complete",
    [25] = "bytes after the complete response",
};

const char *kd_h1_strerror(int err)
{
    if (err >= 0 || err < KD_H1_E_LAST)
        return "unknown error";
    return error_text[-err];
}

/* ---- characters ---- */

/* tchar (RFC 9110 5.6.2): the bytes of a token. */
static bool is_tchar(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return true;
    if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z')
        return true;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* Control characters a field value may not hold: all C0 but HTAB, and DEL. */
static bool is_ctl(uint8_t c)
{
    return (c < 0x20 && c != '\t') || c == 0x7f;
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c |= 0x20;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static bool ci_eq(const char *a, size_t alen, const char *b)
{
    size_t blen = strlen(b);
    if (alen != blen)
        return false;
    for (size_t i = 0; i < alen; i++) {
        uint8_t x = (uint8_t)a[i], y = (uint8_t)b[i];
        if (x >= 'A' && x <= 'Z')
            x |= 0x20;
        if (y >= 'A' && y <= 'Z')
            y |= 0x20;
        if (x != y)
            return false;
    }
    return true;
}

/* ---- request writer ---- */

static int field_err(char *err, size_t errlen, const char *what, size_t idx, const char *why)
{
    if (err != NULL && errlen > 0) {
        if (idx == (size_t)-1)
            snprintf(err, errlen, "%s: %s", what, why);
        else
            snprintf(err, errlen, "header %zu %s: %s", idx, what, why);
    }
    return KD_H1_E_FIELD;
}

/* Why a byte may not stand in a field, or NULL when it may. */
static const char *bad_byte(uint8_t c)
{
    switch (c) {
    case '\r':
        return "CR";
    case '\n':
        return "LF";
    case 0:
        return "NUL";
    default:
        return is_ctl(c) ? "control character" : NULL;
    }
}

/* Request line parts and Host: visible ASCII, no space. */
static const char *bad_word(const char *s, bool token)
{
    if (*s == 0)
        return "empty";
    for (const uint8_t *p = (const uint8_t *)s; *p; p++) {
        const char *why = bad_byte(*p);
        if (why != NULL)
            return why;
        if (*p == ' ')
            return "space";
        if (*p >= 0x80)
            return "non-ASCII byte";
        if (token && !is_tchar(*p))
            return "not a token";
    }
    return NULL;
}

static size_t udigits(uint64_t v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

static char *put(char *o, const void *s, size_t n)
{
    if (n > 0)
        memcpy(o, s, n);
    return o + n;
}

int kd_h1_request_write(const struct kd_h1_request *rq, char *out, size_t cap, size_t *len, char *err,
                        size_t errlen)
{
    const char *why;
    *len = 0;
    if (rq->method == NULL || (why = bad_word(rq->method, true)) != NULL)
        return field_err(err, errlen, "method", (size_t)-1, rq->method ? why : "missing");
    if (rq->target == NULL || (why = bad_word(rq->target, false)) != NULL)
        return field_err(err, errlen, "target", (size_t)-1, rq->target ? why : "missing");
    if (rq->host == NULL || (why = bad_word(rq->host, false)) != NULL)
        return field_err(err, errlen, "host", (size_t)-1, rq->host ? why : "missing");
    size_t ml = strlen(rq->method), tl = strlen(rq->target), hl = strlen(rq->host);
    /* "M T HTTP/1.1\r\n" "Host: H\r\n" ... "\r\n" */
    size_t need = ml + 1 + tl + 11 + 6 + hl + 2 + 2;
    for (size_t i = 0; i < rq->nheaders; i++) {
        const struct kd_h1_header *h = &rq->headers[i];
        if (h->name == NULL || h->name_len == 0)
            return field_err(err, errlen, "name", i, "empty");
        for (size_t j = 0; j < h->name_len; j++) {
            why = bad_byte((uint8_t)h->name[j]);
            if (why != NULL || !is_tchar((uint8_t)h->name[j]))
                return field_err(err, errlen, "name", i, why ? why : "not a token");
        }
        if (ci_eq(h->name, h->name_len, "host") || ci_eq(h->name, h->name_len, "content-length") ||
            ci_eq(h->name, h->name_len, "transfer-encoding"))
            return field_err(err, errlen, "name", i, "set by the writer");
        if (h->value == NULL && h->value_len > 0)
            return field_err(err, errlen, "value", i, "missing");
        for (size_t j = 0; j < h->value_len; j++)
            if ((why = bad_byte((uint8_t)h->value[j])) != NULL)
                return field_err(err, errlen, "value", i, why);
        size_t add = h->name_len + 2 + h->value_len + 2;
        if (need + add < need)
            return KD_H1_E_NOSPACE;
        need += add;
    }
    if (rq->body != NULL) {
        size_t add = 16 + udigits(rq->body_len) + 2; /* "Content-Length: N\r\n" */
        if (need + add + rq->body_len < need)
            return KD_H1_E_NOSPACE;
        need += add + rq->body_len;
    }
    *len = need;
    if (out == NULL || cap < need)
        return KD_H1_E_NOSPACE;
    char *o = out;
    o = put(o, rq->method, ml);
    *o++ = ' ';
    o = put(o, rq->target, tl);
    o = put(o, " HTTP/1.1\r\nHost: ", 17);
    o = put(o, rq->host, hl);
    o = put(o, "\r\n", 2);
    for (size_t i = 0; i < rq->nheaders; i++) {
        const struct kd_h1_header *h = &rq->headers[i];
        o = put(o, h->name, h->name_len);
        o = put(o, ": ", 2);
        o = put(o, h->value, h->value_len);
        o = put(o, "\r\n", 2);
    }
    if (rq->body != NULL) {
        char num[24];
        int n = snprintf(num, sizeof(num), "%zu", rq->body_len);
        o = put(o, "Content-Length: ", 16);
        o = put(o, num, (size_t)n);
        o = put(o, "\r\n", 2);
    }
    o = put(o, "\r\n", 2);
    if (rq->body != NULL)
        o = put(o, rq->body, rq->body_len);
    if ((size_t)(o - out) != need)
        abort(); /* the size computed above is the contract */
    return 0;
}

/* ---- response parser ----
 *
 *   S_HEAD --final head--> S_DONE (no body) | S_BODY_LEN | S_CHUNK_SIZE | S_CLOSE
 *     ^  \--1xx head: buffer emptied, stay
 *   S_CHUNK_SIZE -> [S_CHUNK_BWS] -> [S_CHUNK_EXT] -> S_CHUNK_LF -> S_CHUNK_DATA -> S_CHUNK_CR
 *     -> S_CHUNK_DATA_LF -> S_CHUNK_SIZE ...; size 0: S_CHUNK_LF -> S_TRAILER_START ->
 *     (S_TRAILER_NAME -> S_TRAILER_VALUE -> S_TRAILER_LF -> S_TRAILER_START)* -> S_TRAILER_END_LF
 *     -> S_DONE
 *   any -> S_ERROR (sticky, err set)
 *
 * Invariants: len <= head_max; line_start <= len; nhdr <= headers_max and every entry lies in
 * buf[0, len); body_seen <= body_max; err != 0 exactly in S_ERROR. The head is processed a whole
 * line at a time, the chunk framing a byte at a time, body bytes in runs: each decision depends on
 * the bytes seen so far, never on where the input was cut.
 */

enum state {
    S_HEAD,
    S_BODY_LEN,
    S_CLOSE,
    S_CHUNK_SIZE,
    S_CHUNK_BWS,
    S_CHUNK_EXT,
    S_CHUNK_LF,
    S_CHUNK_DATA,
    S_CHUNK_CR,
    S_CHUNK_DATA_LF,
    S_TRAILER_START,
    S_TRAILER_NAME,
    S_TRAILER_VALUE,
    S_TRAILER_LF,
    S_TRAILER_END_LF,
    S_DONE,
    S_ERROR,
};

struct hdr {
    uint32_t name_off, name_len;
    uint32_t value_off, value_len;
};

struct kd_h1_parser {
    uint32_t head_max, headers_max;
    uint64_t body_max;
    bool allow_close;
    bool head_request;
    enum state state;
    int err;
    bool done_reported; /* DONE returned once for this response */
    /* head */
    uint32_t len, line_start, nhdr;
    bool have_status; /* the current head's status line is parsed */
    bool have_resp;   /* resp describes the final head */
    unsigned interim;
    struct kd_h1_response resp;
    /* body */
    uint64_t remaining; /* S_BODY_LEN, S_CHUNK_DATA */
    uint64_t chunk;     /* size being read */
    uint32_t ndigits, line_bytes, trailer_bytes, ntrailers;
    uint64_t body_seen;
    struct hdr *hdrs;
    char *buf;
};

struct kd_h1_parser *kd_h1_parser_new(const struct kd_h1_limits *lim)
{
    size_t head_max = lim && lim->head_max ? lim->head_max : KD_H1_HEAD_MAX_DEFAULT;
    size_t headers_max = lim && lim->headers_max ? lim->headers_max : KD_H1_HEADERS_MAX_DEFAULT;
    if (head_max > KD_H1_HEAD_MAX_LIMIT || headers_max > KD_H1_HEADERS_MAX_LIMIT)
        return NULL;
    struct kd_h1_parser *p = calloc(1, sizeof(*p) + headers_max * sizeof(struct hdr) + head_max);
    if (p == NULL)
        return NULL;
    p->head_max = (uint32_t)head_max;
    p->headers_max = (uint32_t)headers_max;
    p->body_max = lim && lim->body_max ? lim->body_max : KD_H1_BODY_MAX_DEFAULT;
    p->allow_close = lim && lim->allow_close_delimited;
    p->hdrs = (struct hdr *)(p + 1);
    p->buf = (char *)(p->hdrs + headers_max);
    kd_h1_parser_reset(p, false);
    return p;
}

void kd_h1_parser_free(struct kd_h1_parser *p)
{
    free(p);
}

static void new_head(struct kd_h1_parser *p)
{
    p->len = p->line_start = p->nhdr = 0;
    p->have_status = false;
    memset(&p->resp, 0, sizeof(p->resp));
}

void kd_h1_parser_reset(struct kd_h1_parser *p, bool head_request)
{
    p->head_request = head_request;
    p->state = S_HEAD;
    p->err = 0;
    p->done_reported = false;
    new_head(p);
    p->have_resp = false;
    p->interim = 0;
    p->remaining = p->chunk = 0;
    p->ndigits = p->line_bytes = p->trailer_bytes = p->ntrailers = 0;
    p->body_seen = 0;
}

static int fail(struct kd_h1_parser *p, int err)
{
    p->state = S_ERROR;
    p->err = err;
    return err;
}

/* ---- the head ---- */

static int status_line(struct kd_h1_parser *p, const char *s, size_t n)
{
    /* HTTP-version SP 3DIGIT [SP reason-phrase] (RFC 9112 4; the SP before an empty reason is
     * required by the grammar, but its absence is harmless and tolerated). */
    if (n < 12 || memcmp(s, "HTTP/", 5) != 0 || s[6] != '.' || s[5] < '0' || s[5] > '9' || s[7] < '0' ||
        s[7] > '9')
        return KD_H1_E_STATUS_LINE;
    if (s[5] != '1' || (s[7] != '0' && s[7] != '1'))
        return KD_H1_E_VERSION;
    if (s[8] != ' ')
        return KD_H1_E_STATUS_LINE;
    for (int i = 9; i < 12; i++)
        if (s[i] < '0' || s[i] > '9')
            return KD_H1_E_STATUS_LINE;
    if (n > 12 && s[12] != ' ')
        return KD_H1_E_STATUS_LINE;
    for (size_t i = 13; i < n; i++)
        if (is_ctl((uint8_t)s[i]))
            return KD_H1_E_STATUS_LINE;
    int status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    if (status < 100 || status > 599)
        return KD_H1_E_STATUS;
    if (status == 101)
        return KD_H1_E_UPGRADE;
    p->resp.status = status;
    p->resp.minor = s[7] - '0';
    p->resp.reason = n > 13 ? s + 13 : s + n;
    p->resp.reason_len = n > 13 ? n - 13 : 0;
    p->have_status = true;
    return 0;
}

static int header_line(struct kd_h1_parser *p, const char *s, size_t n)
{
    if (s[0] == ' ' || s[0] == '\t')
        return KD_H1_E_OBS_FOLD; /* also whitespace between the status line and the first field */
    size_t i = 0;
    while (i < n && is_tchar((uint8_t)s[i]))
        i++;
    if (i == 0 || i == n || s[i] != ':')
        return KD_H1_E_HEADER; /* includes whitespace before the colon (RFC 9112 5.1) */
    size_t name_len = i++;
    while (i < n && (s[i] == ' ' || s[i] == '\t'))
        i++;
    size_t vs = i, ve = n;
    while (ve > vs && (s[ve - 1] == ' ' || s[ve - 1] == '\t'))
        ve--;
    for (size_t j = vs; j < ve; j++)
        if (is_ctl((uint8_t)s[j]))
            return KD_H1_E_HEADER_VALUE;
    if (p->nhdr == p->headers_max)
        return KD_H1_E_TOO_MANY_HEADERS;
    uint32_t base = (uint32_t)(s - p->buf);
    p->hdrs[p->nhdr++] = (struct hdr){base, (uint32_t)name_len, base + (uint32_t)vs, (uint32_t)(ve - vs)};
    return 0;
}

/* Calls fn on each non-empty element of a comma-separated list (RFC 9110 5.6.1), OWS trimmed;
 * empty elements are counted in *empty. Stops at the first non-zero return. */
static int each_element(const char *v, size_t n, unsigned *empty, int (*fn)(void *, const char *, size_t),
                        void *ud)
{
    size_t i = 0;
    for (;;) {
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (s < e && (v[s] == ' ' || v[s] == '\t'))
            s++;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e == s)
            (*empty)++;
        else {
            int rc = fn(ud, v + s, e - s);
            if (rc != 0)
                return rc;
        }
        if (i == n)
            return 0;
        i++;
    }
}

struct framing {
    bool have_cl, have_te, chunked, close, keep;
    uint64_t cl;
    unsigned codings;
};

static int cl_element(void *ud, const char *s, size_t n)
{
    struct framing *f = ud;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return KD_H1_E_CONTENT_LENGTH;
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > KD_H1_LENGTH_MAX)
            return KD_H1_E_CONTENT_LENGTH;
    }
    if (f->have_cl && v != f->cl)
        return KD_H1_E_LENGTH_CONFLICT;
    f->have_cl = true;
    f->cl = v;
    return 0;
}

static int te_element(void *ud, const char *s, size_t n)
{
    struct framing *f = ud;
    f->codings++;
    if (ci_eq(s, n, "chunked"))
        f->chunked = true;
    return 0;
}

static int conn_element(void *ud, const char *s, size_t n)
{
    struct framing *f = ud;
    if (ci_eq(s, n, "close"))
        f->close = true;
    else if (ci_eq(s, n, "keep-alive"))
        f->keep = true;
    return 0;
}

/* The empty line ended a head: skip a 1xx, or decide the framing of the final response
 * (RFC 9112 6.3). Returns 1 for a final head, 0 for an interim one, or an error. */
static int head_end(struct kd_h1_parser *p)
{
    if (p->resp.status < 200) {
        if (++p->interim > KD_H1_INTERIM_MAX)
            return KD_H1_E_INTERIM;
        new_head(p);
        return 0;
    }
    struct framing f = {0};
    for (uint32_t i = 0; i < p->nhdr; i++) {
        const char *name = p->buf + p->hdrs[i].name_off, *v = p->buf + p->hdrs[i].value_off;
        size_t nl = p->hdrs[i].name_len, vl = p->hdrs[i].value_len;
        unsigned empty = 0;
        int rc = 0;
        if (ci_eq(name, nl, "content-length")) {
            rc = each_element(v, vl, &empty, cl_element, &f);
            if (rc == 0 && empty > 0)
                rc = KD_H1_E_CONTENT_LENGTH;
        } else if (ci_eq(name, nl, "transfer-encoding")) {
            f.have_te = true;
            rc = each_element(v, vl, &empty, te_element, &f);
        } else if (ci_eq(name, nl, "connection")) {
            rc = each_element(v, vl, &empty, conn_element, &f);
        }
        if (rc != 0)
            return rc;
    }
    if (f.have_te) {
        if (f.have_cl)
            return KD_H1_E_TE_AND_CL; /* RFC 9112 6.1: a sign of smuggling, handled as an error */
        if (p->resp.minor == 0 || f.codings != 1 || !f.chunked)
            return KD_H1_E_TRANSFER_CODING;
    }
    struct kd_h1_response *r = &p->resp;
    r->connection_close = f.close;
    r->connection_keep = f.keep;
    r->nheaders = p->nhdr;
    r->interim = p->interim;
    if (p->head_request || r->status == 204 || r->status == 304) {
        r->framing = KD_H1_BODY_NONE;
        p->state = S_DONE;
    } else if (f.have_te) {
        r->framing = KD_H1_BODY_CHUNKED;
        p->state = S_CHUNK_SIZE;
    } else if (f.have_cl) {
        if (f.cl > p->body_max)
            return KD_H1_E_BODY_TOO_BIG;
        r->framing = KD_H1_BODY_LENGTH;
        r->content_length = f.cl;
        p->remaining = f.cl;
        p->state = S_BODY_LEN;
    } else {
        if (!p->allow_close)
            return KD_H1_E_NO_LENGTH;
        r->framing = KD_H1_BODY_CLOSE;
        p->state = S_CLOSE;
    }
    p->have_resp = true;
    return 1;
}

/* A complete line buf[line_start, len), its LF included. */
static int head_line(struct kd_h1_parser *p)
{
    const char *s = p->buf + p->line_start;
    size_t n = p->len - p->line_start;
    if (n < 2 || s[n - 2] != '\r')
        return KD_H1_E_LINE_END;
    n -= 2;
    if (memchr(s, '\r', n) != NULL)
        return KD_H1_E_LINE_END;
    int rc;
    if (!p->have_status)
        rc = n == 0 ? KD_H1_E_STATUS_LINE : status_line(p, s, n);
    else if (n == 0)
        return head_end(p);
    else
        rc = header_line(p, s, n);
    p->line_start = p->len;
    return rc;
}

/* Take head bytes up to and including the next LF. 1: final head complete, 0: more, or error. */
static int head_bytes(struct kd_h1_parser *p, const uint8_t *d, size_t n, size_t *took)
{
    const uint8_t *nl = memchr(d, '\n', n);
    size_t take = nl != NULL ? (size_t)(nl - d) + 1 : n;
    *took = take;
    if (take > p->head_max - p->len)
        return KD_H1_E_HEAD_TOO_BIG;
    memcpy(p->buf + p->len, d, take);
    p->len += (uint32_t)take;
    return nl != NULL ? head_line(p) : 0;
}

/* ---- chunked framing, one byte at a time ---- */

static int chunk_line_byte(struct kd_h1_parser *p)
{
    return ++p->line_bytes > KD_H1_CHUNK_LINE_MAX ? KD_H1_E_CHUNK_EXT : 0;
}

static int trailer_byte(struct kd_h1_parser *p)
{
    return ++p->trailer_bytes > p->head_max ? KD_H1_E_TRAILER : 0;
}

static int chunk_byte(struct kd_h1_parser *p, uint8_t c)
{
    int rc;
    switch (p->state) {
    case S_CHUNK_SIZE: {
        if ((rc = chunk_line_byte(p)) != 0)
            return rc;
        int h = hexval(c);
        if (h >= 0) {
            if (p->chunk > (KD_H1_LENGTH_MAX >> 4))
                return KD_H1_E_CHUNK_SIZE;
            p->chunk = (p->chunk << 4) | (uint64_t)h;
            if (p->chunk > KD_H1_LENGTH_MAX)
                return KD_H1_E_CHUNK_SIZE;
            p->ndigits++;
        } else if (p->ndigits == 0)
            return KD_H1_E_CHUNK_SIZE;
        else if (c == '\r')
            p->state = S_CHUNK_LF;
        else if (c == ';')
            p->state = S_CHUNK_EXT;
        else if (c == ' ' || c == '\t')
            p->state = S_CHUNK_BWS;
        else
            return c == '\n' ? KD_H1_E_LINE_END : KD_H1_E_CHUNK_SIZE;
        return 0;
    }
    case S_CHUNK_BWS: /* chunk-ext = *( BWS ";" ... ): whitespace only before a ';' */
        if ((rc = chunk_line_byte(p)) != 0)
            return rc;
        if (c == ';')
            p->state = S_CHUNK_EXT;
        else if (c == '\n')
            return KD_H1_E_LINE_END;
        else if (c != ' ' && c != '\t')
            return KD_H1_E_CHUNK_EXT;
        return 0;
    case S_CHUNK_EXT: /* ignored, but bounded and free of controls */
        if ((rc = chunk_line_byte(p)) != 0)
            return rc;
        if (c == '\r')
            p->state = S_CHUNK_LF;
        else if (c == '\n')
            return KD_H1_E_LINE_END;
        else if (is_ctl(c))
            return KD_H1_E_CHUNK_EXT;
        return 0;
    case S_CHUNK_LF:
        if (c != '\n')
            return KD_H1_E_LINE_END;
        if (p->chunk == 0) {
            p->state = S_TRAILER_START;
            return 0;
        }
        if (p->chunk > p->body_max - p->body_seen)
            return KD_H1_E_BODY_TOO_BIG;
        p->remaining = p->chunk;
        p->state = S_CHUNK_DATA;
        return 0;
    case S_CHUNK_CR:
        if (c != '\r')
            return KD_H1_E_CHUNK_END;
        p->state = S_CHUNK_DATA_LF;
        return 0;
    case S_CHUNK_DATA_LF:
        if (c != '\n')
            return KD_H1_E_CHUNK_END;
        p->state = S_CHUNK_SIZE;
        p->chunk = 0;
        p->ndigits = p->line_bytes = 0;
        return 0;
    case S_TRAILER_START:
        if ((rc = trailer_byte(p)) != 0)
            return rc;
        if (c == '\r')
            p->state = S_TRAILER_END_LF;
        else if (c == ' ' || c == '\t')
            return KD_H1_E_OBS_FOLD;
        else if (c == '\n')
            return KD_H1_E_LINE_END;
        else if (!is_tchar(c))
            return KD_H1_E_TRAILER;
        else if (++p->ntrailers > p->headers_max)
            return KD_H1_E_TRAILER;
        else
            p->state = S_TRAILER_NAME;
        return 0;
    case S_TRAILER_NAME:
        if ((rc = trailer_byte(p)) != 0)
            return rc;
        if (c == ':')
            p->state = S_TRAILER_VALUE;
        else if (!is_tchar(c))
            return KD_H1_E_TRAILER;
        return 0;
    case S_TRAILER_VALUE:
        if ((rc = trailer_byte(p)) != 0)
            return rc;
        if (c == '\r')
            p->state = S_TRAILER_LF;
        else if (c == '\n')
            return KD_H1_E_LINE_END;
        else if (is_ctl(c))
            return KD_H1_E_TRAILER;
        return 0;
    case S_TRAILER_LF:
        if ((rc = trailer_byte(p)) != 0)
            return rc;
        if (c != '\n')
            return KD_H1_E_LINE_END;
        p->state = S_TRAILER_START;
        return 0;
    case S_TRAILER_END_LF:
        if (c != '\n')
            return KD_H1_E_LINE_END;
        p->state = S_DONE;
        return 0;
    default:
        abort();
    }
}

/* ---- feeding ---- */

static int emit_body(struct kd_h1_parser *p, const uint8_t *d, size_t n, struct kd_h1_slice *body)
{
    body->p = d;
    body->len = n;
    p->body_seen += n;
    return KD_H1_EV_BODY;
}

int kd_h1_parser_feed(struct kd_h1_parser *p, const void *data, size_t len, size_t *used,
                      struct kd_h1_slice *body)
{
    const uint8_t *d = data;
    size_t off = 0;
    int rc;
    *used = 0;
    body->p = NULL;
    body->len = 0;
    for (;;) {
        switch (p->state) {
        case S_ERROR:
            return p->err;
        case S_DONE:
            *used = off;
            if (!p->done_reported) {
                p->done_reported = true;
                return KD_H1_EV_DONE;
            }
            return off < len ? KD_H1_E_EXTRA : KD_H1_EV_DONE;
        case S_HEAD: {
            if (off == len)
                break;
            size_t took;
            rc = head_bytes(p, d + off, len - off, &took);
            off += took;
            if (rc < 0) {
                *used = off;
                return fail(p, rc);
            }
            if (rc == 1) {
                *used = off;
                return KD_H1_EV_HEAD;
            }
            continue;
        }
        case S_BODY_LEN:
        case S_CHUNK_DATA: {
            if (p->remaining == 0) {
                p->state = p->state == S_BODY_LEN ? S_DONE : S_CHUNK_CR;
                continue;
            }
            if (off == len)
                break;
            size_t n = len - off;
            if (n > p->remaining)
                n = (size_t)p->remaining;
            p->remaining -= n;
            *used = off + n;
            return emit_body(p, d + off, n, body);
        }
        case S_CLOSE: {
            if (off == len)
                break;
            if (p->body_seen == p->body_max) {
                *used = off;
                return fail(p, KD_H1_E_BODY_TOO_BIG);
            }
            size_t n = len - off;
            if (n > p->body_max - p->body_seen)
                n = (size_t)(p->body_max - p->body_seen);
            *used = off + n;
            return emit_body(p, d + off, n, body);
        }
        default: /* chunk framing and trailers */
            if (off == len)
                break;
            rc = chunk_byte(p, d[off++]);
            if (rc < 0) {
                *used = off;
                return fail(p, rc);
            }
            continue;
        }
        *used = off; /* off == len: all taken */
        return KD_H1_EV_NEED_MORE;
    }
}

int kd_h1_parser_eof(struct kd_h1_parser *p)
{
    switch (p->state) {
    case S_ERROR:
        return p->err;
    case S_CLOSE:
        p->state = S_DONE;
        p->done_reported = true;
        return KD_H1_EV_DONE;
    case S_DONE:
        p->done_reported = true;
        return KD_H1_EV_DONE;
    case S_BODY_LEN:
        /* the last body bytes were delivered; DONE was just not asked for yet */
        if (p->remaining == 0) {
            p->state = S_DONE;
            p->done_reported = true;
            return KD_H1_EV_DONE;
        }
        return fail(p, KD_H1_E_TRUNCATED);
    default:
        return fail(p, KD_H1_E_TRUNCATED);
    }
}

/* ---- the result ---- */

const struct kd_h1_response *kd_h1_parser_response(const struct kd_h1_parser *p)
{
    return p->have_resp ? &p->resp : NULL;
}

bool kd_h1_parser_header(const struct kd_h1_parser *p, size_t i, struct kd_h1_header *out)
{
    if (!p->have_resp || i >= p->nhdr)
        return false;
    const struct hdr *h = &p->hdrs[i];
    *out = (struct kd_h1_header){p->buf + h->name_off, h->name_len, p->buf + h->value_off, h->value_len};
    return true;
}

const char *kd_h1_parser_find(const struct kd_h1_parser *p, const char *name, size_t *len)
{
    if (!p->have_resp)
        return NULL;
    for (uint32_t i = 0; i < p->nhdr; i++) {
        const struct hdr *h = &p->hdrs[i];
        if (ci_eq(p->buf + h->name_off, h->name_len, name)) {
            *len = h->value_len;
            return p->buf + h->value_off;
        }
    }
    return NULL;
}

bool kd_h1_parser_keep_alive(const struct kd_h1_parser *p)
{
    if (p->state != S_DONE || !p->have_resp || p->resp.framing == KD_H1_BODY_CLOSE)
        return false;
    if (p->resp.connection_close)
        return false;
    return p->resp.minor == 1 || p->resp.connection_keep;
}

uint64_t kd_h1_parser_body_seen(const struct kd_h1_parser *p)
{
    return p->body_seen;
}

int kd_h1_parser_validate(const struct kd_h1_parser *p)
{
    if (p->len > p->head_max || p->line_start > p->len || p->nhdr > p->headers_max)
        return -EINVAL;
    for (uint32_t i = 0; i < p->nhdr; i++) {
        const struct hdr *h = &p->hdrs[i];
        if ((uint64_t)h->name_off + h->name_len > p->len || (uint64_t)h->value_off + h->value_len > p->len ||
            h->name_len == 0)
            return -EINVAL;
    }
    if (p->body_seen > p->body_max || p->state > S_ERROR || p->remaining > KD_H1_LENGTH_MAX)
        return -EINVAL;
    if ((p->err != 0) != (p->state == S_ERROR) || p->err > 0 || p->err < KD_H1_E_LAST)
        return -EINVAL;
    /* the counters below pass their limit by one on the byte that is refused */
    if (p->state != S_ERROR && (p->interim > KD_H1_INTERIM_MAX || p->chunk > KD_H1_LENGTH_MAX ||
                                p->line_bytes > KD_H1_CHUNK_LINE_MAX || p->ntrailers > p->headers_max ||
                                p->trailer_bytes > p->head_max))
        return -EINVAL;
    if (p->have_resp) {
        if (p->resp.nheaders != p->nhdr || p->resp.status < 200 || p->resp.status > 599)
            return -EINVAL;
        if (p->resp.framing == KD_H1_BODY_LENGTH && p->body_seen + p->remaining != p->resp.content_length &&
            p->state != S_ERROR)
            return -EINVAL;
    } else if (p->state != S_HEAD && p->state != S_ERROR) {
        return -EINVAL;
    }
    return 0;
}

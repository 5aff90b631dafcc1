/* http1_fuzz.c — the HTTP/1.1 client codec (core/http1.h) on arbitrary bytes.
 *
 * Response mode: the bytes are a stream of responses on one connection, parsed three times: in one
 * call, cut into pieces whose sizes come from the input, and one byte at a time; after each DONE
 * the parser is reset and the rest of the stream parsed as the next response (up to 4). All three
 * runs must agree exactly (every head, the concatenated body bytes, each response's end, keep-alive,
 * the final result): how the input is cut may change nothing. Bounds checked on every call:
 * _validate(), bytes taken within the input, body slices inside what was taken and never empty,
 * body totals within body_max and equal to Content-Length at DONE, header slices inside the head.
 *
 * Writer mode: lines (method, target, host, then name:value headers, then the body after an empty
 * line) go to kd_h1_request_write; when it accepts them, the output must be exactly one well-formed
 * head (CRLF only at line ends, no NUL) followed by the body, and the fields must have held no CR,
 * LF or NUL.
 *
 * Input: byte 0 = flags (bit 0: response to HEAD, bit 1: close-delimited allowed, bit 2: the peer
 * closes at the end, bit 3: small limits, bit 4: writer mode), byte 1 = body_max / 4 (small
 * limits), byte 2 = head and header-count limits (small limits), byte 3 = seed of the piece sizes;
 * the rest is the stream. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/http1.h"
#include "fuzz.h"

#define MAX_RESPONSES 4

struct result {
    uint64_t hash;      /* heads, ends and results, in order */
    uint64_t body_hash; /* all body bytes, in order (invariant under any cut) */
    uint64_t body_len;
    int rc; /* the last result: DONE, NEED_MORE, or an error */
    unsigned responses;
};

static void mix(uint64_t *h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        *h = (*h ^ b[i]) * 0x100000001b3ull;
}

static void mix_int(uint64_t *h, uint64_t v)
{
    mix(h, &v, sizeof(v));
}

struct run {
    struct kd_h1_parser *p;
    const struct kd_h1_limits *lim;
    bool head_request;
    bool finished; /* an error, or MAX_RESPONSES done */
    bool in_response_body_counted;
    uint64_t resp_body; /* body bytes of the current response */
    size_t pos;         /* stream offset of the next byte fed */
    struct result r;
};

static void on_head(struct run *s)
{
    const struct kd_h1_response *h = kd_h1_parser_response(s->p);
    CHECK(h != NULL);
    CHECK(h->status >= 200 && h->status <= 599);
    CHECK(h->minor == 0 || h->minor == 1);
    CHECK(h->nheaders <= (s->lim->headers_max ? s->lim->headers_max : KD_H1_HEADERS_MAX_DEFAULT));
    CHECK(h->interim <= KD_H1_INTERIM_MAX);
    if (h->framing == KD_H1_BODY_LENGTH)
        CHECK(h->content_length <= (s->lim->body_max ? s->lim->body_max : KD_H1_BODY_MAX_DEFAULT));
    else
        CHECK(h->content_length == 0);
    mix_int(&s->r.hash, (uint64_t)h->status << 8 | (uint64_t)h->minor);
    mix_int(&s->r.hash, h->framing);
    mix_int(&s->r.hash, h->content_length);
    mix_int(&s->r.hash, h->nheaders << 8 | h->interim);
    mix_int(&s->r.hash, (uint64_t)h->connection_close << 1 | h->connection_keep);
    mix(&s->r.hash, h->reason, h->reason_len);
    struct kd_h1_header hd;
    size_t i = 0;
    for (; kd_h1_parser_header(s->p, i, &hd); i++) {
        CHECK(hd.name_len > 0);
        for (size_t j = 0; j < hd.value_len; j++)
            CHECK(hd.value[j] != '\r' && hd.value[j] != '\n' && hd.value[j] != '\0');
        mix(&s->r.hash, hd.name, hd.name_len);
        mix(&s->r.hash, ":", 1);
        mix(&s->r.hash, hd.value, hd.value_len);
    }
    CHECK(i == h->nheaders);
    if (i > 0) {
        size_t vl;
        CHECK(kd_h1_parser_find(s->p, "content-length", &vl) != NULL || h->framing != KD_H1_BODY_LENGTH);
    }
}

/* Feed one piece (stream offset s->pos). */
static void feed(struct run *s, const uint8_t *in, size_t n)
{
    size_t off = 0;
    while (!s->finished) {
        size_t used;
        struct kd_h1_slice b;
        int rc = kd_h1_parser_feed(s->p, in + off, n - off, &used, &b);
        CHECK(kd_h1_parser_validate(s->p) == 0);
        CHECK(used <= n - off);
        if (rc == KD_H1_EV_BODY) {
            CHECK(b.len > 0 && b.len <= used && b.p >= in + off && b.p + b.len <= in + off + used);
            mix(&s->r.body_hash, b.p, b.len);
            s->r.body_len += b.len;
            s->resp_body += b.len;
            CHECK(s->resp_body == kd_h1_parser_body_seen(s->p));
        } else {
            CHECK(b.p == NULL && b.len == 0);
        }
        off += used;
        s->r.rc = rc;
        switch (rc) {
        case KD_H1_EV_NEED_MORE:
            CHECK(off == n);
            s->pos += n;
            return;
        case KD_H1_EV_HEAD:
            on_head(s);
            break;
        case KD_H1_EV_BODY:
            break;
        case KD_H1_EV_DONE: {
            const struct kd_h1_response *h = kd_h1_parser_response(s->p);
            CHECK(h != NULL);
            if (h->framing == KD_H1_BODY_LENGTH)
                CHECK(s->resp_body == h->content_length);
            if (h->framing == KD_H1_BODY_NONE)
                CHECK(s->resp_body == 0);
            bool keep = kd_h1_parser_keep_alive(s->p);
            CHECK(!keep || h->framing != KD_H1_BODY_CLOSE);
            mix_int(&s->r.hash, 0xd0e);
            mix_int(&s->r.hash, s->pos + off); /* where the response ended */
            mix_int(&s->r.hash, keep);
            if (++s->r.responses == MAX_RESPONSES) {
                s->finished = true;
                break;
            }
            kd_h1_parser_reset(s->p, s->head_request);
            s->resp_body = 0;
            break;
        }
        default:
            CHECK(rc < 0 && rc >= KD_H1_E_LAST && rc != KD_H1_E_FIELD && rc != KD_H1_E_NOSPACE);
            CHECK(rc != KD_H1_E_EXTRA); /* never: the parser is reset after DONE */
            CHECK(kd_h1_strerror(rc)[0] != 0);
            s->finished = true;
            break;
        }
    }
    s->pos += n;
}

static size_t piece(uint32_t *rng, size_t left)
{
    *rng = *rng * 1103515245u + 12345u;
    size_t n = 1 + (*rng >> 16) % 23;
    return n < left ? n : left;
}

/* mode 0: whole, 1: pieces from the seed, 2: one byte at a time */
static void run(const uint8_t *in, size_t n, const struct kd_h1_limits *lim, bool head_request, bool eof,
                uint32_t seed, int mode, struct result *out)
{
    struct run s = {.lim = lim, .head_request = head_request};
    s.r.hash = s.r.body_hash = 0xcbf29ce484222325ull;
    s.p = kd_h1_parser_new(lim);
    CHECK(s.p != NULL);
    kd_h1_parser_reset(s.p, head_request);
    uint32_t rng = seed;
    size_t off = 0;
    while (off < n && !s.finished) {
        size_t len = mode == 0 ? n - off : mode == 2 ? 1 : piece(&rng, n - off);
        feed(&s, in + off, len);
        off += len;
    }
    if (!s.finished && n == 0)
        feed(&s, in, 0); /* an empty stream still asks once */
    if (!s.finished && eof) {
        int rc = kd_h1_parser_eof(s.p);
        CHECK(kd_h1_parser_validate(s.p) == 0);
        CHECK(rc == KD_H1_EV_DONE || rc < 0);
        if (rc == KD_H1_EV_DONE)
            CHECK(!kd_h1_parser_keep_alive(s.p) || kd_h1_parser_response(s.p)->framing != KD_H1_BODY_CLOSE);
        s.r.rc = rc;
    }
    mix_int(&s.r.hash, (uint64_t)(int64_t)s.r.rc);
    kd_h1_parser_free(s.p);
    *out = s.r;
}

static bool same(const struct result *a, const struct result *b)
{
    return a->hash == b->hash && a->body_hash == b->body_hash && a->body_len == b->body_len &&
           a->rc == b->rc && a->responses == b->responses;
}

/* ---- writer ---- */

static bool has_bad(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
            return true;
    return false;
}

static void writer(const uint8_t *data, size_t size)
{
    char *copy = malloc(size + 1);
    CHECK(copy != NULL);
    memcpy(copy, data, size);
    copy[size] = 0;
    /* split into lines on LF; fields keep any other byte (CR and NUL included) */
    const char *lines[20];
    size_t lens[20], nl = 0;
    char *p = copy, *end = copy + size, *body = NULL;
    while (nl < 20) {
        char *e = memchr(p, '\n', (size_t)(end - p));
        lines[nl] = p;
        lens[nl] = (size_t)((e ? e : end) - p);
        nl++;
        if (e == NULL)
            break;
        *e = 0;
        p = e + 1;
        if (nl > 3 && lens[nl - 1] == 0) { /* empty line after the headers: the rest is the body */
            nl--;
            body = p;
            break;
        }
    }
    if (nl < 3) {
        free(copy);
        return;
    }
    struct kd_h1_header hs[17];
    size_t nh = 0;
    bool bad = false;
    for (size_t i = 3; i < nl; i++) {
        const char *c = memchr(lines[i], ':', lens[i]);
        if (c == NULL)
            continue;
        hs[nh] = (struct kd_h1_header){lines[i], (size_t)(c - lines[i]), c + 1,
                                       lens[i] - (size_t)(c - lines[i]) - 1};
        bad |= has_bad(hs[nh].name, hs[nh].name_len) || has_bad(hs[nh].value, hs[nh].value_len);
        nh++;
    }
    /* method, target and host are C strings: they end at a NUL */
    for (int i = 0; i < 3; i++)
        bad |= has_bad(lines[i], strlen(lines[i])) || memchr(lines[i], ' ', strlen(lines[i])) != NULL;
    struct kd_h1_request rq = {.method = lines[0],
                               .target = lines[1],
                               .host = lines[2],
                               .headers = hs,
                               .nheaders = nh,
                               .body = body,
                               .body_len = body ? (size_t)(end - body) : 0};
    size_t need = 0, len = 0;
    char err[96];
    int rc = kd_h1_request_write(&rq, NULL, 0, &need, err, sizeof(err));
    if (rc == KD_H1_E_FIELD) {
        CHECK(need == 0 && strlen(err) < sizeof(err));
        free(copy);
        return;
    }
    CHECK(rc == KD_H1_E_NOSPACE && need > 0);
    CHECK(!bad); /* accepted fields hold no CR, LF, NUL (or space in the request line and Host) */
    char *out = malloc(need);
    CHECK(out != NULL);
    CHECK(kd_h1_request_write(&rq, out, need, &len, NULL, 0) == 0 && len == need);
    size_t body_len = rq.body_len;
    size_t head_len = len - body_len;
    CHECK(head_len >= 4 && memcmp(out + head_len - 4, "\r\n\r\n", 4) == 0);
    size_t crlf = 0;
    for (size_t i = 0; i < head_len; i++) {
        CHECK(out[i] != '\0');
        if (out[i] == '\n')
            CHECK(i > 0 && out[i - 1] == '\r');
        if (out[i] == '\r') {
            CHECK(i + 1 < head_len && out[i + 1] == '\n');
            crlf++;
        }
    }
    CHECK(crlf == 2 + nh + (body ? 1 : 0) + 1); /* request line, Host, headers, Content-Length, end */
    CHECK(body_len == 0 || memcmp(out + head_len, body, body_len) == 0);
    free(out);
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    uint8_t flags = data[0];
    if (flags & 0x10) {
        writer(data + 4, size - 4);
        return 0;
    }
    struct kd_h1_limits lim = {.allow_close_delimited = (flags & 2) != 0};
    if (flags & 8) {
        lim.body_max = (uint64_t)data[1] * 4 + 1;
        lim.head_max = 24 + (size_t)(data[2] & 0x3f) * 4;
        lim.headers_max = 1 + (data[2] >> 6);
    }
    bool head_request = (flags & 1) != 0, eof = (flags & 4) != 0;
    struct result a, b, c;
    run(data + 4, size - 4, &lim, head_request, eof, data[3], 0, &a);
    run(data + 4, size - 4, &lim, head_request, eof, data[3], 1, &b);
    CHECK(same(&a, &b)); /* pieces changed the result */
    if (size <= 8192) {
        run(data + 4, size - 4, &lim, head_request, eof, data[3], 2, &c);
        CHECK(same(&a, &c)); /* one byte at a time changed the result */
    }
    return 0;
}

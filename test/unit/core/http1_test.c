/* http1_test.c — the HTTP/1.1 client codec (core/http1.h): the request writer (exact bytes, every
 * refusal named), the response parser on normal responses (Content-Length, chunked with extensions
 * and trailers, interim 1xx, HEAD, 204/304, close-delimited), keep-alive decisions, every refusal,
 * and each response fed whole, split at every byte, one byte at a time and in small pieces, which
 * must all give the same result. _validate() is called after every step. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/http1.h"

/* ---- writer ---------------------------------------------------------------------------------- */

static int write_req(const struct kd_h1_request *rq, char *out, size_t cap, size_t *len, char *err)
{
    return kd_h1_request_write(rq, out, cap, len, err, 128);
}

Test(http1_writer, get_with_headers)
{
    const struct kd_h1_header hs[] = {
        {"Authorization", 13, "Bearer tok", 10},
        {"Gitlab-Kas-Api-Request", 22, "a.b.c", 5},
    };
    struct kd_h1_request rq = {.method = "GET",
                               .target = "/api/v4/internal/kubernetes/agent_info",
                               .host = "gitlab:8080",
                               .headers = hs,
                               .nheaders = 2};
    char out[512], err[128] = "";
    size_t len;
    cr_assert_eq(write_req(&rq, out, sizeof(out), &len, err), 0, "%s", err);
    const char *want = "GET /api/v4/internal/kubernetes/agent_info HTTP/1.1\r\n"
                       "Host: gitlab:8080\r\n"
                       "Authorization: Bearer tok\r\n"
                       "Gitlab-Kas-Api-Request: a.b.c\r\n"
                       "\r\n";
    cr_assert_eq(len, strlen(want));
    cr_assert_eq(memcmp(out, want, len), 0, "%.*s", (int)len, out);
}

Test(http1_writer, body_and_content_length)
{
    const char *json = "{\"agent_id\":1}";
    const struct kd_h1_header hs[] = {{"Content-Type", 12, "application/json", 16}};
    struct kd_h1_request rq = {.method = "POST",
                               .target = "/x",
                               .host = "h",
                               .headers = hs,
                               .nheaders = 1,
                               .body = json,
                               .body_len = strlen(json)};
    char out[256];
    size_t len, need;
    cr_assert_eq(kd_h1_request_write(&rq, NULL, 0, &need, NULL, 0), KD_H1_E_NOSPACE, "size query");
    cr_assert_eq(kd_h1_request_write(&rq, out, need - 1, &len, NULL, 0), KD_H1_E_NOSPACE);
    cr_assert_eq(len, need, "the size needed is reported");
    cr_assert_eq(kd_h1_request_write(&rq, out, need, &len, NULL, 0), 0);
    const char *want = "POST /x HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
                       "Content-Length: 14\r\n\r\n{\"agent_id\":1}";
    cr_assert_eq(len, strlen(want));
    cr_assert_eq(memcmp(out, want, len), 0, "%.*s", (int)len, out);
}

Test(http1_writer, empty_body_still_has_length)
{
    struct kd_h1_request rq = {.method = "POST", .target = "/", .host = "h", .body = "", .body_len = 0};
    char out[128];
    size_t len;
    cr_assert_eq(kd_h1_request_write(&rq, out, sizeof(out), &len, NULL, 0), 0);
    const char *want = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n";
    cr_assert_eq(len, strlen(want));
    cr_assert_eq(memcmp(out, want, len), 0);
}

struct bad_req {
    const char *method, *target, *host;
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
    const char *err; /* expected text */
};

Test(http1_writer, refusals_name_the_field)
{
    static const struct bad_req cases[] = {
        {"GE T", "/", "h", NULL, 0, NULL, 0, "method: space"},
        {"GET\r", "/", "h", NULL, 0, NULL, 0, "method: CR"},
        {"", "/", "h", NULL, 0, NULL, 0, "method: empty"},
        {"G(T", "/", "h", NULL, 0, NULL, 0, "method: not a token"},
        {NULL, "/", "h", NULL, 0, NULL, 0, "method: missing"},
        {"GET", "/a\nb", "h", NULL, 0, NULL, 0, "target: LF"},
        {"GET", "/a b", "h", NULL, 0, NULL, 0, "target: space"},
        {"GET", "/a\x7f", "h", NULL, 0, NULL, 0, "target: control character"},
        {"GET", "/\xc3\xa9", "h", NULL, 0, NULL, 0, "target: non-ASCII byte"},
        {"GET", "", "h", NULL, 0, NULL, 0, "target: empty"},
        {"GET", "/", "h\r\nX: y", NULL, 0, NULL, 0, "host: CR"},
        {"GET", "/", "", NULL, 0, NULL, 0, "host: empty"},
        {"GET", "/", "h", "X-A", 3, "a\rb", 3, "header 1 value: CR"},
        {"GET", "/", "h", "X-A", 3, "a\nb", 3, "header 1 value: LF"},
        {"GET", "/", "h", "X-A", 3, "a\0b", 3, "header 1 value: NUL"},
        {"GET", "/", "h", "X-A", 3, "a\x01", 2, "header 1 value: control character"},
        {"GET", "/", "h", "X A", 3, "v", 1, "header 1 name: not a token"},
        {"GET", "/", "h", "X:A", 3, "v", 1, "header 1 name: not a token"},
        {"GET", "/", "h", "X\r\n", 3, "v", 1, "header 1 name: CR"},
        {"GET", "/", "h", "X\0", 2, "v", 1, "header 1 name: NUL"},
        {"GET", "/", "h", "", 0, "v", 1, "header 1 name: empty"},
        {"GET", "/", "h", "HOST", 4, "v", 1, "header 1 name: set by the writer"},
        {"GET", "/", "h", "content-length", 14, "1", 1, "header 1 name: set by the writer"},
        {"GET", "/", "h", "Transfer-Encoding", 17, "chunked", 7, "header 1 name: set by the writer"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct bad_req *c = &cases[i];
        struct kd_h1_header hs[2] = {{"Accept", 6, "*/*", 3}, {c->name, c->name_len, c->value, c->value_len}};
        struct kd_h1_request rq = {.method = c->method,
                                   .target = c->target,
                                   .host = c->host,
                                   .headers = hs,
                                   .nheaders = c->name ? 2 : 1};
        char out[256], err[128] = "";
        size_t len = 99;
        cr_assert_eq(write_req(&rq, out, sizeof(out), &len, err), KD_H1_E_FIELD, "case %zu", i);
        cr_assert_str_eq(err, c->err, "case %zu", i);
        cr_assert_eq(len, 0, "case %zu: nothing written", i);
    }
}

/* ---- parser harness ---------------------------------------------------------------------------- */

struct opts {
    struct kd_h1_limits lim;
    bool head_request;
    bool eof; /* the peer closes after the input */
};

struct res {
    int rc; /* DONE, NEED_MORE (input ended, no eof) or an error */
    bool head;
    int status, minor;
    enum kd_h1_framing framing;
    uint64_t cl;
    size_t nheaders;
    unsigned interim;
    char hdrs[1024];
    size_t hdrs_len;
    char body[4096];
    size_t body_len;
    bool keep;
    size_t consumed; /* at DONE: where the response ended */
};

static void add(char *dst, size_t *dl, size_t cap, const char *s, size_t n)
{
    cr_assert_leq(*dl + n, cap, "test buffer too small");
    memcpy(dst + *dl, s, n);
    *dl += n;
}

/* Feed one piece; true when finished (DONE or error). */
static bool feed(struct kd_h1_parser *p, const char *in, size_t n, size_t base, struct res *r)
{
    size_t off = 0;
    for (;;) {
        size_t used = 12345;
        struct kd_h1_slice b;
        int rc = kd_h1_parser_feed(p, in + off, n - off, &used, &b);
        cr_assert_eq(kd_h1_parser_validate(p), 0, "validate after rc %d", rc);
        cr_assert_leq(used, n - off);
        if (rc >= 0 && rc != KD_H1_EV_BODY)
            cr_assert_null(b.p);
        off += used;
        switch (rc) {
        case KD_H1_EV_NEED_MORE:
            cr_assert_eq(off, n, "NEED_MORE takes everything");
            return false;
        case KD_H1_EV_HEAD: {
            const struct kd_h1_response *h = kd_h1_parser_response(p);
            cr_assert_not_null(h);
            cr_assert(!r->head, "one HEAD event");
            r->head = true;
            r->status = h->status;
            r->minor = h->minor;
            r->framing = h->framing;
            r->cl = h->content_length;
            r->nheaders = h->nheaders;
            r->interim = h->interim;
            struct kd_h1_header hd;
            for (size_t i = 0; kd_h1_parser_header(p, i, &hd); i++) {
                add(r->hdrs, &r->hdrs_len, sizeof(r->hdrs), hd.name, hd.name_len);
                add(r->hdrs, &r->hdrs_len, sizeof(r->hdrs), "=", 1);
                add(r->hdrs, &r->hdrs_len, sizeof(r->hdrs), hd.value, hd.value_len);
                add(r->hdrs, &r->hdrs_len, sizeof(r->hdrs), "\n", 1);
            }
            break;
        }
        case KD_H1_EV_BODY:
            cr_assert(r->head, "body after head");
            cr_assert_gt(b.len, 0, "never an empty body event");
            cr_assert(b.p >= (const uint8_t *)in && b.p + b.len <= (const uint8_t *)in + off,
                      "body is a slice of the input just taken");
            add(r->body, &r->body_len, sizeof(r->body), (const char *)b.p, b.len);
            break;
        case KD_H1_EV_DONE:
            r->rc = rc;
            r->consumed = base + off;
            r->keep = kd_h1_parser_keep_alive(p);
            return true;
        default:
            cr_assert_lt(rc, 0, "unknown event %d", rc);
            r->rc = rc;
            cr_assert_eq(kd_h1_parser_feed(p, "x", 1, &used, &b), rc, "errors are sticky");
            cr_assert_eq(used, 0);
            return true;
        }
    }
}

/* cuts: ascending positions where the input is cut (pieces between them). */
static void run_cuts(const char *in, size_t n, const struct opts *o, const size_t *cuts, size_t ncuts,
                     struct res *r)
{
    memset(r, 0, sizeof(*r));
    struct kd_h1_parser *p = kd_h1_parser_new(&o->lim);
    cr_assert_not_null(p);
    kd_h1_parser_reset(p, o->head_request);
    size_t start = 0;
    bool finished = false;
    for (size_t i = 0; i <= ncuts && !finished; i++) {
        size_t end = i < ncuts ? cuts[i] : n;
        finished = feed(p, in + start, end - start, start, r);
        start = end;
    }
    if (!finished) {
        r->rc = KD_H1_EV_NEED_MORE;
        if (o->eof) {
            r->rc = kd_h1_parser_eof(p);
            cr_assert_eq(kd_h1_parser_validate(p), 0);
            if (r->rc == KD_H1_EV_DONE) {
                r->consumed = n;
                r->keep = kd_h1_parser_keep_alive(p);
            }
        }
    }
    kd_h1_parser_free(p);
}

static void run_whole(const char *in, size_t n, const struct opts *o, struct res *r)
{
    run_cuts(in, n, o, NULL, 0, r);
}

static void same(const struct res *a, const struct res *b, const char *how)
{
    cr_assert_eq(a->rc, b->rc, "%s: rc %d vs %d", how, a->rc, b->rc);
    cr_assert_eq(a->head, b->head, "%s", how);
    cr_assert_eq(a->status, b->status, "%s", how);
    cr_assert_eq(a->minor, b->minor, "%s", how);
    cr_assert_eq(a->framing, b->framing, "%s", how);
    cr_assert_eq(a->cl, b->cl, "%s", how);
    cr_assert_eq(a->nheaders, b->nheaders, "%s", how);
    cr_assert_eq(a->interim, b->interim, "%s", how);
    cr_assert_eq(a->hdrs_len, b->hdrs_len, "%s", how);
    cr_assert_eq(memcmp(a->hdrs, b->hdrs, a->hdrs_len), 0, "%s", how);
    cr_assert_eq(a->body_len, b->body_len, "%s: body %zu vs %zu", how, a->body_len, b->body_len);
    cr_assert_eq(memcmp(a->body, b->body, a->body_len), 0, "%s", how);
    cr_assert_eq(a->keep, b->keep, "%s", how);
    cr_assert_eq(a->consumed, b->consumed, "%s", how);
}

/* Whole, every two-piece split, one byte at a time, and pieces of 2..7 bytes: all the same. */
static void check_splits(const char *in, size_t n, const struct opts *o, struct res *whole)
{
    run_whole(in, n, o, whole);
    struct res r;
    for (size_t i = 0; i <= n; i++) {
        run_cuts(in, n, o, &i, 1, &r);
        char how[64];
        snprintf(how, sizeof(how), "split at %zu", i);
        same(whole, &r, how);
    }
    size_t *cuts = malloc((n + 1) * sizeof(size_t));
    for (size_t step = 1; step <= 7; step++) {
        size_t nc = 0;
        for (size_t i = step; i < n; i += step)
            cuts[nc++] = i;
        run_cuts(in, n, o, cuts, nc, &r);
        char how[64];
        snprintf(how, sizeof(how), "pieces of %zu", step);
        same(whole, &r, how);
    }
    free(cuts);
}

#define S(x) x, sizeof(x) - 1

static const struct opts defaults = {{0}, false, false};

/* ---- normal responses ---------------------------------------------------------------------------- */

Test(http1_parse, content_length)
{
    static const char in[] = "HTTP/1.1 200 OK\r\n"
                             "Content-Type: application/json\r\n"
                             "X-Empty:\r\n"
                             "X-Spaces: \t a b \t \r\n"
                             "Content-Length: 19\r\n"
                             "\r\n"
                             "{\"project_id\":1234}";
    struct res r;
    check_splits(S(in), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.status, 200);
    cr_assert_eq(r.minor, 1);
    cr_assert_eq(r.framing, KD_H1_BODY_LENGTH);
    cr_assert_eq(r.cl, 19);
    cr_assert_eq(r.nheaders, 4);
    cr_assert_str_eq(r.hdrs, "Content-Type=application/json\nX-Empty=\nX-Spaces=a b\nContent-Length=19\n");
    cr_assert_eq(r.body_len, 19);
    cr_assert_eq(memcmp(r.body, "{\"project_id\":1234}", 19), 0);
    cr_assert(r.keep);
    cr_assert_eq(r.consumed, sizeof(in) - 1);
}

Test(http1_parse, accessors_reason_find_and_extra_bytes)
{
    static const char in[] =
        "HTTP/1.1 404 Not  Found\r\ncontent-length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nhiEXTRA";
    struct kd_h1_parser *p = kd_h1_parser_new(NULL);
    size_t used;
    struct kd_h1_slice b;
    cr_assert_null(kd_h1_parser_response(p));
    cr_assert_eq(kd_h1_parser_feed(p, in, sizeof(in) - 1, &used, &b), KD_H1_EV_HEAD);
    const struct kd_h1_response *h = kd_h1_parser_response(p);
    cr_assert_eq(h->status, 404);
    cr_assert_eq(h->reason_len, 10);
    cr_assert_eq(memcmp(h->reason, "Not  Found", 10), 0);
    size_t vl;
    const char *v = kd_h1_parser_find(p, "X-a", &vl);
    cr_assert_not_null(v);
    cr_assert_eq(vl, 1);
    cr_assert_eq(*v, '1', "the first of repeated headers");
    cr_assert_null(kd_h1_parser_find(p, "X-B", &vl));
    size_t off = used;
    cr_assert_eq(kd_h1_parser_feed(p, in + off, sizeof(in) - 1 - off, &used, &b), KD_H1_EV_BODY);
    cr_assert_eq(b.len, 2);
    off += used;
    cr_assert(!kd_h1_parser_keep_alive(p), "not before DONE");
    cr_assert_eq(kd_h1_parser_feed(p, in + off, sizeof(in) - 1 - off, &used, &b), KD_H1_EV_DONE);
    cr_assert_eq(used, 0);
    cr_assert(kd_h1_parser_keep_alive(p));
    cr_assert_eq(kd_h1_parser_feed(p, in + off, sizeof(in) - 1 - off, &used, &b), KD_H1_E_EXTRA);
    cr_assert_eq(used, 0);
    cr_assert_eq(kd_h1_parser_feed(p, "", 0, &used, &b), KD_H1_EV_DONE, "still done");
    cr_assert_eq(kd_h1_parser_eof(p), KD_H1_EV_DONE);
    cr_assert_eq(kd_h1_parser_body_seen(p), 2);
    cr_assert_eq(kd_h1_parser_validate(p), 0);
    kd_h1_parser_free(p);
}

Test(http1_parse, chunked_with_extensions_and_trailers)
{
    static const char in[] = "HTTP/1.1 200 OK\r\n"
                             "Transfer-Encoding: Chunked\r\n"
                             "\r\n"
                             "5\r\nhello\r\n"
                             "000B;name=value;flag \t ;q=\"quoted;\\\"\"\r\n, world!!\r\n\r\n"
                             "1 ;x\r\n.\r\n"
                             "0000\r\n"
                             "Expires: never\r\n"
                             "X-Checksum:abc\r\n"
                             "\r\n";
    struct res r;
    check_splits(S(in), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.framing, KD_H1_BODY_CHUNKED);
    cr_assert_eq(r.body_len, 17);
    cr_assert_eq(memcmp(r.body, "hello, world!!\r\n.", 17), 0, "%.*s", (int)r.body_len, r.body);
    cr_assert(r.keep);
    cr_assert_eq(r.consumed, sizeof(in) - 1);
}

Test(http1_parse, chunked_empty_body)
{
    static const char in[] = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    struct res r;
    check_splits(S(in), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.body_len, 0);
}

Test(http1_parse, interim_responses_are_skipped)
{
    static const char in[] = "HTTP/1.1 100 Continue\r\n\r\n"
                             "HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                             "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
    struct res r;
    check_splits(S(in), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.status, 201);
    cr_assert_eq(r.interim, 2);
    cr_assert_eq(r.nheaders, 1, "headers of the 1xx are not kept");
    cr_assert_str_eq(r.hdrs, "Content-Length=0\n");
}

Test(http1_parse, no_body_for_head_204_304)
{
    static const char head[] = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
    struct opts o = defaults;
    o.head_request = true;
    struct res r;
    check_splits(S(head), &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.framing, KD_H1_BODY_NONE);
    cr_assert_eq(r.consumed, sizeof(head) - 1);
    cr_assert(r.keep);

    static const char nc[] = "HTTP/1.1 204 No Content\r\n\r\n";
    check_splits(S(nc), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.framing, KD_H1_BODY_NONE);

    static const char nm[] = "HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n";
    check_splits(S(nm), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.framing, KD_H1_BODY_NONE);
    cr_assert_eq(r.body_len, 0);
}

Test(http1_parse, close_delimited_only_when_allowed)
{
    static const char in[] = "HTTP/1.0 200 OK\r\nServer: old\r\n\r\nall of it";
    struct opts o = defaults;
    o.eof = true;
    struct res r;
    check_splits(S(in), &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_NO_LENGTH);

    o.lim.allow_close_delimited = true;
    check_splits(S(in), &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.framing, KD_H1_BODY_CLOSE);
    cr_assert_eq(r.body_len, 9);
    cr_assert(!r.keep, "a close-delimited body ends the connection");

    o.eof = false;
    check_splits(S(in), &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_NEED_MORE, "not done until the peer closes");

    o.eof = true;
    o.lim.body_max = 4;
    check_splits(S(in), &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_BODY_TOO_BIG);
    cr_assert_eq(r.body_len, 4, "the bytes within the limit are delivered, whatever the split");

    static const char fits[] = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabcd";
    check_splits(S(fits), &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE, "exactly body_max is fine");
    cr_assert_eq(r.body_len, 4);
}

struct ka {
    const char *in;
    bool keep;
};

Test(http1_parse, keep_alive_decisions)
{
    static const struct ka cases[] = {
        {"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true},
        {"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false},
        {"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n", false},
        {"HTTP/1.1 200 OK\r\nConnection: x-foo,  \r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
         true},
        {"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false},
        {"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", true},
        {"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", false},
        {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", true},
        {"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct res r;
        check_splits(cases[i].in, strlen(cases[i].in), &defaults, &r);
        cr_assert_eq(r.rc, KD_H1_EV_DONE, "case %zu", i);
        cr_assert_eq(r.keep, cases[i].keep, "case %zu", i);
    }
}

Test(http1_parse, equal_content_lengths_are_one)
{
    static const char in[] = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3, 3\r\n\r\nabc";
    struct res r;
    check_splits(S(in), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.cl, 3);
    cr_assert_eq(r.body_len, 3);
}

Test(http1_parse, status_line_forms)
{
    static const char no_reason[] = "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n";
    static const char empty_reason[] = "HTTP/1.1 503 \r\nContent-Length: 0\r\n\r\n";
    struct res r;
    check_splits(S(no_reason), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.status, 200);
    check_splits(S(empty_reason), &defaults, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.status, 503);
}

Test(http1_parse, reuse_after_reset)
{
    static const char in[] =
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
        "HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n";
    struct kd_h1_parser *p = kd_h1_parser_new(NULL);
    size_t off = 0, used;
    struct kd_h1_slice b;
    int rc, statuses[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        while ((rc = kd_h1_parser_feed(p, in + off, sizeof(in) - 1 - off, &used, &b)) != KD_H1_EV_DONE) {
            cr_assert_geq(rc, 0);
            off += used;
            if (rc == KD_H1_EV_HEAD)
                statuses[i] = kd_h1_parser_response(p)->status;
        }
        off += used;
        cr_assert(kd_h1_parser_keep_alive(p));
        kd_h1_parser_reset(p, false);
        cr_assert_null(kd_h1_parser_response(p));
        cr_assert_eq(kd_h1_parser_body_seen(p), 0);
    }
    cr_assert_eq(off, sizeof(in) - 1);
    cr_assert_eq(statuses[0], 200);
    cr_assert_eq(statuses[1], 401);
    kd_h1_parser_free(p);
}

/* ---- refusals ---------------------------------------------------------------------------------- */

struct bad {
    const char *in;
    size_t len; /* 0: strlen */
    int err;
    uint64_t body_max;
    bool eof;
};

#define OK200   "HTTP/1.1 200 OK\r\n"
#define CHUNKED OK200 "Transfer-Encoding: chunked\r\n\r\n"

Test(http1_parse, every_refusal)
{
    static const struct bad cases[] = {
        {"HTTP/1.1 200OK\r\n\r\n", 0, KD_H1_E_STATUS_LINE, 0, false},
        {"HTTP/1.1  200 OK\r\n\r\n", 0, KD_H1_E_STATUS_LINE, 0, false},
        {"HTTP/1.1 20 OK\r\n\r\n", 0, KD_H1_E_STATUS_LINE, 0, false},
        {"http/1.1 200 OK\r\n\r\n", 0, KD_H1_E_STATUS_LINE, 0, false},
        {"\r\nHTTP/1.1 200 OK\r\n\r\n", 0, KD_H1_E_STATUS_LINE, 0, false},
        {"HTTP/1.1 200 O\x01K\r\n\r\n", 0, KD_H1_E_STATUS_LINE, 0, false},
        {"HTTP/2.0 200 OK\r\n\r\n", 0, KD_H1_E_VERSION, 0, false},
        {"HTTP/1.2 200 OK\r\n\r\n", 0, KD_H1_E_VERSION, 0, false},
        {"HTTP/0.9 200 OK\r\n\r\n", 0, KD_H1_E_VERSION, 0, false},
        {"HTTP/1.1 600 Nope\r\n\r\n", 0, KD_H1_E_STATUS, 0, false},
        {"HTTP/1.1 099 Nope\r\n\r\n", 0, KD_H1_E_STATUS, 0, false},
        {"HTTP/1.1 200 OK\n\r\n", 0, KD_H1_E_LINE_END, 0, false},
        {OK200 "A: b\n\r\n", 0, KD_H1_E_LINE_END, 0, false},
        {OK200 "A: b\rc\r\n\r\n", 0, KD_H1_E_LINE_END, 0, false},
        {OK200 "\n", 0, KD_H1_E_LINE_END, 0, false},
        {OK200 "A b: c\r\n\r\n", 0, KD_H1_E_HEADER, 0, false},
        {OK200 "A : c\r\n\r\n", 0, KD_H1_E_HEADER, 0, false},
        {OK200 "A\t: c\r\n\r\n", 0, KD_H1_E_HEADER, 0, false},
        {OK200 "NoColon\r\n\r\n", 0, KD_H1_E_HEADER, 0, false},
        {OK200 ": empty name\r\n\r\n", 0, KD_H1_E_HEADER, 0, false},
        {OK200 "A: b\x01"
               "c\r\n\r\n",
         0, KD_H1_E_HEADER_VALUE, 0, false},
        {OK200 "A: b\x7f\r\n\r\n", 0, KD_H1_E_HEADER_VALUE, 0, false},
        {OK200 "A: b\0c\r\n\r\n", sizeof(OK200 "A: b\0c\r\n\r\n") - 1, KD_H1_E_HEADER_VALUE, 0, false},
        {OK200 "A: b\r\n c\r\n\r\n", 0, KD_H1_E_OBS_FOLD, 0, false},
        {OK200 " A: b\r\n\r\n", 0, KD_H1_E_OBS_FOLD, 0, false},
        {OK200 "Content-Length: abc\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: -1\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: +1\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length:\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: 1,,1\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: 0x10\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: 99999999999999999999999\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: 4611686018427387905\r\n\r\n", 0, KD_H1_E_CONTENT_LENGTH, 0, false},
        {OK200 "Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 0, KD_H1_E_LENGTH_CONFLICT, 0, false},
        {OK200 "Content-Length: 5, 6\r\n\r\n", 0, KD_H1_E_LENGTH_CONFLICT, 0, false},
        {OK200 "Transfer-Encoding: gzip\r\n\r\n", 0, KD_H1_E_TRANSFER_CODING, 0, false},
        {OK200 "Transfer-Encoding: gzip, chunked\r\n\r\n", 0, KD_H1_E_TRANSFER_CODING, 0, false},
        {OK200 "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 0, KD_H1_E_TRANSFER_CODING,
         0, false},
        {OK200 "Transfer-Encoding: ,\r\n\r\n", 0, KD_H1_E_TRANSFER_CODING, 0, false},
        {OK200 "Transfer-Encoding: chunked;q=1\r\n\r\n", 0, KD_H1_E_TRANSFER_CODING, 0, false},
        {"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0, KD_H1_E_TRANSFER_CODING, 0, false},
        {OK200 "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 0, KD_H1_E_TE_AND_CL, 0, false},
        {OK200 "Content-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\n", 0, KD_H1_E_TE_AND_CL, 0, false},
        {OK200 "\r\nabc", 0, KD_H1_E_NO_LENGTH, 0, false},
        {CHUNKED "x\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED ";ext\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "-1\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "5x\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "10000000000000000\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "4000000000000001\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "ffffffffffffffffffffffff\r\n", 0, KD_H1_E_CHUNK_SIZE, 0, false},
        {CHUNKED "5\n", 0, KD_H1_E_LINE_END, 0, false},
        {CHUNKED "5\rx", 0, KD_H1_E_LINE_END, 0, false},
        {CHUNKED "5;a\n", 0, KD_H1_E_LINE_END, 0, false},
        {CHUNKED "5 x\r\n", 0, KD_H1_E_CHUNK_EXT, 0, false},
        {CHUNKED "5 \r\n", 0, KD_H1_E_CHUNK_EXT, 0, false},
        {CHUNKED "5;a\x01\r\n", 0, KD_H1_E_CHUNK_EXT, 0, false},
        {CHUNKED "5\r\nhelloX\r\n", 0, KD_H1_E_CHUNK_END, 0, false},
        {CHUNKED "5\r\nhello\rX", 0, KD_H1_E_CHUNK_END, 0, false},
        {CHUNKED "0\r\nBad Trailer: x\r\n\r\n", 0, KD_H1_E_TRAILER, 0, false},
        {CHUNKED "0\r\nNoColon\r\n\r\n", 0, KD_H1_E_TRAILER, 0, false},
        {CHUNKED "0\r\n:x\r\n\r\n", 0, KD_H1_E_TRAILER, 0, false},
        {CHUNKED "0\r\nA: \x01\r\n\r\n", 0, KD_H1_E_TRAILER, 0, false},
        {CHUNKED "0\r\nA: b\r\n c\r\n\r\n", 0, KD_H1_E_OBS_FOLD, 0, false},
        {CHUNKED "0\r\nA: b\n\r\n", 0, KD_H1_E_LINE_END, 0, false},
        {CHUNKED "0\r\n\rX", 0, KD_H1_E_LINE_END, 0, false},
        {OK200 "Content-Length: 11\r\n\r\n", 0, KD_H1_E_BODY_TOO_BIG, 10, false},
        {CHUNKED "5\r\nhello\r\n6\r\n", 0, KD_H1_E_BODY_TOO_BIG, 10, false},
        {"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", 0, KD_H1_E_UPGRADE, 0, false},
        {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
         "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
         "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
         0, KD_H1_E_INTERIM, 0, false},
        {"", 0, KD_H1_E_TRUNCATED, 0, true},
        {"HTTP/1.1 200 OK\r\nContent-Len", 0, KD_H1_E_TRUNCATED, 0, true},
        {OK200 "Content-Length: 5\r\n\r\nabcd", 0, KD_H1_E_TRUNCATED, 0, true},
        {CHUNKED "5\r\nhello\r\n", 0, KD_H1_E_TRUNCATED, 0, true},
        {CHUNKED "0\r\nA: b\r\n", 0, KD_H1_E_TRUNCATED, 0, true},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct bad *c = &cases[i];
        struct opts o = defaults;
        o.lim.body_max = c->body_max;
        o.eof = c->eof;
        struct res r;
        check_splits(c->in, c->len ? c->len : strlen(c->in), &o, &r);
        cr_assert_eq(r.rc, c->err, "case %zu: got %d (%s), want %d (%s)", i, r.rc, kd_h1_strerror(r.rc),
                     c->err, kd_h1_strerror(c->err));
    }
}

Test(http1_parse, limits_on_head_headers_and_trailers)
{
    char in[4096];
    struct opts o = defaults;
    o.lim.head_max = 64;
    o.lim.headers_max = 3;
    struct res r;
    /* exactly 64 bytes of head: accepted */
    int n = snprintf(in, sizeof(in), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: %s\r\n\r\n",
                     "0123456789abcdefghijk");
    cr_assert_eq(n, 64);
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    n = snprintf(in, sizeof(in), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: %s\r\n\r\n",
                 "0123456789abcdefghijkl");
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_HEAD_TOO_BIG);
    /* one never-ending line */
    memset(in, 'a', 200);
    check_splits(in, 200, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_HEAD_TOO_BIG);

    n = snprintf(in, sizeof(in), OK200 "A: 1\r\nB: 2\r\nC: 3\r\n\r\n");
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_NO_LENGTH, "three headers are fine");
    n = snprintf(in, sizeof(in), OK200 "A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n");
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_TOO_MANY_HEADERS);

    n = snprintf(in, sizeof(in), CHUNKED "0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n");
    o.lim.head_max = 0;
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE, "three trailers are fine");
    n = snprintf(in, sizeof(in), CHUNKED "0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n");
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_TRAILER, "a fourth is not");
    o.lim.head_max = 64;
    n = snprintf(in, sizeof(in), CHUNKED "0\r\nA: %070d\r\n\r\n", 0);
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_TRAILER, "trailers over head_max bytes");

    /* a chunk-size line: leading zeros are fine, but the line is bounded */
    o = defaults;
    n = snprintf(in, sizeof(in), CHUNKED "%0500d1\r\nx\r\n0\r\n\r\n", 0);
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_DONE);
    cr_assert_eq(r.body_len, 1);
    n = snprintf(in, sizeof(in), CHUNKED "1;%01100d\r\nx\r\n0\r\n\r\n", 0);
    check_splits(in, (size_t)n, &o, &r);
    cr_assert_eq(r.rc, KD_H1_E_CHUNK_EXT);
}

Test(http1_parse, largest_lengths_within_body_max)
{
    struct opts o = defaults;
    o.lim.body_max = UINT64_MAX;
    struct res r;
    static const char cl[] = OK200 "Content-Length: 4611686018427387904\r\n\r\nabc";
    run_whole(S(cl), &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_NEED_MORE);
    cr_assert_eq(r.cl, (uint64_t)1 << 62);
    cr_assert_eq(r.body_len, 3);
    static const char ch[] = CHUNKED "4000000000000000\r\nabc";
    run_whole(S(ch), &o, &r);
    cr_assert_eq(r.rc, KD_H1_EV_NEED_MORE);
    cr_assert_eq(r.body_len, 3);
}

Test(http1_misc, strerror_and_limits)
{
    for (int e = -1; e >= KD_H1_E_LAST; e--) {
        const char *t = kd_h1_strerror(e);
        cr_assert_not_null(t);
        cr_assert_str_neq(t, "unknown error", "error %d has a text", e);
        for (int f = e - 1; f >= KD_H1_E_LAST; f--)
            cr_assert_str_neq(t, kd_h1_strerror(f), "texts differ: %d and %d", e, f);
    }
    cr_assert_str_eq(kd_h1_strerror(0), "unknown error");
    cr_assert_str_eq(kd_h1_strerror(KD_H1_E_LAST - 1), "unknown error");
    struct kd_h1_limits lim = {.head_max = KD_H1_HEAD_MAX_LIMIT + 1};
    cr_assert_null(kd_h1_parser_new(&lim));
    lim = (struct kd_h1_limits){.headers_max = KD_H1_HEADERS_MAX_LIMIT + 1};
    cr_assert_null(kd_h1_parser_new(&lim));
}

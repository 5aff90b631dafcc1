/* httpmap_test.c — core/httpmap.c against protobuf-c code generated from proto/: the request header
 * message decodes as GitLab's grpctool.HttpRequest with kas's header and query rules; responses
 * built by the generated code parse back; headers an agent must not pass are dropped. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/httpmap.h"
#include "gitlab/agent/grpctool/grpctool.pb-c.h"

#define H(n, v)                                                                                              \
    {                                                                                                        \
        n, sizeof(n) - 1, v, sizeof(v) - 1                                                                   \
    }

static Gitlab__Agent__Grpctool__HttpRequest *encode(const struct kd_hm_request *rq)
{
    uint8_t *buf;
    size_t len;
    cr_assert_eq(kd_hm_encode_request_header(rq, 1 << 20, &buf, &len), 0);
    Gitlab__Agent__Grpctool__HttpRequest *m = gitlab__agent__grpctool__http_request__unpack(NULL, len, buf);
    free(buf);
    cr_assert_not_null(m, "not a valid HttpRequest");
    cr_assert_eq(m->message_case, GITLAB__AGENT__GRPCTOOL__HTTP_REQUEST__MESSAGE_HEADER);
    return m;
}

static const Gitlab__Agent__Prototool__Values *header_values(const Gitlab__Agent__Prototool__HttpRequest *r,
                                                             const char *key)
{
    for (size_t i = 0; i < r->n_header; i++)
        if (strcmp(r->header[i]->key, key) == 0)
            return r->header[i]->value;
    return NULL;
}

static const Gitlab__Agent__Prototool__Values *query_values(const Gitlab__Agent__Prototool__HttpRequest *r,
                                                            const char *key)
{
    for (size_t i = 0; i < r->n_query; i++)
        if (strcmp(r->query[i]->key, key) == 0)
            return r->query[i]->value;
    return NULL;
}

Test(httpmap, request_header_as_kas_sends_it)
{
    const struct kd_hm_header hs[] = {
        H("accept", "application/json"),
        H("user-agent", "kubectl/v1.29"),
        H("x-multi", "1"),
        H("authorization", "Bearer pat:1:secret"),
        H("cookie", "_gitlab_kas=x"),
        H("gitlab-agent-id", "1"),
        H("x-csrf-token", "t"),
        H("connection", "keep-alive, X-Listed"),
        H("x-listed", "gone"),
        H("keep-alive", "timeout=5"),
        H("transfer-encoding", "chunked"),
        H("te", "trailers"),
        H("host", "kas.example"),
        H(":authority", "kas.example"),
        H("X-MULTI", "2"),
        H("via", "1.1 proxy"),
    };
    const char *const groups[] = {"devs", "ops"};
    struct kd_hm_imp imp = {.username = "alice", .groups = groups, .ngroups = 2, .uid = "42"};
    const char q[] =
        "watch=1&labelSelector=app%3Dweb&x=a+b&x=c&gitlab-agent-id=1&gitlab-csrf-token=t&bad=%zz&semi=a;b";
    struct kd_hm_request rq = {
        .method = "GET",
        .method_len = 3,
        .url_path = "/api/v1/pods",
        .url_path_len = 12,
        .query = q,
        .query_len = sizeof(q) - 1,
        .headers = hs,
        .nheaders = sizeof(hs) / sizeof(hs[0]),
        .via = "gRPC/1.0 kasd/test",
        .imp = &imp,
        .content_length = -1,
    };
    Gitlab__Agent__Grpctool__HttpRequest *m = encode(&rq);
    const Gitlab__Agent__Grpctool__HttpRequest__Header *h = m->header;
    const Gitlab__Agent__Prototool__HttpRequest *r = h->request;
    cr_assert_str_eq(r->method, "GET");
    cr_assert_str_eq(r->url_path, "/api/v1/pods");
    cr_assert_eq(h->_content_length_case,
                 GITLAB__AGENT__GRPCTOOL__HTTP_REQUEST__HEADER___CONTENT_LENGTH_CONTENT_LENGTH);
    cr_assert_eq(h->content_length, -1);
    /* kept, canonical names, values of one name together in order */
    cr_assert_str_eq(header_values(r, "Accept")->value[0], "application/json");
    cr_assert_str_eq(header_values(r, "User-Agent")->value[0], "kubectl/v1.29");
    const Gitlab__Agent__Prototool__Values *mv = header_values(r, "X-Multi");
    cr_assert_eq(mv->n_value, 2);
    cr_assert_str_eq(mv->value[0], "1");
    cr_assert_str_eq(mv->value[1], "2");
    const Gitlab__Agent__Prototool__Values *via = header_values(r, "Via");
    cr_assert_eq(via->n_value, 2);
    cr_assert_str_eq(via->value[1], "gRPC/1.0 kasd/test");
    cr_assert_eq(r->n_header, 4, "got %zu headers", r->n_header);
    /* query: Go's ParseQuery, kas's own parameters dropped */
    cr_assert_str_eq(query_values(r, "watch")->value[0], "1");
    cr_assert_str_eq(query_values(r, "labelSelector")->value[0], "app=web");
    const Gitlab__Agent__Prototool__Values *xv = query_values(r, "x");
    cr_assert_eq(xv->n_value, 2);
    cr_assert_str_eq(xv->value[0], "a b");
    cr_assert_str_eq(xv->value[1], "c");
    cr_assert_eq(r->n_query, 3);
    /* impersonation: Any(HeaderExtra{imp_config{username=1, groups=2, uid=3}}) */
    cr_assert_not_null(h->extra);
    cr_assert_str_eq(h->extra->type_url, "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra");
    const uint8_t want[] = {0x0a, 0x16, 0x0a, 0x05, 'a',  'l', 'i', 'c', 'e',  0x12, 0x04, 'd',
                            'e',  'v',  's',  0x12, 0x03, 'o', 'p', 's', 0x1a, 0x02, '4',  '2'};
    cr_assert_eq(h->extra->value.len, sizeof(want));
    cr_assert(memcmp(h->extra->value.data, want, sizeof(want)) == 0);
    gitlab__agent__grpctool__http_request__free_unpacked(m, NULL);
}

Test(httpmap, no_impersonation_no_extra_and_size_limit)
{
    const struct kd_hm_header hs[] = {H("accept", "*/*")};
    struct kd_hm_imp none = {0};
    struct kd_hm_request rq = {.method = "POST",
                               .method_len = 4,
                               .url_path = "/x",
                               .url_path_len = 2,
                               .headers = hs,
                               .nheaders = 1,
                               .imp = &none,
                               .content_length = 7};
    Gitlab__Agent__Grpctool__HttpRequest *m = encode(&rq);
    cr_assert_null(m->header->extra);
    cr_assert_eq(m->header->content_length, 7);
    cr_assert_eq(m->header->request->n_query, 0);
    gitlab__agent__grpctool__http_request__free_unpacked(m, NULL);
    uint8_t *buf = NULL;
    size_t len;
    cr_assert_eq(kd_hm_encode_request_header(&rq, 10, &buf, &len), -E2BIG);
    cr_assert_null(buf);
}

Test(httpmap, data_and_trailer_messages)
{
    uint8_t out[64];
    size_t n = kd_hm_data_size(5);
    cr_assert_eq(kd_hm_put_data(out, "hello", 5) - out, (long)n);
    Gitlab__Agent__Grpctool__HttpRequest *m = gitlab__agent__grpctool__http_request__unpack(NULL, n, out);
    cr_assert_eq(m->message_case, GITLAB__AGENT__GRPCTOOL__HTTP_REQUEST__MESSAGE_DATA);
    cr_assert_eq(m->data->data.len, 5);
    cr_assert(memcmp(m->data->data.data, "hello", 5) == 0);
    gitlab__agent__grpctool__http_request__free_unpacked(m, NULL);
    m = gitlab__agent__grpctool__http_request__unpack(NULL, sizeof(kd_hm_trailer), kd_hm_trailer);
    cr_assert_eq(m->message_case, GITLAB__AGENT__GRPCTOOL__HTTP_REQUEST__MESSAGE_TRAILER);
    gitlab__agent__grpctool__http_request__free_unpacked(m, NULL);
}

Test(httpmap, canonical_names_and_path_decoding)
{
    char out[64];
    kd_hm_canonical("content-type", 12, out);
    cr_assert(memcmp(out, "Content-Type", 12) == 0);
    kd_hm_canonical("x-FOO-bar", 9, out);
    cr_assert(memcmp(out, "X-Foo-Bar", 9) == 0);
    kd_hm_canonical("bad name", 8, out); /* not a token: unchanged, as Go */
    cr_assert(memcmp(out, "bad name", 8) == 0);
    cr_assert_eq(kd_hm_path_decode("/a%20b/%2F", 10, out), 6);
    cr_assert(memcmp(out, "/a b//", 6) == 0);
    cr_assert_eq(kd_hm_path_decode("/a%2", 4, out), -1);
    cr_assert_eq(kd_hm_path_decode("/a%zz", 5, out), -1);
    cr_assert_eq(kd_hm_path_decode("/a%00", 5, out), -1);
}

struct seen {
    char buf[1024];
    size_t len;
};

static int collect(void *ud, const char *n, size_t nl, const char *v, size_t vl)
{
    struct seen *s = ud;
    s->len +=
        (size_t)snprintf(s->buf + s->len, sizeof(s->buf) - s->len, "%.*s=%.*s;", (int)nl, n, (int)vl, v);
    return 0;
}

static size_t pack_response(uint8_t *out, int status, const char *const *kv, size_t nkv)
{
    Gitlab__Agent__Prototool__HttpResponse__HeaderEntry entries[16], *pe[16];
    Gitlab__Agent__Prototool__Values vals[16];
    char *v[16];
    for (size_t i = 0; i < nkv; i++) {
        gitlab__agent__prototool__http_response__header_entry__init(&entries[i]);
        gitlab__agent__prototool__values__init(&vals[i]);
        v[i] = (char *)kv[2 * i + 1];
        vals[i].n_value = 1;
        vals[i].value = &v[i];
        entries[i].key = (char *)kv[2 * i];
        entries[i].value = &vals[i];
        pe[i] = &entries[i];
    }
    Gitlab__Agent__Prototool__HttpResponse resp = GITLAB__AGENT__PROTOTOOL__HTTP_RESPONSE__INIT;
    resp.status_code = status;
    resp.status = (char *)"200 OK";
    resp.n_header = nkv;
    resp.header = pe;
    Gitlab__Agent__Grpctool__HttpResponse__Header hdr = GITLAB__AGENT__GRPCTOOL__HTTP_RESPONSE__HEADER__INIT;
    hdr.response = &resp;
    Gitlab__Agent__Grpctool__HttpResponse m = GITLAB__AGENT__GRPCTOOL__HTTP_RESPONSE__INIT;
    m.message_case = GITLAB__AGENT__GRPCTOOL__HTTP_RESPONSE__MESSAGE_HEADER;
    m.header = &hdr;
    return gitlab__agent__grpctool__http_response__pack(&m, out);
}

Test(httpmap, response_header_filtered)
{
    const char *const kv[] = {"Content-Type",
                              "application/json",
                              "Connection",
                              "X-Private",
                              "X-Private",
                              "1",
                              "Keep-Alive",
                              "timeout=5",
                              "Content-Length",
                              "12",
                              "Server",
                              "agent",
                              "Access-Control-Allow-Origin",
                              "*",
                              "X-Evil",
                              "a\r\nSet-Cookie: x",
                              "Bad Name",
                              "v",
                              "Transfer-Encoding",
                              "chunked"};
    uint8_t buf[1024];
    size_t n = pack_response(buf, 200, kv, 10);
    struct kd_hm_response r;
    cr_assert_eq(kd_hm_parse_response(buf, n, &r), 0);
    cr_assert_eq(r.kind, KD_HM_HEADER);
    cr_assert_eq(r.status_code, 200);
    struct seen s = {.len = 0};
    int64_t cl;
    cr_assert_eq(kd_hm_response_headers(&r, &cl, collect, &s), 0);
    cr_assert_str_eq(s.buf, "Content-Type=application/json;");
    cr_assert_eq(cl, 12);
}

Test(httpmap, response_data_trailer_and_garbage)
{
    Gitlab__Agent__Grpctool__HttpResponse__Data d = GITLAB__AGENT__GRPCTOOL__HTTP_RESPONSE__DATA__INIT;
    d.data.data = (uint8_t *)"abc";
    d.data.len = 3;
    Gitlab__Agent__Grpctool__HttpResponse m = GITLAB__AGENT__GRPCTOOL__HTTP_RESPONSE__INIT;
    m.message_case = GITLAB__AGENT__GRPCTOOL__HTTP_RESPONSE__MESSAGE_DATA;
    m.data = &d;
    uint8_t buf[64];
    size_t n = gitlab__agent__grpctool__http_response__pack(&m, buf);
    struct kd_hm_response r;
    cr_assert_eq(kd_hm_parse_response(buf, n, &r), 0);
    cr_assert_eq(r.kind, KD_HM_DATA);
    cr_assert_eq(r.data_len, 3);
    cr_assert(memcmp(r.data, "abc", 3) == 0);
    const uint8_t trailer[] = {0x1a, 0x00};
    cr_assert_eq(kd_hm_parse_response(trailer, 2, &r), 0);
    cr_assert_eq(r.kind, KD_HM_TRAILER);
    const uint8_t empty[] = {0};
    cr_assert_eq(kd_hm_parse_response(empty, 0, &r), -EBADMSG);
    const uint8_t bad[] = {0xff, 0xff, 0xff};
    cr_assert_eq(kd_hm_parse_response(bad, 3, &r), -EBADMSG);
    const uint8_t varint_member[] = {0x10, 0x01}; /* data as a varint: wrong wire type */
    cr_assert_eq(kd_hm_parse_response(varint_member, 2, &r), -EBADMSG);
}

Test(httpmap, status_object)
{
    char buf[512];
    size_t n = kd_hm_status_json(401, "Unauthorized \"x\"\n", buf, sizeof(buf));
    cr_assert_str_eq(buf, "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\","
                          "\"message\":\"GitLab Agent Server: Unauthorized \\\"x\\\"\\u000a\","
                          "\"reason\":\"Unauthorized\",\"code\":401}\n");
    cr_assert_eq(n, strlen(buf));
    n = kd_hm_status_json(502, "bad gateway", buf, sizeof(buf));
    cr_assert_null(strstr(buf, "reason"));
}

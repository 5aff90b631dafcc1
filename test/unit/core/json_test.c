/* json_test.c — core/json.c: the RFC 8259 examples, every refusal of the validator with its offset
 * and reason, the limits, the two GitLab answers kasd reads (agent_info, authorize_proxy_user),
 * escapes and their decoding, integers, duplicate names and the path lookup's errors. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/json.h"

static struct kd_json parse_ok(const char *s)
{
    struct kd_json root;
    struct kd_json_err err = {0};
    int rc = kd_json_parse(s, strlen(s), &root, &err);

    cr_assert_eq(rc, 0, "%s: %d %s at %zu", s, rc, err.why, err.off);
    return root;
}

/* RFC 8259 section 13, and the scalar texts of section 2 that older RFCs refused. */
Test(json, rfc8259_examples)
{
    static const char image[] = "{\n"
                                "  \"Image\": {\n"
                                "    \"Width\":  800,\n"
                                "    \"Height\": 600,\n"
                                "    \"Title\":  \"View from 15th Floor\",\n"
                                "    \"Thumbnail\": {\n"
                                "      \"Url\":    \"http://www.example.com/image/481989943\",\n"
                                "      \"Height\": 125,\n"
                                "      \"Width\":  100\n"
                                "    },\n"
                                "    \"Animated\" : false,\n"
                                "    \"IDs\": [116, 943, 234, 38793]\n"
                                "  }\n"
                                "}\n";
    static const char places[] = "[\n"
                                 "  {\n"
                                 "     \"precision\": \"zip\",\n"
                                 "     \"Latitude\":  37.7668,\n"
                                 "     \"Longitude\": -122.3959,\n"
                                 "     \"Address\":   \"\",\n"
                                 "     \"City\":      \"SAN FRANCISCO\",\n"
                                 "     \"State\":     \"CA\",\n"
                                 "     \"Zip\":       \"94107\",\n"
                                 "     \"Country\":   \"US\"\n"
                                 "  },\n"
                                 "  {\n"
                                 "     \"precision\": \"zip\",\n"
                                 "     \"Latitude\":  37.371991,\n"
                                 "     \"Longitude\": -122.026020,\n"
                                 "     \"Address\":   \"\",\n"
                                 "     \"City\":      \"SUNNYVALE\",\n"
                                 "     \"State\":     \"CA\",\n"
                                 "     \"Zip\":       \"94085\",\n"
                                 "     \"Country\":   \"US\"\n"
                                 "  }\n"
                                 "]";
    struct kd_json root = parse_ok(image), v;
    struct kd_json_iter it;
    int64_t i;
    char buf[64];
    bool b;

    cr_assert_eq(root.type, KD_JSON_OBJECT);
    cr_assert_eq(root.len, strlen(image) - 1, "trailing newline is not part of the value");
    cr_assert_eq(kd_json_get_int64(&root, "Image.Width", &i), 0);
    cr_assert_eq(i, 800);
    cr_assert_eq(kd_json_get_int64(&root, "Image.Thumbnail.Height", &i), 0);
    cr_assert_eq(i, 125);
    cr_assert_eq(kd_json_get_str(&root, "Image.Thumbnail.Url", buf, sizeof(buf)), 38);
    cr_assert_str_eq(buf, "http://www.example.com/image/481989943");
    cr_assert_eq(kd_json_get(&root, "Image.Animated", &v), 0);
    cr_assert_eq(kd_json_bool(&v, &b), 0);
    cr_assert_eq(b, false);
    cr_assert_eq(kd_json_get_int64(&root, "Image.IDs.3", &i), 0);
    cr_assert_eq(i, 38793);
    cr_assert_eq(kd_json_get(&root, "Image.IDs.4", &v), -ENOENT);

    root = parse_ok(places);
    cr_assert_eq(root.type, KD_JSON_ARRAY);
    cr_assert_eq(kd_json_get_str(&root, "1.City", buf, sizeof(buf)), 9);
    cr_assert_str_eq(buf, "SUNNYVALE");
    cr_assert_eq(kd_json_get(&root, "0.Latitude", &v), 0);
    cr_assert_eq(v.type, KD_JSON_NUMBER);
    cr_assert_eq(v.len, 7);
    cr_assert_eq(kd_json_int64(&v, &i), -EINVAL, "a fraction is not an int64");
    cr_assert_eq(kd_json_get_str(&root, "0.Address", buf, sizeof(buf)), 0);
    cr_assert_eq(kd_json_enter(&root, &it), 0);
    size_t n = 0;
    while (kd_json_next(&it, NULL, &v))
        n++;
    cr_assert_eq(n, 2);
    cr_assert_eq(it.p, root.p + root.len);

    root = parse_ok("\"Hello world!\"");
    cr_assert_eq(root.type, KD_JSON_STRING);
    cr_assert_eq(kd_json_str(&root, buf, sizeof(buf)), 12);
    cr_assert_str_eq(buf, "Hello world!");
    root = parse_ok(" 42 ");
    cr_assert_eq(root.type, KD_JSON_NUMBER);
    cr_assert_eq(root.len, 2);
    cr_assert_eq(kd_json_int64(&root, &i), 0);
    cr_assert_eq(i, 42);
    cr_assert_eq(parse_ok("true").type, KD_JSON_TRUE);
    cr_assert_eq(parse_ok("null").type, KD_JSON_NULL);
    cr_assert_eq(parse_ok("\t\r\n[ ]\n").type, KD_JSON_ARRAY);
    parse_ok("[-0, 0.0, 1E+2, 1e-2, -1.5E10, 123456789012345678901234567890]");
    parse_ok("{\"\":{\"\":[[],{}]}, \"\\u0000\": \"\\/\"}");
    parse_ok("\"\x7f \xc2\x80 \xdf\xbf \xe0\xa0\x80 \xed\x9f\xbf \xee\x80\x80 \xef\xbf\xbf \xf0\x90\x80\x80 "
             "\xf4\x8f\xbf\xbf\""); /* DEL and the edges of each UTF-8 length */
}

struct refusal {
    const char *in;
    size_t len; /* 0: strlen(in) */
    size_t off;
    const char *why;
};

Test(json, every_refusal_with_offset_and_reason)
{
    static const struct refusal cases[] = {
        {"", 0, 0, "unexpected end"},
        {"   ", 0, 3, "unexpected end"},
        {"[", 0, 1, "unexpected end"},
        {"[1,", 0, 3, "unexpected end"},
        {"{\"a\":", 0, 5, "unexpected end"},
        {"{", 0, 1, "expected a member name"},
        {"{a:1}", 0, 1, "expected a member name"},
        {"{\"a\":1,}", 0, 7, "expected a member name"},
        {"{1:1}", 0, 1, "expected a member name"},
        {"{\"a\" 1}", 0, 5, "expected ':'"},
        {"{\"a\"}", 0, 4, "expected ':'"},
        {"[1 2]", 0, 3, "expected ',' or ']'"},
        {"[1}", 0, 2, "expected ',' or ']'"},
        {"{\"a\":1 \"b\":2}", 0, 7, "expected ',' or '}'"},
        {"{\"a\":1]", 0, 6, "expected ',' or '}'"},
        {"[1,]", 0, 3, "unexpected character"},
        {"[,1]", 0, 1, "unexpected character"},
        {"]", 0, 0, "unexpected character"},
        {"True", 0, 0, "unexpected character"},
        {"+1", 0, 0, "unexpected character"},
        {".5", 0, 0, "unexpected character"},
        {"'a'", 0, 0, "unexpected character"},
        {"\xef\xbb\xbf{}", 0, 0, "unexpected character"}, /* a BOM */
        {"[1,/*c*/2]", 0, 3, "unexpected character"},
        {"\v1", 0, 0, "unexpected character"}, /* not JSON whitespace */
        {"\f1", 0, 0, "unexpected character"},
        {"\xc2\xa0"
         "1",
         0, 0, "unexpected character"},
        {"tru", 0, 0, "bad literal"},
        {"nul", 0, 0, "bad literal"},
        {"[nulL]", 0, 1, "bad literal"},
        {"fals", 0, 0, "bad literal"},
        {"-", 0, 1, "bad number"},
        {"-a", 0, 1, "bad number"},
        {"NaN", 0, 0, "unexpected character"},
        {"-Infinity", 0, 1, "bad number"},
        {"01", 0, 1, "leading zero in number"},
        {"-00", 0, 2, "leading zero in number"},
        {"1.", 0, 2, "digit expected after '.'"},
        {"1.e3", 0, 2, "digit expected after '.'"},
        {"1e", 0, 2, "digit expected in exponent"},
        {"1e+", 0, 3, "digit expected in exponent"},
        {"1E-x", 0, 3, "digit expected in exponent"},
        {"\"abc", 0, 4, "unterminated string"},
        {"\"\\", 0, 1, "unterminated string"},
        {"{\"a", 0, 3, "unterminated string"},
        {"\"a\x01\"", 0, 2, "control character in string"},
        {"\"\t\"", 0, 1, "control character in string"},
        {"\"\n\"", 0, 1, "control character in string"},
        {"\"a\0b\"", 5, 2, "control character in string"},
        {"\"\\x\"", 0, 1, "bad escape"},
        {"\"\\U0041\"", 0, 1, "bad escape"},
        {"\"\\'\"", 0, 1, "bad escape"},
        {"\"\\u12g4\"", 0, 1, "bad \\u escape"},
        {"\"\\u12\"", 0, 1, "bad \\u escape"},
        {"\"\\u", 0, 1, "bad \\u escape"},
        {"\"\\uDC00\"", 0, 1, "lone low surrogate"},
        {"\"\\uD800\"", 0, 1, "lone high surrogate"},
        {"\"x\\uD800\\u0041\"", 0, 2, "lone high surrogate"},
        {"\"\\uD800\\uD800\"", 0, 1, "lone high surrogate"},
        {"\"\\uDBFF\\n\"", 0, 1, "lone high surrogate"},
        {"\"\\uD800\\uDC0\"", 0, 1, "lone high surrogate"},
        {"\"\xc0\x80\"", 0, 1, "invalid UTF-8"},         /* overlong NUL */
        {"\"\xc1\xbf\"", 0, 1, "invalid UTF-8"},         /* overlong */
        {"\"\xe0\x9f\xbf\"", 0, 1, "invalid UTF-8"},     /* overlong 3-byte */
        {"\"\xf0\x8f\xbf\xbf\"", 0, 1, "invalid UTF-8"}, /* overlong 4-byte */
        {"\"\xed\xa0\x80\"", 0, 1, "invalid UTF-8"},     /* an encoded surrogate */
        {"\"\xf4\x90\x80\x80\"", 0, 1, "invalid UTF-8"}, /* past U+10FFFF */
        {"\"\xf5\x80\x80\x80\"", 0, 1, "invalid UTF-8"},
        {"\"ab\xe2\x82\"", 0, 3, "invalid UTF-8"}, /* cut short */
        {"\"\xe2\x82", 0, 1, "invalid UTF-8"},
        {"\"\x80\"", 0, 1, "invalid UTF-8"},
        {"\"\xff\"", 0, 1, "invalid UTF-8"},
        {"\"\xc3\x28\"", 0, 1, "invalid UTF-8"},
        {"{} x", 0, 3, "data after the document"},
        {"{}}", 0, 2, "data after the document"},
        {"[] []", 0, 3, "data after the document"},
        {"truex", 0, 4, "data after the document"},
        {"0x10", 0, 1, "data after the document"},
        {"1.5e3.2", 0, 5, "data after the document"},
        {"1\0", 2, 1, "data after the document"},
        {"\"a\"\"b\"", 0, 3, "data after the document"},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct refusal *c = &cases[i];
        size_t len = c->len ? c->len : strlen(c->in);
        struct kd_json root;
        struct kd_json_err err = {99, NULL};
        int rc = kd_json_parse(c->in, len, &root, &err);

        cr_expect_eq(rc, -EBADMSG, "case %zu %s: rc %d", i, c->in, rc);
        cr_expect_eq(err.off, c->off, "case %zu %s: off %zu, want %zu", i, c->in, err.off, c->off);
        cr_expect(err.why && strcmp(err.why, c->why) == 0, "case %zu %s: why \"%s\", want \"%s\"", i, c->in,
                  err.why, c->why);
    }
    /* err may be NULL */
    struct kd_json root;
    cr_assert_eq(kd_json_parse("[", 1, &root, NULL), -EBADMSG);
    cr_assert_eq(kd_json_parse(NULL, 0, &root, NULL), -EBADMSG);
}

Test(json, depth_limit)
{
    char buf[8 * KD_JSON_MAX_DEPTH];
    struct kd_json root, v;
    struct kd_json_err err;
    size_t n = 0;

    /* KD_JSON_MAX_DEPTH containers, alternating arrays and objects: accepted */
    for (int d = 0; d < KD_JSON_MAX_DEPTH; d++) {
        if (d % 2 == 0) {
            buf[n++] = '[';
        } else {
            memcpy(buf + n, "{\"a\":", 5);
            n += 5;
        }
    }
    buf[n++] = '0';
    for (int d = KD_JSON_MAX_DEPTH - 1; d >= 0; d--)
        buf[n++] = d % 2 == 0 ? ']' : '}';
    cr_assert_eq(kd_json_parse(buf, n, &root, &err), 0);
    cr_assert_eq(kd_json_get(&root, "0.a.0.a.0.a", &v), 0);
    cr_assert_eq(v.type, KD_JSON_ARRAY);

    /* one more: -E2BIG at the offending bracket */
    char deep[KD_JSON_MAX_DEPTH + 1];
    memset(deep, '[', sizeof(deep));
    cr_assert_eq(kd_json_parse(deep, sizeof(deep), &root, &err), -E2BIG);
    cr_assert_eq(err.off, KD_JSON_MAX_DEPTH);
    cr_assert_str_eq(err.why, "nested too deeply");
    /* deep, then closed and reopened: depth is per nesting, not per count */
    char wide[4 * KD_JSON_MAX_DEPTH + 2];
    n = 0;
    wide[n++] = '[';
    for (int d = 0; d < KD_JSON_MAX_DEPTH; d++) {
        memcpy(wide + n, d ? ",[]" : "[]", d ? 3 : 2);
        n += d ? 3 : 2;
    }
    wide[n++] = ']';
    cr_assert_eq(kd_json_parse(wide, n, &root, &err), 0);
}

Test(json, size_limit)
{
    size_t max = KD_JSON_MAX_LEN;
    char *buf = malloc(max + 1);
    struct kd_json root;
    struct kd_json_err err;

    cr_assert_not_null(buf);
    memset(buf, ' ', max + 1);
    buf[0] = '"';
    buf[max - 1] = '"';
    cr_assert_eq(kd_json_parse(buf, max, &root, &err), 0);
    cr_assert_eq(root.len, max);
    cr_assert_eq(kd_json_parse(buf, max + 1, &root, &err), -EMSGSIZE);
    cr_assert_eq(err.off, max);
    cr_assert_str_eq(err.why, "document too large");
    free(buf);
}

/* GET /api/v4/internal/kubernetes/agent_info */
Test(json, gitlab_agent_info)
{
    static const char doc[] =
        "{\"project_id\":1,\"agent_id\":2,\"agent_name\":\"x\","
        "\"gitaly_info\":{\"address\":\"unix:/home/git/gitaly.socket\",\"token\":\"secret\","
        "\"features\":{\"gitaly-feature-foo\":\"true\"}},"
        "\"gitaly_repository\":{\"storage_name\":\"default\",\"relative_path\":\"@hashed/6b/86/x.git\","
        "\"gl_repository\":\"project-1\",\"gl_project_path\":\"root/agent\"},"
        "\"default_branch\":\"main\"}";
    struct kd_json root = parse_ok(doc), v, key;
    struct kd_json_iter it;
    int64_t id;
    char s[128];

    cr_assert_eq(kd_json_get_int64(&root, "project_id", &id), 0);
    cr_assert_eq(id, 1);
    cr_assert_eq(kd_json_get_int64(&root, "agent_id", &id), 0);
    cr_assert_eq(id, 2);
    cr_assert_eq(kd_json_get_str(&root, "agent_name", s, sizeof(s)), 1);
    cr_assert_str_eq(s, "x");
    cr_assert_eq(kd_json_get_str(&root, "gitaly_info.address", s, sizeof(s)), 28);
    cr_assert_str_eq(s, "unix:/home/git/gitaly.socket");
    cr_assert_eq(kd_json_get_str(&root, "gitaly_repository.relative_path", s, sizeof(s)), 19);
    cr_assert_str_eq(s, "@hashed/6b/86/x.git");
    cr_assert_eq(kd_json_get_str(&root, "default_branch", s, sizeof(s)), 4);
    /* features: a map, walked with the iterator */
    cr_assert_eq(kd_json_get(&root, "gitaly_info.features", &v), 0);
    cr_assert_eq(kd_json_enter(&v, &it), 0);
    cr_assert(kd_json_next(&it, &key, &v));
    cr_assert(kd_json_eq(&key, "gitaly-feature-foo"));
    cr_assert_eq(kd_json_str(&v, s, sizeof(s)), 4);
    cr_assert(!kd_json_next(&it, &key, &v));
    /* wrong types and missing members */
    cr_assert_eq(kd_json_get_int64(&root, "agent_name", &id), -EINVAL);
    cr_assert_eq(kd_json_get_str(&root, "agent_id", s, sizeof(s)), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "gitaly_info.nope", &v), -ENOENT);
    cr_assert_eq(kd_json_get(&root, "agent_id.x", &v), -EINVAL);
    cr_assert_eq(kd_json_get_str(&root, "gitaly_info.address", s, 28), -ENOSPC);
    cr_assert_eq(strlen(s), 27, "a NUL-terminated prefix");
}

/* POST /api/v4/internal/kubernetes/authorize_proxy_user, both variants of access_as */
Test(json, gitlab_authorize_proxy_user)
{
    static const char as_user[] =
        "{\"agent\":{\"id\":7,\"config_project\":{\"id\":3}},"
        "\"user\":{\"id\":42,\"username\":\"root\"},"
        "\"access_as\":{\"user\":{\"projects\":[{\"id\":3,\"roles\":[\"developer\"]},"
        "{\"id\":9,\"roles\":[\"reporter\",\"maintainer\"]}],"
        "\"groups\":[{\"id\":5,\"roles\":[\"owner\"]}]}}}";
    static const char as_agent[] = "{\"agent\":{\"id\":7,\"config_project\":{\"id\":3}},"
                                   "\"user\":{\"id\":42,\"username\":\"root\"},"
                                   "\"access_as\":{\"agent\":{}}}";
    static const int64_t want_ids[] = {3, 9};
    static const size_t want_roles[] = {1, 2};
    struct kd_json root = parse_ok(as_user), v, p, key, role;
    struct kd_json_iter it, rit;
    int64_t id;
    char s[64];
    size_t n = 0;

    cr_assert_eq(kd_json_get_int64(&root, "agent.id", &id), 0);
    cr_assert_eq(id, 7);
    cr_assert_eq(kd_json_get_int64(&root, "agent.config_project.id", &id), 0);
    cr_assert_eq(id, 3);
    cr_assert_eq(kd_json_get_int64(&root, "user.id", &id), 0);
    cr_assert_eq(id, 42);
    cr_assert_eq(kd_json_get_str(&root, "user.username", s, sizeof(s)), 4);
    cr_assert_str_eq(s, "root");
    cr_assert_eq(kd_json_get(&root, "access_as.user.projects", &v), 0);
    cr_assert_eq(v.type, KD_JSON_ARRAY);
    cr_assert_eq(kd_json_enter(&v, &it), 0);
    while (kd_json_next(&it, &key, &p)) {
        size_t r = 0;

        cr_assert_eq(key.type, KD_JSON_NONE);
        cr_assert_lt(n, 2);
        cr_assert_eq(kd_json_get_int64(&p, "id", &id), 0);
        cr_assert_eq(id, want_ids[n]);
        cr_assert_eq(kd_json_get(&p, "roles", &v), 0);
        cr_assert_eq(kd_json_enter(&v, &rit), 0);
        while (kd_json_next(&rit, NULL, &role)) {
            cr_assert_gt(kd_json_str(&role, s, sizeof(s)), 0);
            r++;
        }
        cr_assert_eq(r, want_roles[n]);
        n++;
    }
    cr_assert_eq(n, 2);
    cr_assert_eq(kd_json_get_str(&root, "access_as.user.projects.1.roles.1", s, sizeof(s)), 10);
    cr_assert_str_eq(s, "maintainer");
    cr_assert_eq(kd_json_get_int64(&root, "access_as.user.groups.0.id", &id), 0);
    cr_assert_eq(id, 5);
    cr_assert_eq(kd_json_get(&root, "access_as.agent", &v), -ENOENT);

    /* the agent variant: which member access_as has decides */
    root = parse_ok(as_agent);
    cr_assert_eq(kd_json_get(&root, "access_as", &v), 0);
    cr_assert_eq(kd_json_enter(&v, &it), 0);
    cr_assert(kd_json_next(&it, &key, &v));
    cr_assert(kd_json_eq(&key, "agent"));
    cr_assert(!kd_json_eq(&key, "agen"));
    cr_assert(!kd_json_eq(&key, "agents"));
    cr_assert_eq(v.type, KD_JSON_OBJECT);
    cr_assert_eq(v.len, 2);
    cr_assert(!kd_json_next(&it, &key, &v));
    cr_assert_eq(kd_json_get(&root, "access_as.user", &v), -ENOENT);
    cr_assert_eq(kd_json_get(&root, "access_as.agent", &v), 0);
    cr_assert_eq(kd_json_enter(&v, &it), 0);
    cr_assert(!kd_json_next(&it, &key, &v), "an empty object");
    cr_assert(!kd_json_next(&it, &key, &v), "and it stays at its end");
}

Test(json, escapes_decode)
{
    static const struct {
        const char *json, *want;
        size_t len;
    } cases[] = {
        {"\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\/\b\f\n\r\t", 8},
        {"\"\\u0041\\u00e9\\u00E9\"", "A\xc3\xa9\xc3\xa9", 5},
        {"\"\\u20AC\\u07ff\\u0800\\uFFFF\"", "\xe2\x82\xac\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf", 11},
        {"\"\\uD83D\\uDE00\"", "\xf0\x9f\x98\x80", 4},
        {"\"\\ud800\\udc00\\uDBFF\\uDFFF\"", "\xf0\x90\x80\x80\xf4\x8f\xbf\xbf", 8},
        {"\"caf\xc3\xa9 \xf0\x9f\x98\x80\"", "caf\xc3\xa9 \xf0\x9f\x98\x80", 10},
        {"\"\\u0000x\"", "\0x", 2},
        {"\"\"", "", 0},
    };
    char buf[32];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct kd_json v = parse_ok(cases[i].json);
        ssize_t n = kd_json_str(&v, buf, sizeof(buf));

        cr_assert_eq(n, (ssize_t)cases[i].len, "case %zu: %zd", i, n);
        cr_assert(memcmp(buf, cases[i].want, cases[i].len) == 0, "case %zu", i);
        cr_assert_eq(buf[n], '\0');
        cr_assert_leq((size_t)n, v.len - 2);
        /* exactly enough room, and one byte short */
        cr_assert_eq(kd_json_str(&v, buf, cases[i].len + 1), n);
        cr_assert_eq(kd_json_str(&v, buf, cases[i].len), -ENOSPC);
    }
    /* the room runs out inside a 4-byte character: the prefix stops before it */
    struct kd_json v = parse_ok("\"ab\\uD83D\\uDE00c\"");
    cr_assert_eq(kd_json_str(&v, buf, 5), -ENOSPC);
    cr_assert_str_eq(buf, "ab");
    /* names compare after unescaping */
    v = parse_ok("\"a\\u0062\\/\"");
    cr_assert(kd_json_eq(&v, "ab/"));
    /* a NUL inside is fine as bytes, refused as a C string */
    struct kd_json root = parse_ok("{\"u\":\"ro\\u0000ot\"}");
    cr_assert_eq(kd_json_get(&root, "u", &v), 0);
    cr_assert_eq(kd_json_str(&v, buf, sizeof(buf)), 5);
    cr_assert_eq(kd_json_get_str(&root, "u", buf, sizeof(buf)), -EILSEQ);
    cr_assert(!kd_json_eq(&v, "ro"));
    /* not a string */
    v = parse_ok("1");
    cr_assert_eq(kd_json_str(&v, buf, sizeof(buf)), -EINVAL);
    cr_assert(!kd_json_eq(&v, "1"));
}

/* Handles made by hand rather than by kd_json_parse: errors, never a read out of bounds. */
Test(json, forged_handles)
{
    char buf[16];
    struct kd_json_iter it;
    struct kd_json key, val;
    struct kd_json bad = {"\"\xff\"", 3, KD_JSON_STRING};
    struct kd_json cut = {"\"abc\"", 3, KD_JSON_STRING};
    struct kd_json lone = {"\"\\uD800\"", 8, KD_JSON_STRING};
    struct kd_json obj = {"{\"a\" 1 2]", 9, KD_JSON_OBJECT};
    struct kd_json notobj = {"[1]", 3, KD_JSON_OBJECT};
    struct kd_json num = {"1x", 2, KD_JSON_NUMBER};
    int64_t i;

    cr_assert_eq(kd_json_str(&bad, buf, sizeof(buf)), -EBADMSG);
    cr_assert_eq(kd_json_str(&cut, buf, sizeof(buf)), -EBADMSG);
    cr_assert_eq(kd_json_str(&lone, buf, sizeof(buf)), -EBADMSG);
    cr_assert(!kd_json_eq(&lone, ""));
    cr_assert_eq(kd_json_enter(&notobj, &it), -EINVAL);
    cr_assert_eq(kd_json_enter(&obj, &it), 0);
    for (int n = 0; n < 4 && kd_json_next(&it, &key, &val); n++)
        cr_assert(val.p >= obj.p && val.p + val.len <= obj.p + obj.len);
    cr_assert(!kd_json_next(&it, &key, &val));
    cr_assert_eq(kd_json_int64(&num, &i), -EINVAL);
}

Test(json, int64)
{
    static const struct {
        const char *in;
        int rc;
        int64_t want;
    } cases[] = {
        {"0", 0, 0},
        {"-0", 0, 0},
        {"7", 0, 7},
        {"-42", 0, -42},
        {"9223372036854775807", 0, INT64_MAX},
        {"-9223372036854775808", 0, INT64_MIN},
        {"9223372036854775808", -ERANGE, 0},
        {"-9223372036854775809", -ERANGE, 0},
        {"18446744073709551616", -ERANGE, 0},
        {"123456789012345678901234567890", -ERANGE, 0},
        {"1.0", -EINVAL, 0},
        {"92233720365784775858.5", -EINVAL, 0}, /* not an integer outranks too large (found by the fuzzer) */
        {"1e400", -EINVAL, 0},
        {"1.5", -EINVAL, 0},
        {"1e3", -EINVAL, 0},
        {"1E3", -EINVAL, 0},
        {"-0.0", -EINVAL, 0},
        {"\"1\"", -EINVAL, 0},
        {"true", -EINVAL, 0},
        {"null", -EINVAL, 0},
        {"[1]", -EINVAL, 0},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct kd_json v = parse_ok(cases[i].in);
        int64_t got = 12345;
        int rc = kd_json_int64(&v, &got);

        cr_assert_eq(rc, cases[i].rc, "%s: %d", cases[i].in, rc);
        cr_assert_eq(got, rc == 0 ? cases[i].want : 12345, "%s", cases[i].in);
    }
    bool b;
    struct kd_json v = parse_ok("true");
    cr_assert_eq(kd_json_bool(&v, &b), 0);
    cr_assert(b);
    v = parse_ok("null");
    cr_assert_eq(kd_json_bool(&v, &b), -EINVAL);
}

/* Duplicates pass validation; lookups take the last and say so; the iterator shows them all. */
Test(json, duplicate_names)
{
    struct kd_json root = parse_ok("{\"a\":1,\"b\":{\"c\":2},\"\\u0061\":3}"), v, key;
    struct kd_json_iter it;
    int64_t i;
    size_t n = 0;

    cr_assert_eq(kd_json_get(&root, "a", &v), -ENOTUNIQ);
    cr_assert_eq(kd_json_int64(&v, &i), 0);
    cr_assert_eq(i, 3, "the last one");
    cr_assert_eq(kd_json_get_int64(&root, "a", &i), -ENOTUNIQ);
    cr_assert_eq(kd_json_get_int64(&root, "b.c", &i), 0);
    cr_assert_eq(kd_json_enter(&root, &it), 0);
    while (kd_json_next(&it, &key, &v))
        n += kd_json_eq(&key, "a");
    cr_assert_eq(n, 2);

    /* a duplicate along the path: the lookup goes on from the last one */
    root = parse_ok("{\"x\":{\"y\":1},\"x\":{\"y\":2,\"z\":0}}");
    cr_assert_eq(kd_json_get(&root, "x.y", &v), -ENOTUNIQ);
    cr_assert_eq(kd_json_int64(&v, &i), 0);
    cr_assert_eq(i, 2);
    cr_assert_eq(kd_json_get(&root, "x.w", &v), -ENOENT, "a missing member outranks the duplicate");
}

Test(json, path_errors)
{
    struct kd_json root = parse_ok("{\"a\":{\"b\":[10,11,12]},\"s\":\"x\",\"a.b\":1}"), v;
    int64_t i;

    cr_assert_eq(kd_json_get(&root, "", &v), 0);
    cr_assert_eq(v.p, root.p);
    cr_assert_eq(v.len, root.len);
    cr_assert_eq(kd_json_get_int64(&root, "a.b.2", &i), 0);
    cr_assert_eq(i, 12);
    cr_assert_eq(kd_json_get(&root, "a.b.3", &v), -ENOENT);
    cr_assert_eq(kd_json_get(&root, "a.b.9999999999", &v), -ENOENT);
    cr_assert_eq(kd_json_get(&root, "a.b.01", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "a.b.x", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "a.b.-1", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "a..b", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, ".a", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "a.", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "s.x", &v), -EINVAL);
    cr_assert_eq(kd_json_get(&root, "nope", &v), -ENOENT);
    cr_assert_eq(kd_json_get(&root, "a.b", &v), 0);
    cr_assert_eq(v.type, KD_JSON_ARRAY, "\"a.b\" is a path, not the member named a.b");
    v = parse_ok("5");
    cr_assert_eq(kd_json_get(&v, "a", &v), -EINVAL);
}

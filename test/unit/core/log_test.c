/* log_test.c — structured log lines: JSON escaping, fields, levels, the logger thread. */
#include <criterion/criterion.h>

#include <ctype.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"

static char *read_all(int fd)
{
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    for (;;) {
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len + 1 == cap)
            buf = realloc(buf, cap *= 2);
    }
    buf[len] = '\0';
    return buf;
}

Test(log, escape)
{
    char out[64];
    kd_log_escape(out, sizeof(out), "a\"b\\c\nd\x01", 8);
    cr_assert_str_eq(out, "a\\\"b\\\\c\\nd\\u0001");
    /* never overflows the destination, never splits an escape */
    kd_log_escape(out, 5, "\"\"\"\"", 4);
    cr_assert_str_eq(out, "\\\"\\\"");
}

Test(log, sync_line_has_fields_and_level_filter)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    kd_log_configure(KD_LOG_INFO, p[1]);
    kd_log_set_shard(3);
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_WARN, "listening");
    kd_log_str(&l, "listener", "agent");
    kd_log_int(&l, "n", -5);
    kd_log_uint(&l, "u", 7);
    kd_log_bool(&l, "b", true);
    kd_log_errno(&l, -2);
    kd_log_end(&l);
    kd_log_begin(&l, KD_LOG_DEBUG, "hidden");
    kd_log_str(&l, "x", "y");
    kd_log_end(&l);
    kd_log_set_shard(-1);
    kd_log_msg(KD_LOG_ERROR, "boom", "value %d \"quoted\"", 42);
    char *out = read_all(p[0]);
    cr_assert(strstr(out,
                     "\"level\":\"warn\",\"shard\":3,\"event\":\"listening\",\"listener\":\"agent\","
                     "\"n\":-5,\"u\":7,\"b\":true,\"error\":\"No such file or directory\",\"errno\":2}\n") !=
                  NULL,
              "%s", out);
    cr_assert(strstr(out, "hidden") == NULL, "debug lines are filtered at info");
    cr_assert(strstr(out, "\"event\":\"boom\",\"msg\":\"value 42 \\\"quoted\\\"\"}\n") != NULL, "%s", out);
    free(out);
    close(p[0]);
    close(p[1]);
    kd_log_configure(KD_LOG_INFO, 2);
}

Test(log, long_values_are_truncated_and_marked)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    kd_log_configure(KD_LOG_INFO, p[1]);
    char *big = malloc(10000);
    memset(big, 'x', 9999);
    big[9999] = '\0';
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "big");
    kd_log_str(&l, "v", big);
    kd_log_end(&l);
    char *out = read_all(p[0]);
    cr_assert_lt(strlen(out), KD_LOG_LINE_MAX + 1);
    cr_assert(strstr(out, "\"truncated\":true}\n") != NULL, "%s", out);
    free(out);
    free(big);
    close(p[0]);
    close(p[1]);
    kd_log_configure(KD_LOG_INFO, 2);
}

static void *spam(void *arg)
{
    long id = (long)arg;
    for (int i = 0; i < 2000; i++) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "spam");
        kd_log_int(&l, "thread", id);
        kd_log_int(&l, "i", i);
        kd_log_end(&l);
    }
    return NULL;
}

Test(log, threaded_lines_never_interleave)
{
    char path[] = "/tmp/kd_log_test_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    unlink(path);
    kd_log_configure(KD_LOG_INFO, fd);
    cr_assert_eq(kd_log_start(), 0);
    pthread_t th[4];
    for (long i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, spam, (void *)i);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    kd_log_stop();
    lseek(fd, 0, SEEK_SET);
    char *out = read_all(fd);
    /* every line is whole: starts with {"ts": and ends with } ; count per thread */
    int count[4] = {0}, lines = 0, dropped_reports = 0;
    for (char *s = strtok(out, "\n"); s != NULL; s = strtok(NULL, "\n")) {
        if (strstr(s, "log_lines_dropped")) {
            dropped_reports++;
            continue;
        }
        cr_assert(strncmp(s, "{\"ts\":\"", 7) == 0 && s[strlen(s) - 1] == '}', "broken line: %s", s);
        long t;
        cr_assert_not_null(strstr(s, "\"thread\":"), "%s", s);
        t = strtol(strstr(s, "\"thread\":") + 9, NULL, 10);
        cr_assert(t >= 0 && t < 4);
        count[t]++;
        lines++;
    }
    cr_assert_eq((uint64_t)lines + kd_log_dropped(), 8000, "lines %d + dropped %llu", lines,
                 (unsigned long long)kd_log_dropped());
    free(out);
    close(fd);
    kd_log_configure(KD_LOG_INFO, 2);
}

/* ---- every line is JSON, however it was cut --------------------------------------------------- */

/* A strict RFC 8259 checker for one line: exactly one object, strings of valid UTF-8 (no
 * overlongs, no surrogates, nothing above U+10FFFF, no raw control characters), only the escapes
 * JSON defines, numbers in JSON's grammar, then "\n" and nothing else. Strict on purpose: a lenient
 * checker would pass the half-closed lines this test exists to catch. */
struct jp {
    const unsigned char *s, *end;
    const char *why;
    int depth;
};

static bool jp_fail(struct jp *p, const char *why)
{
    if (p->why == NULL)
        p->why = why;
    return false;
}

static void jp_ws(struct jp *p)
{
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\r' || *p->s == '\n'))
        p->s++;
}

static bool jp_lit(struct jp *p, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(p->end - p->s) < n || memcmp(p->s, lit, n) != 0)
        return jp_fail(p, "bad literal");
    p->s += n;
    return true;
}

static bool jp_utf8(struct jp *p)
{
    const unsigned char *s = p->s;
    unsigned c = *s, n;
    uint32_t cp;
    if (c < 0x80)
        return jp_fail(p, "internal");
    if (c >= 0xc2 && c <= 0xdf)
        n = 1, cp = c & 0x1f;
    else if (c >= 0xe0 && c <= 0xef)
        n = 2, cp = c & 0x0f;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 3, cp = c & 0x07;
    else
        return jp_fail(p, "invalid UTF-8 lead byte");
    if ((size_t)(p->end - s) < n + 1)
        return jp_fail(p, "UTF-8 sequence cut");
    for (unsigned i = 1; i <= n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return jp_fail(p, "UTF-8 sequence cut");
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff)
        return jp_fail(p, "overlong or out-of-range UTF-8");
    if (cp >= 0xd800 && cp <= 0xdfff)
        return jp_fail(p, "UTF-8 surrogate");
    p->s += n + 1;
    return true;
}

static bool jp_string(struct jp *p)
{
    if (p->s >= p->end || *p->s != '"')
        return jp_fail(p, "expected a string");
    p->s++;
    for (;;) {
        if (p->s >= p->end)
            return jp_fail(p, "string never closed");
        unsigned char c = *p->s;
        if (c == '"') {
            p->s++;
            return true;
        }
        if (c < 0x20)
            return jp_fail(p, "raw control character in a string");
        if (c == '\\') {
            if (p->end - p->s < 2)
                return jp_fail(p, "escape cut");
            unsigned char e = p->s[1];
            if (e == 'u') {
                if (p->end - p->s < 6)
                    return jp_fail(p, "\\u escape cut");
                for (int i = 2; i < 6; i++)
                    if (!isxdigit(p->s[i]))
                        return jp_fail(p, "\\u escape cut");
                p->s += 6;
            } else if (strchr("\"\\/bfnrt", e) != NULL && e != '\0') {
                p->s += 2;
            } else {
                return jp_fail(p, "unknown escape");
            }
            continue;
        }
        if (c >= 0x80) {
            if (!jp_utf8(p))
                return false;
            continue;
        }
        p->s++;
    }
}

static bool jp_number(struct jp *p)
{
    const unsigned char *s = p->s;
    if (s < p->end && *s == '-')
        s++;
    if (s >= p->end || !isdigit(*s))
        return jp_fail(p, "bad number");
    if (*s == '0')
        s++;
    else
        while (s < p->end && isdigit(*s))
            s++;
    if (s < p->end && *s == '.') {
        s++;
        if (s >= p->end || !isdigit(*s))
            return jp_fail(p, "bad fraction");
        while (s < p->end && isdigit(*s))
            s++;
    }
    if (s < p->end && (*s == 'e' || *s == 'E')) {
        s++;
        if (s < p->end && (*s == '+' || *s == '-'))
            s++;
        if (s >= p->end || !isdigit(*s))
            return jp_fail(p, "bad exponent");
        while (s < p->end && isdigit(*s))
            s++;
    }
    p->s = s;
    return true;
}

static bool jp_value(struct jp *p);

static bool jp_container(struct jp *p, bool object)
{
    if (++p->depth > 32)
        return jp_fail(p, "too deep");
    p->s++;
    jp_ws(p);
    if (p->s < p->end && *p->s == (object ? '}' : ']')) {
        p->s++;
        p->depth--;
        return true;
    }
    for (;;) {
        jp_ws(p);
        if (object) {
            if (!jp_string(p))
                return false;
            jp_ws(p);
            if (p->s >= p->end || *p->s != ':')
                return jp_fail(p, "expected ':'");
            p->s++;
            jp_ws(p);
        }
        if (!jp_value(p))
            return false;
        jp_ws(p);
        if (p->s >= p->end)
            return jp_fail(p, object ? "object never closed" : "array never closed");
        if (*p->s == ',') {
            p->s++;
            continue;
        }
        if (*p->s == (object ? '}' : ']')) {
            p->s++;
            p->depth--;
            return true;
        }
        return jp_fail(p, "expected ',' or a closing bracket");
    }
}

static bool jp_value(struct jp *p)
{
    if (p->s >= p->end)
        return jp_fail(p, "expected a value");
    switch (*p->s) {
    case '{':
        return jp_container(p, true);
    case '[':
        return jp_container(p, false);
    case '"':
        return jp_string(p);
    case 't':
        return jp_lit(p, "true");
    case 'f':
        return jp_lit(p, "false");
    case 'n':
        return jp_lit(p, "null");
    default:
        return jp_number(p);
    }
}

/* NULL when line[0..n) is one JSON object followed by exactly one "\n"; else the reason. */
static const char *json_line_error(const char *line, size_t n)
{
    struct jp p = {.s = (const unsigned char *)line, .end = (const unsigned char *)line + n};
    if (n == 0 || line[n - 1] != '\n')
        return "line does not end in a newline";
    p.end--;
    if (memchr(line, '\n', n - 1) != NULL)
        return "newline inside the line";
    if (*p.s != '{')
        return "not an object";
    if (!jp_value(&p))
        return p.why;
    if (p.s != p.end)
        return "bytes after the object";
    return NULL;
}

Test(log, validator_refuses_what_it_must)
{
    /* The checker itself must be able to fail, or the tests below prove nothing. */
    static const char *bad[] = {
        "{\"a\":\"x}\n",
        "{\"a\":\"xxx,\"truncated\":true}\n",
        "{\"a\":\"\\u00\"}\n",
        "{\"a\":\"\\\"}\n",
        "{\"a\":\"\xc3\"}\n",
        "{\"a\":\"\xe2\x82\"}\n",
        "{\"a\":\"\xed\xa0\x80\"}\n",
        "{\"a\":\"\xc0\xaf\"}\n",
        "{\"a\":1,}\n",
        "{\"a\":01}\n",
        "{\"a\":\"\x01\"}\n",
        "{\"a\":\"\\x41\"}\n",
        "{\"a\":1}",
        "{\"a\":1}x\n",
        "{\"a\":\"x\",\"truncated\":true\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_not_null(json_line_error(bad[i], strlen(bad[i])), "accepted bad line %zu: %s", i, bad[i]);
    static const char *good[] = {
        "{\"a\":\"x\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\",\"b\":[1,-2.5e3,true,false,null,{}],\"c\":{}}\n",
        "{\"a\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}\n",
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        cr_assert_null(json_line_error(good[i], strlen(good[i])), "refused good line %zu: %s", i, good[i]);
}

/* Log one line (built by `fill`) into a pipe and check it: valid JSON, within KD_LOG_LINE_MAX, and
 * marked truncated exactly when `want_truncated` is 1 (not marked when 0, either way when -1). Returns the
 * line (malloc'd) for more checks. */
static char *logged_line(void (*fill)(struct kd_logline *, const void *), const void *arg, int want_truncated)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    kd_log_configure(KD_LOG_INFO, p[1]);
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "cut");
    fill(&l, arg);
    kd_log_end(&l);
    char *out = read_all(p[0]);
    close(p[0]);
    close(p[1]);
    kd_log_configure(KD_LOG_INFO, 2);
    size_t n = strlen(out);
    const char *why = json_line_error(out, n);
    cr_assert_null(why, "invalid JSON (%s): %s", why, out);
    cr_assert_leq(n, KD_LOG_LINE_MAX, "line of %zu bytes", n);
    bool marked = strstr(out, ",\"truncated\":true}\n") != NULL && out[n - 2] == '}';
    if (want_truncated >= 0)
        cr_assert_eq(marked, want_truncated == 1, "truncated marker %s: %s", marked ? "present" : "missing",
                     out);
    return out;
}

struct strarg {
    const char *key;
    const char *v;
    size_t n;
};

static void fill_strn(struct kd_logline *l, const void *arg)
{
    const struct strarg *a = arg;
    kd_log_strn(l, a->key, a->v, a->n);
    kd_log_int(l, "after", 1);
}

Test(log, cut_long_value_is_closed_json)
{
    size_t n = 8192;
    char *v = malloc(n);
    memset(v, 'x', n);
    struct strarg a = {"path", v, n};
    char *out = logged_line(fill_strn, &a, true);
    /* The cut is inside the value: most of it is kept, the string and the object are closed. */
    const char *s = strstr(out, "\"path\":\"");
    cr_assert_not_null(s, "%s", out);
    s += 8;
    size_t xs = strspn(s, "x");
    cr_assert_gt(xs, (size_t)KD_LOG_LINE_MAX - 200, "kept only %zu bytes", xs);
    cr_assert_eq(s[xs], '"', "%s", out);
    free(out);
    free(v);
}

Test(log, cut_never_splits_an_escape)
{
    /* Values made only of characters that need 2- or 6-byte escapes, at every length around the
     * limit, so that the cut lands on every offset inside an escape sequence. */
    static const char *units[] = {"\"", "\\", "\n", "\x01", "\x1f\"", "a\x7f"};
    char *v = malloc(4096);
    for (size_t u = 0; u < sizeof(units) / sizeof(units[0]); u++) {
        size_t ul = strlen(units[u]);
        for (size_t i = 0; i + ul <= 4096; i += ul)
            memcpy(v + i, units[u], ul);
        for (size_t n = 500; n <= 1400; n++) {
            struct strarg a = {"v", v, n};
            size_t esc = 0;
            for (size_t i = 0; i < n; i++)
                esc += (v[i] == '"' || v[i] == '\\' || v[i] == '\n') ? 2
                       : (unsigned char)v[i] < 0x20 || v[i] == 0x7f  ? 6
                                                                     : 1;
            /* head ~70 bytes, key, quotes, the "after" field: it fits when well below the line */
            bool fits = esc + 120 < KD_LOG_LINE_MAX;
            bool cut = esc + 40 > KD_LOG_LINE_MAX;
            /* near the edge either answer is right; validity is checked whatever the answer */
            free(logged_line(fill_strn, &a, fits ? 0 : cut ? 1 : -1));
        }
    }
    free(v);
}

Test(log, cut_never_splits_a_utf8_sequence)
{
    /* 2-, 3- and 4-byte sequences at every alignment relative to the cut. */
    static const char *chars[] = {"\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "a\xe2\x82\xac"};
    char *v = malloc(8192);
    for (size_t c = 0; c < sizeof(chars) / sizeof(chars[0]); c++) {
        size_t cl = strlen(chars[c]);
        size_t n = 0;
        while (n + cl <= 8192) {
            memcpy(v + n, chars[c], cl);
            n += cl;
        }
        for (size_t shift = 0; shift < 8; shift++) {
            struct strarg a = {"v", v, n - shift * cl};
            free(logged_line(fill_strn, &a, true));
            /* and a prefix byte that moves the cut by one */
            char *w = malloc(n + 1);
            w[0] = 'p';
            memcpy(w + 1, v, n);
            struct strarg b = {"v", w, n + 1 - shift};
            free(logged_line(fill_strn, &b, true));
            free(w);
        }
    }
    free(v);
}

Test(log, invalid_utf8_in_a_value_becomes_replacement_characters)
{
    /* Values come from peers (a request's :path): bytes that are not UTF-8 must not make the line
     * invalid. Lone continuation, cut sequence, overlong, surrogate, beyond U+10FFFF, 0xff. */
    static const char v[] = "a\x80"
                            "b\xe2\x82"
                            "c\xc0\xaf"
                            "d\xed\xa0\x80"
                            "e\xf4\x90\x80\x80"
                            "f\xff"
                            "g\xc3";
    struct strarg a = {"v", v, sizeof(v) - 1};
    char *out = logged_line(fill_strn, &a, false);
    cr_assert_not_null(strstr(out, "\"v\":\"a\\ufffdb\\ufffdc\\ufffd\\ufffdd\\ufffd\\ufffd\\ufffde"), "%s",
                       out);
    cr_assert_not_null(strstr(out, "f\\ufffdg\\ufffd\""), "%s", out);
    free(out);
}

static void fill_many(struct kd_logline *l, const void *arg)
{
    int nfields = *(const int *)arg;
    for (int i = 0; i < nfields; i++) {
        char key[32];
        snprintf(key, sizeof(key), "field_%d", i);
        switch (i % 5) {
        case 0:
            kd_log_str(l, key, "some \"quoted\" text\n");
            break;
        case 1:
            kd_log_int(l, key, -1234567890123LL);
            break;
        case 2:
            kd_log_bool(l, key, true);
            break;
        case 3:
            kd_log_str(l, key, NULL);
            break;
        default:
            kd_log_uint(l, key, UINT64_MAX);
            break;
        }
    }
}

Test(log, many_fields_are_cut_at_a_field_boundary)
{
    for (int nfields = 1; nfields <= 400; nfields += 3) {
        /* 18 to 38 bytes a field: 100 fields always fit, 200 never do */
        char *out = logged_line(fill_many, &nfields, nfields <= 100 ? 0 : nfields >= 200 ? 1 : -1);
        free(out);
    }
}

static void fill_long_key(struct kd_logline *l, const void *arg)
{
    (void)arg;
    char key[5000];
    memset(key, 'k', sizeof(key) - 1);
    key[sizeof(key) - 1] = '\0';
    kd_log_str(l, "short", "kept");
    kd_log_str(l, key, "v");
    kd_log_int(l, "n", 1);
}

Test(log, an_oversized_key_drops_its_field)
{
    char *out = logged_line(fill_long_key, NULL, true);
    cr_assert_not_null(strstr(out, "\"short\":\"kept\""), "%s", out);
    free(out);
}

Test(log, kd_log_msg_cut_inside_utf8_is_still_json)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    kd_log_configure(KD_LOG_INFO, p[1]);
    /* kd_log_msg formats into a bounded buffer first: the cut there may split a sequence too. */
    char big[3000];
    size_t n = 0;
    while (n + 3 < sizeof(big)) {
        memcpy(big + n, "\xe2\x82\xac", 3);
        n += 3;
    }
    big[n] = '\0';
    for (int shift = 0; shift < 3; shift++) {
        kd_log_msg(KD_LOG_INFO, "euro", "%.*s%s", shift, "xx", big);
        char *out = read_all(p[0]);
        const char *why = json_line_error(out, strlen(out));
        cr_assert_null(why, "invalid JSON (%s): %s", why, out);
        free(out);
    }
    close(p[0]);
    close(p[1]);
    kd_log_configure(KD_LOG_INFO, 2);
}

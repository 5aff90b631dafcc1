/* json.c — see json.h. Two layers:
 *
 *   kd_json_parse       the validator: one pass, no recursion (the open containers are a bit
 *                       stack, 1 = object), every byte checked against RFC 8259.
 *   everything else     readers over text the validator accepted: span() finds the end of a value
 *                       by counting brackets outside strings, the iterator steps over members with
 *                       it, and strings are decoded with the same str_step() the validator uses.
 *
 * Why validate first and then read with a light scanner: a caller's lookups then cannot meet a
 * syntax error halfway through (the answer is refused as a whole, with one offset and reason, before
 * anything is acted on), and a lookup costs a bracket count instead of a full re-validation. The
 * readers stay bounded by the handle's [p, p + len) even on text that was never validated.
 */
#include "core/json.h"

#include <errno.h>
#include <string.h>

/* ---- strings ---------------------------------------------------------------------------------- */

static bool is_cont(uint8_t c)
{
    return (c & 0xc0) == 0x80;
}

/* Length of the well-formed UTF-8 sequence of two or more bytes at p (RFC 3629 section 4), or 0:
 * overlong forms, UTF-16 surrogates (ED A0..BF) and code points past U+10FFFF are not well formed. */
static size_t utf8_seq(const uint8_t *p, const uint8_t *end)
{
    size_t avail = (size_t)(end - p);
    uint8_t lo = 0x80, hi = 0xbf;
    size_t n;

    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        n = 2;
    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        n = 3;
        lo = p[0] == 0xe0 ? 0xa0 : lo;
        hi = p[0] == 0xed ? 0x9f : hi;
    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        n = 4;
        lo = p[0] == 0xf0 ? 0x90 : lo;
        hi = p[0] == 0xf4 ? 0x8f : hi;
    } else {
        return 0;
    }
    if (avail < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (!is_cont(p[i]))
            return 0;
    return n;
}

/* The four hex digits at p as 0..0xffff, or -1 (fewer than four before end, or not hex). */
static long hex4(const uint8_t *p, const uint8_t *end)
{
    long v = 0;

    if (end - p < 4)
        return -1;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0)
            return -1;
        v = v << 4 | d;
    }
    return v;
}

static int put_utf8(uint8_t out[4], uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xc0 | cp >> 6);
        out[1] = (uint8_t)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xe0 | cp >> 12);
        out[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
        out[2] = (uint8_t)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (uint8_t)(0xf0 | cp >> 18);
    out[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3f));
    out[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3f));
    out[3] = (uint8_t)(0x80 | (cp & 0x3f));
    return 4;
}

/* One step through a string whose opening quote is behind *pp: the next character, decoded to
 * UTF-8 in out, returns its byte count (1..4) and moves *pp past it; at the closing quote, returns 0
 * and moves past the quote; on an error returns -1 with *why set and *pp on the offending byte.
 * The validator, the decoder and the comparison all go through here, so they cannot disagree. Every
 * step consumes at least as many raw bytes as it produces (\uXXXX: 6 -> at most 3, a pair: 12 -> 4),
 * which is why a decoded string never outgrows its raw text. */
static int str_step(const uint8_t **pp, const uint8_t *end, uint8_t out[4], const char **why)
{
    static const char esc[] = "\"\\/bfnrt", val[] = "\"\\/\b\f\n\r\t";
    const uint8_t *p = *pp;
    const char *simple;
    long cp, lo;

    if (p >= end) {
        *why = "unterminated string";
        return -1;
    }
    if (*p == '"') {
        *pp = p + 1;
        return 0;
    }
    if (*p < 0x20) {
        *why = "control character in string";
        return -1;
    }
    if (*p >= 0x80) {
        size_t n = utf8_seq(p, end);
        if (n == 0) {
            *why = "invalid UTF-8";
            return -1;
        }
        memcpy(out, p, n);
        *pp = p + n;
        return (int)n;
    }
    if (*p != '\\') {
        out[0] = *p;
        *pp = p + 1;
        return 1;
    }
    if (end - p < 2) {
        *why = "unterminated string";
        return -1;
    }
    simple = p[1] != 0 ? strchr(esc, p[1]) : NULL;
    if (simple) {
        out[0] = (uint8_t)val[simple - esc];
        *pp = p + 2;
        return 1;
    }
    if (p[1] != 'u') {
        *why = "bad escape";
        return -1;
    }
    if ((cp = hex4(p + 2, end)) < 0) {
        *why = "bad \\u escape";
        return -1;
    }
    if (cp >= 0xdc00 && cp <= 0xdfff) {
        *why = "lone low surrogate";
        return -1;
    }
    if (cp >= 0xd800 && cp <= 0xdbff) {
        lo = end - p >= 8 && p[6] == '\\' && p[7] == 'u' ? hex4(p + 8, end) : -1;
        if (lo < 0xdc00 || lo > 0xdfff) {
            *why = "lone high surrogate";
            return -1;
        }
        *pp = p + 12;
        return put_utf8(out, (uint32_t)(0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00)));
    }
    *pp = p + 6;
    return put_utf8(out, (uint32_t)cp);
}

/* ---- the validator ---------------------------------------------------------------------------- */

static const uint8_t *skip_ws(const uint8_t *p, const uint8_t *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static bool digit_at(const uint8_t *p, const uint8_t *end)
{
    return p < end && *p >= '0' && *p <= '9';
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? at *pp; the conventions of str_step. */
static int number(const uint8_t **pp, const uint8_t *end, const char **why)
{
    const uint8_t *p = *pp;

    if (*p == '-')
        p++;
    if (!digit_at(p, end)) {
        *why = "bad number";
        goto fail;
    }
    if (*p == '0' && digit_at(p + 1, end)) {
        p++;
        *why = "leading zero in number";
        goto fail;
    }
    while (digit_at(p, end))
        p++;
    if (p < end && *p == '.') {
        if (!digit_at(++p, end)) {
            *why = "digit expected after '.'";
            goto fail;
        }
        while (digit_at(p, end))
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (!digit_at(p, end)) {
            *why = "digit expected in exponent";
            goto fail;
        }
        while (digit_at(p, end))
            p++;
    }
    *pp = p;
    return 0;
fail:
    *pp = p;
    return -1;
}

static int literal(const uint8_t **pp, const uint8_t *end, const char **why)
{
    const char *lit = **pp == 't' ? "true" : **pp == 'f' ? "false" : "null";
    size_t n = strlen(lit);

    if ((size_t)(end - *pp) < n || memcmp(*pp, lit, n) != 0) {
        *why = "bad literal";
        return -1;
    }
    *pp += n;
    return 0;
}

/* One scalar (string, number, literal) at *pp, which is before end. */
static int scalar(const uint8_t **pp, const uint8_t *end, const char **why)
{
    uint8_t c = **pp, out[4];
    int rc;

    if (c == '"') {
        ++*pp;
        while ((rc = str_step(pp, end, out, why)) > 0)
            ;
        return rc;
    }
    if (c == 't' || c == 'f' || c == 'n')
        return literal(pp, end, why);
    if (c == '-' || (c >= '0' && c <= '9'))
        return number(pp, end, why);
    *why = "unexpected character";
    return -1;
}

static enum kd_json_type type_of(uint8_t c)
{
    switch (c) {
    case '{':
        return KD_JSON_OBJECT;
    case '[':
        return KD_JSON_ARRAY;
    case '"':
        return KD_JSON_STRING;
    case 't':
        return KD_JSON_TRUE;
    case 'f':
        return KD_JSON_FALSE;
    case 'n':
        return KD_JSON_NULL;
    default:
        return c == '-' || (c >= '0' && c <= '9') ? KD_JSON_NUMBER : KD_JSON_NONE;
    }
}

/* The validator is a loop over three states, with the open containers as a bit stack (bit d set:
 * container d is an object):
 *
 *   VALUE ──scalar──▶ AFTER ──',' in object──▶ NAME ──"name" ':'──▶ VALUE
 *     │  ◀──',' in array──┘ │ ──'}' or ']'──▶ AFTER (one level up)
 *     └──'{' or '['──▶ NAME / VALUE (one level down; an empty container goes straight to AFTER)
 *
 * AFTER at depth 0 ends the document: only whitespace may follow. */
int kd_json_parse(const void *buf, size_t len, struct kd_json *root, struct kd_json_err *err)
{
    const uint8_t *start = buf ? buf : (const void *)"", *end, *p = start, *first;
    const char *why = NULL;
    uint64_t objects = 0; /* bit d: the container at depth d (0-based) is an object */
    unsigned depth = 0;
    enum { VALUE, NAME, AFTER } st = VALUE;
    int rc = -EBADMSG;

    if (!buf)
        len = 0;
    end = start + len;
    if (len > KD_JSON_MAX_LEN) {
        p = start + KD_JSON_MAX_LEN;
        why = "document too large";
        rc = -EMSGSIZE;
        goto fail;
    }
    p = first = skip_ws(p, end);
    for (;;) {
        bool obj = depth > 0 && (objects >> (depth - 1) & 1);

        if (st == VALUE) {
            if (p >= end) {
                why = "unexpected end";
                goto fail;
            }
            if (*p != '{' && *p != '[') {
                if (scalar(&p, end, &why) < 0)
                    goto fail;
                st = AFTER;
                continue;
            }
            if (depth == KD_JSON_MAX_DEPTH) {
                why = "nested too deeply";
                rc = -E2BIG;
                goto fail;
            }
            obj = *p == '{';
            objects = (objects & ~(1ull << depth)) | (uint64_t)obj << depth;
            depth++;
            p = skip_ws(p + 1, end);
            if (p < end && *p == (obj ? '}' : ']')) {
                p++;
                depth--;
                st = AFTER;
            } else {
                st = obj ? NAME : VALUE;
            }
        } else if (st == NAME) {
            if (p >= end || *p != '"') {
                why = "expected a member name";
                goto fail;
            }
            if (scalar(&p, end, &why) < 0)
                goto fail;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') {
                why = "expected ':'";
                goto fail;
            }
            p = skip_ws(p + 1, end);
            st = VALUE;
        } else {
            p = skip_ws(p, end);
            if (depth == 0)
                break;
            if (p < end && *p == ',') {
                p = skip_ws(p + 1, end);
                st = obj ? NAME : VALUE;
            } else if (p < end && *p == (obj ? '}' : ']')) {
                p++;
                depth--;
            } else {
                why = obj ? "expected ',' or '}'" : "expected ',' or ']'";
                goto fail;
            }
        }
    }
    if (p != end) {
        why = "data after the document";
        goto fail;
    }
    /* The value ends where trailing whitespace begins. */
    while (end > first && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
        end--;
    root->p = (const char *)first;
    root->len = (size_t)(end - first);
    root->type = type_of(*first);
    return 0;
fail:
    if (err) {
        err->off = (size_t)(p - start);
        err->why = why;
    }
    return rc;
}

/* ---- readers ---------------------------------------------------------------------------------- */

/* Past the closing quote of the string whose opening quote is at p (text already validated, so an
 * escape is a backslash and one more byte as far as finding the end goes), or end. */
static const uint8_t *string_end(const uint8_t *p, const uint8_t *end)
{
    for (p++; p < end; p++) {
        if (*p == '"')
            return p + 1;
        if (*p == '\\' && ++p == end)
            break;
    }
    return end;
}

/* Past the value starting at p, which the validator accepted: containers end at the bracket that
 * brings the count back to zero (brackets inside strings do not count), scalars where their
 * characters stop. Never beyond end, and at least one byte when p < end. */
static const uint8_t *span(const uint8_t *p, const uint8_t *end)
{
    unsigned open = 0;

    if (p >= end)
        return end;
    switch (type_of(*p)) {
    case KD_JSON_STRING:
        return string_end(p, end);
    case KD_JSON_OBJECT:
    case KD_JSON_ARRAY:
        while (p < end) {
            if (*p == '"') {
                p = string_end(p, end);
                continue;
            }
            if (*p == '{' || *p == '[')
                open++;
            else if ((*p == '}' || *p == ']') && --open == 0)
                return p + 1;
            p++;
        }
        return end;
    case KD_JSON_TRUE:
    case KD_JSON_NULL:
        return (size_t)(end - p) > 4 ? p + 4 : end;
    case KD_JSON_FALSE:
        return (size_t)(end - p) > 5 ? p + 5 : end;
    default:
        p++;
        while (p < end &&
               ((*p >= '0' && *p <= '9') || *p == '.' || *p == 'e' || *p == 'E' || *p == '+' || *p == '-'))
            p++;
        return p;
    }
}

static const uint8_t *bytes(const struct kd_json *v)
{
    return (const uint8_t *)v->p;
}

int kd_json_enter(const struct kd_json *v, struct kd_json_iter *it)
{
    const uint8_t *p = bytes(v), *end;

    if (v->len < 2 || !((v->type == KD_JSON_OBJECT && *p == '{') || (v->type == KD_JSON_ARRAY && *p == '[')))
        return -EINVAL;
    end = p + v->len;
    it->p = (const char *)skip_ws(p + 1, end);
    it->end = (const char *)end;
    it->object = v->type == KD_JSON_OBJECT;
    return 0;
}

/* The value at *pp into *v, moving *pp past it and the whitespace after it. */
static void take(const uint8_t **pp, const uint8_t *end, struct kd_json *v)
{
    const uint8_t *p = *pp, *e = span(p, end);

    v->p = (const char *)p;
    v->len = (size_t)(e - p);
    v->type = p < end ? type_of(*p) : KD_JSON_NONE;
    *pp = skip_ws(e, end);
}

bool kd_json_next(struct kd_json_iter *it, struct kd_json *key, struct kd_json *val)
{
    const uint8_t *p = (const uint8_t *)it->p, *end = (const uint8_t *)it->end;
    struct kd_json k = {.type = KD_JSON_NONE};

    if (p >= end || *p == '}' || *p == ']') {
        it->p = (const char *)(p < end ? p + 1 : end);
        return false;
    }
    if (it->object) {
        take(&p, end, &k);
        if (p < end && *p == ':')
            p = skip_ws(p + 1, end);
    }
    take(&p, end, val);
    if (p < end && *p == ',')
        p = skip_ws(p + 1, end);
    /* Only a forged handle can have a member that is not a string or a value of no length; stop
     * there rather than hand out garbage (and never loop in place). */
    if (val->len == 0 || (it->object && k.type != KD_JSON_STRING)) {
        it->p = it->end;
        return false;
    }
    it->p = (const char *)p;
    if (key)
        *key = k;
    return true;
}

/* Does the string v decode to exactly s[0..n)? */
static bool eq_n(const struct kd_json *v, const char *s, size_t n)
{
    const uint8_t *p = bytes(v) + 1, *end = bytes(v) + v->len;
    const char *why;
    uint8_t out[4];
    size_t i = 0;
    int k;

    if (v->type != KD_JSON_STRING || v->len < 2 || v->p[0] != '"')
        return false;
    while ((k = str_step(&p, end, out, &why)) > 0) {
        if ((size_t)k > n - i || memcmp(out, s + i, (size_t)k) != 0)
            return false;
        i += (size_t)k;
    }
    return k == 0 && i == n;
}

bool kd_json_eq(const struct kd_json *v, const char *s)
{
    return eq_n(v, s, strlen(s));
}

/* The element of array a at the decimal index seg[0..n). */
static int index_of(const struct kd_json *a, const char *seg, size_t n, struct kd_json *out)
{
    struct kd_json_iter it;
    size_t idx = 0;

    if (n > 9 || (n > 1 && seg[0] == '0'))
        return n > 9 && strspn(seg, "0123456789") >= n ? -ENOENT : -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (seg[i] < '0' || seg[i] > '9')
            return -EINVAL;
        idx = idx * 10 + (size_t)(seg[i] - '0');
    }
    kd_json_enter(a, &it);
    while (kd_json_next(&it, NULL, out))
        if (idx-- == 0)
            return 0;
    return -ENOENT;
}

/* The member of object o named seg[0..n): the last one, -ENOTUNIQ if there were more. */
static int member_of(const struct kd_json *o, const char *seg, size_t n, struct kd_json *out)
{
    struct kd_json_iter it;
    struct kd_json key, val;
    unsigned found = 0;

    kd_json_enter(o, &it);
    while (kd_json_next(&it, &key, &val))
        if (eq_n(&key, seg, n)) {
            *out = val;
            found++;
        }
    return found == 0 ? -ENOENT : found > 1 ? -ENOTUNIQ : 0;
}

int kd_json_get(const struct kd_json *v, const char *path, struct kd_json *out)
{
    struct kd_json cur = *v, next;
    int dup = 0;

    while (*path) {
        size_t n = strcspn(path, ".");
        int rc;

        if (n == 0 || (path[n] == '.' && path[n + 1] == '\0'))
            return -EINVAL;
        if (cur.type == KD_JSON_OBJECT)
            rc = member_of(&cur, path, n, &next);
        else if (cur.type == KD_JSON_ARRAY)
            rc = index_of(&cur, path, n, &next);
        else
            rc = -EINVAL;
        if (rc == -ENOTUNIQ)
            dup = rc;
        else if (rc < 0)
            return rc;
        cur = next;
        path += n + (path[n] == '.');
    }
    *out = cur;
    return dup;
}

int kd_json_int64(const struct kd_json *v, int64_t *out)
{
    const uint8_t *p = bytes(v), *end = p + v->len;
    bool neg = p < end && *p == '-';
    uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX, acc = 0;
    bool over = false;

    if (v->type != KD_JSON_NUMBER)
        return -EINVAL;
    p += neg;
    if (p == end)
        return -EINVAL;
    for (; p < end; p++) {
        unsigned d = (unsigned)(*p - '0');

        if (d > 9)
            return -EINVAL; /* '.', 'e', 'E': not an integer, however large */
        if (acc > (limit - d) / 10)
            over = true;
        else if (!over)
            acc = acc * 10 + d;
    }
    if (over)
        return -ERANGE;
    /* -2^63 is limit itself: negate in unsigned arithmetic, then convert (two's complement). */
    *out = neg ? (int64_t)(0 - acc) : (int64_t)acc;
    return 0;
}

int kd_json_bool(const struct kd_json *v, bool *out)
{
    if (v->type != KD_JSON_TRUE && v->type != KD_JSON_FALSE)
        return -EINVAL;
    *out = v->type == KD_JSON_TRUE;
    return 0;
}

ssize_t kd_json_str(const struct kd_json *v, char *buf, size_t cap)
{
    const uint8_t *p = bytes(v) + 1, *end = bytes(v) + v->len;
    const char *why;
    uint8_t out[4];
    size_t n = 0;
    bool cut = false;
    int k;

    if (v->type != KD_JSON_STRING || v->len < 2 || v->p[0] != '"')
        return -EINVAL;
    while ((k = str_step(&p, end, out, &why)) > 0) {
        if (!cut && (size_t)k < cap - n) {
            memcpy(buf + n, out, (size_t)k);
            n += (size_t)k;
        } else {
            cut = true; /* keep going: a bad string is -EBADMSG whatever the room */
        }
    }
    if (cap > 0)
        buf[n] = '\0';
    if (k < 0)
        return -EBADMSG;
    return cut || cap == 0 ? -ENOSPC : (ssize_t)n; /* cap 0: no room for the NUL */
}

int kd_json_get_int64(const struct kd_json *v, const char *path, int64_t *out)
{
    struct kd_json x;
    int rc = kd_json_get(v, path, &x);

    return rc < 0 ? rc : kd_json_int64(&x, out);
}

ssize_t kd_json_get_str(const struct kd_json *v, const char *path, char *buf, size_t cap)
{
    struct kd_json x;
    int rc = kd_json_get(v, path, &x);
    ssize_t n;

    if (rc < 0)
        return rc;
    n = kd_json_str(&x, buf, cap);
    if (n >= 0 && memchr(buf, '\0', (size_t)n))
        return -EILSEQ;
    return n;
}

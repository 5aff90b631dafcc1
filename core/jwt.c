/* jwt.c — see jwt.h. Three pieces: base64 (url alphabet for tokens, standard for the secret file),
 * a small strict JSON scanner, and the verify/sign logic on top of core/sha2.
 *
 * The JSON scanner works on the decoded header or payload in place, never allocates and never
 * builds a tree: the top-level object is walked member by member, the few members we care about are
 * read, everything else is validated and skipped. Nesting is limited to KD_JWT_MAX_DEPTH, so the
 * recursion in json_skip is bounded (16 frames of a few words). It follows RFC 8259 strictly:
 * UTF-8 only (overlongs, surrogates and code points past U+10FFFF refused), no control characters
 * in strings, \u escapes with surrogates properly paired, no leading zeros, no NaN/Infinity, nothing
 * but whitespace after the top-level value. */
#include "core/jwt.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "core/base64.h"
#include "core/sha2.h"
#include "core/tokens.h"

/* JWS compact serialization: base64url without padding (RFC 7515 section 2), one encoding per
 * byte string. */
#define JWT_B64 (KD_B64_URL | KD_B64_NOPAD | KD_B64_STRICT)

#define DECODED_MAX     (KD_JWT_MAX_LEN / 4 * 3 + 3)
#define SECRET_FILE_MAX 4096
#define SHOWN_MAX       16 /* bytes of a token-supplied value shown in an error */

static void seterr(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Copy a token-supplied value for an error message: [A-Za-z0-9._-] kept, anything else shown as '?'
 * so a hostile header cannot inject text into a log line; "..." marks a value longer than len. */
static void shown(const char *in, size_t len, size_t full_len, char out[SHOWN_MAX + 4])
{
    size_t n = 0;
    for (size_t i = 0; i < len && i < SHOWN_MAX; i++) {
        char c = in[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                  c == '_' || c == '-';
        out[n++] = ok ? c : '?';
    }
    if (full_len > n) {
        memcpy(out + n, "...", 3);
        n += 3;
    }
    out[n] = '\0';
}

static bool bytes_are(const char *s, size_t len, const char *lit)
{
    return len == strlen(lit) && memcmp(s, lit, len) == 0;
}

/* ---- JSON scanner ----------------------------------------------------------------------------- */

struct json {
    const uint8_t *start, *p, *end;
    const char *why; /* first failure */
    bool syntax;     /* why is a syntax error (else a claim-level one: type, range, duplicate) */
};

static int jfail(struct json *j, const char *why)
{
    if (j->why == NULL) {
        j->why = why;
        j->syntax = true;
    }
    return -EINVAL;
}

/* A well-formed value of the wrong kind or range. */
static int jbad(struct json *j, const char *why)
{
    if (j->why == NULL) {
        j->why = why;
        j->syntax = false;
    }
    return -EINVAL;
}

static void ws(struct json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static bool at(const struct json *j, char c)
{
    return j->p < j->end && *j->p == (uint8_t)c;
}

static bool cont(uint8_t c)
{
    return (c & 0xc0) == 0x80;
}

/* Length of the well-formed UTF-8 sequence at p (RFC 3629 table), or 0. Bytes below 0x80 are not
 * handled here. */
static size_t utf8_len(const uint8_t *p, const uint8_t *end)
{
    size_t avail = (size_t)(end - p);
    uint8_t c = p[0];
    if (c >= 0xc2 && c <= 0xdf)
        return avail >= 2 && cont(p[1]) ? 2 : 0;
    if (c >= 0xe0 && c <= 0xef) {
        uint8_t lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf; /* no overlongs, no surrogates */
        return avail >= 3 && p[1] >= lo && p[1] <= hi && cont(p[2]) ? 3 : 0;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        uint8_t lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf; /* no overlongs, <= U+10FFFF */
        return avail >= 4 && p[1] >= lo && p[1] <= hi && cont(p[2]) && cont(p[3]) ? 4 : 0;
    }
    return 0;
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Four hex digits at p (bounds checked by the caller) -> 0..0xffff, or -1. */
static long hex4(const uint8_t *p)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0)
            return -1;
        v = v << 4 | h;
    }
    return v;
}

static void emit(char *out, size_t cap, size_t *n, uint8_t b)
{
    if (out != NULL && *n + 1 < cap)
        out[*n] = (char)b;
    (*n)++;
}

static void emit_utf8(char *out, size_t cap, size_t *n, uint32_t cp)
{
    if (cp < 0x80) {
        emit(out, cap, n, (uint8_t)cp);
    } else if (cp < 0x800) {
        emit(out, cap, n, (uint8_t)(0xc0 | cp >> 6));
        emit(out, cap, n, (uint8_t)(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        emit(out, cap, n, (uint8_t)(0xe0 | cp >> 12));
        emit(out, cap, n, (uint8_t)(0x80 | ((cp >> 6) & 0x3f)));
        emit(out, cap, n, (uint8_t)(0x80 | (cp & 0x3f)));
    } else {
        emit(out, cap, n, (uint8_t)(0xf0 | cp >> 18));
        emit(out, cap, n, (uint8_t)(0x80 | ((cp >> 12) & 0x3f)));
        emit(out, cap, n, (uint8_t)(0x80 | ((cp >> 6) & 0x3f)));
        emit(out, cap, n, (uint8_t)(0x80 | (cp & 0x3f)));
    }
}

/* Scan the string at j->p (on its opening quote) and validate it. When out is set, the decoded
 * UTF-8 is stored there (at most cap - 1 bytes, NUL-terminated; cap > 0). *dlen (may be NULL) gets
 * the full decoded length, so dlen >= cap means it was cut. */
static int json_string(struct json *j, char *out, size_t cap, size_t *dlen)
{
    size_t n = 0;
    j->p++;
    for (;;) {
        if (j->p >= j->end)
            return jfail(j, "unterminated string");
        uint8_t c = *j->p;
        if (c == '"') {
            j->p++;
            break;
        }
        if (c < 0x20)
            return jfail(j, "control character in string");
        if (c >= 0x80) {
            size_t l = utf8_len(j->p, j->end);
            if (l == 0)
                return jfail(j, "invalid UTF-8");
            for (size_t i = 0; i < l; i++)
                emit(out, cap, &n, j->p[i]);
            j->p += l;
            continue;
        }
        if (c != '\\') {
            emit(out, cap, &n, c);
            j->p++;
            continue;
        }
        if (j->end - j->p < 2)
            return jfail(j, "unterminated string");
        uint8_t e = j->p[1];
        static const char esc[] = "\"\\/bfnrt", val[] = "\"\\/\b\f\n\r\t";
        const char *simple = e != 0 ? strchr(esc, e) : NULL;
        if (simple != NULL) {
            emit(out, cap, &n, (uint8_t)val[simple - esc]);
            j->p += 2;
            continue;
        }
        if (e != 'u')
            return jfail(j, "bad escape");
        long cp = j->end - j->p >= 6 ? hex4(j->p + 2) : -1;
        if (cp < 0)
            return jfail(j, "bad \\u escape");
        j->p += 6;
        if (cp >= 0xdc00 && cp <= 0xdfff)
            return jfail(j, "lone low surrogate");
        if (cp >= 0xd800 && cp <= 0xdbff) {
            long lo = -1;
            if (j->end - j->p >= 6 && j->p[0] == '\\' && j->p[1] == 'u')
                lo = hex4(j->p + 2);
            if (lo < 0xdc00 || lo > 0xdfff)
                return jfail(j, "unpaired high surrogate");
            j->p += 6;
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        }
        emit_utf8(out, cap, &n, (uint32_t)cp);
    }
    if (out != NULL)
        out[n < cap ? n : cap - 1] = '\0';
    if (dlen != NULL)
        *dlen = n;
    return 0;
}

/* Next code point of a string json_string has already validated (*pp inside it), or -1 at the
 * closing quote. Used to compare member names whatever their escaping ("exp" == "\u0065xp"). */
static long cp_next(const uint8_t **pp)
{
    const uint8_t *p = *pp;
    long cp;
    if (*p == '"')
        return -1;
    if (*p == '\\') {
        switch (p[1]) {
        case 'b':
            cp = '\b';
            break;
        case 'f':
            cp = '\f';
            break;
        case 'n':
            cp = '\n';
            break;
        case 'r':
            cp = '\r';
            break;
        case 't':
            cp = '\t';
            break;
        case 'u':
            cp = hex4(p + 2);
            p += 6;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                cp = 0x10000 + ((cp - 0xd800) << 10) + (hex4(p + 2) - 0xdc00);
                p += 6;
            }
            *pp = p;
            return cp;
        default: /* " \ / */
            cp = p[1];
            break;
        }
        *pp = p + 2;
        return cp;
    }
    if (*p < 0x80) {
        cp = *p;
        *pp = p + 1;
    } else if (*p < 0xe0) {
        cp = (long)(p[0] & 0x1f) << 6 | (p[1] & 0x3f);
        *pp = p + 2;
    } else if (*p < 0xf0) {
        cp = (long)(p[0] & 0x0f) << 12 | (long)(p[1] & 0x3f) << 6 | (p[2] & 0x3f);
        *pp = p + 3;
    } else {
        cp = (long)(p[0] & 0x07) << 18 | (long)(p[1] & 0x3f) << 12 | (long)(p[2] & 0x3f) << 6 | (p[3] & 0x3f);
        *pp = p + 4;
    }
    return cp;
}

/* a and b point just past the opening quotes of two validated strings. */
static bool same_string(const uint8_t *a, const uint8_t *b)
{
    for (;;) {
        long x = cp_next(&a), y = cp_next(&b);
        if (x != y)
            return false;
        if (x < 0)
            return true;
    }
}

static bool is_digit(const struct json *j)
{
    return j->p < j->end && *j->p >= '0' && *j->p <= '9';
}

/* Scan a number (RFC 8259 grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?). When v is set,
 * also convert it: up to 19 significant digits and a saturated exponent, scaled by powers of ten.
 * That is not correctly rounded in the last bit, which is of no matter for seconds; it needs no
 * locale (strtod would) and no libm. Magnitudes above KD_JWT_TIME_MAX return -ERANGE. */
static int json_number(struct json *j, double *v)
{
    bool neg = false;
    uint64_t mant = 0;
    int sig = 0;    /* significant digits in mant */
    long exp10 = 0; /* value = mant * 10^exp10 */
    if (at(j, '-')) {
        neg = true;
        j->p++;
    }
    if (!is_digit(j))
        return jfail(j, "bad number");
    if (*j->p == '0') {
        j->p++;
    } else {
        while (is_digit(j)) {
            if (sig < 19) {
                mant = mant * 10 + (uint64_t)(*j->p - '0');
                sig++;
            } else {
                exp10++;
            }
            j->p++;
        }
    }
    if (at(j, '.')) {
        j->p++;
        if (!is_digit(j))
            return jfail(j, "bad number");
        while (is_digit(j)) {
            if (sig < 19) {
                mant = mant * 10 + (uint64_t)(*j->p - '0');
                if (mant != 0)
                    sig++;
                exp10--;
            }
            j->p++;
        }
    }
    if (at(j, 'e') || at(j, 'E')) {
        j->p++;
        bool eneg = false;
        if (at(j, '+') || at(j, '-'))
            eneg = *j->p++ == '-';
        if (!is_digit(j))
            return jfail(j, "bad number");
        long e = 0;
        while (is_digit(j)) {
            if (e < 1000000)
                e = e * 10 + (*j->p - '0');
            j->p++;
        }
        exp10 += eneg ? -e : e;
    }
    if (v == NULL)
        return 0;
    if (mant == 0) {
        *v = 0;
        return 0;
    }
    if (sig - 1 + exp10 > 20) /* >= 1e21, far past KD_JWT_TIME_MAX; also keeps the loop short */
        return -ERANGE;
    double d = (double)mant;
    if (exp10 < -400) {
        d = 0; /* underflow: a tiny number is as good as zero for a time */
    } else {
        for (; exp10 > 0; exp10--)
            d *= 10;
        double div = 1;
        for (; exp10 < 0; exp10++)
            div *= 10;
        d /= div; /* div may become inf for exp10 < -308: d / inf == 0, as wanted */
    }
    if (d > KD_JWT_TIME_MAX)
        return -ERANGE;
    *v = neg ? -d : d;
    return 0;
}

static int json_literal(struct json *j, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, lit, n) != 0)
        return jfail(j, "bad literal");
    j->p += n;
    return 0;
}

/* Validate and skip one value at j->p. depth counts the containers already open around it; opening
 * one more must stay within KD_JWT_MAX_DEPTH, which bounds the recursion. */
static int json_skip(struct json *j, int depth)
{
    if (j->p >= j->end)
        return jfail(j, "unexpected end");
    switch (*j->p) {
    case '"':
        return json_string(j, NULL, 0, NULL);
    case 't':
        return json_literal(j, "true");
    case 'f':
        return json_literal(j, "false");
    case 'n':
        return json_literal(j, "null");
    case '{':
    case '[': {
        bool obj = *j->p == '{';
        char close = obj ? '}' : ']';
        if (depth + 1 > KD_JWT_MAX_DEPTH)
            return jfail(j, "nested too deeply");
        j->p++;
        ws(j);
        if (at(j, close)) {
            j->p++;
            return 0;
        }
        for (;;) {
            if (obj) {
                if (!at(j, '"'))
                    return jfail(j, "expected a member name");
                int rc = json_string(j, NULL, 0, NULL);
                if (rc < 0)
                    return rc;
                ws(j);
                if (!at(j, ':'))
                    return jfail(j, "expected ':'");
                j->p++;
                ws(j);
            }
            int rc = json_skip(j, depth + 1);
            if (rc < 0)
                return rc;
            ws(j);
            if (at(j, ',')) {
                j->p++;
                ws(j);
                continue;
            }
            if (at(j, close)) {
                j->p++;
                return 0;
            }
            return jfail(j, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    default:
        if (*j->p == '-' || (*j->p >= '0' && *j->p <= '9'))
            return json_number(j, NULL);
        return jfail(j, "unexpected character");
    }
}

/* A value of the wrong type for its claim: still validated first, so broken JSON is reported as such.
 * depth: containers open around the value. */
static int wrong_type(struct json *j, int depth, const char *why)
{
    int rc = json_skip(j, depth);
    return rc < 0 ? rc : jbad(j, why);
}

/* Called for each member of the top-level object with j->p on its value, which it must consume.
 * key holds the decoded name when klen < 16 (longer names match nothing we look for). */
typedef int (*member_fn)(void *ctx, const char *key, size_t klen, struct json *j);

/* Walk the top-level object: the whole input must be one object, with unique member names. */
static int json_top_object(struct json *j, member_fn fn, void *ctx)
{
    const uint8_t *names[KD_JWT_MAX_MEMBERS];
    size_t nnames = 0;
    ws(j);
    if (!at(j, '{'))
        return jfail(j, "not an object");
    j->p++;
    ws(j);
    if (at(j, '}')) {
        j->p++;
    } else {
        for (;;) {
            if (!at(j, '"'))
                return jfail(j, "expected a member name");
            const uint8_t *name = j->p + 1;
            char key[16];
            size_t klen;
            int rc = json_string(j, key, sizeof(key), &klen);
            if (rc < 0)
                return rc;
            for (size_t i = 0; i < nnames; i++)
                if (same_string(names[i], name))
                    return jbad(j, "duplicate member name");
            if (nnames == KD_JWT_MAX_MEMBERS)
                return jbad(j, "too many members");
            names[nnames++] = name;
            ws(j);
            if (!at(j, ':'))
                return jfail(j, "expected ':'");
            j->p++;
            ws(j);
            if (j->p >= j->end)
                return jfail(j, "unexpected end");
            rc = fn(ctx, klen < sizeof(key) ? key : "", klen, j);
            if (rc < 0)
                return rc;
            ws(j);
            if (at(j, ',')) {
                j->p++;
                ws(j);
                continue;
            }
            if (at(j, '}')) {
                j->p++;
                break;
            }
            return jfail(j, "expected ',' or '}'");
        }
    }
    ws(j);
    if (j->p != j->end)
        return jfail(j, "data after the object");
    return 0;
}

/* Report a JSON failure of the header or payload. */
static int json_error(const struct json *j, const char *part, char *err, size_t errlen)
{
    if (j->syntax)
        seterr(err, errlen, "%s is not valid JSON: %s at byte %zu", part, j->why, (size_t)(j->p - j->start));
    else
        seterr(err, errlen, "%s: %s", part, j->why);
    return -EINVAL;
}

/* ---- header ----------------------------------------------------------------------------------- */

struct header {
    char alg[16];
    size_t alg_len; /* decoded length; >= sizeof(alg) means cut */
    bool has_alg, has_typ, typ_ok, has_crit;
};

static int header_member(void *ctx, const char *key, size_t klen, struct json *j)
{
    struct header *h = ctx;
    if (bytes_are(key, klen, "alg")) {
        if (!at(j, '"'))
            return wrong_type(j, 1, "alg is not a string");
        h->has_alg = true;
        return json_string(j, h->alg, sizeof(h->alg), &h->alg_len);
    }
    if (bytes_are(key, klen, "typ")) {
        char typ[8];
        size_t n;
        if (!at(j, '"'))
            return wrong_type(j, 1, "typ is not a string");
        int rc = json_string(j, typ, sizeof(typ), &n);
        if (rc < 0)
            return rc;
        h->has_typ = true;
        h->typ_ok = n == 3 && strcasecmp(typ, "JWT") == 0;
        return 0;
    }
    if (bytes_are(key, klen, "crit"))
        h->has_crit = true;
    return json_skip(j, 1);
}

/* ---- claims ----------------------------------------------------------------------------------- */

struct claims {
    const struct kd_jwt_opts *o;
    struct kd_jwt_claims *c;
    bool has_exp, has_aud, aud_ok, has_iss, iss_ok;
    double exp, nbf, iat;
};

/* Decode the string at j->p and say whether it is exactly want. */
static int string_is(struct json *j, const char *want, bool *eq)
{
    char buf[KD_JWT_STR_MAX];
    size_t n;
    *eq = false;
    int rc = json_string(j, buf, sizeof(buf), &n);
    if (rc < 0)
        return rc;
    *eq = n < sizeof(buf) && bytes_are(buf, n, want);
    return 0;
}

static int time_claim(struct json *j, double *v, const char *not_number, const char *range)
{
    if (!at(j, '-') && !(*j->p >= '0' && *j->p <= '9'))
        return wrong_type(j, 1, not_number);
    int rc = json_number(j, v);
    if (rc == -ERANGE)
        return jbad(j, range);
    return rc;
}

/* "aud": a string, or an array of strings (RFC 7519 section 4.1.3). */
static int aud_claim(struct claims *cl, struct json *j)
{
    static const char *const bad = "aud is not a string or an array of strings";
    bool eq = false;
    cl->has_aud = true;
    if (at(j, '"')) {
        int rc = string_is(j, cl->o->audience, &eq);
        cl->aud_ok = eq;
        return rc;
    }
    if (!at(j, '['))
        return wrong_type(j, 1, bad);
    j->p++;
    ws(j);
    if (at(j, ']')) {
        j->p++;
        return 0;
    }
    for (;;) {
        if (!at(j, '"'))
            return wrong_type(j, 2, bad);
        int rc = string_is(j, cl->o->audience, &eq);
        if (rc < 0)
            return rc;
        cl->aud_ok |= eq;
        ws(j);
        if (at(j, ',')) {
            j->p++;
            ws(j);
            continue;
        }
        if (at(j, ']')) {
            j->p++;
            return 0;
        }
        return jfail(j, "expected ',' or ']'");
    }
}

/* A string claim copied out (cleared when it does not fit). */
static int copy_claim(struct json *j, char out[KD_JWT_STR_MAX], size_t *n, const char *not_string)
{
    if (!at(j, '"'))
        return wrong_type(j, 1, not_string);
    int rc = json_string(j, out, KD_JWT_STR_MAX, n);
    return rc;
}

static int claim_member(void *ctx, const char *key, size_t klen, struct json *j)
{
    struct claims *cl = ctx;
    if (bytes_are(key, klen, "exp")) {
        cl->has_exp = true;
        return time_claim(j, &cl->exp, "exp is not a number", "exp is out of range");
    }
    if (bytes_are(key, klen, "nbf")) {
        cl->c->has_nbf = true;
        return time_claim(j, &cl->nbf, "nbf is not a number", "nbf is out of range");
    }
    if (bytes_are(key, klen, "iat")) {
        cl->c->has_iat = true;
        return time_claim(j, &cl->iat, "iat is not a number", "iat is out of range");
    }
    if (bytes_are(key, klen, "aud"))
        return aud_claim(cl, j);
    if (bytes_are(key, klen, "iss")) {
        size_t n;
        int rc = copy_claim(j, cl->c->iss, &n, "iss is not a string");
        if (rc < 0)
            return rc;
        cl->has_iss = true;
        cl->iss_ok = cl->o->issuer != NULL && n < KD_JWT_STR_MAX && bytes_are(cl->c->iss, n, cl->o->issuer);
        if (n >= KD_JWT_STR_MAX)
            cl->c->iss[0] = '\0';
        return 0;
    }
    if (bytes_are(key, klen, "sub")) {
        size_t n;
        int rc = copy_claim(j, cl->c->sub, &n, "sub is not a string");
        if (rc == 0 && n >= KD_JWT_STR_MAX)
            cl->c->sub[0] = '\0';
        return rc;
    }
    return json_skip(j, 1);
}

/* Whole seconds, rounded down (v is within +-KD_JWT_TIME_MAX). */
static int64_t seconds(double v)
{
    int64_t t = (int64_t)v;
    if ((double)t > v)
        t--;
    return t;
}

/* ---- verify ----------------------------------------------------------------------------------- */

static enum kd_hash_alg hash_of(enum kd_jwt_alg a)
{
    switch (a) {
    case KD_JWT_HS384:
        return KD_HASH_SHA384;
    case KD_JWT_HS512:
        return KD_HASH_SHA512;
    case KD_JWT_HS256:
        break;
    }
    return KD_HASH_SHA256;
}

static const char *const alg_names[] = {"HS256", "HS384", "HS512"};

static int check_header(const uint8_t *buf, size_t n, enum kd_jwt_alg *alg, char *err, size_t errlen)
{
    struct header h = {0};
    struct json j = {.start = buf, .p = buf, .end = buf + n};
    if (json_top_object(&j, header_member, &h) < 0)
        return json_error(&j, "header", err, errlen);
    if (!h.has_alg) {
        seterr(err, errlen, "header has no alg");
        return -EINVAL;
    }
    size_t alen = h.alg_len < sizeof(h.alg) ? h.alg_len : sizeof(h.alg) - 1;
    int found = -1;
    for (int i = 0; i < 3; i++)
        if (bytes_are(h.alg, h.alg_len, alg_names[i]))
            found = i;
    if (found < 0) {
        char s[SHOWN_MAX + 4];
        shown(h.alg, alen, h.alg_len, s);
        seterr(err, errlen, "algorithm %s is not allowed (HS256, HS384 or HS512 only)", s);
        return -EACCES;
    }
    if (h.has_typ && !h.typ_ok) {
        seterr(err, errlen, "header typ is not JWT");
        return -EACCES;
    }
    if (h.has_crit) {
        seterr(err, errlen, "header has crit: no critical extensions are supported");
        return -EACCES;
    }
    *alg = (enum kd_jwt_alg)found;
    return 0;
}

/* exp and nbf against now and leeway, as parsed (doubles: a fractional exp counts exactly). */
static int check_times(const struct kd_jwt_opts *o, double exp, bool has_nbf, double nbf, char *err,
                       size_t errlen)
{
    double now = (double)o->now, leeway = o->leeway > 0 ? (double)o->leeway : 0;
    if (now >= exp + leeway) {
        seterr(err, errlen, "token expired %llds ago", (long long)seconds(now - exp));
        return -EACCES;
    }
    if (has_nbf && now + leeway < nbf) {
        seterr(err, errlen, "token not valid yet: nbf is %llds ahead", (long long)-seconds(now - nbf));
        return -EACCES;
    }
    return 0;
}

/* kd_jwt_verify, also giving exp and nbf as parsed (for the cache). */
static int verify(const char *token, size_t len, const struct kd_jwt_opts *o, struct kd_jwt_claims *out,
                  double *exp_out, double *nbf_out, char *err, size_t errlen)
{
    seterr(err, errlen, "%s", "");
    if (o->audience == NULL || o->audience[0] == '\0') {
        seterr(err, errlen, "no audience configured");
        return -EINVAL;
    }
    if (o->secret == NULL || o->secret_len == 0) {
        seterr(err, errlen, "no secret configured");
        return -EACCES;
    }
    if (len == 0) {
        seterr(err, errlen, "empty token");
        return -EINVAL;
    }
    if (len > KD_JWT_MAX_LEN) {
        seterr(err, errlen, "token is %zu bytes, more than %d", len, KD_JWT_MAX_LEN);
        return -EINVAL;
    }
    size_t dot1 = 0, dot2 = 0, dots = 0;
    for (size_t i = 0; i < len; i++) {
        if (token[i] != '.')
            continue;
        if (dots == 0)
            dot1 = i;
        else if (dots == 1)
            dot2 = i;
        dots++;
    }
    if (dots != 2) {
        seterr(err, errlen, "token has %zu parts, want 3 (header.payload.signature)", dots + 1);
        return -EINVAL;
    }

    /* One buffer, reused: header, then signature, then payload. */
    uint8_t buf[DECODED_MAX];
    long n = kd_base64_decode(token, dot1, buf, sizeof(buf), JWT_B64);
    if (n < 0) {
        seterr(err, errlen, "header is not valid base64url");
        return -EINVAL;
    }
    enum kd_jwt_alg alg = KD_JWT_HS256;
    int rc = check_header(buf, (size_t)n, &alg, err, errlen);
    if (rc < 0)
        return rc;

    /* Signature before anything in the payload is looked at. */
    n = kd_base64_decode(token + dot2 + 1, len - dot2 - 1, buf, sizeof(buf), JWT_B64);
    if (n < 0) {
        seterr(err, errlen, "signature is not valid base64url");
        return -EINVAL;
    }
    enum kd_hash_alg h = hash_of(alg);
    size_t dlen = kd_hash_len(h);
    if ((size_t)n != dlen) {
        seterr(err, errlen, "signature mismatch: %ld bytes, %s has %zu", n, alg_names[alg], dlen);
        return -EACCES;
    }
    uint8_t mac[KD_HASH_MAX_LEN];
    kd_hmac(h, o->secret, o->secret_len, token, dot2, mac);
    bool good = kd_ct_equal(mac, buf, dlen);
    explicit_bzero(mac, sizeof(mac));
    if (!good) {
        seterr(err, errlen, "signature mismatch");
        return -EACCES;
    }

    n = kd_base64_decode(token + dot1 + 1, dot2 - dot1 - 1, buf, sizeof(buf), JWT_B64);
    if (n < 0) {
        seterr(err, errlen, "payload is not valid base64url");
        return -EINVAL;
    }
    struct kd_jwt_claims c = {.alg = alg};
    struct claims cl = {.o = o, .c = &c};
    struct json j = {.start = buf, .p = buf, .end = buf + n};
    if (json_top_object(&j, claim_member, &cl) < 0)
        return json_error(&j, "payload", err, errlen);

    if (!cl.has_exp) {
        seterr(err, errlen, "token has no exp claim");
        return -EACCES;
    }
    rc = check_times(o, cl.exp, c.has_nbf, cl.nbf, err, errlen);
    if (rc < 0)
        return rc;
    if (!cl.has_aud) {
        seterr(err, errlen, "token has no aud claim (want %s)", o->audience);
        return -EACCES;
    }
    if (!cl.aud_ok) {
        seterr(err, errlen, "audience does not contain %s", o->audience);
        return -EACCES;
    }
    if (o->issuer != NULL && !cl.has_iss) {
        seterr(err, errlen, "token has no iss claim (want %s)", o->issuer);
        return -EACCES;
    }
    if (o->issuer != NULL && !cl.iss_ok) {
        seterr(err, errlen, "issuer is not %s", o->issuer);
        return -EACCES;
    }
    c.exp = seconds(cl.exp);
    c.nbf = c.has_nbf ? seconds(cl.nbf) : 0;
    c.iat = c.has_iat ? seconds(cl.iat) : 0;
    if (out != NULL)
        *out = c;
    if (exp_out != NULL)
        *exp_out = cl.exp;
    if (nbf_out != NULL)
        *nbf_out = cl.nbf;
    return 0;
}

int kd_jwt_verify(const char *token, size_t len, const struct kd_jwt_opts *o, struct kd_jwt_claims *out,
                  char *err, size_t errlen)
{
    return verify(token, len, o, out, NULL, NULL, err, errlen);
}

/* ---- cache of verified tokens (see jwt.h) ------------------------------------------------------ */

struct cache_entry {
    uint64_t hash;
    uint64_t last_use; /* c->tick at the last hit or insert; 0: the slot is empty */
    char *token;       /* malloc'd copy, len bytes */
    size_t len;
    double exp, nbf;
    struct kd_jwt_claims claims;
};

struct kd_jwt_cache {
    uint8_t key[16]; /* SipHash key, random per cache */
    /* What the entries were verified under. */
    uint8_t secret[KD_JWT_CACHE_SECRET_MAX];
    size_t secret_len;
    char *audience, *issuer;
    bool bound;
    uint64_t tick;
    unsigned cap, used;
    struct kd_jwt_cache_stats stats;
    struct cache_entry e[];
};

struct kd_jwt_cache *kd_jwt_cache_new(unsigned capacity)
{
    if (capacity == 0)
        return NULL;
    struct kd_jwt_cache *c = calloc(1, sizeof(*c) + (size_t)capacity * sizeof(c->e[0]));
    if (c == NULL)
        return NULL;
    c->cap = capacity;
    size_t got = 0;
    while (got < sizeof(c->key)) {
        ssize_t r = getrandom(c->key + got, sizeof(c->key) - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            /* No randomness: the hash only picks candidates (every hit is compared in full), so a
             * guessable key costs speed at worst, never correctness. */
            uint64_t t = (uint64_t)(uintptr_t)c ^ (uint64_t)time(NULL);
            memcpy(c->key, &t, sizeof(t));
            break;
        }
        got += (size_t)r;
    }
    return c;
}

static void entry_drop(struct kd_jwt_cache *c, struct cache_entry *e)
{
    free(e->token);
    memset(e, 0, sizeof(*e));
    c->used--;
}

static void cache_clear(struct kd_jwt_cache *c)
{
    for (unsigned i = 0; i < c->cap; i++)
        if (c->e[i].last_use != 0)
            entry_drop(c, &c->e[i]);
    explicit_bzero(c->secret, sizeof(c->secret));
    c->secret_len = 0;
    free(c->audience);
    free(c->issuer);
    c->audience = c->issuer = NULL;
    c->bound = false;
}

void kd_jwt_cache_free(struct kd_jwt_cache *c)
{
    if (c == NULL)
        return;
    cache_clear(c);
    free(c);
}

static bool same_str(const char *a, const char *b)
{
    return (a == NULL || b == NULL) ? a == b : strcmp(a, b) == 0;
}

/* Entries hold only for the secret, audience and issuer they were verified under. false: the opts
 * cannot be cached (secret too long, or out of memory binding them). */
static bool cache_bind(struct kd_jwt_cache *c, const struct kd_jwt_opts *o)
{
    if (o->secret_len > KD_JWT_CACHE_SECRET_MAX)
        return false;
    if (c->bound && c->secret_len == o->secret_len && memcmp(c->secret, o->secret, o->secret_len) == 0 &&
        same_str(c->audience, o->audience) && same_str(c->issuer, o->issuer))
        return true;
    cache_clear(c);
    c->audience = strdup(o->audience);
    c->issuer = o->issuer != NULL ? strdup(o->issuer) : NULL;
    if (c->audience == NULL || (o->issuer != NULL && c->issuer == NULL)) {
        cache_clear(c);
        return false;
    }
    memcpy(c->secret, o->secret, o->secret_len);
    c->secret_len = o->secret_len;
    c->bound = true;
    return true;
}

static void cache_insert(struct kd_jwt_cache *c, uint64_t hash, const char *token, size_t len,
                         const struct kd_jwt_claims *claims, double exp, double nbf)
{
    char *copy = malloc(len);
    if (copy == NULL)
        return; /* not kept: the next call verifies again */
    memcpy(copy, token, len);
    struct cache_entry *victim = NULL;
    for (unsigned i = 0; i < c->cap; i++) {
        struct cache_entry *e = &c->e[i];
        if (e->last_use == 0) {
            victim = e;
            break;
        }
        if (victim == NULL || e->last_use < victim->last_use)
            victim = e;
    }
    if (victim->last_use != 0) {
        entry_drop(c, victim);
        c->stats.evictions++;
    }
    victim->hash = hash;
    victim->last_use = ++c->tick;
    victim->token = copy;
    victim->len = len;
    victim->exp = exp;
    victim->nbf = nbf;
    victim->claims = *claims;
    c->used++;
}

int kd_jwt_cache_verify(struct kd_jwt_cache *c, const char *token, size_t len, const struct kd_jwt_opts *o,
                        struct kd_jwt_claims *out, char *err, size_t errlen)
{
    /* Malformed configurations and tokens too long to keep take the full path (same errors). */
    if (c == NULL || o->audience == NULL || o->audience[0] == '\0' || o->secret == NULL ||
        o->secret_len == 0 || len == 0 || len > KD_JWT_CACHE_TOKEN_MAX || !cache_bind(c, o))
        return kd_jwt_verify(token, len, o, out, err, errlen);
    uint64_t hash = kd_siphash24(c->key, token, len);
    for (unsigned i = 0; i < c->cap; i++) {
        struct cache_entry *e = &c->e[i];
        if (e->last_use == 0 || e->hash != hash || e->len != len || !kd_ct_equal(e->token, token, len))
            continue;
        seterr(err, errlen, "%s", "");
        int rc = check_times(o, e->exp, e->claims.has_nbf, e->nbf, err, errlen);
        if (rc < 0) {
            /* Expired (or not yet valid under a changed clock): never served from here again. */
            entry_drop(c, e);
            c->stats.expired++;
            return rc;
        }
        e->last_use = ++c->tick;
        c->stats.hits++;
        if (out != NULL)
            *out = e->claims;
        return 0;
    }
    c->stats.misses++;
    struct kd_jwt_claims claims;
    double exp = 0, nbf = 0;
    int rc = verify(token, len, o, &claims, &exp, &nbf, err, errlen);
    if (rc < 0)
        return rc;
    cache_insert(c, hash, token, len, &claims, exp, nbf);
    if (out != NULL)
        *out = claims;
    return 0;
}

void kd_jwt_cache_stats(const struct kd_jwt_cache *c, struct kd_jwt_cache_stats *out)
{
    *out = c->stats;
    out->entries = c->used;
    out->capacity = c->cap;
}

int kd_jwt_cache_validate(const struct kd_jwt_cache *c)
{
    unsigned used = 0;
    for (unsigned i = 0; i < c->cap; i++) {
        const struct cache_entry *e = &c->e[i];
        if (e->last_use == 0) {
            if (e->token != NULL)
                return -EINVAL;
            continue;
        }
        used++;
        if (!c->bound || e->token == NULL || e->len == 0 || e->len > KD_JWT_CACHE_TOKEN_MAX ||
            e->last_use > c->tick || kd_siphash24(c->key, e->token, e->len) != e->hash)
            return -EINVAL;
    }
    return used == c->used ? 0 : -EINVAL;
}

/* ---- sign ------------------------------------------------------------------------------------- */

int kd_jwt_sign(enum kd_jwt_alg alg, const void *secret, size_t secretlen, const char *payload_json,
                char *out, size_t outlen)
{
    static const char *const headers[] = {
        "{\"alg\":\"HS256\",\"typ\":\"JWT\"}",
        "{\"alg\":\"HS384\",\"typ\":\"JWT\"}",
        "{\"alg\":\"HS512\",\"typ\":\"JWT\"}",
    };
    if ((unsigned)alg > KD_JWT_HS512)
        return -EINVAL;
    enum kd_hash_alg h = hash_of(alg);
    size_t hl = strlen(headers[alg]), pl = strlen(payload_json), dlen = kd_hash_len(h);
    if (pl > (size_t)0x3fffffff)
        return -ENOSPC; /* keeps the sum below from overflowing and the result within an int */
    size_t need = kd_base64_encoded_len(hl, JWT_B64) + 1 + kd_base64_encoded_len(pl, JWT_B64) + 1 +
                  kd_base64_encoded_len(dlen, JWT_B64) + 1;
    if (need > outlen)
        return -ENOSPC;
    size_t o = kd_base64_encode_ex((const uint8_t *)headers[alg], hl, out, JWT_B64);
    out[o++] = '.';
    o += kd_base64_encode_ex((const uint8_t *)payload_json, pl, out + o, JWT_B64);
    uint8_t mac[KD_HASH_MAX_LEN];
    kd_hmac(h, secret, secretlen, out, o, mac);
    out[o++] = '.';
    o += kd_base64_encode_ex(mac, dlen, out + o, JWT_B64);
    out[o] = '\0';
    explicit_bzero(mac, sizeof(mac));
    return (int)o;
}

/* ---- secret file ------------------------------------------------------------------------------ */

int kd_jwt_secret_load(const char *path, uint8_t *out, size_t cap, size_t *len, char *err, size_t errlen)
{
    char buf[SECRET_FILE_MAX + 1];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        seterr(err, errlen, "cannot open secret file %s: %s", path, strerror(e));
        return -e;
    }
    size_t n = 0;
    while (n < sizeof(buf)) {
        ssize_t r = read(fd, buf + n, sizeof(buf) - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            explicit_bzero(buf, sizeof(buf));
            seterr(err, errlen, "cannot read secret file %s: %s", path, strerror(e));
            return -e;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    int rc = 0;
    if (n > SECRET_FILE_MAX) {
        seterr(err, errlen, "secret file %s is larger than %d bytes", path, SECRET_FILE_MAX);
        rc = -EFBIG;
        goto out;
    }
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' || buf[n - 1] == '\t'))
        n--;
    if (n == 0) {
        seterr(err, errlen, "secret file %s is empty", path);
        rc = -EINVAL;
        goto out;
    }
    long d = kd_base64_decode(buf, n, out, cap, KD_B64_STRICT);
    if (d == -ENOSPC) {
        seterr(err, errlen, "secret in %s is longer than %zu bytes", path, cap);
        rc = -ENOSPC;
    } else if (d < 0) {
        seterr(err, errlen, "secret file %s does not hold base64 (standard alphabet)", path);
        rc = -EINVAL;
    } else {
        *len = (size_t)d;
    }
out:
    explicit_bzero(buf, sizeof(buf));
    return rc;
}

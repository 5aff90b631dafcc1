/* json_fuzz.c — libFuzzer driver for core/json.c. The bytes are validated with kd_json_parse; a
 * refusal must carry a known code, an offset within the input and a reason. An accepted document is
 * walked completely with the iterator, and every value re-checked against what the contract says:
 *  - the validator, span() (the iterator's bracket count) and the walk agree on where each value
 *    ends: an iterator that has returned false sits exactly at its container's end, and every value
 *    the walk hands out is itself a valid document of exactly that length (re-parsed on its own);
 *  - values lie inside their container, in order, without overlap; only whitespace surrounds the
 *    root; nesting never passes KD_JSON_MAX_DEPTH;
 *  - every string decodes within its raw length (len - 2), equals itself under kd_json_eq when it
 *    holds no NUL, and one byte less room gives -ENOSPC with a NUL-terminated prefix;
 *  - kd_json_int64 round-trips through printf, and refuses only fractions, exponents and
 *    magnitudes of 19 digits or more;
 *  - path lookups find what the walk found: an array's element i by "i", an object's member by its
 *    name (the last one of that name, with -ENOTUNIQ when there is more than one).
 * Seeds: test/fuzz/corpus/json/. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/json.h"
#include "fuzz.h"

static char *scratch; /* decoded strings: at most the input's size */

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool same(const struct kd_json *a, const struct kd_json *b)
{
    return a->p == b->p && a->len == b->len && a->type == b->type;
}

static void check_string(const struct kd_json *s)
{
    size_t raw = s->len - 2;
    ssize_t n = kd_json_str(s, scratch, raw + 1);

    CHECK(s->len >= 2 && s->p[0] == '"' && s->p[s->len - 1] == '"');
    CHECK(n >= 0 && (size_t)n <= raw && scratch[n] == '\0');
    if (!memchr(scratch, '\0', (size_t)n))
        CHECK(kd_json_eq(s, scratch));
    if (n > 0) {
        ssize_t m = kd_json_str(s, scratch, (size_t)n);
        CHECK(m == -ENOSPC && strlen(scratch) < (size_t)n);
    }
}

static void check_number(const struct kd_json *v)
{
    char text[32];
    int64_t i;
    int rc = kd_json_int64(v, &i);
    bool frac = memchr(v->p, '.', v->len) || memchr(v->p, 'e', v->len) || memchr(v->p, 'E', v->len);

    if (rc == 0) {
        int n = snprintf(text, sizeof(text), "%" PRId64, i);
        bool minus_zero = v->len == 2 && memcmp(v->p, "-0", 2) == 0;
        CHECK(!frac && (minus_zero ? i == 0 : (size_t)n == v->len && memcmp(text, v->p, v->len) == 0));
    } else if (rc == -EINVAL) {
        CHECK(frac);
    } else {
        CHECK(rc == -ERANGE && !frac && v->len - (v->p[0] == '-') >= 19);
    }
}

/* How many members of object o are named like key, and is one of them after position `after`? */
static unsigned named_like(const struct kd_json *o, const struct kd_json *key, const char *after, bool *later)
{
    struct kd_json_iter it;
    struct kd_json k, v;
    ssize_t n = kd_json_str(key, scratch, key->len - 1);
    unsigned count = 0;

    CHECK(n >= 0);
    *later = false;
    kd_json_enter(o, &it);
    while (kd_json_next(&it, &k, &v))
        if (kd_json_eq(&k, scratch)) {
            count++;
            *later |= k.p > after;
        }
    return count;
}

/* The member name as a path, when it can be one: no '.', no NUL, not empty. */
static bool as_path(const struct kd_json *key, char *path, size_t cap)
{
    ssize_t n = kd_json_str(key, path, cap);

    return n > 0 && !memchr(path, '\0', (size_t)n) && !memchr(path, '.', (size_t)n);
}

static void walk(const struct kd_json *v, unsigned depth)
{
    struct kd_json_iter it;
    struct kd_json key, val, got;
    const char *prev = v->p + 1;
    size_t i = 0;

    /* every value is a document of its own, with the same extent */
    {
        struct kd_json alone;
        CHECK(kd_json_parse(v->p, v->len, &alone, NULL) == 0);
        CHECK(alone.p == v->p && alone.len == v->len && alone.type == v->type);
    }
    switch (v->type) {
    case KD_JSON_STRING:
        check_string(v);
        return;
    case KD_JSON_NUMBER:
        check_number(v);
        return;
    case KD_JSON_OBJECT:
    case KD_JSON_ARRAY:
        break;
    default:
        CHECK(v->type == KD_JSON_NULL || v->type == KD_JSON_TRUE || v->type == KD_JSON_FALSE);
        return;
    }
    CHECK(depth < KD_JSON_MAX_DEPTH);
    CHECK(kd_json_enter(v, &it) == 0);
    while (kd_json_next(&it, &key, &val)) {
        CHECK(val.len > 0 && val.p >= prev && val.p + val.len < v->p + v->len);
        if (v->type == KD_JSON_OBJECT) {
            char path[64];

            CHECK(key.type == KD_JSON_STRING && key.p >= prev && key.p + key.len < val.p);
            check_string(&key);
            if (i < 16 && key.len < sizeof(path) && as_path(&key, path, sizeof(path))) {
                int rc = kd_json_get(v, path, &got);
                bool later;
                unsigned count = named_like(v, &key, key.p, &later);

                CHECK(count >= 1 && rc == (count > 1 ? -ENOTUNIQ : 0));
                CHECK(later ? got.p > val.p : same(&got, &val));
            }
        } else {
            char path[24];

            CHECK(key.type == KD_JSON_NONE);
            if (i < 16) {
                snprintf(path, sizeof(path), "%zu", i);
                CHECK(kd_json_get(v, path, &got) == 0 && same(&got, &val));
            }
        }
        walk(&val, depth + 1);
        prev = val.p + val.len;
        i++;
    }
    /* the walk and the bracket count agree on where the container ends */
    CHECK(it.p == v->p + v->len);
    CHECK(!kd_json_next(&it, &key, &val));
    if (v->type == KD_JSON_ARRAY) {
        char path[24];
        snprintf(path, sizeof(path), "%zu", i);
        CHECK(kd_json_get(v, path, &got) == -ENOENT);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kd_json root;
    struct kd_json_err err = {0, NULL};
    int rc = kd_json_parse(data, size, &root, &err);

    if (rc < 0) {
        CHECK(rc == -EBADMSG || rc == -E2BIG || rc == -EMSGSIZE);
        CHECK(err.why != NULL && err.off <= size);
        return 0;
    }
    CHECK(root.p >= (const char *)data && root.p + root.len <= (const char *)data + size && root.len > 0);
    for (const char *p = (const char *)data; p < root.p; p++)
        CHECK(is_ws(*p));
    for (const char *p = root.p + root.len; p < (const char *)data + size; p++)
        CHECK(is_ws(*p));
    scratch = malloc(size + 1);
    if (!scratch)
        return 0;
    walk(&root, 0);
    free(scratch);
    return 0;
}

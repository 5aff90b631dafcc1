/* access_fuzz.c — libFuzzer driver for the Kubernetes API access-token file loader.
 * Loads the bytes twice with kd_access_load_string() (each load draws its own hash key) and checks
 * what the contract promises:
 *  - an error is -EINVAL/-ENOMEM/-EFBIG, leaves *out alone, and is one NUL-terminated line starting
 *    with the source name that never echoes a value of 16 bytes or more (the message is scanned for
 *    long runs of non-space characters, and each must be one of the forms the loader itself writes);
 *  - the outcome does not depend on the hash key: both loads fail alike or both succeed, and then
 *    answer every check alike (same code, same grant strings);
 *  - checks of strings cut from the input, for agent ids found in it and fixed ones, keep the
 *    invariants: ids <= 0 are never allowed, a token is unknown for every agent or for none, and a
 *    grant is either "no impersonation" (all NULL) or a username with at most 64 groups, each name
 *    1..255 bytes.
 * Seeds: test/fuzz/corpus/access/. */
#include "core/access.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NAME "f"

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Digits from s, at least one; returns the position after them, or NULL. */
static const char *digits(const char *s, const char *end)
{
    const char *p = s;

    while (p < end && is_digit(*p))
        p++;
    return p > s ? p : NULL;
}

/* A path the loader writes: name([N])?(.name([N])?)* with names from the schema. */
static bool is_path(const char *p, const char *end)
{
    static const char *const names[] = {"users",       "token",    "agents", "groups",
                                        "impersonate", "username", "uid"};

    for (;;) {
        size_t i, n = 0;

        while (p + n < end && p[n] >= 'a' && p[n] <= 'z')
            n++;
        for (i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            if (strlen(names[i]) == n && memcmp(names[i], p, n) == 0)
                break;
        if (i == sizeof(names) / sizeof(names[0]))
            return false;
        p += n;
        if (p < end && *p == '[') {
            if (!(p = digits(p + 1, end)) || p == end || *p != ']')
                return false;
            p++;
        }
        if (p == end)
            return true;
        if (*p != '.')
            return false;
        p++;
    }
}

/* Is run[0..n) (no spaces) something the loader writes itself, rather than an echoed value? */
static bool allowed_run(const char *run, size_t n)
{
    const char *end = run + n, *p;

    /* Trailing punctuation after a value or a path. */
    while (end > run && (end[-1] == ',' || end[-1] == ')' || end[-1] == ';' || end[-1] == ':'))
        end--;
    /* "f:LINE:COL:" (": " always separates it from the path). */
    if (end - run > 2 && run[0] == 'f' && run[1] == ':') {
        p = digits(run + 2, end);
        if (p && p < end && *p == ':' && (p = digits(p + 1, end)) && p == end)
            return true;
    }
    if (is_path(run, end))
        return true;
    /* The one word of 16+ characters in libyaml's problem strings. */
    if (end - run == 16 && memcmp(run, "non-alphabetical", 16) == 0)
        return true;
    /* A number: validated ids and limits are shown. */
    if (digits(run, end) == end)
        return true;
    return false;
}

/* The message as the loader writes it: quoted values ("...", escapes as \" \\ \xNN) of at most 15
 * bytes, and otherwise runs of non-space characters that are the loader's own text. */
static void check_message(const char *err, size_t cap)
{
    const char *p = err, *run = NULL;

    if (!memchr(err, '\0', cap) || strchr(err, '\n') || strncmp(err, NAME ":", strlen(NAME ":")) != 0)
        abort();
    for (;;) {
        bool word = *p > ' ' && *p <= '~' && *p != '"';

        if (word && !run)
            run = p;
        if (!word && run) {
            if ((size_t)(p - run) >= KD_ACCESS_MIN_LEN && !allowed_run(run, (size_t)(p - run)))
                abort();
            run = NULL;
        }
        if (!*p)
            break;
        if (*p == '"') {
            size_t bytes = 0;

            for (p++; *p && *p != '"'; bytes++) {
                size_t step = *p != '\\' ? 1 : p[1] == 'x' ? 4 : 2;

                /* Never step over the terminating NUL (a cut-off escape is a malformed message). */
                for (size_t k = 1; k < step; k++)
                    if (!p[k])
                        abort();
                p += step;
            }
            if (*p != '"' || bytes > KD_ACCESS_MIN_LEN - 1)
                abort();
        }
        p++;
    }
}

static void check_name(const char *s)
{
    size_t n;

    if (!s)
        abort();
    n = strlen(s);
    if (n < 1 || n > KD_ACCESS_NAME_MAX)
        abort();
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] == 0x7f)
            abort();
}

static bool same_str(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Agent ids to try each candidate token with: fixed ones, then numbers found in the input. */
#define MAX_IDS 24

static size_t collect_ids(const uint8_t *data, size_t size, int64_t *ids)
{
    static const int64_t fixed[] = {0, -1, INT64_MIN, 1, 2, 42, INT64_MAX};
    size_t n = 0;

    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
        ids[n++] = fixed[i];
    for (size_t i = 0; i < size && n < MAX_IDS; i++) {
        uint64_t v = 0;
        size_t k = 0;

        if (!is_digit((char)data[i]) || (i > 0 && is_digit((char)data[i - 1])))
            continue;
        while (i + k < size && is_digit((char)data[i + k]) && k < 19) {
            v = v * 10 + (uint64_t)(data[i + k] - '0');
            k++;
        }
        if (v <= (uint64_t)INT64_MAX)
            ids[n++] = (int64_t)v;
    }
    return n;
}

/* token s[0..n) against both tables, for every id. */
static void check_token(const struct kd_access *t, const struct kd_access *t2, const char *s, size_t n,
                        const int64_t *ids, size_t nids)
{
    int known = -1; /* unknown yet; then 0 (ENOENT for every id) or 1 */

    for (size_t i = 0; i < nids; i++) {
        struct kd_access_grant g, g2;
        int r, r2;

        memset(&g, 0xa5, sizeof(g));
        memset(&g2, 0x5a, sizeof(g2));
        r = kd_access_check(t, s, n, ids[i], &g);
        r2 = kd_access_check(t2, s, n, ids[i], &g2);
        if (r != r2 || (r != 0 && r != -ENOENT && r != -EPERM))
            abort();
        if (known < 0)
            known = r != -ENOENT;
        else if (known != (r != -ENOENT))
            abort();
        if (r != 0)
            continue;
        if (ids[i] <= 0 || n < KD_ACCESS_MIN_LEN || n > KD_ACCESS_MAX_LEN)
            abort();
        if (!g.username) {
            if (g.groups || g.ngroups || g.uid)
                abort();
        } else {
            check_name(g.username);
            if (g.uid)
                check_name(g.uid);
            if (g.ngroups > KD_ACCESS_MAX_GROUPS || (g.ngroups == 0) != (g.groups == NULL))
                abort();
            for (size_t k = 0; k < g.ngroups; k++)
                check_name(g.groups[k]);
        }
        if (!same_str(g.username, g2.username) || !same_str(g.uid, g2.uid) || g.ngroups != g2.ngroups)
            abort();
        for (size_t k = 0; k < g.ngroups; k++)
            if (strcmp(g.groups[k], g2.groups[k]) != 0)
                abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kd_access *sentinel = (struct kd_access *)&sentinel;
    struct kd_access *t = sentinel, *t2 = sentinel;
    char err[512], err2[512];
    int64_t ids[MAX_IDS];
    size_t nids;
    int r, r2;

    memset(err, 'Z', sizeof(err));
    r = kd_access_load_string(NAME, (const char *)data, size, &t, err, sizeof(err));
    r2 = kd_access_load_string(NAME, (const char *)data, size, &t2, err2, sizeof(err2));
    if (r != r2 || (r < 0 && strcmp(err, err2) != 0))
        abort();
    if (r < 0) {
        if (r != -EINVAL && r != -ENOMEM && r != -EFBIG)
            abort();
        if (t != sentinel || t2 != sentinel)
            abort();
        check_message(err, sizeof(err));
        return 0;
    }
    if (r != 0 || t == sentinel || !t || !t2 || kd_access_count(t) != kd_access_count(t2) ||
        kd_access_count(t) > KD_ACCESS_MAX_USERS)
        abort();

    nids = collect_ids(data, size, ids);
    check_token(t, t2, "", 0, ids, nids);
    check_token(t, t2, "k8s-0000000000000000", 20, ids, nids);
    /* Windows of the input: a token given in it is one of them only if it starts at a window start,
     * so cut at every quote, space, bracket or line start. */
    for (size_t i = 0; i < size && i < 4096; i++) {
        if (i == 0 || data[i - 1] == ' ' || data[i - 1] == '"' || data[i - 1] == '\'' ||
            data[i - 1] == '\n' || data[i - 1] == '{' || data[i - 1] == '[') {
            size_t n = 0;

            while (i + n < size && n < KD_ACCESS_MAX_LEN && data[i + n] > ' ' && data[i + n] <= '~' &&
                   data[i + n] != '"' && data[i + n] != '\'' && data[i + n] != ',' && data[i + n] != '}')
                n++;
            if (n >= KD_ACCESS_MIN_LEN)
                check_token(t, t2, (const char *)data + i, n, ids, nids);
        }
    }
    kd_access_free(t);
    kd_access_free(t2);
    return 0;
}

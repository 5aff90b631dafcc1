/* access.c — the Kubernetes API access-token file: loader (libyaml event API through core/yamlev.h),
 * the lookup table and kd_access_check(). Contract and file format in access.h; user documentation in
 * docs/tokens.md ("Kubernetes API access tokens"). Built like core/tokens.c, whose reasoning applies:
 * the event API shows anchors, aliases and tags where they stand so they can be refused, the walk never
 * descends further than the schema, and the first problem in document order is reported.
 *
 * Table layout (immutable after load):
 *
 *   slots[0..mask]  uint32: 0 = empty, else 1 + index into users    (linear probing, load <= 1/2)
 *   users[i]        {hash = SipHash(key, token), token at bytes + tok_off, agent ids at
 *                    ids[ids_off .. ids_off + nids) sorted ascending, impersonation strings}
 *   ids[]           agent ids of all users, one run per user
 *   groups[]        group names of user i at groups[groups_off .. groups_off + ngroups), pointers
 *                   into bytes
 *   bytes[]         tokens, usernames, uids and group names, each NUL-terminated (wiped on free)
 *
 * Invariants: every token is unique; a user's ids are distinct, positive and sorted; the slot of user
 * i is reached from (hash & mask) by probing without passing an empty slot; name_off == NO_STR means
 * no impersonation, and then ngroups == 0 and uid_off == NO_STR. The probe sequence depends only on
 * the keyed hash; the first candidate whose 64-bit hash equals the input's is compared with it in
 * constant time. While loading, group names are byte offsets (goffs[]: bytes[] still moves); a
 * successful load turns them into groups[] once.
 *
 * Token hygiene as in tokens.c: values are never put into messages; libyaml's copies of the input and
 * of each scalar are wiped (yamlev's `wipe`); buffers grow by copy-and-wipe, never realloc.
 */
#include "core/access.h"
#include "core/tokens.h" /* kd_siphash24 */
#include "core/secretfile.h"
#include "core/yamlev.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"

#define NO_STR UINT32_MAX

/* ---------------------------------------------------------------------------------------------- */
/* Table                                                                                          */

struct acc_user {
    uint64_t hash;
    uint32_t tok_off, tok_len;
    uint32_t ids_off, nids;
    uint32_t name_off, uid_off; /* NO_STR: absent */
    uint32_t groups_off, ngroups;
};

struct kd_access {
    uint8_t key[16]; /* SipHash key, random per load */
    uint32_t mask;   /* slots - 1; slots is a power of two >= 2 * n */
    uint32_t *slots;
    struct acc_user *users;
    size_t n, users_cap;
    int64_t *ids;
    size_t nids, ids_cap;
    uint32_t *goffs;     /* loading: group names at bytes + goffs[k] (bytes[] still moves) */
    const char **groups; /* loaded: the same as pointers, what a grant hands out */
    size_t ngroups, goffs_cap;
    char *bytes;
    size_t bytes_len, bytes_cap;
};

void kd_access_free(struct kd_access *t)
{
    if (!t)
        return;
    if (t->bytes)
        explicit_bzero(t->bytes, t->bytes_cap);
    if (t->users)
        explicit_bzero(t->users, t->users_cap * sizeof(*t->users));
    free(t->bytes);
    free(t->users);
    free(t->slots);
    free(t->ids);
    free(t->goffs);
    free(t->groups);
    explicit_bzero(t, sizeof(*t));
    free(t);
}

size_t kd_access_count(const struct kd_access *t)
{
    return t ? t->n : 0;
}

/* Is id in the sorted ids[0..n)? Not constant time: the caller already proved it holds the token. */
static bool has_id(const int64_t *ids, size_t n, int64_t id)
{
    size_t lo = 0, hi = n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (ids[mid] == id)
            return true;
        if (ids[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return false;
}

int kd_access_check(const struct kd_access *t, const char *token, size_t len, int64_t agent_id,
                    struct kd_access_grant *out)
{
    uint64_t h;

    /* The length bounds are public (documented); refusing outside them early reveals nothing. */
    if (!t || !token || len < KD_ACCESS_MIN_LEN || len > KD_ACCESS_MAX_LEN)
        return -ENOENT;
    h = kd_siphash24(t->key, token, len);
    for (uint32_t i = (uint32_t)h & t->mask;; i = (i + 1) & t->mask) {
        uint32_t s = t->slots[i];
        const struct acc_user *u;

        if (s == 0)
            return -ENOENT;
        u = &t->users[s - 1];
        if (u->hash != h || !kd_secretfile_equal(t->bytes + u->tok_off, u->tok_len, token, len))
            continue;
        if (!has_id(t->ids + u->ids_off, u->nids, agent_id))
            return -EPERM;
        out->username = u->name_off == NO_STR ? NULL : t->bytes + u->name_off;
        out->uid = u->uid_off == NO_STR ? NULL : t->bytes + u->uid_off;
        out->ngroups = u->ngroups;
        out->groups = u->ngroups ? t->groups + u->groups_off : NULL;
        return 0;
    }
}

/* Make the slot table a power of two >= 2 * want (at least 16), rebuilt from the stored hashes. */
static int table_rehash(struct kd_access *t, size_t want)
{
    size_t slots = 16;
    uint32_t *s;

    while (slots < 2 * want)
        slots *= 2;
    if (t->slots && slots <= (size_t)t->mask + 1)
        return 0;
    s = calloc(slots, sizeof(*s));
    if (!s)
        return -ENOMEM;
    for (size_t k = 0; k < t->n; k++) {
        uint32_t i = (uint32_t)t->users[k].hash & (uint32_t)(slots - 1);

        while (s[i])
            i = (i + 1) & (uint32_t)(slots - 1);
        s[i] = (uint32_t)k + 1;
    }
    free(t->slots);
    t->slots = s;
    t->mask = (uint32_t)(slots - 1);
    return 0;
}

/* Index of the user holding token, or -1. Load time only: plain memcmp is fine here. */
static long table_find(const struct kd_access *t, uint64_t h, const char *token, size_t len)
{
    for (uint32_t i = (uint32_t)h & t->mask;; i = (i + 1) & t->mask) {
        uint32_t s = t->slots[i];
        const struct acc_user *u;

        if (s == 0)
            return -1;
        u = &t->users[s - 1];
        if (u->hash == h && u->tok_len == len && memcmp(t->bytes + u->tok_off, token, len) == 0)
            return (long)s - 1;
    }
}

/* Append s[0..n) and a NUL to t->bytes; the offset goes to *off. Grown by copy-and-wipe, never
 * realloc, so that no stale copy of a token is left behind in freed memory. */
static int bytes_add(struct kd_access *t, const char *s, size_t n, uint32_t *off)
{
    if (t->bytes_len + n + 1 > t->bytes_cap) {
        size_t cap = t->bytes_cap ? t->bytes_cap : 4096;
        char *nb;

        while (cap < t->bytes_len + n + 1)
            cap *= 2;
        nb = malloc(cap);
        if (!nb)
            return -ENOMEM;
        if (t->bytes) {
            memcpy(nb, t->bytes, t->bytes_len);
            explicit_bzero(t->bytes, t->bytes_cap);
            free(t->bytes);
        }
        t->bytes = nb;
        t->bytes_cap = cap;
    }
    *off = (uint32_t)t->bytes_len;
    memcpy(t->bytes + t->bytes_len, s, n);
    t->bytes[t->bytes_len + n] = '\0';
    t->bytes_len += n + 1;
    return 0;
}

/* Room for need elements of size in *arr (plain realloc: nothing secret lives in these arrays
 * except users[].hash, which is keyed and useless without the key). */
static int grow(void **arr, size_t *cap, size_t need, size_t size)
{
    size_t nc = *cap ? *cap : 64;
    void *na;

    if (need <= *cap)
        return 0;
    while (nc < need)
        nc *= 2;
    na = realloc(*arr, nc * size);
    if (!na)
        return -ENOMEM;
    *arr = na;
    *cap = nc;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Messages                                                                                       */

/* Values are shown in messages only up to KD_SECRETFILE_SHOW_MAX bytes: anything longer could be
 * a token in the wrong place. */
_Static_assert(KD_SECRETFILE_SHOW_MAX < KD_ACCESS_MIN_LEN, "a value short enough to show is never a token");

static void set_error(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_error(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Where a key of the mapping being walked was given (for "duplicate key") and where its value starts. */
struct field_state {
    struct kd_yaml_mark key_at, at;
    bool seen;
};

enum { U_TOKEN, U_AGENTS, U_IMPERSONATE, U_COUNT };
static const char *const user_keys[U_COUNT] = {"token", "agents", "impersonate"};
enum { I_USERNAME, I_GROUPS, I_UID, I_COUNT };
static const char *const imp_keys[I_COUNT] = {"username", "groups", "uid"};
static const char *const top_keys[1] = {"users"};

/* State of one load. ev is the current event (its strings belong to the parser y, valid until the
 * next next_event() or the end of the load). */
struct parse {
    struct kd_yaml *y;
    struct kd_yaml_event ev;
    char name[512]; /* escaped source name */
    char path[160]; /* "users[123].impersonate.groups[63]" */
    char *err;
    size_t errlen;

    struct kd_access *t;
    uint32_t *lines; /* 1-based line of each user (messages only); parallel to t->users */
    size_t lines_cap;
    /* The agent ids of the user being parsed, for duplicates: open addressing over 1 + index into
     * t->ids. Entries of earlier users stay behind but never match (index < cur.ids_off); a rebuild
     * keeps only the current user's, so the set stays as large as the longest list, not the file. */
    uint32_t *idset;
    uint32_t idmask;
    size_t idused;

    /* The user being parsed. */
    struct acc_user cur;
    char token[KD_ACCESS_MAX_LEN];
    size_t token_len;
};

/* "NAME:LINE:COL: PATH: MESSAGE" (PATH left out when empty). Returns code. */
static int fail_code(struct parse *p, int code, struct kd_yaml_mark at, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail_code(struct parse *p, int code, struct kd_yaml_mark at, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    set_error(p->err, p->errlen, "%s:%zu:%zu: %s%s%s", p->name, at.line + 1, at.column + 1, p->path,
              p->path[0] ? ": " : "", msg);
    return code;
}

#define fail(p, at, ...) fail_code(p, -EINVAL, at, __VA_ARGS__)

static int fail_oom(struct parse *p, struct kd_yaml_mark at)
{
    return fail_code(p, -ENOMEM, at, "out of memory");
}

/* Cut the path back to its first keep bytes, then append the formatted text. */
static void path_at(struct parse *p, size_t keep, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void path_at(struct parse *p, size_t keep, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(p->path + keep, sizeof(p->path) - keep, fmt, ap);
    va_end(ap);
}

/* An unquoted empty, "~" or "null" scalar: YAML's null. */
static bool is_null(const struct kd_yaml_event *e)
{
    const char *v;

    if (e->type != KD_YAML_SCALAR || !e->plain)
        return false;
    v = (const char *)e->value;
    return !strcmp(v, "") || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") ||
           !strcmp(v, "NULL");
}

static const char *event_kind(const struct kd_yaml_event *e)
{
    switch (e->type) {
    case KD_YAML_SCALAR:
        return is_null(e) ? "null" : "a scalar";
    case KD_YAML_SEQUENCE_START:
        return "a sequence";
    case KD_YAML_MAPPING_START:
        return "a mapping";
    case KD_YAML_ALIAS:
        return "an alias";
    default:
        return "nothing";
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* libyaml boundary                                                                               */

/* libyaml's problem and context strings are static text, never input. A reader error's offending
 * byte value is not shown: it might sit inside a token. */
static int syntax_error(struct parse *p)
{
    struct kd_yaml_error ye;
    char ctx[160] = "";

    kd_yaml_last_error(p->y, &ye);
    if (ye.kind == KD_YAML_ERR_MEMORY) {
        set_error(p->err, p->errlen, "%s: out of memory", p->name);
        return -ENOMEM;
    }
    if (ye.kind != KD_YAML_ERR_READER && ye.context)
        snprintf(ctx, sizeof(ctx), " (%s at %zu:%zu)", ye.context, ye.context_at.line + 1,
                 ye.context_at.column + 1);
    set_error(p->err, p->errlen, "%s:%zu:%zu: YAML syntax error: %s%s", p->name, ye.at.line + 1,
              ye.at.column + 1, ye.problem, ctx);
    return -EINVAL;
}

/* Next event into p->ev; anchors, aliases and tags are refused on sight (described like values). */
static int next_event(struct parse *p)
{
    struct kd_yaml_event *e = &p->ev;
    char q[KD_SECRETFILE_DESCRIBE_LEN];

    if (kd_yaml_next(p->y, e) < 0)
        return syntax_error(p);
    if (e->type == KD_YAML_ALIAS) {
        kd_secretfile_describe(q, sizeof(q), e->anchor, strlen(e->anchor));
        return fail(p, e->start_mark, "aliases are not supported (alias %s)", q);
    }
    if (e->type != KD_YAML_SCALAR && e->type != KD_YAML_SEQUENCE_START && e->type != KD_YAML_MAPPING_START)
        return 0;
    if (e->anchor) {
        kd_secretfile_describe(q, sizeof(q), e->anchor, strlen(e->anchor));
        return fail(p, e->start_mark, "anchors are not supported (anchor %s)", q);
    }
    if (e->tag) {
        kd_secretfile_describe(q, sizeof(q), e->tag, strlen(e->tag));
        return fail(p, e->start_mark, "tags are not supported (tag %s)", q);
    }
    return 0;
}

/* The next key of a mapping whose path is p->path[0..base). 1: the mapping ended. 0: key `*which`
 * of names[0..n) was read, its path appended, and p->ev is now its value. Unknown and repeated keys
 * are errors; list is the "expected" part of the message. */
static int next_key(struct parse *p, size_t base, const char *const *names, int n, struct field_state *seen,
                    const char *list, int *which)
{
    const struct kd_yaml_event *k = &p->ev;
    int f, r;

    p->path[base] = '\0';
    if ((r = next_event(p)) < 0)
        return r;
    if (k->type == KD_YAML_MAPPING_END)
        return 1;
    if (k->type != KD_YAML_SCALAR)
        return fail(p, k->start_mark, "keys must be scalars, got %s", event_kind(k));
    for (f = 0; f < n; f++)
        if (strlen(names[f]) == k->length && memcmp(names[f], k->value, k->length) == 0)
            break;
    if (f == n) {
        char q[KD_SECRETFILE_DESCRIBE_LEN];

        kd_secretfile_describe(q, sizeof(q), k->value, k->length);
        return fail(p, k->start_mark, "unknown key %s (expected%s: %s)", q, n == 1 ? "" : " one of", list);
    }
    path_at(p, base, "%s%s", base ? "." : "", names[f]);
    if (seen[f].seen)
        return fail(p, k->start_mark, "duplicate key (first given at line %zu)", seen[f].key_at.line + 1);
    seen[f].seen = true;
    seen[f].key_at = k->start_mark;
    if ((r = next_event(p)) < 0)
        return r;
    seen[f].at = p->ev.start_mark;
    *which = f;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Values                                                                                         */

/* Strict decimal 1..INT64_MAX: digits only, no sign, no leading zero (tokens.c's rule). -EINVAL or
 * -ERANGE. */
static int parse_id(const char *s, size_t n, int64_t *out)
{
    uint64_t v = 0;
    bool big = false;

    if (n == 0 || s[0] == '0')
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -EINVAL;
        if (v > ((uint64_t)INT64_MAX - (uint64_t)(s[i] - '0')) / 10)
            big = true; /* keep scanning: "99999999999999999999x" is a syntax error */
        else
            v = v * 10 + (uint64_t)(s[i] - '0');
    }
    if (big)
        return -ERANGE;
    *out = (int64_t)v;
    return 0;
}

/* p->ev is the user's token: check it and keep it in p until the user is complete. */
static int token_value(struct parse *p)
{
    const struct kd_yaml_event *e = &p->ev;

    if (e->type != KD_YAML_SCALAR)
        return fail(p, e->start_mark, "expected a string, got %s", event_kind(e));
    /* Say what is wrong, never what is there. */
    if (e->length < KD_ACCESS_MIN_LEN || e->length > KD_ACCESS_MAX_LEN)
        return fail(p, e->start_mark, "must be %d to %d bytes long, got %zu", KD_ACCESS_MIN_LEN,
                    KD_ACCESS_MAX_LEN, e->length);
    for (size_t i = 0; i < e->length; i++)
        if ((unsigned char)e->value[i] < 0x21 || (unsigned char)e->value[i] > 0x7e)
            return fail(p, e->start_mark, "must be printable ASCII without spaces");
    memcpy(p->token, e->value, e->length);
    p->token_len = e->length;
    return 0;
}

/* p->ev is a username, uid or group name: 1..255 bytes, no control characters. */
static int name_value(struct parse *p)
{
    const struct kd_yaml_event *e = &p->ev;

    if (e->type != KD_YAML_SCALAR)
        return fail(p, e->start_mark, "expected a string, got %s", event_kind(e));
    if (e->length < 1 || e->length > KD_ACCESS_NAME_MAX)
        return fail(p, e->start_mark, "must be 1 to %d bytes long, got %zu", KD_ACCESS_NAME_MAX, e->length);
    for (size_t i = 0; i < e->length; i++) {
        if ((unsigned char)e->value[i] < 0x20 || (unsigned char)e->value[i] == 0x7f) {
            char got[KD_SECRETFILE_DESCRIBE_LEN];

            kd_secretfile_describe(got, sizeof(got), e->value, e->length);
            return fail(p, e->start_mark, "must not contain control characters, got %s", got);
        }
    }
    return 0;
}

/* Index of id among the current user's ids (t->ids[cur.ids_off..]), or -1. */
static long idset_find(const struct parse *p, int64_t id)
{
    const struct kd_access *t = p->t;

    if (!p->idset)
        return -1;
    for (uint32_t i = (uint32_t)kd_hash_u64((uint64_t)id) & p->idmask;; i = (i + 1) & p->idmask) {
        uint32_t s = p->idset[i];

        if (s == 0)
            return -1;
        if (s - 1 >= p->cur.ids_off && t->ids[s - 1] == id)
            return (long)(s - 1 - p->cur.ids_off);
    }
}

/* Insert t->ids[k] (k >= cur.ids_off). When the set is half full, rebuild it from the current user's
 * ids only (dropping earlier users'), sized for twice as many. */
static int idset_add(struct parse *p, uint32_t k)
{
    const struct kd_access *t = p->t;
    uint32_t i;

    if (!p->idset || 2 * (p->idused + 1) > (size_t)p->idmask + 1) {
        size_t live = k - p->cur.ids_off, slots = 16;
        uint32_t *s;

        while (slots < 4 * (live + 1))
            slots *= 2;
        s = calloc(slots, sizeof(*s));
        if (!s)
            return -ENOMEM;
        for (uint32_t j = p->cur.ids_off; j < k; j++) {
            i = (uint32_t)kd_hash_u64((uint64_t)t->ids[j]) & (uint32_t)(slots - 1);
            while (s[i])
                i = (i + 1) & (uint32_t)(slots - 1);
            s[i] = j + 1;
        }
        free(p->idset);
        p->idset = s;
        p->idmask = (uint32_t)(slots - 1);
        p->idused = live;
    }
    i = (uint32_t)kd_hash_u64((uint64_t)t->ids[k]) & p->idmask;
    while (p->idset[i])
        i = (i + 1) & p->idmask;
    p->idset[i] = k + 1;
    p->idused++;
    return 0;
}

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

    return (x > y) - (x < y);
}

/* p->ev is the value of users[i].agents (path p->path[0..base)): a non-empty list of distinct ids,
 * appended to t->ids as cur's run. */
static int parse_agents(struct parse *p, size_t base)
{
    struct kd_access *t = p->t;
    struct kd_yaml_mark start = p->ev.start_mark;
    char got[KD_SECRETFILE_DESCRIBE_LEN];
    int r;

    if (is_null(&p->ev))
        return fail(p, start, "must list at least one agent id");
    if (p->ev.type != KD_YAML_SEQUENCE_START)
        return fail(p, start, "expected a list of agent ids, got %s", event_kind(&p->ev));
    p->cur.ids_off = (uint32_t)t->nids;
    for (size_t j = 0;; j++) {
        const struct kd_yaml_event *e = &p->ev;
        int64_t id;
        long dup;

        path_at(p, base, "[%zu]", j); /* before the read: an anchor or tag on the element is its error */
        if ((r = next_event(p)) < 0)
            return r;
        if (e->type == KD_YAML_SEQUENCE_END)
            break;
        if (e->type != KD_YAML_SCALAR)
            return fail(p, e->start_mark, "expected an integer, got %s", event_kind(e));
        kd_secretfile_describe(got, sizeof(got), e->value, e->length);
        r = parse_id(e->value, e->length, &id);
        if (r == -ERANGE)
            return fail(p, e->start_mark, "must be at most %lld, got %s", (long long)INT64_MAX, got);
        if (r < 0)
            return fail(p, e->start_mark, "must be a positive integer, got %s", got);
        if ((dup = idset_find(p, id)) >= 0)
            return fail(p, e->start_mark, "duplicate agent id %lld (also given at agents[%ld])",
                        (long long)id, dup);
        if (grow((void **)&t->ids, &t->ids_cap, t->nids + 1, sizeof(*t->ids)) < 0)
            return fail_oom(p, e->start_mark);
        t->ids[t->nids] = id;
        if (idset_add(p, (uint32_t)t->nids) < 0)
            return fail_oom(p, e->start_mark);
        t->nids++;
    }
    p->path[base] = '\0';
    p->cur.nids = (uint32_t)(t->nids - p->cur.ids_off);
    if (p->cur.nids == 0)
        return fail(p, start, "must list at least one agent id");
    qsort(t->ids + p->cur.ids_off, p->cur.nids, sizeof(*t->ids), cmp_id);
    return 0;
}

/* p->ev is the value of impersonate.groups (path p->path[0..base)): at most 64 distinct names. */
static int parse_groups(struct parse *p, size_t base)
{
    struct kd_access *t = p->t;
    int r;

    if (p->ev.type != KD_YAML_SEQUENCE_START)
        return fail(p, p->ev.start_mark, "expected a list of group names, got %s", event_kind(&p->ev));
    p->cur.groups_off = (uint32_t)t->ngroups;
    for (size_t j = 0;; j++) {
        const struct kd_yaml_event *e = &p->ev;
        uint32_t off;

        path_at(p, base, "[%zu]", j);
        if ((r = next_event(p)) < 0)
            return r;
        if (e->type == KD_YAML_SEQUENCE_END)
            break;
        if (j >= KD_ACCESS_MAX_GROUPS)
            return fail(p, e->start_mark, "too many groups (at most %d)", KD_ACCESS_MAX_GROUPS);
        if ((r = name_value(p)) < 0)
            return r;
        for (size_t k = p->cur.groups_off; k < t->ngroups; k++) {
            const char *g = t->bytes + t->goffs[k];

            if (strlen(g) == e->length && memcmp(g, e->value, e->length) == 0)
                return fail(p, e->start_mark, "duplicate group (also given at groups[%zu])",
                            k - p->cur.groups_off);
        }
        if (grow((void **)&t->goffs, &t->goffs_cap, t->ngroups + 1, sizeof(*t->goffs)) < 0 ||
            bytes_add(t, e->value, e->length, &off) < 0)
            return fail_oom(p, e->start_mark);
        t->goffs[t->ngroups++] = off;
    }
    p->cur.ngroups = (uint32_t)(t->ngroups - p->cur.groups_off);
    return 0;
}

/* p->ev is the value of users[i].impersonate (path p->path[0..base)). */
static int parse_impersonate(struct parse *p, size_t base)
{
    struct kd_yaml_mark start = p->ev.start_mark;
    struct field_state seen[I_COUNT];
    int f, r;

    if (p->ev.type != KD_YAML_MAPPING_START)
        return fail(p, start, "expected a mapping with username, groups and uid, got %s", event_kind(&p->ev));
    memset(seen, 0, sizeof(seen));
    while ((r = next_key(p, base, imp_keys, I_COUNT, seen, "username, groups, uid", &f)) == 0) {
        size_t sub = strlen(p->path);
        uint32_t off;

        if (f == I_GROUPS) {
            if ((r = parse_groups(p, sub)) < 0)
                return r;
            continue;
        }
        if ((r = name_value(p)) < 0)
            return r;
        if (bytes_add(p->t, p->ev.value, p->ev.length, &off) < 0)
            return fail_oom(p, p->ev.start_mark);
        *(f == I_USERNAME ? &p->cur.name_off : &p->cur.uid_off) = off;
    }
    if (r < 0)
        return r;
    if (!seen[I_USERNAME].seen) {
        path_at(p, base, ".username");
        return fail(p, start, "missing (impersonate needs a username)");
    }
    return 0;
}

/* The user's mapping has ended (it started at `at`): check it as a whole and add it. */
static int user_done(struct parse *p, size_t base, const struct field_state *seen, struct kd_yaml_mark at)
{
    struct kd_access *t = p->t;
    struct acc_user *u;
    uint64_t h;
    long dup;
    uint32_t slot;

    for (int f = U_TOKEN; f <= U_AGENTS; f++) {
        if (!seen[f].seen) {
            path_at(p, base, ".%s", user_keys[f]);
            return fail(p, at, "missing (every user needs token and agents)");
        }
    }
    h = kd_siphash24(t->key, p->token, p->token_len);
    dup = table_find(t, h, p->token, p->token_len);
    if (dup >= 0) {
        path_at(p, base, ".token");
        return fail(p, seen[U_TOKEN].at, "duplicate token (also given at users[%ld], line %u)", dup,
                    (unsigned)p->lines[dup]);
    }
    if (grow((void **)&t->users, &t->users_cap, t->n + 1, sizeof(*t->users)) < 0 ||
        grow((void **)&p->lines, &p->lines_cap, t->n + 1, sizeof(*p->lines)) < 0 ||
        table_rehash(t, t->n + 1) < 0)
        return fail_oom(p, at);
    u = &t->users[t->n];
    *u = p->cur;
    u->hash = h;
    u->tok_len = (uint32_t)p->token_len;
    if (bytes_add(t, p->token, p->token_len, &u->tok_off) < 0)
        return fail_oom(p, at);
    p->lines[t->n] = (uint32_t)at.line + 1;
    slot = (uint32_t)h & t->mask;
    while (t->slots[slot])
        slot = (slot + 1) & t->mask;
    t->slots[slot] = (uint32_t)t->n + 1;
    t->n++;
    return 0;
}

/* p->ev is the MAPPING-START of users[idx]; consume up to and including its MAPPING-END. */
static int parse_user(struct parse *p, size_t idx)
{
    struct kd_yaml_mark start = p->ev.start_mark;
    struct field_state seen[U_COUNT];
    size_t base;
    int f, r;

    memset(seen, 0, sizeof(seen));
    memset(&p->cur, 0, sizeof(p->cur));
    p->cur.name_off = p->cur.uid_off = NO_STR;
    path_at(p, 0, "users[%zu]", idx);
    base = strlen(p->path);
    while ((r = next_key(p, base, user_keys, U_COUNT, seen, "token, agents, impersonate", &f)) == 0) {
        size_t sub = strlen(p->path);

        if (f == U_TOKEN)
            r = token_value(p);
        else if (f == U_AGENTS)
            r = parse_agents(p, sub);
        else
            r = parse_impersonate(p, sub);
        if (r < 0)
            return r;
    }
    if (r < 0)
        return r;
    r = user_done(p, base, seen, start);
    explicit_bzero(p->token, p->token_len);
    p->token_len = 0;
    return r;
}

/* p->ev is the value of the top-level users key. */
static int parse_users(struct parse *p)
{
    int r;

    if (is_null(&p->ev))
        return 0; /* "users:" with nothing under it: an empty table (every token refused) */
    if (p->ev.type != KD_YAML_SEQUENCE_START)
        return fail(p, p->ev.start_mark, "expected a list of users, got %s", event_kind(&p->ev));
    for (size_t i = 0;; i++) {
        path_at(p, 0, "users[%zu]", i);
        if ((r = next_event(p)) < 0)
            return r;
        if (p->ev.type == KD_YAML_SEQUENCE_END)
            return 0;
        if (i >= KD_ACCESS_MAX_USERS)
            return fail(p, p->ev.start_mark, "too many users (at most %d)", KD_ACCESS_MAX_USERS);
        if (p->ev.type != KD_YAML_MAPPING_START)
            return fail(p, p->ev.start_mark, "expected a mapping with token, agents and impersonate, got %s",
                        event_kind(&p->ev));
        if ((r = parse_user(p, i)) < 0)
            return r;
    }
}

/* STREAM-START, one document whose root is a mapping with a users key, STREAM-END. */
static int parse_stream(struct parse *p)
{
    struct field_state seen[1];
    struct kd_yaml_mark start;
    int f, r;

    if ((r = next_event(p)) < 0 || (r = next_event(p)) < 0)
        return r;
    if (p->ev.type == KD_YAML_STREAM_END)
        return fail(p, p->ev.start_mark, "empty file (an access-token file is a mapping with a users: list)");
    if ((r = next_event(p)) < 0)
        return r;
    if (p->ev.type != KD_YAML_MAPPING_START)
        return fail(p, p->ev.start_mark, "expected a mapping with a users: list at the top level, got %s",
                    event_kind(&p->ev));
    start = p->ev.start_mark;
    memset(seen, 0, sizeof(seen));
    while ((r = next_key(p, 0, top_keys, 1, seen, "users", &f)) == 0)
        if ((r = parse_users(p)) < 0)
            return r;
    if (r < 0)
        return r;
    if (!seen[0].seen) {
        path_at(p, 0, "users");
        return fail(p, start, "missing (an access-token file is a mapping with a users: list)");
    }
    p->path[0] = '\0';
    /* DOCUMENT-END, then STREAM-END; reading to the end also surfaces trailing syntax errors. */
    if ((r = next_event(p)) < 0 || (r = next_event(p)) < 0)
        return r;
    if (p->ev.type != KD_YAML_STREAM_END)
        return fail(p, p->ev.start_mark, "only one YAML document is allowed");
    return 0;
}

/* The file is loaded: turn group offsets into pointers (bytes[] no longer moves). 0 or -ENOMEM. */
static int finish(struct kd_access *t)
{
    if (t->ngroups == 0)
        return 0;
    t->groups = malloc(t->ngroups * sizeof(*t->groups));
    if (!t->groups)
        return -ENOMEM;
    for (size_t k = 0; k < t->ngroups; k++)
        t->groups[k] = t->bytes + t->goffs[k];
    free(t->goffs);
    t->goffs = NULL;
    return 0;
}

int kd_access_load_string(const char *name, const char *buf, size_t len, struct kd_access **out, char *err,
                          size_t errlen)
{
    struct kd_access *t = NULL;
    struct parse *p;
    size_t nl = 0;
    int r;

    if (!name)
        name = "<string>";
    if (!buf) {
        buf = "";
        len = 0;
    }
    if (err && errlen)
        err[0] = '\0';
    /* ~2 KiB of state plus libyaml's parser: keep it off the (possibly small) stack. */
    p = calloc(1, sizeof(*p));
    if (!p) {
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    kd_secretfile_escape(p->name, sizeof(p->name), &nl, name, strlen(name));
    if (len > KD_ACCESS_MAX_FILESIZE) {
        set_error(err, errlen, "%s: access-token file larger than %u bytes", p->name, KD_ACCESS_MAX_FILESIZE);
        free(p);
        return -EFBIG;
    }
    t = calloc(1, sizeof(*t));
    p->t = t;
    if (!t || table_rehash(t, 0) < 0) {
        set_error(err, errlen, "%s: out of memory", p->name);
        r = -ENOMEM;
        goto out;
    }
    if ((r = kd_secretfile_random(t->key, sizeof(t->key))) < 0) {
        set_error(err, errlen, "%s: getrandom: %s", p->name, strerror(-r));
        goto out;
    }
    /* wipe: scalars (tokens) and libyaml's copies of the input are overwritten before release */
    if ((p->y = kd_yaml_new(buf, len, true)) == NULL) {
        set_error(err, errlen, "%s: out of memory", p->name);
        r = -ENOMEM;
        goto out;
    }
    p->err = err;
    p->errlen = errlen;
    r = parse_stream(p);
    if (r == 0 && (r = finish(t)) < 0)
        set_error(err, errlen, "%s: out of memory", p->name);
    kd_yaml_free(p->y);
out:
    free(p->lines);
    free(p->idset);
    explicit_bzero(p, sizeof(*p));
    free(p);
    if (r < 0) {
        kd_access_free(t);
        return r;
    }
    *out = t;
    return 0;
}

int kd_access_load_file(const char *path, struct kd_access **out, char *err, size_t errlen)
{
    char name[512];
    size_t nl = 0, len = 0;
    char *buf = NULL;
    int r;

    r = kd_secretfile_read(path, KD_ACCESS_MAX_FILESIZE, &buf, &len);
    if (r < 0) {
        kd_secretfile_escape(name, sizeof(name), &nl, path, strlen(path));
        if (r == -EFBIG)
            set_error(err, errlen, "%s: access-token file larger than %u bytes", name,
                      KD_ACCESS_MAX_FILESIZE);
        else
            set_error(err, errlen, "%s: cannot read access-token file: %s", name, strerror(-r));
        return r;
    }
    r = kd_access_load_string(path, buf, len, out, err, errlen);
    explicit_bzero(buf, len);
    free(buf);
    return r;
}

/* tokens.c — token file loader (libyaml event API), SipHash-2-4, the lookup table, the table handle
 * and the QSBR epoch. Contract and file format in tokens.h; user documentation in docs/tokens.md.
 *
 * Table layout (immutable after load):
 *
 *   slots[0..mask]  uint32: 0 = empty, else 1 + index into entries      (linear probing, load <= 1/2)
 *   entries[i]      {hash = SipHash(key, token), off/len of the token in bytes[], agent index}
 *   agents[j]       {agent_id, project_id, offset of the NUL-terminated name in bytes[]}
 *   bytes[]         token and name bytes (wiped on free)
 *
 * Invariants: every token is unique; each agents[] entry is referenced by >= 1 entry; slot of entry
 * i is reached from (hash & mask) by probing without passing an empty slot. The probe sequence
 * depends only on the keyed hash, which an attacker cannot predict; the first candidate whose 64-bit
 * hash equals the input's is compared with it in constant time.
 *
 * Why the event API and not libyaml's document loader: as in config.c, events show anchors, aliases
 * and tags at their exact position so they can be refused, and the walk never descends further than
 * the schema (3 levels) whatever the input nests. The first problem in document order is reported.
 *
 * Token hygiene: values are never put into messages. libyaml keeps copies of the input; we wipe the
 * ones we can reach (its input buffers, the scalar of each event, queued tokens) before they are
 * freed. Transient copies libyaml makes while it grows its own strings are beyond our reach.
 */
#include "core/tokens.h"
#include "core/secretfile.h"
#include "core/yamlev.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"
#include "core/hash.h"

/* ---------------------------------------------------------------------------------------------- */
/* SipHash-2-4                                                                                    */

static inline uint64_t rotl64(uint64_t x, unsigned b)
{
    return (x << b) | (x >> (64 - b));
}

static inline uint64_t load_le64(const uint8_t *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

#define SIPROUND                                                                                             \
    do {                                                                                                     \
        v0 += v1;                                                                                            \
        v1 = rotl64(v1, 13);                                                                                 \
        v1 ^= v0;                                                                                            \
        v0 = rotl64(v0, 32);                                                                                 \
        v2 += v3;                                                                                            \
        v3 = rotl64(v3, 16);                                                                                 \
        v3 ^= v2;                                                                                            \
        v0 += v3;                                                                                            \
        v3 = rotl64(v3, 21);                                                                                 \
        v3 ^= v0;                                                                                            \
        v2 += v1;                                                                                            \
        v1 = rotl64(v1, 17);                                                                                 \
        v1 ^= v2;                                                                                            \
        v2 = rotl64(v2, 32);                                                                                 \
    } while (0)

/* The paper's description: state initialised from the key and "somepseudorandomlygeneratedbytes";
 * each 8-byte little-endian word m goes v3 ^= m, c = 2 SipRounds, v0 ^= m; the last word holds the
 * 0..7 remaining bytes and len mod 256 in its top byte; then v2 ^= 0xff, d = 4 SipRounds, and the
 * output is v0 ^ v1 ^ v2 ^ v3. */
uint64_t kd_siphash24(const uint8_t key[16], const void *data, size_t len)
{
    const uint8_t *in = data;
    uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ull;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dull;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ull;
    uint64_t v3 = k1 ^ 0x7465646279746573ull;
    size_t full = len & ~(size_t)7;
    uint64_t m, b = (uint64_t)(len & 0xff) << 56;

    for (size_t i = 0; i < full; i += 8) {
        m = load_le64(in + i);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    for (size_t i = 0; i < (len & 7); i++)
        b |= (uint64_t)in[full + i] << (8 * i);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---------------------------------------------------------------------------------------------- */
/* Table                                                                                          */

struct tok_entry {
    uint64_t hash;
    uint32_t off, len; /* token at bytes + off */
    uint32_t agent;    /* index into agents */
};

struct tok_agent {
    int64_t agent_id, project_id;
    uint32_t name_off; /* NUL-terminated at bytes + name_off */
};

struct kd_tokens {
    uint8_t key[16]; /* SipHash key, random per load */
    uint32_t mask;   /* slots - 1; slots is a power of two >= 2 * n */
    uint32_t *slots;
    struct tok_entry *entries;
    size_t n, entries_cap;
    struct tok_agent *agents;
    size_t nagents, agents_cap;
    char *bytes;
    size_t bytes_len, bytes_cap;
};

void kd_tokens_free(struct kd_tokens *t)
{
    if (!t)
        return;
    if (t->bytes)
        explicit_bzero(t->bytes, t->bytes_cap);
    if (t->entries)
        explicit_bzero(t->entries, t->entries_cap * sizeof(*t->entries));
    free(t->bytes);
    free(t->entries);
    free(t->slots);
    free(t->agents);
    explicit_bzero(t, sizeof(*t));
    free(t);
}

size_t kd_tokens_count(const struct kd_tokens *t)
{
    return t ? t->n : 0;
}

size_t kd_tokens_agents(const struct kd_tokens *t)
{
    return t ? t->nagents : 0;
}

int kd_tokens_lookup(const struct kd_tokens *t, const char *token, size_t len, struct kd_agent_ident *out)
{
    uint64_t h;
    uint32_t i;

    /* The length bounds are public (documented); refusing outside them early reveals nothing. */
    if (!t || len < KD_TOKENS_MIN_LEN || len > KD_TOKENS_MAX_LEN || !token)
        return -ENOENT;
    h = kd_siphash24(t->key, token, len);
    for (i = (uint32_t)h & t->mask;; i = (i + 1) & t->mask) {
        uint32_t s = t->slots[i];
        const struct tok_entry *e;

        if (s == 0)
            return -ENOENT;
        e = &t->entries[s - 1];
        if (e->hash == h && kd_secretfile_equal(t->bytes + e->off, e->len, token, len)) {
            const struct tok_agent *a = &t->agents[e->agent];

            out->agent_id = a->agent_id;
            out->project_id = a->project_id;
            out->agent_name = t->bytes + a->name_off;
            return 0;
        }
    }
}

/* Make the slot table a power of two >= 2 * want (at least 16), rebuilt from the stored hashes. */
static int table_rehash(struct kd_tokens *t, size_t want)
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
        uint32_t i = (uint32_t)t->entries[k].hash & (uint32_t)(slots - 1);

        while (s[i])
            i = (i + 1) & (uint32_t)(slots - 1);
        s[i] = (uint32_t)k + 1;
    }
    free(t->slots);
    t->slots = s;
    t->mask = (uint32_t)(slots - 1);
    return 0;
}

/* Index of the entry holding token, or -1. Load time only: plain memcmp is fine here. */
static long table_find(const struct kd_tokens *t, uint64_t h, const char *token, size_t len)
{
    for (uint32_t i = (uint32_t)h & t->mask;; i = (i + 1) & t->mask) {
        uint32_t s = t->slots[i];
        const struct tok_entry *e;

        if (s == 0)
            return -1;
        e = &t->entries[s - 1];
        if (e->hash == h && e->len == len && memcmp(t->bytes + e->off, token, len) == 0)
            return (long)s - 1;
    }
}

/* Room for n more bytes in t->bytes. Grown by copy-and-wipe, never realloc, so that no stale copy
 * of a token is left behind in freed memory. */
static int bytes_reserve(struct kd_tokens *t, size_t n)
{
    size_t cap = t->bytes_cap ? t->bytes_cap : 4096;
    char *nb;

    if (t->bytes_len + n <= t->bytes_cap)
        return 0;
    while (cap < t->bytes_len + n)
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
    return 0;
}

/* Append s[0..n) and a NUL; the offset goes to *off. */
static int bytes_add(struct kd_tokens *t, const char *s, size_t n, uint32_t *off)
{
    int r = bytes_reserve(t, n + 1);

    if (r < 0)
        return r;
    *off = (uint32_t)t->bytes_len;
    memcpy(t->bytes + t->bytes_len, s, n);
    t->bytes[t->bytes_len + n] = '\0';
    t->bytes_len += n + 1;
    return 0;
}

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
_Static_assert(KD_SECRETFILE_SHOW_MAX < KD_TOKENS_MIN_LEN, "a value short enough to show is never a token");

struct field_state {
    struct kd_yaml_mark at; /* where the value started */
    bool seen;
};

enum { F_TOKEN, F_AGENT_ID, F_PROJECT_ID, F_AGENT_NAME, F_COUNT };
static const char *const field_names[F_COUNT] = {"token", "agent_id", "project_id", "agent_name"};

/* Per-entry and per-agent provenance, for messages only (freed after the load). */
struct src {
    uint32_t line;  /* 1-based line of the entry */
    uint32_t first; /* agents only: the first entry that named this agent */
};

/* State of one load. ev is the current event (its strings belong to the parser y, valid until the
 * next next_event() or the end of the load). */
struct parse {
    struct kd_yaml *y;
    struct kd_yaml_event ev;
    char name[512]; /* escaped source name */
    char path[96];  /* "agents[123].agent_name" */
    char *err;
    size_t errlen;

    struct kd_tokens *t;
    struct src *esrc, *asrc; /* parallel to t->entries / t->agents */
    size_t esrc_cap, asrc_cap;
    uint32_t *amap; /* agent_id -> 1 + index into t->agents; open addressing */
    uint32_t amask;

    /* The entry being parsed. */
    struct field_state f[F_COUNT];
    char token[KD_TOKENS_MAX_LEN];
    size_t token_len;
    char agent_name[KD_TOKENS_NAME_MAX + 1];
    size_t name_len;
    int64_t agent_id, project_id;
};

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

/* Path "agents[i]" or "agents[i].field" (field may be NULL). */
static void set_path(struct parse *p, size_t i, const char *field)
{
    snprintf(p->path, sizeof(p->path), "agents[%zu]%s%s", i, field ? "." : "", field ? field : "");
}

static const char *event_kind(const struct kd_yaml_event *e)
{
    switch (e->type) {
    case KD_YAML_SCALAR:
        return "a scalar";
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

/* libyaml's problem and context strings are static text, never input. Unlike config.c, a reader
 * error's offending byte value is not shown: it might sit inside a token. */
static int syntax_error(struct parse *p)
{
    struct kd_yaml_error ye;
    char ctx[160] = "";

    kd_yaml_last_error(p->y, &ye);
    const char *problem = ye.problem;
    struct kd_yaml_mark at = ye.at;

    if (ye.kind == KD_YAML_ERR_MEMORY) {
        set_error(p->err, p->errlen, "%s: out of memory", p->name);
        return -ENOMEM;
    }
    if (ye.kind != KD_YAML_ERR_READER && ye.context)
        snprintf(ctx, sizeof(ctx), " (%s at %zu:%zu)", ye.context, ye.context_at.line + 1,
                 ye.context_at.column + 1);
    set_error(p->err, p->errlen, "%s:%zu:%zu: YAML syntax error: %s%s", p->name, at.line + 1, at.column + 1,
              problem, ctx);
    return -EINVAL;
}

/* Next event into p->ev; anchors, aliases and tags are refused on sight (their names are short
 * identifiers chosen by the author, but are described like values all the same). */
static int next_event(struct parse *p)
{
    struct kd_yaml_event *e = &p->ev;
    const char *anchor = NULL, *tag = NULL;
    char q[KD_SECRETFILE_DESCRIBE_LEN];

    if (kd_yaml_next(p->y, e) < 0)
        return syntax_error(p);

    switch (e->type) {
    case KD_YAML_ALIAS:
        anchor = e->anchor;
        kd_secretfile_describe(q, sizeof(q), (const char *)anchor, strlen((const char *)anchor));
        return fail(p, e->start_mark, "aliases are not supported (alias %s)", q);
    case KD_YAML_SCALAR:
        anchor = e->anchor;
        tag = e->tag;
        break;
    case KD_YAML_SEQUENCE_START:
        anchor = e->anchor;
        tag = e->tag;
        break;
    case KD_YAML_MAPPING_START:
        anchor = e->anchor;
        tag = e->tag;
        break;
    default:
        break;
    }
    if (anchor) {
        kd_secretfile_describe(q, sizeof(q), (const char *)anchor, strlen((const char *)anchor));
        return fail(p, e->start_mark, "anchors are not supported (anchor %s)", q);
    }
    if (tag) {
        kd_secretfile_describe(q, sizeof(q), (const char *)tag, strlen((const char *)tag));
        return fail(p, e->start_mark, "tags are not supported (tag %s)", q);
    }
    return 0;
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

/* ---------------------------------------------------------------------------------------------- */
/* Values                                                                                         */

/* Strict decimal 1..INT64_MAX: digits only, no sign, no leading zero. -EINVAL or -ERANGE. */
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

/* p->ev is the value of field f of the current entry: check it and keep it in p. */
static int entry_value(struct parse *p, int f)
{
    const struct kd_yaml_event *e = &p->ev;
    struct kd_yaml_mark at = e->start_mark;
    char got[KD_SECRETFILE_DESCRIBE_LEN];
    const char *v;
    size_t n;
    int r;

    if (e->type != KD_YAML_SCALAR)
        return fail(p, at, "expected %s, got %s",
                    f == F_TOKEN || f == F_AGENT_NAME ? "a string" : "an integer", event_kind(e));
    v = (const char *)e->value;
    n = e->length;

    switch (f) {
    case F_TOKEN:
        /* Say what is wrong, never what is there. */
        if (n < KD_TOKENS_MIN_LEN || n > KD_TOKENS_MAX_LEN)
            return fail(p, at, "must be %d to %d bytes long, got %zu", KD_TOKENS_MIN_LEN, KD_TOKENS_MAX_LEN,
                        n);
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)v[i] < 0x21 || (unsigned char)v[i] > 0x7e)
                return fail(p, at, "must be printable ASCII without spaces");
        memcpy(p->token, v, n);
        p->token_len = n;
        return 0;
    case F_AGENT_ID:
    case F_PROJECT_ID: {
        int64_t id;

        kd_secretfile_describe(got, sizeof(got), v, n);
        r = parse_id(v, n, &id);
        if (r == -ERANGE)
            return fail(p, at, "must be at most %lld, got %s", (long long)INT64_MAX, got);
        if (r < 0)
            return fail(p, at, "must be a positive integer, got %s", got);
        *(f == F_AGENT_ID ? &p->agent_id : &p->project_id) = id;
        return 0;
    }
    case F_AGENT_NAME:
        if (n < 1 || n > KD_TOKENS_NAME_MAX)
            return fail(p, at, "must be 1 to %d bytes long, got %zu", KD_TOKENS_NAME_MAX, n);
        for (size_t i = 0; i < n; i++) {
            if ((unsigned char)v[i] < 0x20 || (unsigned char)v[i] == 0x7f) {
                kd_secretfile_describe(got, sizeof(got), v, n);
                return fail(p, at, "must not contain control characters, got %s", got);
            }
        }
        memcpy(p->agent_name, v, n);
        p->agent_name[n] = '\0';
        p->name_len = n;
        return 0;
    }
    return fail(p, at, "internal error: unknown field");
}

/* ---------------------------------------------------------------------------------------------- */
/* Entries                                                                                        */

/* Index of agent_id in t->agents, or -1. */
static long agent_find(const struct parse *p, int64_t agent_id)
{
    for (uint32_t i = (uint32_t)kd_hash_u64((uint64_t)agent_id) & p->amask;; i = (i + 1) & p->amask) {
        uint32_t s = p->amap[i];

        if (s == 0)
            return -1;
        if (p->t->agents[s - 1].agent_id == agent_id)
            return (long)s - 1;
    }
}

static int agent_map_grow(struct parse *p, size_t want)
{
    size_t slots = 16;
    uint32_t *m;

    while (slots < 2 * want)
        slots *= 2;
    if (p->amap && slots <= (size_t)p->amask + 1)
        return 0;
    m = calloc(slots, sizeof(*m));
    if (!m)
        return -ENOMEM;
    for (size_t k = 0; k < p->t->nagents; k++) {
        uint32_t i = (uint32_t)kd_hash_u64((uint64_t)p->t->agents[k].agent_id) & (uint32_t)(slots - 1);

        while (m[i])
            i = (i + 1) & (uint32_t)(slots - 1);
        m[i] = (uint32_t)k + 1;
    }
    free(p->amap);
    p->amap = m;
    p->amask = (uint32_t)(slots - 1);
    return 0;
}

/* The entry's mapping has ended (it started at `at`): check it as a whole and add it. */
static int entry_done(struct parse *p, size_t idx, struct kd_yaml_mark at)
{
    struct kd_tokens *t = p->t;
    struct tok_entry *e;
    uint64_t h;
    long dup, ai;
    uint32_t slot;

    for (int f = 0; f < F_COUNT; f++) {
        if (!p->f[f].seen) {
            set_path(p, idx, field_names[f]);
            return fail(p, at, "missing (every entry needs token, agent_id, project_id and agent_name)");
        }
    }

    h = kd_siphash24(t->key, p->token, p->token_len);
    dup = table_find(t, h, p->token, p->token_len);
    if (dup >= 0) {
        set_path(p, idx, "token");
        return fail(p, p->f[F_TOKEN].at, "duplicate token (also given at agents[%ld], line %u)", dup,
                    (unsigned)p->esrc[dup].line);
    }

    ai = agent_find(p, p->agent_id);
    if (ai >= 0) {
        const struct tok_agent *a = &t->agents[ai];
        const struct src *s = &p->asrc[ai];

        /* Rotation: the same agent under several tokens, but it must be the same agent. */
        if (a->project_id != p->project_id) {
            set_path(p, idx, "project_id");
            return fail(p, p->f[F_PROJECT_ID].at,
                        "agent_id %lld has project_id %lld at agents[%u] (line %u); every token of an agent "
                        "must agree, got %lld",
                        (long long)p->agent_id, (long long)a->project_id, (unsigned)s->first,
                        (unsigned)s->line, (long long)p->project_id);
        }
        if (strcmp(t->bytes + a->name_off, p->agent_name) != 0) {
            set_path(p, idx, "agent_name");
            return fail(p, p->f[F_AGENT_NAME].at,
                        "agent_id %lld has another agent_name at agents[%u] (line %u); every token of an "
                        "agent must agree",
                        (long long)p->agent_id, (unsigned)s->first, (unsigned)s->line);
        }
    } else {
        struct tok_agent *a;
        uint32_t name_off;

        if (grow((void **)&t->agents, &t->agents_cap, t->nagents + 1, sizeof(*t->agents)) < 0 ||
            grow((void **)&p->asrc, &p->asrc_cap, t->nagents + 1, sizeof(*p->asrc)) < 0 ||
            agent_map_grow(p, t->nagents + 1) < 0 || bytes_add(t, p->agent_name, p->name_len, &name_off) < 0)
            return fail_oom(p, at);
        a = &t->agents[t->nagents];
        a->agent_id = p->agent_id;
        a->project_id = p->project_id;
        a->name_off = name_off;
        p->asrc[t->nagents].first = (uint32_t)idx;
        p->asrc[t->nagents].line = (uint32_t)at.line + 1;
        ai = (long)t->nagents++;
        slot = (uint32_t)kd_hash_u64((uint64_t)p->agent_id) & p->amask;
        while (p->amap[slot])
            slot = (slot + 1) & p->amask;
        p->amap[slot] = (uint32_t)ai + 1;
    }

    if (grow((void **)&t->entries, &t->entries_cap, t->n + 1, sizeof(*t->entries)) < 0 ||
        grow((void **)&p->esrc, &p->esrc_cap, t->n + 1, sizeof(*p->esrc)) < 0 ||
        table_rehash(t, t->n + 1) < 0)
        return fail_oom(p, at);
    e = &t->entries[t->n];
    e->hash = h;
    e->len = (uint32_t)p->token_len;
    e->agent = (uint32_t)ai;
    if (bytes_add(t, p->token, p->token_len, &e->off) < 0)
        return fail_oom(p, at);
    p->esrc[t->n].line = (uint32_t)at.line + 1;
    slot = (uint32_t)h & t->mask;
    while (t->slots[slot])
        slot = (slot + 1) & t->mask;
    t->slots[slot] = (uint32_t)t->n + 1;
    t->n++;
    return 0;
}

/* p->ev is the MAPPING-START of entry idx; consume up to and including its MAPPING-END. */
static int parse_entry(struct parse *p, size_t idx)
{
    struct kd_yaml_mark start = p->ev.start_mark;
    int r;

    memset(p->f, 0, sizeof(p->f));
    for (;;) {
        const struct kd_yaml_event *k = &p->ev;
        const char *key;
        size_t kl;
        int f;

        set_path(p, idx, NULL);
        if ((r = next_event(p)) < 0)
            return r;
        if (k->type == KD_YAML_MAPPING_END)
            break;
        if (k->type != KD_YAML_SCALAR)
            return fail(p, k->start_mark, "keys must be scalars, got %s", event_kind(k));
        key = (const char *)k->value;
        kl = k->length;
        for (f = 0; f < F_COUNT; f++)
            if (strlen(field_names[f]) == kl && memcmp(field_names[f], key, kl) == 0)
                break;
        if (f == F_COUNT) {
            char q[KD_SECRETFILE_DESCRIBE_LEN];

            kd_secretfile_describe(q, sizeof(q), key, kl);
            return fail(p, k->start_mark,
                        "unknown key %s (expected one of: token, agent_id, project_id, agent_name)", q);
        }
        set_path(p, idx, field_names[f]);
        if (p->f[f].seen)
            return fail(p, k->start_mark, "duplicate key (first given at line %zu)", p->f[f].at.line + 1);
        if ((r = next_event(p)) < 0)
            return r;
        p->f[f].seen = true;
        p->f[f].at = p->ev.start_mark;
        if ((r = entry_value(p, f)) < 0)
            return r;
    }
    r = entry_done(p, idx, start);
    explicit_bzero(p->token, p->token_len);
    p->token_len = 0;
    return r;
}

/* p->ev is the value of the top-level agents key. */
static int parse_agents(struct parse *p)
{
    int r;

    if (is_null(&p->ev))
        return 0; /* "agents:" with nothing under it: an empty table (every agent refused) */
    if (p->ev.type != KD_YAML_SEQUENCE_START)
        return fail(p, p->ev.start_mark, "expected a list of agents, got %s", event_kind(&p->ev));
    for (size_t i = 0;; i++) {
        if ((r = next_event(p)) < 0)
            return r;
        if (p->ev.type == KD_YAML_SEQUENCE_END)
            return 0;
        set_path(p, i, NULL);
        if (i >= KD_TOKENS_MAX_ENTRIES)
            return fail(p, p->ev.start_mark, "too many entries (at most %d)", KD_TOKENS_MAX_ENTRIES);
        if (p->ev.type != KD_YAML_MAPPING_START)
            return fail(p, p->ev.start_mark,
                        "expected a mapping with token, agent_id, project_id and agent_name, got %s",
                        event_kind(&p->ev));
        if ((r = parse_entry(p, i)) < 0)
            return r;
    }
}

/* p->ev is the root MAPPING-START. */
static int parse_top(struct parse *p)
{
    struct kd_yaml_mark start = p->ev.start_mark, first = start;
    bool seen = false;
    int r;

    for (;;) {
        const struct kd_yaml_event *k = &p->ev;
        char q[KD_SECRETFILE_DESCRIBE_LEN];

        p->path[0] = '\0';
        if ((r = next_event(p)) < 0)
            return r;
        if (k->type == KD_YAML_MAPPING_END)
            break;
        if (k->type != KD_YAML_SCALAR)
            return fail(p, k->start_mark, "keys must be scalars, got %s", event_kind(k));
        if (k->length != 6 || memcmp(k->value, "agents", 6) != 0) {
            kd_secretfile_describe(q, sizeof(q), (const char *)k->value, k->length);
            return fail(p, k->start_mark, "unknown key %s (expected: agents)", q);
        }
        snprintf(p->path, sizeof(p->path), "agents");
        if (seen)
            return fail(p, k->start_mark, "duplicate key (first given at line %zu)", first.line + 1);
        seen = true;
        first = k->start_mark;
        if ((r = next_event(p)) < 0 || (r = parse_agents(p)) < 0)
            return r;
    }
    if (!seen) {
        snprintf(p->path, sizeof(p->path), "agents");
        return fail(p, start, "missing (a token file is a mapping with an agents: list)");
    }
    return 0;
}

/* STREAM-START, one document whose root is a mapping, STREAM-END. */
static int parse_stream(struct parse *p)
{
    int r;

    if ((r = next_event(p)) < 0 || (r = next_event(p)) < 0)
        return r;
    if (p->ev.type == KD_YAML_STREAM_END)
        return fail(p, p->ev.start_mark, "empty file (a token file is a mapping with an agents: list)");
    if ((r = next_event(p)) < 0)
        return r;
    if (p->ev.type != KD_YAML_MAPPING_START)
        return fail(p, p->ev.start_mark, "expected a mapping with an agents: list at the top level, got %s",
                    event_kind(&p->ev));
    if ((r = parse_top(p)) < 0)
        return r;
    p->path[0] = '\0';
    /* DOCUMENT-END, then STREAM-END; reading to the end also surfaces trailing syntax errors. */
    if ((r = next_event(p)) < 0 || (r = next_event(p)) < 0)
        return r;
    if (p->ev.type != KD_YAML_STREAM_END)
        return fail(p, p->ev.start_mark, "only one YAML document is allowed");
    return 0;
}

int kd_tokens_load_string(const char *name, const char *buf, size_t len, struct kd_tokens **out, char *err,
                          size_t errlen)
{
    struct kd_tokens *t = NULL;
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
    /* ~3 KiB of state plus libyaml's parser: keep it off the (possibly small) stack. */
    p = calloc(1, sizeof(*p));
    if (!p) {
        set_error(err, errlen, "%s: out of memory", name);
        return -ENOMEM;
    }
    kd_secretfile_escape(p->name, sizeof(p->name), &nl, name, strlen(name));
    if (len > KD_TOKENS_MAX_FILESIZE) {
        set_error(err, errlen, "%s: token file larger than %u bytes", p->name, KD_TOKENS_MAX_FILESIZE);
        free(p);
        return -EFBIG;
    }
    t = calloc(1, sizeof(*t));
    p->t = t;
    if (!t || table_rehash(t, 0) < 0 || agent_map_grow(p, 0) < 0) {
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

    kd_yaml_free(p->y);
out:
    free(p->amap);
    free(p->esrc);
    free(p->asrc);
    explicit_bzero(p, sizeof(*p));
    free(p);
    if (r < 0) {
        kd_tokens_free(t);
        return r;
    }
    *out = t;
    return 0;
}

int kd_tokens_load_file(const char *path, struct kd_tokens **out, char *err, size_t errlen)
{
    char name[512];
    size_t nl = 0, len = 0;
    char *buf = NULL;
    int r;

    r = kd_secretfile_read(path, KD_TOKENS_MAX_FILESIZE, &buf, &len);
    if (r < 0) {
        kd_secretfile_escape(name, sizeof(name), &nl, path, strlen(path));
        if (r == -EFBIG)
            set_error(err, errlen, "%s: token file larger than %u bytes", name, KD_TOKENS_MAX_FILESIZE);
        else
            set_error(err, errlen, "%s: cannot read token file: %s", name, strerror(-r));
        return r;
    }
    r = kd_tokens_load_string(path, buf, len, out, err, errlen);
    explicit_bzero(buf, len);
    free(buf);
    return r;
}

/* ---------------------------------------------------------------------------------------------- */
/* Handle                                                                                         */

void kd_tokens_handle_init(struct kd_tokens_handle *h, struct kd_tokens *t)
{
    atomic_init(&h->cur, t);
}

const struct kd_tokens *kd_tokens_handle_get(const struct kd_tokens_handle *h)
{
    /* Pairs with the release half of swap(): the table's contents are visible to whoever sees it. */
    return atomic_load_explicit(&((struct kd_tokens_handle *)h)->cur, memory_order_acquire);
}

struct kd_tokens *kd_tokens_handle_swap(struct kd_tokens_handle *h, struct kd_tokens *t)
{
    return atomic_exchange_explicit(&h->cur, t, memory_order_acq_rel);
}

/* ---------------------------------------------------------------------------------------------- */
/* Epoch                                                                                          */

/* 128, not 64: adjacent-line prefetchers pull cache lines in pairs, which would make neighbouring
 * slots share a line's traffic after all. */
#define EPOCH_LINE    128
#define EPOCH_OFFLINE UINT64_MAX
#define EPOCH_MAX     4096

struct epoch_slot {
    _Alignas(EPOCH_LINE) _Atomic uint64_t seen;
};

struct kd_epoch {
    _Alignas(EPOCH_LINE) _Atomic uint64_t global; /* written by synchronize() only; read by every slot */
    unsigned nslots;
    struct epoch_slot slots[]; /* each on its own line; written only by its reader */
};

int kd_epoch_create(unsigned nslots, struct kd_epoch **out)
{
    size_t size;
    struct kd_epoch *e;

    if (nslots == 0 || nslots > EPOCH_MAX)
        return -EINVAL;
    size = sizeof(*e) + (size_t)nslots * sizeof(e->slots[0]);
    size = (size + EPOCH_LINE - 1) & ~(size_t)(EPOCH_LINE - 1);
    e = aligned_alloc(EPOCH_LINE, size);
    if (!e)
        return -ENOMEM;
    memset(e, 0, size);
    atomic_init(&e->global, 1);
    e->nslots = nslots;
    for (unsigned i = 0; i < nslots; i++)
        atomic_init(&e->slots[i].seen, 0); /* online, no quiescent point yet */
    *out = e;
    return 0;
}

void kd_epoch_destroy(struct kd_epoch *e)
{
    free(e);
}

void kd_epoch_quiescent(struct kd_epoch *e, unsigned slot)
{
    uint64_t g = atomic_load_explicit(&e->global, memory_order_acquire);

    atomic_store_explicit(&e->slots[slot].seen, g, memory_order_release);
}

void kd_epoch_offline(struct kd_epoch *e, unsigned slot)
{
    atomic_store_explicit(&e->slots[slot].seen, EPOCH_OFFLINE, memory_order_release);
}

void kd_epoch_online(struct kd_epoch *e, unsigned slot)
{
    uint64_t g = atomic_load_explicit(&e->global, memory_order_acquire);

    atomic_store_explicit(&e->slots[slot].seen, g, memory_order_relaxed);
    /* Dekker with synchronize(): our slot store before our next handle load. */
    atomic_thread_fence(memory_order_seq_cst);
}

int kd_epoch_synchronize(struct kd_epoch *e, kd_epoch_wake_fn wake, void *ud, uint32_t timeout_ms)
{
    uint64_t deadline = kd_clock_ns() + (uint64_t)timeout_ms * 1000000u;
    uint64_t target, delay_ns = 10000;

    /* Release: the swap that preceded this call is visible to a reader that reads target. */
    target = atomic_fetch_add_explicit(&e->global, 1, memory_order_acq_rel) + 1;
    /* Dekker with online(): our increment (and the swap) before our reads of the slots. */
    atomic_thread_fence(memory_order_seq_cst);
    if (wake) {
        for (unsigned i = 0; i < e->nslots; i++)
            if (atomic_load_explicit(&e->slots[i].seen, memory_order_acquire) < target)
                wake(ud, i);
    }
    for (;;) {
        bool all = true;
        struct timespec ts;

        /* Acquire: what a reader did before its release store of >= target happens before our
         * return, hence before the caller frees. */
        for (unsigned i = 0; i < e->nslots && all; i++)
            all = atomic_load_explicit(&e->slots[i].seen, memory_order_acquire) >= target;
        if (all)
            return 0;
        if (kd_clock_ns() >= deadline)
            return -ETIMEDOUT;
        ts.tv_sec = 0;
        ts.tv_nsec = (long)delay_ns;
        nanosleep(&ts, NULL);
        if (delay_ns < 1000000)
            delay_ns *= 2;
    }
}

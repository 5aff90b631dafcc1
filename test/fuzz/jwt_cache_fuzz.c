/* jwt_cache_fuzz.c — the api listener's JWT cache (core/jwt.c kd_jwt_cache_verify, one per shard,
 * called by shards/route.c for every api call's bearer token) driven by a script of operations read
 * from the input, so the cache fills, hits, evicts, expires entries and is re-bound:
 *   0  a token of the input's bytes            4  the clock moves (forwards, or back)
 *   1  a token signed with the current or      5  other opts: secret, audience, issuer, leeway
 *      the other secret, claims from the input 6  a token signed over a payload of the input's
 *   2  a token given before, again                bytes (any JSON the claim reader may meet)
 *   3  a token given before, one byte changed, cut short or lengthened
 * Tokens go in exactly sized buffers (ASan sees overreads). The cache holds 4 entries here (32 in
 * kasd): the same code, evictions sooner.
 * Checks: every answer (status, error text, claims) equals kd_jwt_verify's for the same token and
 * opts (the cache's contract: "same results, same error strings"); kd_jwt_cache_validate holds after
 * every call; the entries never exceed the capacity. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/jwt.h"
#include "test/fuzz/fuzz.h"

#define CAPACITY 4
#define POOL     8
#define BASE_NOW 1700000000

struct script {
    const uint8_t *p;
    size_t left;
};

static uint8_t take(struct script *s)
{
    if (s->left == 0)
        return 0;
    s->left--;
    return *s->p++;
}

static const uint8_t secret_a[] = "0123456789abcdef0123456789abcdef";
static const uint8_t secret_b[] = "another secret, as after a rotation";

struct pool {
    char *tok[POOL];
    size_t len[POOL];
    unsigned n, next;
};

static void pool_add(struct pool *pl, const char *tok, size_t len)
{
    unsigned i = pl->n < POOL ? pl->n++ : pl->next++ % POOL;
    free(pl->tok[i]);
    pl->tok[i] = malloc(len ? len : 1);
    memcpy(pl->tok[i], tok, len);
    pl->len[i] = len;
}

static bool same_claims(const struct kd_jwt_claims *a, const struct kd_jwt_claims *b)
{
    return a->alg == b->alg && a->exp == b->exp && a->nbf == b->nbf && a->iat == b->iat &&
           a->has_nbf == b->has_nbf && a->has_iat == b->has_iat && strcmp(a->iss, b->iss) == 0 &&
           strcmp(a->sub, b->sub) == 0;
}

/* One call through the cache, checked against the uncached verification. */
static void verify(struct kd_jwt_cache *c, const char *tok, size_t len, const struct kd_jwt_opts *o)
{
    char *copy = malloc(len ? len : 1); /* exact size */
    memcpy(copy, tok, len);
    struct kd_jwt_claims got, want;
    char got_err[256], want_err[256];
    memset(&got, 0, sizeof(got));
    memset(&want, 0, sizeof(want));
    int rc = kd_jwt_cache_verify(c, copy, len, o, &got, got_err, sizeof(got_err));
    int want_rc = kd_jwt_verify(copy, len, o, &want, want_err, sizeof(want_err));
    CHECK(rc == want_rc);
    CHECK(strcmp(got_err, want_err) == 0);
    if (rc == 0)
        CHECK(same_claims(&got, &want));
    CHECK(kd_jwt_cache_validate(c) == 0);
    struct kd_jwt_cache_stats st;
    kd_jwt_cache_stats(c, &st);
    CHECK(st.entries <= st.capacity && st.capacity == CAPACITY);
    free(copy);
}

/* A token with claims taken from the script; most of them acceptable, some not. */
static int sign_claims(struct script *s, const struct kd_jwt_opts *o, char *out, size_t cap)
{
    uint8_t f = take(s), e = take(s), n = take(s), sub = take(s);
    int64_t exp = o->now + (int8_t)e * 10;
    char payload[512];
    int len = snprintf(payload, sizeof(payload), "{\"aud\":%s,\"exp\":%lld%s",
                       f & 1   ? "\"gitlab-kas\""
                       : f & 2 ? "[\"x\",\"gitlab-kas\"]"
                               : "\"other\"",
                       (long long)exp, f & 4 ? ".5" : "");
    if (f & 8)
        len += snprintf(payload + len, sizeof(payload) - (size_t)len, ",\"nbf\":%lld",
                        (long long)(o->now + (int8_t)n * 10));
    if (f & 16)
        len += snprintf(payload + len, sizeof(payload) - (size_t)len, ",\"iss\":\"gitlab-kas\"");
    if (f & 32)
        len += snprintf(payload + len, sizeof(payload) - (size_t)len, ",\"sub\":\"user-%u\",\"iat\":%lld",
                        sub, (long long)o->now);
    snprintf(payload + len, sizeof(payload) - (size_t)len, "}");
    const uint8_t *secret = f & 64 ? secret_b : secret_a;
    size_t slen = f & 64 ? sizeof(secret_b) - 1 : sizeof(secret_a) - 1;
    return kd_jwt_sign((enum kd_jwt_alg)(sub % 3), secret, slen, payload, out, cap);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct script s = {data, size};
    struct kd_jwt_cache *c = kd_jwt_cache_new(CAPACITY);
    if (c == NULL)
        return 0;
    struct pool pl = {0};
    struct kd_jwt_opts o = {
        .secret = secret_a,
        .secret_len = sizeof(secret_a) - 1,
        .audience = "gitlab-kas",
        .issuer = NULL,
        .now = BASE_NOW,
        .leeway = KD_JWT_LEEWAY_DEFAULT,
    };
    static char tok[2 * KD_JWT_MAX_LEN];
    for (unsigned ops = 0; s.left > 0 && ops < 256; ops++) {
        uint8_t op = take(&s);
        int len = -1;
        switch (op % 7) {
        case 0: { /* the input's bytes */
            size_t n = take(&s);
            n = n * 16 + take(&s) % 16; /* up to ~4 KiB: past KD_JWT_CACHE_TOKEN_MAX too */
            if (n > s.left)
                n = s.left;
            memcpy(tok, s.p, n);
            s.p += n;
            s.left -= n;
            len = (int)n;
            break;
        }
        case 1:
            len = sign_claims(&s, &o, tok, sizeof(tok));
            break;
        case 2:
            if (pl.n > 0) {
                unsigned i = take(&s) % pl.n;
                verify(c, pl.tok[i], pl.len[i], &o);
            }
            break;
        case 3:
            if (pl.n > 0) {
                unsigned i = take(&s) % pl.n;
                uint8_t how = take(&s), at = take(&s);
                len = (int)pl.len[i];
                memcpy(tok, pl.tok[i], pl.len[i]);
                if (how % 3 == 0 && len > 0)
                    tok[at % len] ^= (char)(how | 1);
                else if (how % 3 == 1)
                    len = len > 0 ? at % len : 0;
                else
                    tok[len++] = (char)at;
            }
            break;
        case 4: {
            uint8_t d = take(&s);
            o.now += d & 0x80 ? -(int64_t)(d & 0x7f) : (int64_t)d * 10;
            break;
        }
        case 5: {
            uint8_t w = take(&s);
            o.secret = w & 1 ? secret_b : secret_a;
            o.secret_len = w & 1 ? sizeof(secret_b) - 1 : sizeof(secret_a) - 1;
            o.audience = w & 2 ? "other" : "gitlab-kas";
            o.issuer = w & 4 ? "gitlab-kas" : NULL;
            o.leeway = w & 8 ? 0 : w & 16 ? -1 : KD_JWT_LEEWAY_DEFAULT;
            break;
        }
        case 6: { /* a correctly signed token over the input's bytes as the payload */
            char payload[512];
            size_t n = take(&s) % sizeof(payload);
            if (n > s.left)
                n = s.left;
            memcpy(payload, s.p, n);
            payload[n] = '\0';
            s.p += n;
            s.left -= n;
            len = kd_jwt_sign(KD_JWT_HS256, o.secret, o.secret_len, payload, tok, sizeof(tok));
            break;
        }
        }
        if (len >= 0) {
            verify(c, tok, (size_t)len, &o);
            pool_add(&pl, tok, (size_t)len);
        }
    }
    for (unsigned i = 0; i < pl.n; i++)
        free(pl.tok[i]);
    kd_jwt_cache_free(c);
    return 0;
}

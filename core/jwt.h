/* jwt.h — HS256/HS384/HS512 JSON Web Tokens (RFC 7519, compact JWS of RFC 7515): verify the tokens
 * GitLab sends on the api listener, sign the ones kasd sends, load the shared secret file.
 * Concurrency: pure functions (kd_jwt_secret_load does blocking file I/O: call it at start-up), except
 * struct kd_jwt_cache: one per thread (a shard's own), no locks.
 * Ownership: everything is borrowed for the duration of the call; results go to caller memory. A
 * cache copies the tokens it keeps; kd_jwt_cache_new/kd_jwt_cache_free pair.
 *
 * Verification order (nothing in the payload is looked at before the signature checks out):
 *   1. shape: at most KD_JWT_MAX_LEN bytes, exactly three base64url parts, no padding, no whitespace
 *   2. header: strict JSON object; "alg" exactly "HS256", "HS384" or "HS512" ("none" and any other
 *      algorithm refused); "typ", if present, "JWT" in any case; "crit" present: refused
 *   3. signature: HMAC of "header.payload" with the secret, compared in constant time
 *   4. payload: strict JSON object; "exp" required, numeric, now < exp + leeway; "nbf" optional,
 *      numeric, nbf <= now + leeway; "iat" optional, numeric (not compared with now); "aud" a string
 *      or an array of strings containing the audience; "iss" a string, equal to opts.issuer when
 *      that is set; "sub" a string. Other members (any JSON) are validated and skipped.
 * Both JSON objects: no duplicate member names at the top level (compared after unescaping; nested
 * objects are only validated), at most KD_JWT_MAX_MEMBERS members, nesting within KD_JWT_MAX_DEPTH.
 * Error strings say what failed and never contain the token, its signature or the secret; values
 * taken from the token (an algorithm name) are cut short and reduced to printable ASCII.
 */
#ifndef KD_CORE_JWT_H
#define KD_CORE_JWT_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define KD_JWT_MAX_LEN        8192 /* longer tokens are refused as malformed */
#define KD_JWT_MAX_DEPTH      16   /* JSON nesting limit, the top-level object included */
#define KD_JWT_MAX_MEMBERS    64   /* members of the header or payload object */
#define KD_JWT_LEEWAY_DEFAULT 5    /* seconds; what kasd passes as opts.leeway */
#define KD_JWT_STR_MAX        256  /* claims copied out: up to 255 bytes and a NUL */
/* Time claims beyond +-(2^53 - 1) seconds are refused as malformed ("huge"): past that, a double
 * no longer counts whole seconds. */
#define KD_JWT_TIME_MAX 9007199254740991.0

enum kd_jwt_alg {
    KD_JWT_HS256,
    KD_JWT_HS384,
    KD_JWT_HS512,
};

struct kd_jwt_opts {
    const uint8_t *secret; /* the HMAC key (decoded bytes); empty: every token is refused */
    size_t secret_len;
    const char *audience; /* required, e.g. "gitlab-kas" */
    const char *issuer;   /* NULL: "iss" is not checked (GitLab's api tokens carry its host) */
    int64_t now;          /* unix seconds; callers pass time(NULL), tests a fixed value */
    int64_t leeway;       /* seconds of clock skew tolerated for exp and nbf; negative counts as 0 */
};

struct kd_jwt_claims {
    enum kd_jwt_alg alg;
    int64_t exp;      /* seconds, rounded down; always present after success */
    int64_t nbf, iat; /* 0 when absent */
    bool has_nbf, has_iat;
    char iss[KD_JWT_STR_MAX]; /* "" when absent or longer than KD_JWT_STR_MAX - 1 bytes */
    char sub[KD_JWT_STR_MAX]; /* likewise */
};

/* Verify a compact token (without the "Bearer " prefix). On success fills *out (may be NULL) and
 * returns 0. Returns -EINVAL when the token or the configuration is malformed (shape, base64, JSON,
 * claim types, huge numbers, duplicate members, no audience configured) and -EACCES when a
 * well-formed token is not acceptable (algorithm, typ, crit, signature, expiry, nbf, audience,
 * issuer, missing exp or aud, no secret configured). err (may be NULL) gets a one-line reason. */
int kd_jwt_verify(const char *token, size_t len, const struct kd_jwt_opts *o, struct kd_jwt_claims *out,
                  char *err, size_t errlen);

/* A small bounded cache of verified tokens, so a token GitLab reuses for many calls costs one HMAC,
 * not one per call (sha256 was ~11 % of kasd's CPU per routed call).
 *
 *   entries[cap]: { hash: SipHash-2-4(random per-cache key, token bytes), token copy, claims,
 *                   exp and nbf as parsed, last use }      cap fixed at creation, linear scan
 *   bound to: a copy of the secret, the audience and the issuer of the opts it was filled with
 *
 * Invariants: an entry holds a token that kd_jwt_verify accepted under the bound secret, audience
 * and issuer. A hit needs the hash AND the full token bytes to match (compared in constant time);
 * exp and nbf are checked against opts.now and opts.leeway on every hit exactly as kd_jwt_verify
 * checks them, and an entry that fails that check is dropped. Opts with another secret, audience or
 * issuer empty the cache first. Only accepted tokens are kept (refusals are verified in full every
 * time); when full, the least recently used entry is evicted. Tokens longer than
 * KD_JWT_CACHE_TOKEN_MAX or secrets longer than KD_JWT_CACHE_SECRET_MAX are verified, never kept. */
#define KD_JWT_CACHE_TOKEN_MAX  2048
#define KD_JWT_CACHE_SECRET_MAX 256
#define KD_JWT_CACHE_ENTRIES    32 /* what kasd uses per shard */
struct kd_jwt_cache;
struct kd_jwt_cache_stats {
    uint64_t hits, misses, evictions, expired; /* expired: hits refused by exp/nbf (and dropped) */
    unsigned entries, capacity;
};
/* NULL on ENOMEM or capacity 0. */
struct kd_jwt_cache *kd_jwt_cache_new(unsigned capacity);
void kd_jwt_cache_free(struct kd_jwt_cache *c);
/* kd_jwt_verify through the cache: same results, same error strings. c may be NULL (no cache). */
int kd_jwt_cache_verify(struct kd_jwt_cache *c, const char *token, size_t len, const struct kd_jwt_opts *o,
                        struct kd_jwt_claims *out, char *err, size_t errlen);
void kd_jwt_cache_stats(const struct kd_jwt_cache *c, struct kd_jwt_cache_stats *out);
/* Checks the invariants that do not need the secret (entry count, hashes match the kept bytes);
 * 0 or -EINVAL. For tests. */
int kd_jwt_cache_validate(const struct kd_jwt_cache *c);

/* Produce a token with header {"alg":"HS256|HS384|HS512","typ":"JWT"} and the given payload (used
 * as is: the caller writes valid JSON). out is NUL-terminated. Returns the token length, -EINVAL
 * for an unknown alg, or -ENOSPC when outlen is too small. */
int kd_jwt_sign(enum kd_jwt_alg alg, const void *secret, size_t secretlen, const char *payload_json,
                char *out, size_t outlen);

/* Read a secret file as GitLab writes it: the secret base64-encoded (standard alphabet, padding
 * optional), trailing whitespace and newlines allowed, at most 4096 bytes. Decoded bytes go to out,
 * their count to *len. Returns 0, a negative errno from open/read, -EFBIG (file too large),
 * -EINVAL (empty or not base64) or -ENOSPC (secret longer than cap). err names the path. */
int kd_jwt_secret_load(const char *path, uint8_t *out, size_t cap, size_t *len, char *err, size_t errlen);

#endif

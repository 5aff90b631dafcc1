/* jwt_fuzz.c — arbitrary bytes into core/jwt.c (and core/sha2.c under it), two ways per input:
 *  1. as a token: the first byte gives a secret length n (0-63), the next n bytes are the secret and
 *     the rest is the token, passed without a terminating NUL so overreads show;
 *  2. as a payload: the input (up to its first NUL) is signed as the claims JSON with a fixed secret
 *     by kd_jwt_sign, so the signature holds and the JSON scanner and claim checks are reached.
 * Besides not crashing, kd_jwt_verify must return only 0, -EINVAL or -EACCES, must never put the
 * signature part in its error text, and an accepted token must satisfy the documented claims. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/jwt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NOW 1700000010

static const char fixed_secret[] = "0123456789abcdef0123456789abcdef";

static void check(const char *tok, size_t len, const struct kd_jwt_opts *o)
{
    struct kd_jwt_claims c;
    char err[256];
    int rc = kd_jwt_verify(tok, len, o, &c, err, sizeof(err));
    if (rc != 0 && rc != -EINVAL && rc != -EACCES)
        abort();
    if (memchr(err, '\0', sizeof(err)) == NULL)
        abort();
    if (rc != 0 && err[0] == '\0')
        abort();
    /* The signature part (after the last dot) never appears in the error text. */
    const char *dot = memrchr(tok, '.', len);
    size_t siglen = dot != NULL ? len - (size_t)(dot + 1 - tok) : 0;
    if (rc != 0 && siglen >= 8 && memmem(err, strlen(err), dot + 1, siglen) != NULL)
        abort();
    if (rc == 0) {
        if (c.alg != KD_JWT_HS256 && c.alg != KD_JWT_HS384 && c.alg != KD_JWT_HS512)
            abort();
        /* exp is rounded down: exp + leeway may equal now for a fractional exp */
        if (c.exp + o->leeway < o->now || c.exp > (int64_t)KD_JWT_TIME_MAX)
            abort();
        if (c.has_nbf && c.nbf > o->now + o->leeway)
            abort();
        if (memchr(c.iss, '\0', sizeof(c.iss)) == NULL || memchr(c.sub, '\0', sizeof(c.sub)) == NULL)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;

    /* 1. Input as secret + token. */
    size_t n = data[0] % 64;
    if (1 + n <= size) {
        struct kd_jwt_opts o = {
            .secret = data + 1,
            .secret_len = n,
            .audience = "gitlab-kas",
            .issuer = (data[0] & 64) ? "gitlab-kas" : NULL,
            .now = NOW,
            .leeway = KD_JWT_LEEWAY_DEFAULT,
        };
        size_t tlen = size - 1 - n;
        char *tok = malloc(tlen ? tlen : 1); /* exact size: ASan sees any read past the end */
        memcpy(tok, data + 1 + n, tlen);
        check(tok, tlen, &o);
        free(tok);
    }

    /* 2. Input as the payload of a correctly signed token. */
    if (size > KD_JWT_MAX_LEN)
        return 0;
    char *payload = malloc(size + 1);
    memcpy(payload, data, size);
    payload[size] = '\0';
    enum kd_jwt_alg alg = (enum kd_jwt_alg)(size % 3);
    size_t cap = 2 * KD_JWT_MAX_LEN;
    char *tok = malloc(cap);
    int len = kd_jwt_sign(alg, fixed_secret, sizeof(fixed_secret) - 1, payload, tok, cap);
    if (len < 0)
        abort(); /* cap always suffices for a payload this size */
    struct kd_jwt_opts o = {
        .secret = (const uint8_t *)fixed_secret,
        .secret_len = sizeof(fixed_secret) - 1,
        .audience = "gitlab-kas",
        .issuer = NULL,
        .now = NOW,
        .leeway = KD_JWT_LEEWAY_DEFAULT,
    };
    check(tok, (size_t)len, &o);
    free(tok);
    free(payload);
    return 0;
}

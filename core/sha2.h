/* sha2.h — SHA-256, SHA-384 and SHA-512 (FIPS 180-4), HMAC over each (RFC 2104), and a
 * constant-time compare; enough crypto for HS256/HS384/HS512 JWTs without a crypto library.
 * Concurrency: pure functions; a hash context belongs to one caller. Ownership: nothing is kept;
 * inputs are borrowed for the duration of the call, outputs are written to caller memory.
 *
 * Contexts are plain structs (no allocation): init, update any number of times in any split,
 * final once. final wipes the context. SHA-384 is SHA-512 with other initial values and a cut
 * output, so it shares struct kd_sha512 and the update/final functions.
 */
#ifndef KD_CORE_SHA2_H
#define KD_CORE_SHA2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KD_SHA256_LEN   32
#define KD_SHA384_LEN   48
#define KD_SHA512_LEN   64
#define KD_SHA256_BLOCK 64
#define KD_SHA512_BLOCK 128
#define KD_HASH_MAX_LEN KD_SHA512_LEN /* large enough for any digest or HMAC below */

enum kd_hash_alg {
    KD_HASH_SHA256,
    KD_HASH_SHA384,
    KD_HASH_SHA512,
};

struct kd_sha256 {
    uint32_t h[8];
    uint64_t total;               /* bytes hashed so far */
    uint8_t buf[KD_SHA256_BLOCK]; /* partial block */
    size_t used;                  /* bytes in buf, < KD_SHA256_BLOCK */
};

struct kd_sha512 {
    uint64_t h[8];
    uint64_t total; /* bytes hashed so far (2^64 bytes is far beyond any input) */
    uint8_t buf[KD_SHA512_BLOCK];
    size_t used;
    size_t out_len; /* KD_SHA512_LEN, or KD_SHA384_LEN after kd_sha384_init */
};

void kd_sha256_init(struct kd_sha256 *c);
void kd_sha256_update(struct kd_sha256 *c, const void *data, size_t len);
void kd_sha256_final(struct kd_sha256 *c, uint8_t out[KD_SHA256_LEN]);
void kd_sha256(const void *data, size_t len, uint8_t out[KD_SHA256_LEN]);

void kd_sha512_init(struct kd_sha512 *c);
void kd_sha384_init(struct kd_sha512 *c); /* then kd_sha512_update / kd_sha512_final */
void kd_sha512_update(struct kd_sha512 *c, const void *data, size_t len);
/* Writes c->out_len bytes (64, or 48 for a context from kd_sha384_init) and returns that length. */
size_t kd_sha512_final(struct kd_sha512 *c, uint8_t *out);
void kd_sha512(const void *data, size_t len, uint8_t out[KD_SHA512_LEN]);
void kd_sha384(const void *data, size_t len, uint8_t out[KD_SHA384_LEN]);

/* Digest length of alg (32, 48, 64), or 0 for an unknown value. */
size_t kd_hash_len(enum kd_hash_alg alg);

/* HMAC-SHA-2 (RFC 2104): writes the full, untruncated tag to out (KD_HASH_MAX_LEN bytes is always
 * enough) and returns its length, or 0 for an unknown alg. Keys of any length; keys longer than the
 * block are hashed first, as the RFC says. Key-derived stack copies are wiped before returning. */
size_t kd_hmac(enum kd_hash_alg alg, const void *key, size_t keylen, const void *msg, size_t msglen,
               uint8_t out[KD_HASH_MAX_LEN]);

/* true when the n bytes at a and b are equal. The time taken depends on n only, never on where the
 * first difference is, so it is safe for comparing MACs. */
bool kd_ct_equal(const void *a, const void *b, size_t n);

#endif

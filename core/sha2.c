/* sha2.c — see sha2.h. Written from FIPS 180-4 (sections 4.1.2, 4.1.3, 4.2.2, 4.2.3, 5.1, 5.3,
 * 6.2, 6.4, 6.5) and RFC 2104; the constants were derived from their definitions (fractional parts
 * of square and cube roots of the first primes) and match the tables in the standard. Portable C:
 * byte order is handled by explicit shifts, so it runs the same on any host. */
#include "core/sha2.h"

#include <string.h>

/* Wipe memory the compiler may not optimise away (glibc >= 2.25 has explicit_bzero). */
static void wipe(void *p, size_t n)
{
    explicit_bzero(p, n);
}

/* ---- SHA-256 ---------------------------------------------------------------------------------- */

/* First 32 bits of the fractional parts of the cube roots of the first 64 primes (4.2.2). */
static const uint32_t k256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

/* First 32 bits of the fractional parts of the square roots of the first 8 primes (5.3.3). */
static const uint32_t h256[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

static inline uint32_t ror32(uint32_t x, unsigned n)
{
    return (x >> n) | (x << (32 - n));
}

static inline uint32_t load_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void store_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* One 512-bit block (6.2.2). */
static void sha256_block(uint32_t h[8], const uint8_t *blk)
{
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = load_be32(blk + 4 * t);
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = ror32(w[t - 15], 7) ^ ror32(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = ror32(w[t - 2], 17) ^ ror32(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int t = 0; t < 64; t++) {
        uint32_t S1 = ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25);
        uint32_t ch = (e & f) ^ (~e & g);
        uint32_t t1 = hh + S1 + ch + k256[t] + w[t];
        uint32_t S0 = ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22);
        uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
        uint32_t t2 = S0 + maj;
        hh = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
    wipe(w, sizeof(w)); /* the schedule holds message bytes (HMAC key pads, for one) */
}

void kd_sha256_init(struct kd_sha256 *c)
{
    memcpy(c->h, h256, sizeof(h256));
    c->total = 0;
    c->used = 0;
}

void kd_sha256_update(struct kd_sha256 *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    if (len == 0)
        return; /* data may be NULL then */
    c->total += len;
    if (c->used > 0) {
        size_t take = KD_SHA256_BLOCK - c->used;
        if (take > len)
            take = len;
        memcpy(c->buf + c->used, p, take);
        c->used += take;
        p += take;
        len -= take;
        if (c->used < KD_SHA256_BLOCK)
            return;
        sha256_block(c->h, c->buf);
        c->used = 0;
    }
    for (; len >= KD_SHA256_BLOCK; p += KD_SHA256_BLOCK, len -= KD_SHA256_BLOCK)
        sha256_block(c->h, p);
    if (len > 0) {
        memcpy(c->buf, p, len);
        c->used = len;
    }
}

/* Padding (5.1.1): 0x80, zeros up to 56 mod 64, then the length in bits as a 64-bit big-endian. */
void kd_sha256_final(struct kd_sha256 *c, uint8_t out[KD_SHA256_LEN])
{
    uint64_t bits = c->total * 8;
    c->buf[c->used++] = 0x80;
    if (c->used > 56) {
        memset(c->buf + c->used, 0, KD_SHA256_BLOCK - c->used);
        sha256_block(c->h, c->buf);
        c->used = 0;
    }
    memset(c->buf + c->used, 0, 56 - c->used);
    store_be32(c->buf + 56, (uint32_t)(bits >> 32));
    store_be32(c->buf + 60, (uint32_t)bits);
    sha256_block(c->h, c->buf);
    for (int i = 0; i < 8; i++)
        store_be32(out + 4 * i, c->h[i]);
    wipe(c, sizeof(*c));
}

void kd_sha256(const void *data, size_t len, uint8_t out[KD_SHA256_LEN])
{
    struct kd_sha256 c;
    kd_sha256_init(&c);
    kd_sha256_update(&c, data, len);
    kd_sha256_final(&c, out);
}

/* ---- SHA-512 / SHA-384 ------------------------------------------------------------------------ */

/* First 64 bits of the fractional parts of the cube roots of the first 80 primes (4.2.3). */
static const uint64_t k512[80] = {
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc, 0x3956c25bf348b538,
    0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118, 0xd807aa98a3030242, 0x12835b0145706fbe,
    0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2, 0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235,
    0xc19bf174cf692694, 0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
    0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5, 0x983e5152ee66dfab,
    0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4, 0xc6e00bf33da88fc2, 0xd5a79147930aa725,
    0x06ca6351e003826f, 0x142929670a0e6e70, 0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed,
    0x53380d139d95b3df, 0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
    0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30, 0xd192e819d6ef5218,
    0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8, 0x19a4c116b8d2d0c8, 0x1e376c085141ab53,
    0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8, 0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373,
    0x682e6ff3d6b2b8a3, 0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b, 0xca273eceea26619c,
    0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178, 0x06f067aa72176fba, 0x0a637dc5a2c898a6,
    0x113f9804bef90dae, 0x1b710b35131c471b, 0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc,
    0x431d67c49c100d4c, 0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
};

/* Square roots of the first 8 primes (5.3.5) and, for SHA-384, of the 9th to 16th (5.3.4). */
static const uint64_t h512[8] = {
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
};
static const uint64_t h384[8] = {
    0xcbbb9d5dc1059ed8, 0x629a292a367cd507, 0x9159015a3070dd17, 0x152fecd8f70e5939,
    0x67332667ffc00b31, 0x8eb44a8768581511, 0xdb0c2e0d64f98fa7, 0x47b5481dbefa4fa4,
};

static inline uint64_t ror64(uint64_t x, unsigned n)
{
    return (x >> n) | (x << (64 - n));
}

static inline uint64_t load_be64(const uint8_t *p)
{
    return (uint64_t)load_be32(p) << 32 | load_be32(p + 4);
}

static inline void store_be64(uint8_t *p, uint64_t v)
{
    store_be32(p, (uint32_t)(v >> 32));
    store_be32(p + 4, (uint32_t)v);
}

/* One 1024-bit block (6.4.2). */
static void sha512_block(uint64_t h[8], const uint8_t *blk)
{
    uint64_t w[80];
    for (int t = 0; t < 16; t++)
        w[t] = load_be64(blk + 8 * t);
    for (int t = 16; t < 80; t++) {
        uint64_t s0 = ror64(w[t - 15], 1) ^ ror64(w[t - 15], 8) ^ (w[t - 15] >> 7);
        uint64_t s1 = ror64(w[t - 2], 19) ^ ror64(w[t - 2], 61) ^ (w[t - 2] >> 6);
        w[t] = s1 + w[t - 7] + s0 + w[t - 16];
    }
    uint64_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int t = 0; t < 80; t++) {
        uint64_t S1 = ror64(e, 14) ^ ror64(e, 18) ^ ror64(e, 41);
        uint64_t ch = (e & f) ^ (~e & g);
        uint64_t t1 = hh + S1 + ch + k512[t] + w[t];
        uint64_t S0 = ror64(a, 28) ^ ror64(a, 34) ^ ror64(a, 39);
        uint64_t maj = (a & b) ^ (a & c) ^ (b & c);
        uint64_t t2 = S0 + maj;
        hh = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
    wipe(w, sizeof(w));
}

void kd_sha512_init(struct kd_sha512 *c)
{
    memcpy(c->h, h512, sizeof(h512));
    c->total = 0;
    c->used = 0;
    c->out_len = KD_SHA512_LEN;
}

void kd_sha384_init(struct kd_sha512 *c)
{
    memcpy(c->h, h384, sizeof(h384));
    c->total = 0;
    c->used = 0;
    c->out_len = KD_SHA384_LEN;
}

void kd_sha512_update(struct kd_sha512 *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    if (len == 0)
        return; /* data may be NULL then */
    c->total += len;
    if (c->used > 0) {
        size_t take = KD_SHA512_BLOCK - c->used;
        if (take > len)
            take = len;
        memcpy(c->buf + c->used, p, take);
        c->used += take;
        p += take;
        len -= take;
        if (c->used < KD_SHA512_BLOCK)
            return;
        sha512_block(c->h, c->buf);
        c->used = 0;
    }
    for (; len >= KD_SHA512_BLOCK; p += KD_SHA512_BLOCK, len -= KD_SHA512_BLOCK)
        sha512_block(c->h, p);
    if (len > 0) {
        memcpy(c->buf, p, len);
        c->used = len;
    }
}

/* Padding (5.1.2): 0x80, zeros up to 112 mod 128, then the length in bits as a 128-bit big-endian
 * number. A byte count fits in 64 bits, so the bit count's high word is total >> 61. */
size_t kd_sha512_final(struct kd_sha512 *c, uint8_t *out)
{
    size_t out_len = c->out_len;
    c->buf[c->used++] = 0x80;
    if (c->used > 112) {
        memset(c->buf + c->used, 0, KD_SHA512_BLOCK - c->used);
        sha512_block(c->h, c->buf);
        c->used = 0;
    }
    memset(c->buf + c->used, 0, 112 - c->used);
    store_be64(c->buf + 112, c->total >> 61);
    store_be64(c->buf + 120, c->total << 3);
    sha512_block(c->h, c->buf);
    uint8_t full[KD_SHA512_LEN];
    for (int i = 0; i < 8; i++)
        store_be64(full + 8 * i, c->h[i]);
    memcpy(out, full, out_len); /* SHA-384 keeps the leftmost 384 bits (6.5) */
    wipe(full, sizeof(full));
    wipe(c, sizeof(*c));
    return out_len;
}

void kd_sha512(const void *data, size_t len, uint8_t out[KD_SHA512_LEN])
{
    struct kd_sha512 c;
    kd_sha512_init(&c);
    kd_sha512_update(&c, data, len);
    kd_sha512_final(&c, out);
}

void kd_sha384(const void *data, size_t len, uint8_t out[KD_SHA384_LEN])
{
    struct kd_sha512 c;
    kd_sha384_init(&c);
    kd_sha512_update(&c, data, len);
    kd_sha512_final(&c, out);
}

/* ---- HMAC ------------------------------------------------------------------------------------- */

size_t kd_hash_len(enum kd_hash_alg alg)
{
    switch (alg) {
    case KD_HASH_SHA256:
        return KD_SHA256_LEN;
    case KD_HASH_SHA384:
        return KD_SHA384_LEN;
    case KD_HASH_SHA512:
        return KD_SHA512_LEN;
    }
    return 0;
}

/* A context for any of the three, so HMAC is written once. */
struct anyhash {
    enum kd_hash_alg alg;
    union {
        struct kd_sha256 s256;
        struct kd_sha512 s512;
    } u;
};

static void any_init(struct anyhash *h, enum kd_hash_alg alg)
{
    h->alg = alg;
    if (alg == KD_HASH_SHA256)
        kd_sha256_init(&h->u.s256);
    else if (alg == KD_HASH_SHA384)
        kd_sha384_init(&h->u.s512);
    else
        kd_sha512_init(&h->u.s512);
}

static void any_update(struct anyhash *h, const void *data, size_t len)
{
    if (h->alg == KD_HASH_SHA256)
        kd_sha256_update(&h->u.s256, data, len);
    else
        kd_sha512_update(&h->u.s512, data, len);
}

static void any_final(struct anyhash *h, uint8_t *out)
{
    if (h->alg == KD_HASH_SHA256)
        kd_sha256_final(&h->u.s256, out);
    else
        kd_sha512_final(&h->u.s512, out);
}

/* HMAC(K, m) = H((K0 ^ opad) || H((K0 ^ ipad) || m)), K0 = K (or H(K) when longer than a block)
 * padded with zeros to the block size B; ipad = 0x36 * B, opad = 0x5c * B. */
size_t kd_hmac(enum kd_hash_alg alg, const void *key, size_t keylen, const void *msg, size_t msglen,
               uint8_t out[KD_HASH_MAX_LEN])
{
    size_t dlen = kd_hash_len(alg);
    if (dlen == 0)
        return 0;
    size_t block = alg == KD_HASH_SHA256 ? KD_SHA256_BLOCK : KD_SHA512_BLOCK;
    uint8_t k0[KD_SHA512_BLOCK], pad[KD_SHA512_BLOCK], inner[KD_HASH_MAX_LEN];
    struct anyhash h;

    memset(k0, 0, sizeof(k0));
    if (keylen > block) {
        any_init(&h, alg);
        any_update(&h, key, keylen);
        any_final(&h, k0);
    } else if (keylen > 0) {
        memcpy(k0, key, keylen);
    }

    for (size_t i = 0; i < block; i++)
        pad[i] = k0[i] ^ 0x36;
    any_init(&h, alg);
    any_update(&h, pad, block);
    any_update(&h, msg, msglen);
    any_final(&h, inner);

    for (size_t i = 0; i < block; i++)
        pad[i] = k0[i] ^ 0x5c;
    any_init(&h, alg);
    any_update(&h, pad, block);
    any_update(&h, inner, dlen);
    any_final(&h, out);

    wipe(k0, sizeof(k0));
    wipe(pad, sizeof(pad));
    wipe(inner, sizeof(inner));
    return dlen;
}

bool kd_ct_equal(const void *a, const void *b, size_t n)
{
    const volatile uint8_t *x = a, *y = b; /* volatile: no early exit, no vectorised shortcut */
    uint8_t diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= x[i] ^ y[i];
    return diff == 0;
}

/* jwt_test.c — SHA-2 and HMAC against FIPS 180-4 / RFC 4231 vectors; JWT verification: every
 * accepted shape and every rejection, error texts, signing, secret files. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/jwt.h"
#include "core/sha2.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

static void hex(const uint8_t *b, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", b[i]);
    out[2 * n] = '\0';
}

static void unhex(const char *s, uint8_t *out, size_t *n)
{
    size_t l = strlen(s) / 2;
    for (size_t i = 0; i < l; i++) {
        unsigned v;
        sscanf(s + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
    *n = l;
}

static void digest(enum kd_hash_alg alg, const void *m, size_t n, char *hexout)
{
    uint8_t d[KD_HASH_MAX_LEN];
    if (alg == KD_HASH_SHA256)
        kd_sha256(m, n, d);
    else if (alg == KD_HASH_SHA384)
        kd_sha384(m, n, d);
    else
        kd_sha512(m, n, d);
    hex(d, kd_hash_len(alg), hexout);
}

static size_t b64url(const void *in, size_t len, char *out)
{
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const uint8_t *p = in;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        acc = acc << 8 | p[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = abc[(acc >> bits) & 63];
        }
    }
    if (bits > 0)
        out[o++] = abc[(acc << (6 - bits)) & 63];
    out[o] = '\0';
    return o;
}

#define SECRET "0123456789abcdef0123456789abcdef"
#define NOW    1700000010
#define AUD    "gitlab-kas"

static struct kd_jwt_opts opts(void)
{
    struct kd_jwt_opts o = {
        .secret = (const uint8_t *)SECRET,
        .secret_len = strlen(SECRET),
        .audience = AUD,
        .issuer = NULL,
        .now = NOW,
        .leeway = KD_JWT_LEEWAY_DEFAULT,
    };
    return o;
}

/* Build header.payload.signature from raw JSON texts; sign with alg (-1: empty signature). */
static char *make(const char *hdr, const char *payload, int alg, const char *secret)
{
    static char buf[4][20000];
    static int slot;
    char *t = buf[slot++ % 4];
    size_t o = b64url(hdr, strlen(hdr), t);
    t[o++] = '.';
    o += b64url(payload, strlen(payload), t + o);
    t[o++] = '.';
    t[o] = '\0';
    if (alg >= 0) {
        uint8_t mac[KD_HASH_MAX_LEN];
        size_t n = kd_hmac((enum kd_hash_alg)alg, secret, strlen(secret), t, o - 1, mac);
        b64url(mac, n, t + o);
    }
    return t;
}

static const char *HS256_HDR = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";

/* A payload accepted under opts(), with `extra` members added in front. */
static char *claims(const char *extra)
{
    static char buf[4][20100];
    static int slot;
    char *p = buf[slot++ % 4];
    snprintf(p, sizeof(buf[0]), "{%s%s\"aud\":\"gitlab-kas\",\"exp\":%d}", extra, *extra ? "," : "",
             NOW + 60);
    return p;
}

static char last_err[256];

/* Verify, and check that the error text never contains the token, its signature or its payload. */
static int verify_with(const char *tok, const struct kd_jwt_opts *o, struct kd_jwt_claims *c)
{
    memset(last_err, 'X', sizeof(last_err));
    int rc = kd_jwt_verify(tok, strlen(tok), o, c, last_err, sizeof(last_err));
    cr_assert(memchr(last_err, '\0', sizeof(last_err)) != NULL, "err not terminated");
    if (rc == 0)
        cr_assert_str_empty(last_err);
    else
        cr_assert(last_err[0] != '\0', "no error text for rc %d", rc);
    const char *dot1 = strchr(tok, '.'), *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    if (dot2 != NULL && strlen(dot2 + 1) >= 4)
        cr_assert(strstr(last_err, dot2 + 1) == NULL, "signature leaked: %s", last_err);
    if (dot1 != NULL && dot2 != NULL && dot2 - dot1 > 8) {
        char pl[20000];
        memcpy(pl, dot1 + 1, (size_t)(dot2 - dot1 - 1));
        pl[dot2 - dot1 - 1] = '\0';
        cr_assert(strstr(last_err, pl) == NULL, "payload leaked: %s", last_err);
    }
    if (strlen(tok) >= 8)
        cr_assert(strstr(last_err, tok) == NULL, "token leaked: %s", last_err);
    return rc;
}

static int verify(const char *tok)
{
    struct kd_jwt_opts o = opts();
    return verify_with(tok, &o, NULL);
}

#define expect_ok(tok)                                                                                       \
    do {                                                                                                     \
        int rc_ = verify(tok);                                                                               \
        cr_assert_eq(rc_, 0, "rc %d: %s", rc_, last_err);                                                    \
    } while (0)

#define expect_fail(tok, code, text)                                                                         \
    do {                                                                                                     \
        int rc_ = verify(tok);                                                                               \
        cr_assert_eq(rc_, code, "rc %d (want %d): %s", rc_, code, last_err);                                 \
        cr_assert(strstr(last_err, text) != NULL, "error '%s' lacks '%s'", last_err, text);                  \
    } while (0)

/* ---- SHA-2 ------------------------------------------------------------------------------------ */

static const char *M448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
static const char *M896 =
    "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqr"
    "lmnopqrsmnopqrstnopqrstu";

struct vec {
    enum kd_hash_alg alg;
    const char *msg;
    const char *want;
};

static const struct vec fips[] = {
    {KD_HASH_SHA256, "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
    {KD_HASH_SHA256, "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
    {KD_HASH_SHA384, "",
     "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b"},
    {KD_HASH_SHA384, "abc",
     "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7"},
    {KD_HASH_SHA512, "",
     "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931b"
     "d4741"
     "7a81a538327af927da3e"},
    {KD_HASH_SHA512, "abc",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d442"
     "3643c"
     "e80e2a9ac94fa54ca49f"},
};

Test(sha2, short_messages)
{
    char got[KD_HASH_MAX_LEN * 2 + 1];
    for (size_t i = 0; i < sizeof(fips) / sizeof(fips[0]); i++) {
        digest(fips[i].alg, fips[i].msg, strlen(fips[i].msg), got);
        cr_assert_str_eq(got, fips[i].want, "vector %zu", i);
    }
}

Test(sha2, two_block_messages)
{
    char got[KD_HASH_MAX_LEN * 2 + 1];
    digest(KD_HASH_SHA256, M448, strlen(M448), got);
    cr_assert_str_eq(got, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    digest(KD_HASH_SHA256, M896, strlen(M896), got);
    cr_assert_str_eq(got, "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    digest(KD_HASH_SHA384, M448, strlen(M448), got);
    cr_assert_str_eq(
        got, "3391fdddfc8dc7393707a65b1b4709397cf8b1d162af05abfe8f450de5f36bc6b0455a8520bc4e6f5fe95b1f"
             "e3c8452b");
    digest(KD_HASH_SHA384, M896, strlen(M896), got);
    cr_assert_str_eq(
        got, "09330c33f71147e83d192fc782cd1b4753111b173b3b05d22fa08086e3b0f712fcc7c71a557e2db966c3e9fa"
             "91746039");
    digest(KD_HASH_SHA512, M448, strlen(M448), got);
    cr_assert_str_eq(
        got, "204a8fc6dda82f0a0ced7beb8e08a41657c16ef468b228a8279be331a703c33596fd15c13b1b07f9aa1d3bea"
             "57789ca031ad85c7a71dd70354ec631238ca3445");
    digest(KD_HASH_SHA512, M896, strlen(M896), got);
    cr_assert_str_eq(
        got, "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018501d289e4900f7e4331b99de"
             "c4b5433ac7d329eeb6dd26545e96e55b874be909");
}

Test(sha2, million_a)
{
    static const char *want256 = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
    static const char *want384 =
        "9d0e1809716474cb086e834e310a4a1ced149e9c00f248527972cec5704c2a5b07b8b3dc38ecc4ebae97"
        "ddd87f3d8985";
    static const char *want512 =
        "e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973ebde0ff244877ea60a4cb0"
        "432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b";
    char *m = malloc(1000000);
    memset(m, 'a', 1000000);
    char got[KD_HASH_MAX_LEN * 2 + 1];
    uint8_t d[KD_HASH_MAX_LEN];

    digest(KD_HASH_SHA256, m, 1000000, got);
    cr_assert_str_eq(got, want256);
    digest(KD_HASH_SHA384, m, 1000000, got);
    cr_assert_str_eq(got, want384);
    digest(KD_HASH_SHA512, m, 1000000, got);
    cr_assert_str_eq(got, want512);

    /* Incrementally, in chunks that straddle block boundaries. */
    struct kd_sha256 c256;
    struct kd_sha512 c384, c512;
    kd_sha256_init(&c256);
    kd_sha384_init(&c384);
    kd_sha512_init(&c512);
    for (size_t off = 0, step = 1; off < 1000000; off += step, step = step % 251 + 7) {
        size_t n = off + step > 1000000 ? 1000000 - off : step;
        kd_sha256_update(&c256, m + off, n);
        kd_sha512_update(&c384, m + off, n);
        kd_sha512_update(&c512, m + off, n);
    }
    kd_sha256_final(&c256, d);
    hex(d, 32, got);
    cr_assert_str_eq(got, want256);
    cr_assert_eq(kd_sha512_final(&c384, d), 48);
    hex(d, 48, got);
    cr_assert_str_eq(got, want384);
    cr_assert_eq(kd_sha512_final(&c512, d), 64);
    hex(d, 64, got);
    cr_assert_str_eq(got, want512);
    free(m);
}

/* Every split of messages around the padding boundaries gives the one-shot digest. */
Test(sha2, every_split)
{
    uint8_t m[300];
    for (size_t i = 0; i < sizeof(m); i++)
        m[i] = (uint8_t)(i * 7 + 3);
    size_t lens[] = {0, 1, 55, 56, 63, 64, 65, 111, 112, 119, 127, 128, 129, 255, 256, 300};
    for (size_t k = 0; k < sizeof(lens) / sizeof(lens[0]); k++) {
        size_t len = lens[k];
        uint8_t one256[32], one512[64], one384[48], d[64];
        kd_sha256(m, len, one256);
        kd_sha512(m, len, one512);
        kd_sha384(m, len, one384);
        for (size_t cut = 0; cut <= len; cut++) {
            struct kd_sha256 a;
            kd_sha256_init(&a);
            kd_sha256_update(&a, m, cut);
            kd_sha256_update(&a, NULL, 0);
            kd_sha256_update(&a, m + cut, len - cut);
            kd_sha256_final(&a, d);
            cr_assert(memcmp(d, one256, 32) == 0, "sha256 len %zu cut %zu", len, cut);
            struct kd_sha512 b;
            kd_sha512_init(&b);
            kd_sha512_update(&b, m, cut);
            kd_sha512_update(&b, m + cut, len - cut);
            kd_sha512_final(&b, d);
            cr_assert(memcmp(d, one512, 64) == 0, "sha512 len %zu cut %zu", len, cut);
            kd_sha384_init(&b);
            kd_sha512_update(&b, m, cut);
            kd_sha512_update(&b, m + cut, len - cut);
            kd_sha512_final(&b, d);
            cr_assert(memcmp(d, one384, 48) == 0, "sha384 len %zu cut %zu", len, cut);
        }
    }
}

/* RFC 4231 section 4: test cases 1-7 (case 5 is truncated to 128 bits). */
struct hmac_case {
    const char *key_hex;
    const char *data;
    const char *data_hex;
    const char *want[3]; /* SHA-256, SHA-384, SHA-512 */
};

static const struct hmac_case rfc4231[] = {
    {"0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
     "Hi There",
     NULL,
     {"b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
      "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6",
      "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cdedaa833b7d6b8a702038b274eaea3f4e4be9d91"
      "4eeb61"
      "f1702e696c203a126854"}},
    {"4a656665",
     "what do ya want for nothing?",
     NULL,
     {"5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
      "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649",
      "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1"
      "a34d4a"
      "6b4b636e070a38bce737"}},
    {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
     NULL,
     "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
     {"773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
      "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b2a5ab39dc13814b94e3ab6e101a34f27",
      "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39bf3e848279a722c806b485a47e67c807b946a3"
      "37bee8"
      "942674278859e13292fb"}},
    {"0102030405060708090a0b0c0d0e0f10111213141516171819",
     NULL,
     "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
     {"82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
      "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e6801dd23c4a7d679ccf8a386c674cffb",
      "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3dba91ca5c11aa25eb4d679275cc5788063a5f197"
      "41120c"
      "4f2de2adebeb10a298dd"}},
    {"0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c",
     "Test With Truncation",
     NULL,
     {"a3b6167473100ee06e0c796c2955552b", "3abf34c3503b2a23a46efc619baef897",
      "415fad6271580a531d4179bc891d87a6"}},
    {NULL,
     "Test Using Larger Than Block-Size Key - Hash Key First",
     NULL,
     {"60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
      "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c60c2ef6ab4030fe8296248df163f44952",
      "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f3526b56d037e05f2598bd0fd2215d6a1e5295e64f"
      "73f63f"
      "0aec8b915a985d786598"}},
    {NULL,
     "This is a test using a larger than block-size key and a larger than block-size data. The key needs to "
     "be "
     "hashed before being used by the HMAC algorithm.",
     NULL,
     {"9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
      "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5a678cc31e799176d3860e6110c46523e",
      "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944b6022cac3c4982b10d5eeb55c3e4de15134676"
      "fb6de0"
      "446065c97440fa8c6a58"}},
};

Test(sha2, hmac_rfc4231)
{
    for (size_t i = 0; i < sizeof(rfc4231) / sizeof(rfc4231[0]); i++) {
        const struct hmac_case *tc = &rfc4231[i];
        uint8_t key[256], data[256], mac[KD_HASH_MAX_LEN];
        size_t klen, dlen;
        if (tc->key_hex != NULL) {
            unhex(tc->key_hex, key, &klen);
        } else {
            klen = 131; /* cases 6 and 7: 131 bytes of 0xaa, longer than either block size */
            memset(key, 0xaa, klen);
        }
        if (tc->data != NULL) {
            dlen = strlen(tc->data);
            memcpy(data, tc->data, dlen);
        } else {
            unhex(tc->data_hex, data, &dlen);
        }
        enum kd_hash_alg algs[3] = {KD_HASH_SHA256, KD_HASH_SHA384, KD_HASH_SHA512};
        for (int a = 0; a < 3; a++) {
            size_t n = kd_hmac(algs[a], key, klen, data, dlen, mac);
            cr_assert_eq(n, kd_hash_len(algs[a]));
            char got[KD_HASH_MAX_LEN * 2 + 1];
            hex(mac, strlen(tc->want[a]) / 2, got); /* case 5 compares the leftmost 128 bits */
            cr_assert_str_eq(got, tc->want[a], "case %zu alg %d", i + 1, a);
        }
    }
}

Test(sha2, hmac_unknown_alg_and_empty_key)
{
    uint8_t mac[KD_HASH_MAX_LEN];
    cr_assert_eq(kd_hmac((enum kd_hash_alg)7, "k", 1, "m", 1, mac), 0);
    cr_assert_eq(kd_hash_len((enum kd_hash_alg)7), 0);
    /* Empty key and message: HMAC-SHA256("", "") (computed with Python's hmac module). */
    cr_assert_eq(kd_hmac(KD_HASH_SHA256, NULL, 0, NULL, 0, mac), 32);
    char got[65];
    hex(mac, 32, got);
    cr_assert_str_eq(got, "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
}

Test(sha2, ct_equal)
{
    uint8_t a[64], b[64];
    memset(a, 0x5a, sizeof(a));
    memcpy(b, a, sizeof(b));
    cr_assert(kd_ct_equal(a, b, 64));
    cr_assert(kd_ct_equal(a, b, 0));
    for (int i = 0; i < 64; i++) {
        for (int bit = 0; bit < 8; bit++) {
            b[i] ^= (uint8_t)(1 << bit);
            cr_assert(!kd_ct_equal(a, b, 64), "byte %d bit %d", i, bit);
            b[i] ^= (uint8_t)(1 << bit);
        }
    }
}

/* ---- JWT: accepted ---------------------------------------------------------------------------- */

/* Tokens made with Python (hmac, hashlib, base64) for secret SHECRET, header {"typ":"JWT","alg":..}
 * and payload {"iss":"gitlab.example.com","aud":"gitlab-kas","iat":1700000000,"nbf":1699999995,
 * "exp":1700000060,"jti":"c0ffee"}. */
static const char *py_hs256 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9."
                              "eyJpc3MiOiJnaXRsYWIuZXhhbXBsZS5jb20iLCJhdWQiOiJnaXRsYWIta2FzIiwiaWF0"
                              "IjoxNzAwMDAwMDAwLCJuYmYiOjE2OTk5OTk5OTUsImV4cCI6MTcwMDAwMDA2MCwianRpIjoiYzBmZm"
                              "VlIn0.WwdFTazYHqiFE67ZQ3LltY_r"
                              "Y2W6lsIKxcGIuH4wcdU";
static const char *py_hs384 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzM4NCJ9."
                              "eyJpc3MiOiJnaXRsYWIuZXhhbXBsZS5jb20iLCJhdWQiOiJnaXRsYWIta2FzIiwiaWF0"
                              "IjoxNzAwMDAwMDAwLCJuYmYiOjE2OTk5OTk5OTUsImV4cCI6MTcwMDAwMDA2MCwianRpIjoiYzBmZm"
                              "VlIn0.H5XIYI_0gGMg92-Gfd-zWvcC"
                              "CCPGFvuC8r95uz1d3NwvOMCtHyDmW-RRApGmqEKT";
static const char *py_hs512 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzUxMiJ9."
                              "eyJpc3MiOiJnaXRsYWIuZXhhbXBsZS5jb20iLCJhdWQiOiJnaXRsYWIta2FzIiwiaWF0"
                              "IjoxNzAwMDAwMDAwLCJuYmYiOjE2OTk5OTk5OTUsImV4cCI6MTcwMDAwMDA2MCwianRpIjoiYzBmZm"
                              "VlIn0.mSEA_iUUH40dlU_a4Ku25Q59"
                              "uVOnJN6LifA_EyLrIgdIzHQsMiyp9TwVWdfpMJwKi5Pknym3UkpUS-CDryxFyg";

Test(jwt, python_vectors)
{
    const char *toks[3] = {py_hs256, py_hs384, py_hs512};
    for (int i = 0; i < 3; i++) {
        struct kd_jwt_opts o = opts();
        struct kd_jwt_claims c;
        memset(&c, 0xee, sizeof(c));
        int rc = verify_with(toks[i], &o, &c);
        cr_assert_eq(rc, 0, "%d: %s", i, last_err);
        cr_assert_eq(c.alg, (enum kd_jwt_alg)i);
        cr_assert_eq(c.exp, 1700000060);
        cr_assert(c.has_nbf && c.nbf == 1699999995);
        cr_assert(c.has_iat && c.iat == 1700000000);
        cr_assert_str_eq(c.iss, "gitlab.example.com");
        cr_assert_str_empty(c.sub);
    }
}

Test(jwt, sign_verify_round_trip)
{
    enum kd_jwt_alg algs[3] = {KD_JWT_HS256, KD_JWT_HS384, KD_JWT_HS512};
    for (int i = 0; i < 3; i++) {
        char tok[1024];
        int n = kd_jwt_sign(algs[i], SECRET, strlen(SECRET),
                            "{\"aud\":[\"x\",\"gitlab-kas\"],\"exp\":1700000070,\"sub\":\"agent:7\"}", tok,
                            sizeof(tok));
        cr_assert_gt(n, 0);
        cr_assert_eq((size_t)n, strlen(tok));
        struct kd_jwt_opts o = opts();
        struct kd_jwt_claims c;
        cr_assert_eq(verify_with(tok, &o, &c), 0, "%s", last_err);
        cr_assert_eq(c.alg, algs[i]);
        cr_assert_eq(c.exp, 1700000070);
        cr_assert(!c.has_nbf && !c.has_iat);
        cr_assert_str_eq(c.sub, "agent:7");
        cr_assert_str_empty(c.iss);
    }
    /* The header kd_jwt_sign writes. */
    char tok[256];
    kd_jwt_sign(KD_JWT_HS256, "k", 1, "{}", tok, sizeof(tok));
    cr_assert(strncmp(tok, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.", 41) == 0, "%s", tok);
}

Test(jwt, sign_errors)
{
    char tok[512];
    cr_assert_eq(kd_jwt_sign((enum kd_jwt_alg)3, "k", 1, "{}", tok, sizeof(tok)), -EINVAL);
    int n = kd_jwt_sign(KD_JWT_HS512, "k", 1, "{\"exp\":1}", tok, sizeof(tok));
    cr_assert_gt(n, 0);
    char small[512];
    cr_assert_eq(kd_jwt_sign(KD_JWT_HS512, "k", 1, "{\"exp\":1}", small, (size_t)n), -ENOSPC);
    cr_assert_eq(kd_jwt_sign(KD_JWT_HS512, "k", 1, "{\"exp\":1}", small, (size_t)n + 1), n);
    cr_assert_str_eq(small, tok);
}

Test(jwt, claims_may_be_null_and_err_may_be_null)
{
    struct kd_jwt_opts o = opts();
    cr_assert_eq(kd_jwt_verify(py_hs256, strlen(py_hs256), &o, NULL, NULL, 0), 0);
    o.secret = (const uint8_t *)"nope";
    o.secret_len = 4;
    cr_assert_eq(kd_jwt_verify(py_hs256, strlen(py_hs256), &o, NULL, NULL, 0), -EACCES);
    char tiny[4];
    cr_assert_eq(kd_jwt_verify(py_hs256, strlen(py_hs256), &o, NULL, tiny, sizeof(tiny)), -EACCES);
    cr_assert_str_eq(tiny, "sig");
}

Test(jwt, typ_is_optional_and_case_insensitive)
{
    expect_ok(make("{\"alg\":\"HS256\"}", claims(""), KD_HASH_SHA256, SECRET));
    expect_ok(make("{\"alg\":\"HS256\",\"typ\":\"jwt\"}", claims(""), KD_HASH_SHA256, SECRET));
    expect_ok(make("{\"typ\":\"Jwt\",\"alg\":\"HS384\",\"kid\":{\"a\":[1,2]}}", claims(""), KD_HASH_SHA384,
                   SECRET));
    expect_fail(make("{\"alg\":\"HS256\",\"typ\":\"JWS\"}", claims(""), KD_HASH_SHA256, SECRET), -EACCES,
                "typ");
    expect_fail(make("{\"alg\":\"HS256\",\"typ\":\"JWTX\"}", claims(""), KD_HASH_SHA256, SECRET), -EACCES,
                "typ");
    expect_fail(make("{\"alg\":\"HS256\",\"typ\":1}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL, "typ");
}

Test(jwt, json_extras_are_skipped)
{
    expect_ok(
        make(HS256_HDR,
             claims("\"x\":{\"a\":[1,-2.5e+3,true,false,null,{\"b\":{}}],\"c\":[]},\"y\":[[[]]],"
                    "\"s\":\"q\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00 \xc3\xa9\xf0\x9f\x98\x80\","
                    "\"n\":0,\"m\":-0.0e-0,\"big\":1e400,\"u\":\"\\u0000\""),
             KD_HASH_SHA256, SECRET));
    /* Whitespace between tokens of the JSON text is fine. */
    expect_ok(make(" {\t\"alg\" : \"HS256\" }\r\n",
                   " {\n\"exp\" :1700000070 , \"aud\": [ \"gitlab-kas\" ] } ", KD_HASH_SHA256, SECRET));
    /* An escaped member name means the same member. */
    expect_ok(make(HS256_HDR, "{\"\\u0061ud\":\"gitlab\\u002dkas\",\"e\\u0078p\":1700000070}", KD_HASH_SHA256,
                   SECRET));
}

Test(jwt, decimal_times)
{
    struct kd_jwt_opts o = opts();
    struct kd_jwt_claims c;
    char *t =
        make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":1700000060.75,\"nbf\":1.69999999e9,\"iat\":-1.5}",
             KD_HASH_SHA256, SECRET);
    cr_assert_eq(verify_with(t, &o, &c), 0, "%s", last_err);
    cr_assert_eq(c.exp, 1700000060);
    cr_assert_eq(c.nbf, 1699999990);
    cr_assert_eq(c.iat, -2);
    t = make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":17000000600E-1}", KD_HASH_SHA256, SECRET);
    cr_assert_eq(verify_with(t, &o, &c), 0, "%s", last_err);
    cr_assert_eq(c.exp, 1700000060);
    t = make(HS256_HDR,
             "{\"aud\":\"gitlab-kas\",\"exp\":0."
             "00000000000000000000" /* 20 zeros */ "1700000060e+30}",
             KD_HASH_SHA256, SECRET);
    cr_assert_eq(verify_with(t, &o, &c), 0, "%s", last_err);
    cr_assert_eq(c.exp, 1700000060);
}

/* ---- JWT: signature and algorithm ------------------------------------------------------------- */

Test(jwt, wrong_secret)
{
    expect_fail(make(HS256_HDR, claims(""), KD_HASH_SHA256, "another secret"), -EACCES, "signature mismatch");
    /* One flipped signature character. */
    char t[2048];
    strcpy(t, py_hs256);
    char *last = t + strlen(t) - 2;
    *last = *last == 'A' ? 'B' : 'A';
    expect_fail(t, -EACCES, "signature mismatch");
    /* Payload changed after signing. */
    char *s = make(HS256_HDR, claims(""), KD_HASH_SHA256, SECRET);
    char *u = make(HS256_HDR, claims("\"admin\":true"), KD_HASH_SHA256, "x");
    char mix[4096];
    const char *sig = strrchr(s, '.');
    size_t head = (size_t)(strrchr(u, '.') - u);
    memcpy(mix, u, head);
    strcpy(mix + head, sig);
    expect_fail(mix, -EACCES, "signature mismatch");
}

Test(jwt, signature_of_another_size)
{
    /* HS256 header, signature computed with SHA-512 (64 bytes). */
    expect_fail(make(HS256_HDR, claims(""), KD_HASH_SHA512, SECRET), -EACCES, "signature mismatch");
    expect_fail(make("{\"alg\":\"HS512\"}", claims(""), KD_HASH_SHA256, SECRET), -EACCES,
                "signature mismatch");
    /* Empty signature. */
    expect_fail(make(HS256_HDR, claims(""), -1, SECRET), -EACCES, "signature mismatch");
}

Test(jwt, alg_none)
{
    expect_fail(make("{\"alg\":\"none\"}", claims(""), -1, SECRET), -EACCES, "algorithm none is not allowed");
    expect_fail(make("{\"alg\":\"none\",\"typ\":\"JWT\"}", claims(""), KD_HASH_SHA256, SECRET), -EACCES,
                "algorithm none is not allowed");
    expect_fail(make("{\"alg\":\"None\"}", claims(""), -1, SECRET), -EACCES, "algorithm None is not allowed");
    expect_fail(make("{\"alg\":\"\"}", claims(""), -1, SECRET), -EACCES, "is not allowed");
}

Test(jwt, other_algorithms)
{
    const char *algs[] = {"RS256", "ES256",  "PS256",  "EdDSA", "hs256",
                          "Hs256", "HS256 ", "HS 256", "HS257", "HS1"};
    for (size_t i = 0; i < sizeof(algs) / sizeof(algs[0]); i++) {
        char hdr[64];
        snprintf(hdr, sizeof(hdr), "{\"alg\":\"%s\"}", algs[i]);
        expect_fail(make(hdr, claims(""), KD_HASH_SHA256, SECRET), -EACCES, "is not allowed");
    }
    expect_fail(make("{\"alg\":\"RS256\"}", claims(""), KD_HASH_SHA256, SECRET), -EACCES, "algorithm RS256");
    /* Hostile alg values are shown cut and sanitised. */
    expect_fail(
        make("{\"alg\":\"HS256\\nX-Injected: yes, and a long tail\"}", claims(""), KD_HASH_SHA256, SECRET),
        -EACCES, "algorithm HS256?X-Injecte...");
    cr_assert(strchr(last_err, '\n') == NULL);
    expect_fail(make("{\"alg\":\"HS256\\u0000\"}", claims(""), KD_HASH_SHA256, SECRET), -EACCES, "HS256?");
    expect_fail(make("{\"alg\":256}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL, "alg is not a string");
    expect_fail(make("{\"alg\":null}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL, "alg is not a string");
    expect_fail(make("{\"typ\":\"JWT\"}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL, "header has no alg");
    expect_fail(make("{}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL, "header has no alg");
}

Test(jwt, escaped_alg_is_the_same_alg)
{
    expect_ok(make("{\"alg\":\"HS\\u0032\\u00356\"}", claims(""), KD_HASH_SHA256, SECRET));
}

Test(jwt, crit_header)
{
    expect_fail(make("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", claims(""), KD_HASH_SHA256, SECRET), -EACCES,
                "crit");
    expect_fail(make("{\"alg\":\"HS256\",\"crit\":[],\"b64\":false}", claims(""), KD_HASH_SHA256, SECRET),
                -EACCES, "crit");
}

Test(jwt, no_secret_or_audience_configured)
{
    struct kd_jwt_opts o = opts();
    o.secret_len = 0;
    cr_assert_eq(verify_with(py_hs256, &o, NULL), -EACCES);
    cr_assert(strstr(last_err, "no secret") != NULL);
    o = opts();
    o.audience = NULL;
    cr_assert_eq(verify_with(py_hs256, &o, NULL), -EINVAL);
    o.audience = "";
    cr_assert_eq(verify_with(py_hs256, &o, NULL), -EINVAL);
}

/* ---- JWT: claims ------------------------------------------------------------------------------ */

static char *with_times(const char *fmt, long a, long b)
{
    char p[512];
    snprintf(p, sizeof(p), fmt, a, b);
    return make(HS256_HDR, p, KD_HASH_SHA256, SECRET);
}

Test(jwt, expiry_and_leeway)
{
    const char *f = "{\"aud\":\"gitlab-kas\",\"exp\":%ld%.0ld}";
    expect_ok(with_times(f, NOW + 1, 0));
    expect_ok(with_times(f, NOW - 4, 0)); /* expired 4 s ago, within 5 s of leeway */
    expect_fail(with_times(f, NOW - 5, 0), -EACCES, "token expired 5s ago");
    expect_fail(with_times(f, NOW - 6, 0), -EACCES, "token expired 6s ago");
    expect_fail(with_times(f, NOW - 42, 0), -EACCES, "token expired 42s ago");
    expect_fail(with_times(f, 0, 0), -EACCES, "token expired");
    expect_fail(with_times(f, -100, 0), -EACCES, "token expired");

    struct kd_jwt_opts o = opts();
    o.leeway = 0;
    cr_assert_eq(verify_with(with_times(f, NOW, 0), &o, NULL), -EACCES);
    cr_assert_eq(verify_with(with_times(f, NOW + 1, 0), &o, NULL), 0);
    o.leeway = -10; /* a negative leeway counts as none */
    cr_assert_eq(verify_with(with_times(f, NOW + 1, 0), &o, NULL), 0);
    o.leeway = 3600;
    cr_assert_eq(verify_with(with_times(f, NOW - 3599, 0), &o, NULL), 0);
}

Test(jwt, not_before)
{
    const char *f = "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"nbf\":%ld%.0ld}";
    expect_ok(with_times(f, NOW, 0));
    expect_ok(with_times(f, NOW + 5, 0)); /* within leeway */
    expect_fail(with_times(f, NOW + 6, 0), -EACCES, "not valid yet");
    expect_fail(with_times(f, NOW + 50, 0), -EACCES, "nbf is 50s ahead");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"nbf\":\"soon\"}",
                     KD_HASH_SHA256, SECRET),
                -EINVAL, "nbf is not a number");
    expect_fail(
        make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"iat\":true}", KD_HASH_SHA256, SECRET),
        -EINVAL, "iat is not a number");
}

Test(jwt, exp_required_and_numeric)
{
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\"}", KD_HASH_SHA256, SECRET), -EACCES, "no exp");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"iat\":1700000000}", KD_HASH_SHA256, SECRET),
                -EACCES, "no exp");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":\"1700000100\"}", KD_HASH_SHA256, SECRET),
                -EINVAL, "exp is not a number");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":null}", KD_HASH_SHA256, SECRET), -EINVAL,
                "exp is not a number");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":[1700000100]}", KD_HASH_SHA256, SECRET),
                -EINVAL, "exp is not a number");
}

Test(jwt, huge_numbers)
{
    const char *bad[] = {
        "1e300",
        "1e400",
        "-1e300",
        "1e21",
        "9007199254740993",
        "-9007199254740993",
        ("1000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
         "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"),
        "1e999999999999999999999999"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char p[512];
        snprintf(p, sizeof(p), "{\"aud\":\"gitlab-kas\",\"exp\":%s}", bad[i]);
        expect_fail(make(HS256_HDR, p, KD_HASH_SHA256, SECRET), -EINVAL, "exp is out of range");
        snprintf(p, sizeof(p), "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"nbf\":%s}", bad[i]);
        expect_fail(make(HS256_HDR, p, KD_HASH_SHA256, SECRET), -EINVAL, "nbf is out of range");
    }
    /* Far future but representable: accepted; tiny: zero. */
    expect_ok(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":9007199254740991}", KD_HASH_SHA256, SECRET));
    expect_ok(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":1e15,\"iat\":1e-400,\"nbf\":-1e-500}",
                   KD_HASH_SHA256, SECRET));
    /* NaN and Infinity are not JSON at all. */
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":NaN}", KD_HASH_SHA256, SECRET), -EINVAL,
                "not valid JSON");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":Infinity}", KD_HASH_SHA256, SECRET), -EINVAL,
                "not valid JSON");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":-Infinity}", KD_HASH_SHA256, SECRET),
                -EINVAL, "not valid JSON");
}

Test(jwt, audience)
{
    expect_fail(make(HS256_HDR, "{\"exp\":1700000100}", KD_HASH_SHA256, SECRET), -EACCES, "no aud");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab\",\"exp\":1700000100}", KD_HASH_SHA256, SECRET), -EACCES,
                "audience does not contain gitlab-kas");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas \",\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EACCES, "audience does not contain gitlab-kas");
    expect_fail(make(HS256_HDR, "{\"aud\":\"GITLAB-KAS\",\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EACCES, "audience does not contain gitlab-kas");
    expect_fail(make(HS256_HDR, "{\"aud\":\"gitlab-kas\\u0000\",\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EACCES, "audience does not contain gitlab-kas");
    expect_ok(make(HS256_HDR, "{\"aud\":[\"gitlab-kas\"],\"exp\":1700000100}", KD_HASH_SHA256, SECRET));
    expect_ok(
        make(HS256_HDR, "{\"aud\":[\"a\",\"b\",\"gitlab-kas\"],\"exp\":1700000100}", KD_HASH_SHA256, SECRET));
    expect_fail(make(HS256_HDR, "{\"aud\":[\"a\",\"b\"],\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EACCES, "audience does not contain gitlab-kas");
    expect_fail(make(HS256_HDR, "{\"aud\":[],\"exp\":1700000100}", KD_HASH_SHA256, SECRET), -EACCES,
                "audience does not contain");
    expect_fail(make(HS256_HDR, "{\"aud\":[\"gitlab-kas\",1],\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EINVAL, "aud is not a string or an array of strings");
    expect_fail(make(HS256_HDR, "{\"aud\":[[\"gitlab-kas\"]],\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EINVAL, "aud is not");
    expect_fail(make(HS256_HDR, "{\"aud\":{\"gitlab-kas\":1},\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EINVAL, "aud is not");
    expect_fail(make(HS256_HDR, "{\"aud\":null,\"exp\":1700000100}", KD_HASH_SHA256, SECRET), -EINVAL,
                "aud is not");
    expect_fail(make(HS256_HDR, "{\"aud\":[\"gitlab-kas\",],\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
                -EINVAL, "not valid JSON");
    /* A different configured audience. */
    struct kd_jwt_opts o = opts();
    o.audience = "other";
    cr_assert_eq(verify_with(py_hs256, &o, NULL), -EACCES);
    cr_assert(strstr(last_err, "audience does not contain other") != NULL);
}

Test(jwt, issuer)
{
    struct kd_jwt_opts o = opts();
    o.issuer = "gitlab-kas";
    cr_assert_eq(verify_with(claims(""), &o, NULL), -EINVAL); /* not a token at all */
    cr_assert_eq(
        verify_with(make(HS256_HDR, claims("\"iss\":\"gitlab-kas\""), KD_HASH_SHA256, SECRET), &o, NULL), 0);
    cr_assert_eq(
        verify_with(make(HS256_HDR, claims("\"iss\":\"gitlab.example.com\""), KD_HASH_SHA256, SECRET), &o,
                    NULL),
        -EACCES);
    cr_assert(strstr(last_err, "issuer is not gitlab-kas") != NULL, "%s", last_err);
    cr_assert_eq(verify_with(make(HS256_HDR, claims(""), KD_HASH_SHA256, SECRET), &o, NULL), -EACCES);
    cr_assert(strstr(last_err, "no iss") != NULL, "%s", last_err);
    /* Not checked when no issuer is configured, but still a string. */
    expect_ok(make(HS256_HDR, claims("\"iss\":\"anything\""), KD_HASH_SHA256, SECRET));
    expect_fail(make(HS256_HDR, claims("\"iss\":42"), KD_HASH_SHA256, SECRET), -EINVAL,
                "iss is not a string");
    expect_fail(make(HS256_HDR, claims("\"sub\":{}"), KD_HASH_SHA256, SECRET), -EINVAL,
                "sub is not a string");
}

Test(jwt, long_string_claims_are_not_copied)
{
    char extra[1400], iss[600];
    memset(iss, 'i', 599);
    iss[599] = '\0';
    snprintf(extra, sizeof(extra), "\"iss\":\"%s\",\"sub\":\"%s\"", iss, iss);
    struct kd_jwt_opts o = opts();
    struct kd_jwt_claims c;
    cr_assert_eq(verify_with(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET), &o, &c), 0, "%s",
                 last_err);
    cr_assert_str_empty(c.iss);
    cr_assert_str_empty(c.sub);
    memset(iss + 255, 0, 1); /* exactly 255 bytes: fits */
    snprintf(extra, sizeof(extra), "\"iss\":\"%s\"", iss);
    cr_assert_eq(verify_with(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET), &o, &c), 0, "%s",
                 last_err);
    cr_assert_eq(strlen(c.iss), 255);
}

Test(jwt, duplicate_members)
{
    expect_fail(
        make(HS256_HDR, "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"exp\":1}", KD_HASH_SHA256, SECRET),
        -EINVAL, "duplicate member");
    expect_fail(make(HS256_HDR, "{\"exp\":1,\"aud\":\"gitlab-kas\",\"\\u0065xp\":1700000100}", KD_HASH_SHA256,
                     SECRET),
                -EINVAL, "duplicate member");
    expect_fail(
        make(HS256_HDR, "{\"aud\":\"x\",\"aud\":\"gitlab-kas\",\"exp\":1700000100}", KD_HASH_SHA256, SECRET),
        -EINVAL, "duplicate member");
    expect_fail(make(HS256_HDR, claims("\"jti\":\"a\",\"jti\":\"a\""), KD_HASH_SHA256, SECRET), -EINVAL,
                "duplicate member");
    expect_fail(
        make(HS256_HDR, claims("\"\\ud83d\\ude00\":1,\"\xf0\x9f\x98\x80\":2"), KD_HASH_SHA256, SECRET),
        -EINVAL, "duplicate member");
    expect_fail(make("{\"alg\":\"none\",\"alg\":\"HS256\"}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL,
                "header: duplicate member");
    /* Every escape form compares by the character it stands for. */
    const char *same[][2] = {
        {"a\\nb", "a\\u000ab"},      {"a\\tb", "a\\u0009b"},  {"a\\rb", "a\\u000Db"},
        {"a\\bb", "a\\u0008b"},      {"a\\fb", "a\\u000cb"},  {"a\\/b", "a/b"},
        {"a\\\"b", "a\\u0022b"},     {"a\\\\b", "a\\u005cb"}, {"\\u00e9", "\xc3\xa9"},
        {"\\u20ac", "\xe2\x82\xac"}, {"\\u20AC", "\\u20ac"},
    };
    for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++) {
        char extra[64];
        snprintf(extra, sizeof(extra), "\"%s\":1,\"%s\":2", same[i][0], same[i][1]);
        expect_fail(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET), -EINVAL, "duplicate member");
        snprintf(extra, sizeof(extra), "\"%s\":1,\"%sx\":2", same[i][0], same[i][1]);
        expect_ok(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET));
    }
    expect_ok(make(
        HS256_HDR,
        claims(
            "\"a\\tb\":1,\"a\\rb\":2,\"a\\bb\":3,\"a\\fb\":4,\"a\\nb\":5,\"\xc3\xa9\":6,\"\xe2\x82\xac\":7"),
        KD_HASH_SHA256, SECRET));
    /* Names that differ only in case or by a prefix are different members. */
    expect_ok(make(HS256_HDR, claims("\"Exp\":1,\"ex\":2,\"expx\":3"), KD_HASH_SHA256, SECRET));
}

Test(jwt, too_many_members)
{
    char extra[2000];
    size_t o = 0;
    for (int i = 0; i < KD_JWT_MAX_MEMBERS - 2; i++)
        o += (size_t)snprintf(extra + o, sizeof(extra) - o, "%s\"k%d\":%d", i ? "," : "", i, i);
    expect_ok(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET));
    snprintf(extra + o, sizeof(extra) - o, ",\"one_more\":0");
    expect_fail(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET), -EINVAL, "too many members");
}

Test(jwt, nesting_depth)
{
    char extra[20000];
    /* Top-level object + 15 nested arrays = 16 levels: accepted. */
    size_t n = 0;
    n += (size_t)sprintf(extra + n, "\"deep\":");
    for (int i = 0; i < KD_JWT_MAX_DEPTH - 1; i++)
        extra[n++] = '[';
    for (int i = 0; i < KD_JWT_MAX_DEPTH - 1; i++)
        extra[n++] = ']';
    extra[n] = '\0';
    expect_ok(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET));
    /* 17 levels, mixing objects and arrays. */
    n = (size_t)sprintf(extra, "\"deep\":");
    for (int i = 0; i < KD_JWT_MAX_DEPTH; i++)
        n += (size_t)sprintf(extra + n, i % 2 ? "[" : "{\"a\":");
    n += (size_t)sprintf(extra + n, "1");
    for (int i = KD_JWT_MAX_DEPTH - 1; i >= 0; i--)
        extra[n++] = i % 2 ? ']' : '}';
    extra[n] = '\0';
    expect_fail(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET), -EINVAL, "nested too deeply");
    /* Thousands of brackets: refused early, no deep recursion. */
    n = (size_t)sprintf(extra, "\"deep\":");
    memset(extra + n, '[', 5000);
    extra[n + 5000] = '\0';
    expect_fail(make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET), -EINVAL, "nested too deeply");
    /* Same in the header. */
    expect_fail(make("{\"alg\":\"HS256\",\"x\":[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]}", claims(""),
                     KD_HASH_SHA256, SECRET),
                -EINVAL, "nested too deeply");
}

Test(jwt, bad_json)
{
    const char *bad[] = {
        "",
        "[]",
        "\"aud\"",
        "null",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100}}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100} x",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100}{}",
        "{'aud':'gitlab-kas','exp':1700000100}",
        "{aud:\"gitlab-kas\",\"exp\":1700000100}",
        "{\"aud\":\"gitlab-kas\" \"exp\":1700000100}",
        "{\"aud\" \"gitlab-kas\",\"exp\":1700000100}",
        "{\"aud\":\"gitlab-kas\",\"exp\":01700000100}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100.}",
        "{\"aud\":\"gitlab-kas\",\"exp\":.5}",
        "{\"aud\":\"gitlab-kas\",\"exp\":+1700000100}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100e}",
        "{\"aud\":\"gitlab-kas\",\"exp\":-}",
        "{\"aud\":\"gitlab-kas\",\"exp\":0x10}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":tru}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":True}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":nul}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"unterminated}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"tab\there\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"bad \\x escape\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\\u12\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\\u12g4\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\\ud800\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\\ud800\\u0041\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\\udc00\\ud800\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\xff\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\xc0\xaf\"}",         /* overlong '/' */
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\xed\xa0\x80\"}",     /* UTF-8 surrogate */
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\xf4\x90\x80\x80\"}", /* > U+10FFFF */
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\"\xe2\x82\"}",         /* truncated */
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":[1 2]}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":{\"a\"}}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":{1:2}}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":[}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"x\":\v1}",
        "\xef\xbb\xbf{\"aud\":\"gitlab-kas\",\"exp\":1700000100}", /* a BOM is not allowed either */
        "{\"exp\":1700000100,\"aud\":\"gitlab-kas\\q\"}",          /* bad strings in claims we read */
        "{\"exp\":1700000100,\"aud\":[\"gitlab-kas\",\"\\ud800\"]}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"iss\":\"\xff\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"sub\":\"\x01\"}",
        "{\"aud\":\"gitlab-kas\",\"exp\":1700000100,\"\\x\":1}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = verify(make(HS256_HDR, bad[i], KD_HASH_SHA256, SECRET));
        cr_assert_eq(rc, -EINVAL, "case %zu: rc %d %s", i, rc, last_err);
        cr_assert(strstr(last_err, "payload") != NULL, "case %zu: %s", i, last_err);
    }
    /* And in the header, before any signature work. */
    expect_fail(make("{\"alg\":\"HS256\",}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL,
                "header is not valid JSON");
    expect_fail(make("{\"alg\":\"HS256\"", claims(""), KD_HASH_SHA256, SECRET), -EINVAL,
                "header is not valid JSON");
    expect_fail(make("{\"alg\":\"HS256\",\"typ\":\"J\\uWT\"}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL,
                "header is not valid JSON");
    expect_fail(make("{\"alg\":\"HS\\u32\"}", claims(""), KD_HASH_SHA256, SECRET), -EINVAL,
                "header is not valid JSON");
    /* A NUL byte in the payload. */
    char p[64] = "{\"aud\":\"gitlab-kas\",\"exp\":1700000100}";
    char t[512];
    size_t o = b64url(HS256_HDR, strlen(HS256_HDR), t);
    t[o++] = '.';
    p[37] = '\0';
    o += b64url(p, 38, t + o);
    uint8_t mac[KD_HASH_MAX_LEN];
    kd_hmac(KD_HASH_SHA256, SECRET, strlen(SECRET), t, o, mac);
    t[o++] = '.';
    b64url(mac, 32, t + o);
    expect_fail(t, -EINVAL, "payload is not valid JSON");
}

/* Bad payload JSON under a wrong signature is reported as a signature failure: nothing in the payload
 * is examined before the signature is checked. */
Test(jwt, signature_checked_before_payload)
{
    expect_fail(make(HS256_HDR, "{\"aud\":", KD_HASH_SHA256, "wrong"), -EACCES, "signature mismatch");
    expect_fail(make(HS256_HDR, "{\"exp\":0,\"exp\":0}", KD_HASH_SHA256, "wrong"), -EACCES,
                "signature mismatch");
}

/* ---- JWT: shape ------------------------------------------------------------------------------- */

Test(jwt, wrong_number_of_parts)
{
    char t[2048];
    expect_fail("", -EINVAL, "empty token");
    expect_fail("abc", -EINVAL, "token has 1 parts");
    expect_fail("eyJhbGciOiJIUzI1NiJ9.e30", -EINVAL, "token has 2 parts");
    snprintf(t, sizeof(t), "%s.", py_hs256);
    expect_fail(t, -EINVAL, "token has 4 parts");
    snprintf(t, sizeof(t), "%s.%s", py_hs256, "e30");
    expect_fail(t, -EINVAL, "token has 4 parts");
    expect_fail("..", -EINVAL, "header");
    /* JWE (five parts). */
    expect_fail("eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", -EINVAL, "token has 5 parts");
}

Test(jwt, malformed_base64)
{
    char t[2048];
    const char *dot1 = strchr(py_hs256, '.'), *dot2 = strrchr(py_hs256, '.');
    size_t h = (size_t)(dot1 - py_hs256), p = (size_t)(dot2 - py_hs256);

    /* Characters outside base64url, in each part. */
    const char bad[] = {'+', '/', '=', '*', '!', ' ', '\t', '\n', '\0', (char)0xc3};
    size_t where[3] = {3, h + 5, p + 5};
    const char *part[3] = {"header", "payload", "signature"};
    for (size_t w = 0; w < 3; w++) {
        for (size_t i = 0; i < sizeof(bad); i++) {
            strcpy(t, py_hs256);
            t[where[w]] = bad[i];
            struct kd_jwt_opts o = opts();
            int rc = kd_jwt_verify(t, strlen(py_hs256), &o, NULL, last_err, sizeof(last_err));
            /* A changed payload character fails the signature first, which is also a refusal. */
            if (w == 1) {
                cr_assert(rc == -EACCES, "part %zu char %zu: %d %s", w, i, rc, last_err);
            } else {
                cr_assert_eq(rc, -EINVAL, "part %zu char %zu: %d %s", w, i, rc, last_err);
                cr_assert(strstr(last_err, part[w]) != NULL, "%s", last_err);
            }
        }
    }
    /* Correctly signed but an invalid payload encoding. */
    char hdr64[128], sig64[128];
    b64url(HS256_HDR, strlen(HS256_HDR), hdr64);
    const char *payloads[] = {"e30=", "e30*", "e",
                              "e31"}; /* padded, bad char, impossible length, stray bits */
    for (size_t i = 0; i < 4; i++) {
        uint8_t mac[KD_HASH_MAX_LEN];
        snprintf(t, sizeof(t), "%s.%s", hdr64, payloads[i]);
        kd_hmac(KD_HASH_SHA256, SECRET, strlen(SECRET), t, strlen(t), mac);
        b64url(mac, 32, sig64);
        snprintf(t + strlen(t), sizeof(t) - strlen(t), ".%s", sig64);
        expect_fail(t, -EINVAL, "payload is not valid base64url");
    }
    /* Padded signature. */
    snprintf(t, sizeof(t), "%s=", py_hs256);
    expect_fail(t, -EINVAL, "signature is not valid base64url");
    /* Non-zero unused bits in the last signature character ('U' -> 'V' keeps the decoded bytes). */
    strcpy(t, py_hs256);
    cr_assert_eq(t[strlen(t) - 1], 'U');
    t[strlen(t) - 1] = 'V';
    expect_fail(t, -EINVAL, "signature is not valid base64url");
}

Test(jwt, whitespace)
{
    char t[2048];
    snprintf(t, sizeof(t), " %s", py_hs256);
    expect_fail(t, -EINVAL, "header is not valid base64url");
    snprintf(t, sizeof(t), "%s\n", py_hs256);
    expect_fail(t, -EINVAL, "signature is not valid base64url");
    snprintf(t, sizeof(t), "%s ", py_hs256);
    expect_fail(t, -EINVAL, "signature is not valid base64url");
    snprintf(t, sizeof(t), "Bearer %s", py_hs256);
    expect_fail(t, -EINVAL, "header is not valid base64url");
    const char *dot = strchr(py_hs256, '.');
    snprintf(t, sizeof(t), "%.*s. %s", (int)(dot - py_hs256), py_hs256, dot + 1);
    expect_fail(t, -EACCES, "signature mismatch"); /* the payload is only decoded after the signature */
}

Test(jwt, length_argument_is_respected)
{
    /* The token in a larger buffer (as from an HTTP header) with junk after it. */
    char t[2048];
    snprintf(t, sizeof(t), "%s, junk", py_hs256);
    struct kd_jwt_opts o = opts();
    cr_assert_eq(kd_jwt_verify(t, strlen(py_hs256), &o, NULL, last_err, sizeof(last_err)), 0, "%s", last_err);
    cr_assert_neq(kd_jwt_verify(t, strlen(py_hs256) - 1, &o, NULL, last_err, sizeof(last_err)), 0);
}

Test(jwt, too_long)
{
    char *extra = malloc(KD_JWT_MAX_LEN);
    memcpy(extra, "\"pad\":\"", 7);
    size_t n = 7 + KD_JWT_MAX_LEN * 3 / 4 - 50;
    memset(extra + 7, 'p', n - 7);
    strcpy(extra + n, "\"");
    char *t = make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET);
    cr_assert_gt(strlen(t), KD_JWT_MAX_LEN);
    expect_fail(t, -EINVAL, "more than 8192");
    /* Just below the limit is fine. */
    extra[n - 300] = '"';
    extra[n - 299] = '\0';
    t = make(HS256_HDR, claims(extra), KD_HASH_SHA256, SECRET);
    cr_assert_leq(strlen(t), KD_JWT_MAX_LEN);
    expect_ok(t);
    free(extra);
}

/* ---- secret file ------------------------------------------------------------------------------ */

static char *secret_file(const void *content, size_t len)
{
    static char path[4][64];
    static int slot;
    char *p = path[slot++ % 4];
    strcpy(p, "/tmp/kd_jwt_secret_XXXXXX");
    int fd = mkstemp(p);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, content, len), (ssize_t)len);
    close(fd);
    return p;
}

static int load(const char *content, uint8_t *out, size_t cap, size_t *len, char *err)
{
    char *p = secret_file(content, strlen(content));
    int rc = kd_jwt_secret_load(p, out, cap, len, err, 256);
    if (rc < 0)
        cr_assert(strstr(err, p) != NULL, "error does not name the path: %s", err);
    unlink(p);
    return rc;
}

Test(jwt_secret, gitlab_format)
{
    uint8_t s[64];
    size_t n = 0;
    char err[256];
    /* What GitLab writes: Base64.strict_encode64(SecureRandom.random_bytes(32)) and a newline. */
    cr_assert_eq(load("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n", s, sizeof(s), &n, err), 0, "%s", err);
    cr_assert_eq(n, 32);
    cr_assert(memcmp(s, SECRET, 32) == 0);
    cr_assert_eq(load("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", s, sizeof(s), &n, err), 0);
    cr_assert_eq(load("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY", s, sizeof(s), &n, err), 0);
    cr_assert_eq(load("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\r\n \t\n", s, sizeof(s), &n, err), 0);
    cr_assert_eq(n, 32);
    cr_assert_eq(load("+/+/", s, sizeof(s), &n, err), 0);
    cr_assert_eq(n, 3);
    cr_assert(memcmp(s, "\xfb\xff\xbf", 3) == 0);
    cr_assert_eq(load("YQ==", s, sizeof(s), &n, err), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(s[0], 'a');

    /* Loaded secret verifies the Python tokens. */
    cr_assert_eq(load("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n", s, sizeof(s), &n, err), 0);
    struct kd_jwt_opts o = opts();
    o.secret = s;
    o.secret_len = n;
    cr_assert_eq(verify_with(py_hs512, &o, NULL), 0, "%s", last_err);
}

Test(jwt_secret, rejections)
{
    uint8_t s[64];
    size_t n = 0;
    char err[256];
    cr_assert_eq(load("", s, sizeof(s), &n, err), -EINVAL);
    cr_assert(strstr(err, "empty") != NULL);
    cr_assert_eq(load("\n\n", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("=", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("====", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("MDEy-_", s, sizeof(s), &n, err), -EINVAL); /* url alphabet */
    cr_assert(strstr(err, "base64") != NULL);
    cr_assert_eq(load(" MDEy", s, sizeof(s), &n, err), -EINVAL); /* leading whitespace */
    cr_assert_eq(load("MD Ey", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("MDEyM", s, sizeof(s), &n, err), -EINVAL); /* impossible length */
    cr_assert_eq(load("YR==", s, sizeof(s), &n, err), -EINVAL);  /* stray bits */
    cr_assert_eq(load("YQ=", s, sizeof(s), &n, err), -EINVAL);   /* half padding */
    cr_assert_eq(load("YQ===", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("Y===", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("YQ==YQ==", s, sizeof(s), &n, err), -EINVAL);
    cr_assert_eq(load("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", s, 31, &n, err), -ENOSPC);

    char big[5000];
    memset(big, 'A', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    cr_assert_eq(load(big, s, sizeof(s), &n, err), -EFBIG);

    cr_assert_eq(kd_jwt_secret_load("/nonexistent/kd/secret", s, sizeof(s), &n, err, sizeof(err)), -ENOENT);
    cr_assert(strstr(err, "/nonexistent/kd/secret") != NULL, "%s", err);
    cr_assert_eq(kd_jwt_secret_load("/tmp", s, sizeof(s), &n, err, sizeof(err)), -EISDIR);
    cr_assert(strstr(err, "/tmp") != NULL, "%s", err);
}

/* ---- kd_jwt_cache ----------------------------------------------------------------------------- */

static struct kd_jwt_cache_stats cstats(const struct kd_jwt_cache *c)
{
    struct kd_jwt_cache_stats st;
    kd_jwt_cache_stats(c, &st);
    cr_assert_eq(kd_jwt_cache_validate(c), 0);
    return st;
}

static int cverify(struct kd_jwt_cache *c, const char *tok, const struct kd_jwt_opts *o,
                   struct kd_jwt_claims *out)
{
    memset(last_err, 'X', sizeof(last_err));
    int rc = kd_jwt_cache_verify(c, tok, strlen(tok), o, out, last_err, sizeof(last_err));
    cr_assert(memchr(last_err, '\0', sizeof(last_err)) != NULL, "err not terminated");
    if (rc == 0)
        cr_assert_str_empty(last_err);
    if (c != NULL)
        cr_assert_eq(kd_jwt_cache_validate(c), 0);
    return rc;
}

/* A distinct valid token per n (the jti differs). */
static char *cache_token(int n, long exp)
{
    char p[256];
    snprintf(p, sizeof(p), "{\"aud\":\"gitlab-kas\",\"exp\":%ld,\"jti\":\"t%d\",\"sub\":\"s%d\"}", exp, n, n);
    return make(HS256_HDR, p, KD_HASH_SHA256, SECRET);
}

Test(jwt_cache, hit_gives_the_same_claims)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(4);
    cr_assert_not_null(c);
    struct kd_jwt_opts o = opts();
    struct kd_jwt_claims a, b, full;
    memset(&a, 0x11, sizeof(a));
    memset(&b, 0x22, sizeof(b));
    cr_assert_eq(verify_with(py_hs256, &o, &full), 0);
    cr_assert_eq(cverify(c, py_hs256, &o, &a), 0, "%s", last_err);
    struct kd_jwt_cache_stats st = cstats(c);
    cr_assert_eq(st.misses, 1);
    cr_assert_eq(st.hits, 0);
    cr_assert_eq(st.entries, 1);
    cr_assert_eq(cverify(c, py_hs256, &o, &b), 0, "%s", last_err);
    st = cstats(c);
    cr_assert_eq(st.hits, 1);
    cr_assert_eq(st.misses, 1);
    cr_assert_eq(memcmp(&a, &full, sizeof(a)), 0);
    cr_assert_eq(memcmp(&b, &full, sizeof(b)), 0);
    cr_assert_eq(cverify(c, py_hs256, &o, NULL), 0); /* claims may be NULL */
    kd_jwt_cache_free(c);
    kd_jwt_cache_free(NULL);
    cr_assert_null(kd_jwt_cache_new(0));
    /* No cache: plain verification. */
    cr_assert_eq(cverify(NULL, py_hs256, &o, NULL), 0);
    o.secret_len = 3;
    cr_assert_eq(cverify(NULL, py_hs256, &o, NULL), -EACCES);
}

Test(jwt_cache, expired_token_in_cache_is_refused)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(4);
    struct kd_jwt_opts o = opts();
    const char *tok = cache_token(1, NOW + 60);
    cr_assert_eq(cverify(c, tok, &o, NULL), 0);
    cr_assert_eq(cverify(c, tok, &o, NULL), 0);
    cr_assert_eq(cstats(c).hits, 1);
    /* The clock moves past exp + leeway: the cached entry must not be served. */
    o.now = NOW + 60 + 4;
    cr_assert_eq(cverify(c, tok, &o, NULL), 0); /* still within the 5 s of leeway */
    o.now = NOW + 60 + 5;
    cr_assert_eq(cverify(c, tok, &o, NULL), -EACCES);
    cr_assert(strstr(last_err, "token expired 5s ago") != NULL, "%s", last_err);
    struct kd_jwt_cache_stats st = cstats(c);
    cr_assert_eq(st.expired, 1);
    cr_assert_eq(st.entries, 0, "an expired entry is dropped");
    /* Leeway is the caller's, per call: with none, the token is refused earlier. */
    o = opts();
    cr_assert_eq(cverify(c, tok, &o, NULL), 0); /* full verification again, cached again */
    cr_assert_eq(cstats(c).misses, 2);
    o.now = NOW + 60;
    o.leeway = 0;
    cr_assert_eq(cverify(c, tok, &o, NULL), -EACCES);
    /* A token that was refused is never kept. */
    o = opts();
    const char *old = cache_token(2, NOW - 30);
    cr_assert_eq(cverify(c, old, &o, NULL), -EACCES);
    cr_assert_eq(cverify(c, old, &o, NULL), -EACCES);
    st = cstats(c);
    cr_assert_eq(st.entries, 0, "the entry refused under leeway 0 was dropped; refusals are not kept");
    cr_assert_eq(st.hits, 2);
    cr_assert_eq(st.expired, 2);
    kd_jwt_cache_free(c);
}

Test(jwt_cache, not_before_rechecked_on_hit)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(4);
    struct kd_jwt_opts o = opts();
    char p[256];
    snprintf(p, sizeof(p), "{\"aud\":\"gitlab-kas\",\"exp\":%d,\"nbf\":%d}", NOW + 100, NOW);
    const char *tok = make(HS256_HDR, p, KD_HASH_SHA256, SECRET);
    cr_assert_eq(cverify(c, tok, &o, NULL), 0);
    o.now = NOW - 6; /* the clock went back: nbf is ahead again */
    cr_assert_eq(cverify(c, tok, &o, NULL), -EACCES);
    cr_assert(strstr(last_err, "not valid yet") != NULL, "%s", last_err);
    cr_assert_eq(cstats(c).expired, 1);
    kd_jwt_cache_free(c);
}

Test(jwt_cache, different_signature_is_not_accepted)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(4);
    struct kd_jwt_opts o = opts();
    char p[256];
    snprintf(p, sizeof(p), "{\"aud\":\"gitlab-kas\",\"exp\":%d}", NOW + 100);
    char good[1024], forged[1024];
    snprintf(good, sizeof(good), "%s", make(HS256_HDR, p, KD_HASH_SHA256, SECRET));
    snprintf(forged, sizeof(forged), "%s", make(HS256_HDR, p, KD_HASH_SHA256, "another secret"));
    cr_assert_eq(strlen(good), strlen(forged));
    cr_assert_eq(cverify(c, good, &o, NULL), 0);
    cr_assert_eq(cverify(c, good, &o, NULL), 0);
    /* Same header and payload, same length, another signature: verified in full, refused. */
    cr_assert_eq(cverify(c, forged, &o, NULL), -EACCES);
    cr_assert(strstr(last_err, "signature mismatch") != NULL, "%s", last_err);
    /* One changed character in the signature of the cached token. */
    char flipped[1024];
    snprintf(flipped, sizeof(flipped), "%s", good);
    size_t n = strlen(flipped);
    flipped[n - 2] = flipped[n - 2] == 'A' ? 'B' : 'A';
    cr_assert_lt(cverify(c, flipped, &o, NULL), 0);
    /* A prefix of the cached token (same bytes, shorter). */
    flipped[0] = '\0';
    memcpy(flipped, good, n - 1);
    flipped[n - 1] = '\0';
    cr_assert_lt(cverify(c, flipped, &o, NULL), 0);
    struct kd_jwt_cache_stats st = cstats(c);
    cr_assert_eq(st.hits, 1);
    cr_assert_eq(st.entries, 1);
    kd_jwt_cache_free(c);
}

Test(jwt_cache, bound_to_secret_audience_and_issuer)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(4);
    struct kd_jwt_opts o = opts();
    cr_assert_eq(cverify(c, py_hs256, &o, NULL), 0);
    cr_assert_eq(cstats(c).entries, 1);
    /* Another secret: the cached token does not count. */
    struct kd_jwt_opts o2 = o;
    o2.secret = (const uint8_t *)"0123456789abcdef0123456789abcdeX";
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), -EACCES);
    cr_assert_eq(cstats(c).entries, 0);
    cr_assert_eq(cverify(c, py_hs256, &o, NULL), 0);
    cr_assert_eq(cstats(c).hits, 0);
    /* Another audience. */
    o2 = o;
    o2.audience = "someone-else";
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), -EACCES);
    cr_assert(strstr(last_err, "audience") != NULL, "%s", last_err);
    /* An issuer required that the token does not carry. */
    cr_assert_eq(cverify(c, py_hs256, &o, NULL), 0);
    o2 = o;
    o2.issuer = "gitlab.other.com";
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), -EACCES);
    o2.issuer = "gitlab.example.com";
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), 0);
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), 0);
    struct kd_jwt_cache_stats st = cstats(c);
    cr_assert_eq(st.hits, 1);
    /* Configuration errors give kd_jwt_verify's answers. */
    o2.audience = NULL;
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), -EINVAL);
    o2 = o;
    o2.secret_len = 0;
    cr_assert_eq(cverify(c, py_hs256, &o2, NULL), -EACCES);
    kd_jwt_cache_free(c);
}

Test(jwt_cache, eviction_is_least_recently_used)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(2);
    struct kd_jwt_opts o = opts();
    char t1[512], t2[512], t3[512];
    snprintf(t1, sizeof(t1), "%s", cache_token(1, NOW + 100));
    snprintf(t2, sizeof(t2), "%s", cache_token(2, NOW + 100));
    snprintf(t3, sizeof(t3), "%s", cache_token(3, NOW + 100));
    cr_assert_eq(cverify(c, t1, &o, NULL), 0);
    cr_assert_eq(cverify(c, t2, &o, NULL), 0);
    cr_assert_eq(cverify(c, t1, &o, NULL), 0); /* t1 is now the most recent */
    cr_assert_eq(cverify(c, t3, &o, NULL), 0); /* evicts t2 */
    struct kd_jwt_cache_stats st = cstats(c);
    cr_assert_eq(st.entries, 2);
    cr_assert_eq(st.capacity, 2);
    cr_assert_eq(st.evictions, 1);
    cr_assert_eq(st.hits, 1);
    cr_assert_eq(st.misses, 3);
    cr_assert_eq(cverify(c, t1, &o, NULL), 0);
    cr_assert_eq(cverify(c, t3, &o, NULL), 0);
    cr_assert_eq(cstats(c).hits, 3);
    cr_assert_eq(cverify(c, t2, &o, NULL), 0); /* a miss: verified again, evicts t1 */
    st = cstats(c);
    cr_assert_eq(st.misses, 4);
    cr_assert_eq(st.evictions, 2);
    /* Many tokens through a small cache: bounded. */
    for (int i = 10; i < 60; i++)
        cr_assert_eq(cverify(c, cache_token(i, NOW + 100), &o, NULL), 0);
    st = cstats(c);
    cr_assert_eq(st.entries, 2);
    cr_assert_eq(st.evictions, 52);
    kd_jwt_cache_free(c);
}

Test(jwt_cache, long_tokens_are_verified_not_kept)
{
    struct kd_jwt_cache *c = kd_jwt_cache_new(2);
    struct kd_jwt_opts o = opts();
    char pad[KD_JWT_CACHE_TOKEN_MAX + 16];
    memset(pad, 'a', sizeof(pad) - 1);
    pad[sizeof(pad) - 1] = '\0';
    char p[KD_JWT_CACHE_TOKEN_MAX + 128];
    snprintf(p, sizeof(p), "{\"aud\":\"gitlab-kas\",\"exp\":%d,\"pad\":\"%s\"}", NOW + 100, pad);
    const char *tok = make(HS256_HDR, p, KD_HASH_SHA256, SECRET);
    cr_assert_gt(strlen(tok), KD_JWT_CACHE_TOKEN_MAX);
    cr_assert_eq(cverify(c, tok, &o, NULL), 0);
    cr_assert_eq(cverify(c, tok, &o, NULL), 0);
    struct kd_jwt_cache_stats st = cstats(c);
    cr_assert_eq(st.entries, 0);
    cr_assert_eq(st.hits, 0);
    kd_jwt_cache_free(c);
}

/* md_fuzz.c — call metadata both ways through shards/route.c, untrusted both ways:
 *  (a) kd_kas_md_headers: an md blob (an agent's header or trailer metadata from the tunnel) to the
 *      HTTP/2 headers of GitLab's call;
 *  (b) kd_kas_request_md_blob: GitLab's request headers to the md blob sent to the agent, then that
 *      blob through (a) again.
 * Input: (a) takes the whole input as a blob. (b) splits it into headers at '\n', name and value at
 * the first ':' after the name's first byte (so ":path:/x" is a pseudo header), at most 256; a line
 * "*<byte>name:value" is that header <byte> times over (many values of one key, the 64-value limits,
 * are then one mutation away).
 * Checks, (a): every header has a valid gRPC key (lower case), is not a transport header, and has a
 * printable ASCII value or, for a -bin key, canonical unpadded standard base64; no value that meets
 * those rules is lost (up to the 64 headers asked for); names and values lie inside the arena, and
 * nothing is written past it: for this driver the chunkpool's malloc-shaped calls are plain malloc
 * (meson.build wraps them), so AddressSanitizer knows the arena's exact size.
 * (b): the blob is well formed, holds no transport, kas-hop-* or authorization key, and the values
 * of a key form one run; through (a) every other key with a valid name comes back with its values in
 * order: printable ones byte-exact, -bin ones decoded (grpc-go's rules: padding optional but exact,
 * stray bits ignored, undecodable values dropped) and re-encoded, so the bytes are kept exactly.
 * The oracle below is written from those rules, not from route.c. */
#include <malloc.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/chunkpool.h"
#include "core/h2.h"
#include "shards/kas.h"
#include "shards/tunnel_codec.h"
#include "test/fuzz/fuzz.h"
#include "test/fuzz/hlist.h"

/* ---- the chunkpool as plain malloc (linked with --wrap, see meson.build) ---- */

void *__wrap_kd_chunkpool_malloc(size_t size);
void *__wrap_kd_chunkpool_calloc(size_t n, size_t size);
void *__wrap_kd_chunkpool_realloc(void *p, size_t size);
void __wrap_kd_chunkpool_free(void *p);

void *__wrap_kd_chunkpool_malloc(size_t size)
{
    return malloc(size);
}

void *__wrap_kd_chunkpool_calloc(size_t n, size_t size)
{
    return calloc(n, size);
}

void *__wrap_kd_chunkpool_realloc(void *p, size_t size)
{
    return realloc(p, size);
}

void __wrap_kd_chunkpool_free(void *p)
{
    free(p);
}

/* ---- the rules ---- */

#define CAP  64           /* headers kd_kas_md_headers may return (route.c passes 64 too) */
#define VBUF (CAP * 5500) /* expected -bin values, re-encoded: CAP values of 4 KiB at most */

static bool is(const char *k, size_t n, const char *s)
{
    return strlen(s) == n && memcmp(k, s, n) == 0;
}

/* Transport headers, never call metadata. route.c has its own list: this one is the rule the
 * driver holds route.c to, written again on purpose. */
static bool transport(const char *k, size_t n)
{
    static const char *const names[] = {
        "content-type", "te",           "grpc-timeout",    "grpc-encoding", "grpc-accept-encoding",
        "grpc-status",  "grpc-message", "connection",      "keep-alive",    "transfer-encoding",
        "upgrade",      "host",         "proxy-connection"};
    if (n > 0 && k[0] == ':')
        return true;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (is(k, n, names[i]))
            return true;
    return false;
}

/* Not sent to the agent: transport, the routing metadata, GitLab's credential. */
static bool withheld(const char *k, size_t n)
{
    return transport(k, n) || (n >= 8 && memcmp(k, "kas-hop-", 8) == 0) || is(k, n, "authorization");
}

static bool key_valid(const char *k, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((k[i] >= 'a' && k[i] <= 'z') || (k[i] >= '0' && k[i] <= '9') || k[i] == '-' || k[i] == '_' ||
              k[i] == '.'))
            return false;
    return true;
}

/* kasd's rule: a key longer than "-bin" that ends in it. */
static bool bin_key(const char *k, size_t n)
{
    return n > 4 && memcmp(k + n - 4, "-bin", 4) == 0;
}

static bool printable(const uint8_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] < 0x20 || v[i] > 0x7e)
            return false;
    return true;
}

static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int sym(char c)
{
    const char *p = c != '\0' ? strchr(abc, c) : NULL;
    return p != NULL ? (int)(p - abc) : -1;
}

/* grpc-go: StdEncoding when the length is a multiple of 4 (padding, if any, exact), else
 * RawStdEncoding; the unused bits of the last symbol are ignored. -1 if it does not decode. */
static long b64_decode(const char *in, size_t n, uint8_t *out)
{
    size_t pad = 0;
    if (n % 4 == 0 && n > 0 && in[n - 1] == '=')
        pad = in[n - 2] == '=' ? 2 : 1;
    n -= pad;
    if (n % 4 == 1)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        size_t q = n - i < 4 ? n - i : 4;
        uint32_t v = 0;
        for (size_t j = 0; j < 4; j++) {
            int s = j < q ? sym(in[i + j]) : 0;
            if (s < 0)
                return -1;
            v = v << 6 | (uint32_t)s;
        }
        for (size_t j = 0; j + 1 < q; j++)
            out[o++] = (uint8_t)(v >> (16 - 8 * j));
    }
    return (long)o;
}

static size_t b64_encode(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        size_t q = n - i < 3 ? n - i : 3;
        uint32_t v = (uint32_t)in[i] << 16 | (q > 1 ? (uint32_t)in[i + 1] << 8 : 0) | (q > 2 ? in[i + 2] : 0);
        for (size_t j = 0; j <= q; j++)
            out[o++] = abc[(v >> (18 - 6 * j)) & 63];
    }
    return o;
}

/* ---- (a) ---- */

static bool inside(const char *p, size_t n, const char *base, size_t size)
{
    return p >= base && n <= size && (size_t)(p - base) <= size - n;
}

/* What (a) must give for a blob: every value (as kd_tun_blob_each, tunnel_fuzz's subject, walks
 * them) of a valid, non-transport key that is printable or under a -bin key, encoded, up to CAP. */
struct bexp {
    struct kd_h2_header *e;
    size_t n;
    char *vbuf;
    size_t vo;
};

static int blob_expect(void *ud, const char *k, size_t klen, const uint8_t *v, size_t vlen)
{
    struct bexp *x = ud;
    bool bin = bin_key(k, klen);
    if (x->n == CAP || !key_valid(k, klen) || transport(k, klen) || (!bin && !printable(v, vlen)))
        return 0;
    const char *ev = (const char *)v;
    size_t el = vlen;
    if (bin) {
        CHECK(x->vo + vlen / 3 * 4 + 4 <= VBUF); /* the driver's own buffer, never short */
        ev = x->vbuf + x->vo;
        el = b64_encode(v, vlen, x->vbuf + x->vo);
        x->vo += el;
    }
    x->e[x->n++] = (struct kd_h2_header){k, klen, ev, el};
    return 0;
}

static void same_headers(const struct kd_h2_header *h, size_t n, const struct kd_h2_header *e, size_t ne)
{
    CHECK(n == ne);
    for (size_t i = 0; i < n; i++) {
        CHECK(h[i].namelen == e[i].namelen && memcmp(h[i].name, e[i].name, e[i].namelen) == 0);
        CHECK(h[i].valuelen == e[i].valuelen && memcmp(h[i].value, e[i].value, e[i].valuelen) == 0);
    }
}

static size_t to_headers(const uint8_t *blob, size_t len, struct kd_h2_header *h, char **arena)
{
    size_t n = kd_kas_md_headers(blob, len, h, CAP, arena);
    CHECK(n <= CAP);
    CHECK(n == 0 || *arena != NULL);
    size_t asize = *arena != NULL ? malloc_usable_size(*arena) : 0; /* exact under AddressSanitizer */
    for (size_t i = 0; i < n; i++) {
        CHECK(inside(h[i].name, h[i].namelen, *arena, asize) &&
              inside(h[i].value, h[i].valuelen, *arena, asize));
        CHECK(key_valid(h[i].name, h[i].namelen) && !transport(h[i].name, h[i].namelen));
        const uint8_t *v = (const uint8_t *)h[i].value;
        size_t vl = h[i].valuelen;
        if (!bin_key(h[i].name, h[i].namelen)) {
            CHECK(printable(v, vl));
            continue;
        }
        CHECK(vl % 4 != 1);
        for (size_t j = 0; j < vl; j++)
            CHECK(sym((char)v[j]) >= 0);
        if (vl % 4 != 0) /* canonical: the unused low bits of the last symbol are zero */
            CHECK((sym((char)v[vl - 1]) & (vl % 4 == 2 ? 15 : 3)) == 0);
    }
    static struct kd_h2_header e[CAP];
    static char vbuf[VBUF];
    struct bexp x = {e, 0, vbuf, 0};
    kd_tun_blob_each(blob, len, blob_expect, &x);
    same_headers(h, n, e, x.n);
    return n;
}

/* ---- (b) ---- */

struct blobcheck {
    const char *keys[FUZZ_HLIST_MAX];
    size_t klens[FUZZ_HLIST_MAX], nkeys;
    size_t values;
};

static int blob_value(void *ud, const char *k, size_t klen, const uint8_t *v, size_t vlen)
{
    struct blobcheck *c = ud;
    CHECK(!withheld(k, klen));
    c->values++;
    if (c->nkeys > 0 && c->klens[c->nkeys - 1] == klen && memcmp(c->keys[c->nkeys - 1], k, klen) == 0)
        return 0;
    for (size_t i = 0; i < c->nkeys; i++) /* a new run: the key must not have had one before */
        CHECK(c->klens[i] != klen || memcmp(c->keys[i], k, klen) != 0);
    CHECK(c->nkeys < FUZZ_HLIST_MAX);
    c->keys[c->nkeys] = k;
    c->klens[c->nkeys++] = klen;
    return 0;
}

/* The headers (a) must give back for l, in order; values point into vbuf. */
static size_t expect(const struct fuzz_hlist *l, struct kd_h2_header *e, size_t cap, char *vbuf)
{
    static uint8_t dec[4096];
    size_t n = 0, vo = 0;
    for (size_t i = 0; i < l->n; i++) {
        const struct kd_h2_header *h = &l->h[i];
        bool first = true;
        for (size_t j = 0; j < i && first; j++)
            first = !(l->h[j].namelen == h->namelen && memcmp(l->h[j].name, h->name, h->namelen) == 0);
        if (!first || withheld(h->name, h->namelen))
            continue;
        bool bin = bin_key(h->name, h->namelen);
        size_t kept = 0; /* values of this key in the blob: 64 at most */
        for (size_t j = i; j < l->n && kept < 64; j++) {
            const struct kd_h2_header *v = &l->h[j];
            if (v->namelen != h->namelen || memcmp(v->name, h->name, h->namelen) != 0)
                continue;
            if (bin) {
                long dl = b64_decode(v->value, v->valuelen, dec);
                if (dl < 0)
                    continue;
                kept++;
                if (key_valid(h->name, h->namelen) && n < cap) {
                    CHECK(vo + (size_t)dl / 3 * 4 + 4 <= VBUF);
                    size_t el = b64_encode(dec, (size_t)dl, vbuf + vo);
                    e[n++] = (struct kd_h2_header){h->name, h->namelen, vbuf + vo, el};
                    vo += el;
                }
            } else {
                kept++;
                if (key_valid(h->name, h->namelen) && printable((const uint8_t *)v->value, v->valuelen) &&
                    n < cap)
                    e[n++] = *v;
            }
        }
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096)
        return 0;
    struct kd_h2_header h[CAP], e[CAP];
    char *arena = NULL;

    /* (a) on the input itself */
    to_headers(data, size, h, &arena);
    kd_chunkpool_free(arena);

    /* (b) */
    static struct fuzz_hlist l;
    l.n = 0;
    const char *p = (const char *)data, *end = p + size;
    while (p < end && l.n < FUZZ_HLIST_MAX) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end, *q = p;
        size_t rep = 1;
        if (le - q >= 2 && q[0] == '*') {
            rep = (uint8_t)q[1];
            q += 2;
        }
        const char *colon = le - q > 1 ? memchr(q + 1, ':', (size_t)(le - q - 1)) : NULL;
        for (size_t r = 0; colon != NULL && r < rep && l.n < FUZZ_HLIST_MAX; r++)
            l.h[l.n++] = (struct kd_h2_header){q, (size_t)(colon - q), colon + 1, (size_t)(le - colon - 1)};
        p = nl ? nl + 1 : end;
    }
    size_t blen = 0;
    uint8_t *blob = kd_kas_request_md_blob(fuzz_hlist_get, &l, &blen);
    CHECK(blob != NULL);
    static struct blobcheck bc;
    bc.nkeys = bc.values = 0;
    CHECK(kd_tun_blob_each(blob, blen, blob_value, &bc) == 0);

    size_t n = to_headers(blob, blen, h, &arena);
    static char vbuf[VBUF];
    size_t ne = expect(&l, e, CAP, vbuf);
    same_headers(h, n, e, ne);
    kd_chunkpool_free(arena);
    kd_chunkpool_free(blob);
    return 0;
}

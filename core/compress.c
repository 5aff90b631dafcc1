/* compress.c — see compress.h; the only file that includes zlib (style.md rule 9).
 *
 * Inflate writes straight into the message buffer, never through a scratch buffer of its own: the
 * buffer doubles until the limit, and at the limit a one-byte probe tells "the stream ends here"
 * from "more would come" (a bomb), so no byte past the limit is ever stored. zlib's result codes
 * are translated here, once.
 */
#include "core/compress.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/chunkpool.h"

#define MIN_BUF 1024u

struct kd_inflater {
    z_stream zs;
    bool inited;
    bool active; /* between begin and end (or an error) */
    bool ended;  /* Z_STREAM_END seen */
    int wbits;
    size_t limit;
    struct kd_compress_buf buf;
};

struct kd_deflater {
    z_stream zs;
    bool inited;
    int wbits;
    int level;
};

int kd_compress_alg_parse(const char *name, size_t len)
{
    if (len == 8 && memcmp(name, "identity", 8) == 0)
        return KD_COMPRESS_IDENTITY;
    if (len == 4 && memcmp(name, "gzip", 4) == 0)
        return KD_COMPRESS_GZIP;
    if (len == 7 && memcmp(name, "deflate", 7) == 0)
        return KD_COMPRESS_DEFLATE;
    return -ENOENT;
}

const char *kd_compress_alg_name(enum kd_compress_alg alg)
{
    switch (alg) {
    case KD_COMPRESS_GZIP:
        return "gzip";
    case KD_COMPRESS_DEFLATE:
        return "deflate";
    case KD_COMPRESS_IDENTITY:
        break;
    }
    return "identity";
}

bool kd_compress_accepts(const char *list, size_t len, enum kd_compress_alg alg)
{
    const char *want = kd_compress_alg_name(alg);
    size_t wl = strlen(want);
    size_t i = 0;
    while (i < len) {
        while (i < len && (list[i] == ' ' || list[i] == '\t' || list[i] == ','))
            i++;
        size_t s = i;
        while (i < len && list[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (list[e - 1] == ' ' || list[e - 1] == '\t'))
            e--;
        if (e - s == wl && memcmp(list + s, want, wl) == 0)
            return true;
    }
    return false;
}

void kd_compress_buf_release(struct kd_compress_buf *b)
{
    kd_chunkpool_put(b->data, b->cap);
    memset(b, 0, sizeof(*b));
}

/* Grow b to hold at least `need` bytes (keeping its contents). */
static int buf_grow(struct kd_compress_buf *b, size_t need)
{
    size_t cap;
    uint8_t *n = kd_chunkpool_get(need, &cap);
    if (n == NULL)
        return -ENOMEM;
    if (b->len > 0)
        memcpy(n, b->data, b->len);
    kd_chunkpool_put(b->data, b->cap);
    b->data = n;
    b->cap = cap;
    return 0;
}

static int wbits_of(enum kd_compress_alg alg)
{
    if (alg == KD_COMPRESS_GZIP)
        return 16 + MAX_WBITS; /* gzip wrapper only */
    if (alg == KD_COMPRESS_DEFLATE)
        return MAX_WBITS; /* zlib wrapper: gRPC's "deflate" */
    return 0;
}

/* ---- inflate ---- */

struct kd_inflater *kd_inflater_new(void)
{
    return calloc(1, sizeof(struct kd_inflater));
}

void kd_inflater_free(struct kd_inflater *z)
{
    if (z == NULL)
        return;
    if (z->inited)
        inflateEnd(&z->zs);
    kd_compress_buf_release(&z->buf);
    free(z);
}

int kd_inflater_begin(struct kd_inflater *z, enum kd_compress_alg alg, size_t limit)
{
    int wbits = wbits_of(alg);
    if (wbits == 0)
        return -EINVAL;
    kd_compress_buf_release(&z->buf);
    int rc;
    if (!z->inited) {
        memset(&z->zs, 0, sizeof(z->zs));
        rc = inflateInit2(&z->zs, wbits);
        z->inited = rc == Z_OK;
    } else {
        rc = inflateReset2(&z->zs, wbits);
    }
    if (rc != Z_OK)
        return rc == Z_MEM_ERROR ? -ENOMEM : -EINVAL;
    z->wbits = wbits;
    z->limit = limit;
    z->active = true;
    z->ended = false;
    return 0;
}

static int inflate_fail(struct kd_inflater *z, int err)
{
    z->active = false;
    kd_compress_buf_release(&z->buf);
    return err;
}

static int zerr(int rc)
{
    return rc == Z_MEM_ERROR ? -ENOMEM : -EBADMSG;
}

int kd_inflater_feed(struct kd_inflater *z, const uint8_t *data, size_t len)
{
    if (!z->active)
        return -EINVAL;
    if (len == 0)
        return 0;
    if (z->ended)
        return inflate_fail(z, -EBADMSG); /* bytes after the end of the stream */
    struct kd_compress_buf *b = &z->buf;
    z->zs.next_in = (Bytef *)(uintptr_t)data;
    z->zs.avail_in = (uInt)len;
    if ((size_t)z->zs.avail_in != len)
        return inflate_fail(z, -EMSGSIZE);
    for (;;) {
        size_t room = b->cap < z->limit ? b->cap : z->limit;
        if (b->len == room && room < z->limit) {
            size_t want = b->cap * 2 > MIN_BUF ? b->cap * 2 : MIN_BUF;
            if (want > z->limit)
                want = z->limit;
            if (buf_grow(b, want) < 0)
                return inflate_fail(z, -ENOMEM);
            room = b->cap < z->limit ? b->cap : z->limit;
        }
        uint8_t probe;
        bool probing = b->len == room; /* at the limit: may one more byte come out? */
        z->zs.next_out = probing ? &probe : b->data + b->len;
        z->zs.avail_out = probing ? 1 : (uInt)(room - b->len > UINT32_MAX ? UINT32_MAX : room - b->len);
        uInt before = z->zs.avail_out;
        int rc = inflate(&z->zs, Z_NO_FLUSH);
        size_t made = before - z->zs.avail_out;
        if (probing && made > 0)
            return inflate_fail(z, -EMSGSIZE);
        b->len += probing ? 0 : made;
        if (rc == Z_STREAM_END) {
            z->ended = true;
            if (z->zs.avail_in > 0)
                return inflate_fail(z, -EBADMSG);
            return 0;
        }
        if (rc == Z_BUF_ERROR) {
            if (z->zs.avail_in == 0)
                return 0; /* everything taken, nothing pending */
            return inflate_fail(z, -EBADMSG);
        }
        if (rc != Z_OK)
            return inflate_fail(z, zerr(rc));
        if (z->zs.avail_in == 0 && z->zs.avail_out > 0)
            return 0; /* input used up and zlib had room: nothing is pending inside */
    }
}

int kd_inflater_end(struct kd_inflater *z, struct kd_compress_buf *out)
{
    if (!z->active)
        return -EINVAL;
    if (!z->ended)
        return inflate_fail(z, -EBADMSG); /* truncated (or empty) */
    z->active = false;
    *out = z->buf;
    memset(&z->buf, 0, sizeof(z->buf));
    return 0;
}

int kd_inflater_run(struct kd_inflater *z, enum kd_compress_alg alg, const uint8_t *in, size_t len,
                    size_t limit, struct kd_compress_buf *out)
{
    int rc = kd_inflater_begin(z, alg, limit);
    if (rc == 0)
        rc = kd_inflater_feed(z, in, len);
    if (rc == 0)
        rc = kd_inflater_end(z, out);
    return rc;
}

/* ---- deflate ---- */

struct kd_deflater *kd_deflater_new(int level)
{
    struct kd_deflater *d = calloc(1, sizeof(*d));
    if (d != NULL)
        d->level = level > 0 && level <= 9 ? level : Z_DEFAULT_COMPRESSION;
    return d;
}

void kd_deflater_free(struct kd_deflater *d)
{
    if (d == NULL)
        return;
    if (d->inited)
        deflateEnd(&d->zs);
    free(d);
}

int kd_deflater_begin(struct kd_deflater *d, enum kd_compress_alg alg)
{
    int wbits = wbits_of(alg);
    if (wbits == 0)
        return -EINVAL;
    if (d->inited && d->wbits == wbits)
        return deflateReset(&d->zs) == Z_OK ? 0 : -EINVAL;
    if (d->inited) {
        /* deflateReset cannot change the wrapper: start over for the other algorithm */
        deflateEnd(&d->zs);
        d->inited = false;
    }
    memset(&d->zs, 0, sizeof(d->zs));
    int rc = deflateInit2(&d->zs, d->level, Z_DEFLATED, wbits, 8, Z_DEFAULT_STRATEGY);
    if (rc != Z_OK)
        return rc == Z_MEM_ERROR ? -ENOMEM : -EINVAL;
    d->inited = true;
    d->wbits = wbits;
    return 0;
}

int kd_deflater_feed(struct kd_deflater *d, const uint8_t *data, size_t len, bool last,
                     struct kd_compress_buf *out)
{
    if (!d->inited)
        return -EINVAL;
    d->zs.next_in = (Bytef *)(uintptr_t)data;
    d->zs.avail_in = (uInt)len;
    if ((size_t)d->zs.avail_in != len)
        return -EMSGSIZE;
    for (;;) {
        if (out->cap - out->len < 64) {
            size_t want = out->cap * 2 > MIN_BUF ? out->cap * 2 : MIN_BUF;
            if (buf_grow(out, want) < 0)
                return -ENOMEM;
        }
        size_t room = out->cap - out->len;
        d->zs.next_out = out->data + out->len;
        d->zs.avail_out = (uInt)(room > UINT32_MAX ? UINT32_MAX : room);
        uInt before = d->zs.avail_out;
        int rc = deflate(&d->zs, last ? Z_FINISH : Z_NO_FLUSH);
        out->len += before - d->zs.avail_out;
        if (rc == Z_STREAM_END)
            return 0;
        if (rc != Z_OK && rc != Z_BUF_ERROR)
            return rc == Z_MEM_ERROR ? -ENOMEM : -EINVAL;
        if (!last && d->zs.avail_in == 0 && d->zs.avail_out > 0)
            return 0;
    }
}

int kd_deflater_run(struct kd_deflater *d, enum kd_compress_alg alg, const uint8_t *in, size_t len,
                    struct kd_compress_buf *out)
{
    memset(out, 0, sizeof(*out));
    int rc = kd_deflater_begin(d, alg);
    if (rc < 0)
        return rc;
    /* One block sized to zlib's worst case: the usual message is compressed in one pass. */
    rc = buf_grow(out, deflateBound(&d->zs, (uLong)len));
    if (rc == 0)
        rc = kd_deflater_feed(d, in, len, true, out);
    if (rc < 0)
        kd_compress_buf_release(out);
    return rc;
}

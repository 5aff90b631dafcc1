/* resp_fuzz.c — the RESP2 reply path as shards/redis.c drives it: arbitrary bytes fed to a reader
 * in arbitrary splits (the first byte seeds the split sizes), every complete reply walked and
 * freed, with a small max_reply_bytes so the limit paths are reached too. Checks the tree's shape
 * promises (strings NUL-terminated, arrays' elements all present). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/resp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static size_t walk(const struct kd_resp *o, unsigned depth)
{
    size_t n = 1;
    if (depth > KD_RESP_MAX_DEPTH + 1)
        abort();
    switch (o->type) {
    case KD_RESP_STRING:
    case KD_RESP_STATUS:
    case KD_RESP_ERROR:
        if (o->str == NULL || o->str[o->len] != '\0')
            abort();
        break;
    case KD_RESP_ARRAY:
        for (size_t i = 0; i < o->n; i++) {
            if (o->elem[i] == NULL)
                abort();
            n += walk(o->elem[i], depth + 1);
        }
        break;
    default:
        break;
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    unsigned seed = data[0];
    struct kd_resp_reader *r = kd_resp_reader_new(seed & 1 ? 4096 : 1u << 20);
    if (r == NULL)
        return 0;
    size_t off = 1;
    while (off < size) {
        seed = seed * 1103515245u + 12345u;
        size_t len = 1 + (seed >> 16) % 64;
        if (len > size - off)
            len = size - off;
        if (kd_resp_reader_feed(r, data + off, len) < 0)
            break;
        off += len;
        struct kd_resp *o;
        int rc;
        while ((rc = kd_resp_reader_next(r, &o)) == 1) {
            walk(o, 0);
            kd_resp_free(o);
        }
        if (rc < 0) {
            if (kd_resp_reader_error(r)[0] == '\0')
                abort();
            break;
        }
    }
    kd_resp_reader_free(r);
    return 0;
}

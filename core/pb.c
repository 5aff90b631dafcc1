/* pb.c — see pb.h. */
#include "core/pb.h"

#include <errno.h>
#include <string.h>

static int read_varint(struct kd_pb_reader *r, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end)
            return -EBADMSG;
        uint8_t b = *r->p++;
        if (shift == 63 && b > 1)
            return -EBADMSG; /* the 10th byte may only carry the top bit */
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -EBADMSG;
}

int kd_pb_next(struct kd_pb_reader *r, struct kd_pb_field *f)
{
    uint64_t key;
    if (r->p >= r->end)
        return 0;
    if (read_varint(r, &key) < 0)
        return -EBADMSG;
    f->num = (uint32_t)(key >> 3);
    f->wt = (uint32_t)(key & 7);
    if (f->num == 0 || (key >> 3) > 0x1fffffff)
        return -EBADMSG;
    f->data = NULL;
    f->len = 0;
    f->v = 0;
    switch (f->wt) {
    case KD_PB_VARINT:
        return read_varint(r, &f->v) < 0 ? -EBADMSG : 1;
    case KD_PB_I64:
        if (r->end - r->p < 8)
            return -EBADMSG;
        memcpy(&f->v, r->p, 8);
        r->p += 8;
        return 1;
    case KD_PB_I32: {
        uint32_t v32;
        if (r->end - r->p < 4)
            return -EBADMSG;
        memcpy(&v32, r->p, 4);
        f->v = v32;
        r->p += 4;
        return 1;
    }
    case KD_PB_LEN: {
        uint64_t n;
        if (read_varint(r, &n) < 0 || n > (uint64_t)(r->end - r->p))
            return -EBADMSG;
        f->data = r->p;
        f->len = (size_t)n;
        r->p += n;
        return 1;
    }
    default:
        return -EBADMSG;
    }
}

size_t kd_pb_varint_size(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

uint8_t *kd_pb_put_varint(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

uint8_t *kd_pb_put_tag(uint8_t *p, uint32_t num, uint32_t wt)
{
    return kd_pb_put_varint(p, ((uint64_t)num << 3) | wt);
}

uint8_t *kd_pb_put_len_header(uint8_t *p, uint32_t num, size_t n)
{
    p = kd_pb_put_tag(p, num, KD_PB_LEN);
    return kd_pb_put_varint(p, n);
}

uint8_t *kd_pb_put_len_field(uint8_t *p, uint32_t num, const void *data, size_t n)
{
    p = kd_pb_put_len_header(p, num, n);
    if (n > 0)
        memcpy(p, data, n);
    return p + n;
}

uint8_t *kd_pb_put_varint_field(uint8_t *p, uint32_t num, uint64_t v)
{
    p = kd_pb_put_tag(p, num, KD_PB_VARINT);
    return kd_pb_put_varint(p, v);
}

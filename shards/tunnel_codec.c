/* tunnel_codec.c — see tunnel_codec.h. */
#include "shards/tunnel_codec.h"

#include <errno.h>
#include <string.h>

#include "core/pb.h"

int kd_tun_decode_request(const uint8_t *p, size_t n, struct kd_tun_msg *out)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc, seen = 0;
    memset(out, 0, sizeof(*out));
    kd_pb_reader_init(&r, p, n);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num < 1 || f.num > 5)
            continue; /* unknown fields are skipped, as protobuf requires */
        if (f.wt != KD_PB_LEN)
            return -EBADMSG;
        /* A oneof seen twice: protobuf keeps the last; so do we. */
        seen = 1;
        out->kind = (enum kd_tun_kind)f.num;
        out->body = f.data;
        out->len = f.len;
    }
    if (rc < 0 || !seen)
        return -EBADMSG;
    struct kd_pb_reader in;
    kd_pb_reader_init(&in, out->body, out->len);
    if (out->kind == KD_TUN_MESSAGE) {
        out->data = (const uint8_t *)"";
        while ((rc = kd_pb_next(&in, &f)) > 0)
            if (f.num == 1) {
                if (f.wt != KD_PB_LEN)
                    return -EBADMSG;
                out->data = f.data;
                out->data_len = f.len;
            }
        if (rc < 0)
            return -EBADMSG;
    } else if (out->kind == KD_TUN_ERROR) {
        /* Error { google.rpc.Status status = 1 }; Status { int32 code = 1; string message = 2; ... } */
        const uint8_t *st = NULL;
        size_t stlen = 0;
        while ((rc = kd_pb_next(&in, &f)) > 0)
            if (f.num == 1) {
                if (f.wt != KD_PB_LEN)
                    return -EBADMSG;
                st = f.data;
                stlen = f.len;
            }
        if (rc < 0)
            return -EBADMSG;
        out->text = (const uint8_t *)"";
        if (st != NULL) {
            kd_pb_reader_init(&in, st, stlen);
            while ((rc = kd_pb_next(&in, &f)) > 0) {
                if (f.num == 1 && f.wt == KD_PB_VARINT)
                    out->code = (int32_t)f.v;
                else if (f.num == 2 && f.wt == KD_PB_LEN) {
                    out->text = f.data;
                    out->text_len = f.len;
                } else if (f.num <= 2)
                    return -EBADMSG;
            }
            if (rc < 0)
                return -EBADMSG;
        }
    }
    return 0;
}

static bool name_ok(const uint8_t *s, size_t n)
{
    if (n == 0 || n > 1024)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 0x20 || s[i] >= 0x7f || s[i] == '/')
            return false;
    return true;
}

int kd_tun_descriptor_each(const uint8_t *desc, size_t n, kd_tun_method_cb cb, void *ud)
{
    /* Descriptor { AgentDescriptor agent_descriptor = 1 }
     * AgentDescriptor { repeated Service services = 1 }
     * Service { string name = 1; repeated Method methods = 2 }   Method { string name = 1 } */
    struct kd_pb_reader r, ad, sv, me;
    struct kd_pb_field f, g, h, k;
    int rc, count = 0;
    kd_pb_reader_init(&r, desc, n);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num != 1)
            continue;
        if (f.wt != KD_PB_LEN)
            return -EBADMSG;
        kd_pb_reader_init(&ad, f.data, f.len);
        while ((rc = kd_pb_next(&ad, &g)) > 0) {
            if (g.num != 1)
                continue;
            if (g.wt != KD_PB_LEN)
                return -EBADMSG;
            const uint8_t *svc = NULL;
            size_t svclen = 0;
            /* The service name may come after its methods on the wire: find it first. */
            kd_pb_reader_init(&sv, g.data, g.len);
            while ((rc = kd_pb_next(&sv, &h)) > 0)
                if (h.num == 1 && h.wt == KD_PB_LEN) {
                    svc = h.data;
                    svclen = h.len;
                }
            if (rc < 0)
                return -EBADMSG;
            if (svc == NULL || !name_ok(svc, svclen))
                return -EINVAL;
            kd_pb_reader_init(&sv, g.data, g.len);
            while ((rc = kd_pb_next(&sv, &h)) > 0) {
                if (h.num != 2)
                    continue;
                if (h.wt != KD_PB_LEN)
                    return -EBADMSG;
                const uint8_t *m = NULL;
                size_t mlen = 0;
                kd_pb_reader_init(&me, h.data, h.len);
                while ((rc = kd_pb_next(&me, &k)) > 0)
                    if (k.num == 1 && k.wt == KD_PB_LEN) {
                        m = k.data;
                        mlen = k.len;
                    }
                if (rc < 0)
                    return -EBADMSG;
                if (m == NULL || !name_ok(m, mlen))
                    return -EINVAL;
                int c = cb(ud, (const char *)svc, svclen, (const char *)m, mlen);
                if (c < 0)
                    return c;
                count++;
            }
            if (rc < 0)
                return -EBADMSG;
        }
        if (rc < 0)
            return -EBADMSG;
    }
    if (rc < 0)
        return -EBADMSG;
    return count;
}

long kd_tun_meta_to_blob(const uint8_t *msg, size_t n, uint8_t *out, size_t cap)
{
    /* Header/Trailer { map<string, Values> meta = 1 }: each field-1 entry becomes [len][entry]. */
    struct kd_pb_reader r;
    struct kd_pb_field f;
    uint8_t *o = out;
    int rc;
    kd_pb_reader_init(&r, msg, n);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num != 1)
            continue;
        if (f.wt != KD_PB_LEN)
            return -EBADMSG;
        size_t need = kd_pb_varint_size(f.len) + f.len;
        if ((size_t)(o - out) + need > cap)
            return -EBADMSG;
        o = kd_pb_put_varint(o, f.len);
        memcpy(o, f.data, f.len);
        o += f.len;
    }
    if (rc < 0)
        return -EBADMSG;
    return (long)(o - out);
}

int kd_tun_blob_each(const uint8_t *blob, size_t n, kd_tun_md_cb cb, void *ud)
{
    const uint8_t *p = blob, *end = blob + n;
    while (p < end) {
        /* [varint len][entry] */
        struct kd_pb_reader lr = {p, end};
        uint64_t len = 0;
        int shift = 0;
        do {
            if (lr.p >= end || shift > 63)
                return -EBADMSG;
            len |= (uint64_t)(*lr.p & 0x7f) << shift;
            shift += 7;
        } while (*lr.p++ & 0x80);
        if (len > (uint64_t)(end - lr.p))
            return -EBADMSG;
        const uint8_t *entry = lr.p;
        p = lr.p + len;
        /* entry { string key = 1; Values value = 2 }  Values { repeated string value = 1 } */
        struct kd_pb_reader er, vr;
        struct kd_pb_field f, g;
        const uint8_t *key = (const uint8_t *)"";
        size_t klen = 0;
        int rc;
        kd_pb_reader_init(&er, entry, (size_t)len);
        while ((rc = kd_pb_next(&er, &f)) > 0)
            if (f.num == 1 && f.wt == KD_PB_LEN) {
                key = f.data;
                klen = f.len;
            }
        if (rc < 0)
            return -EBADMSG;
        kd_pb_reader_init(&er, entry, (size_t)len);
        while ((rc = kd_pb_next(&er, &f)) > 0) {
            if (f.num != 2 || f.wt != KD_PB_LEN)
                continue;
            kd_pb_reader_init(&vr, f.data, f.len);
            while ((rc = kd_pb_next(&vr, &g)) > 0) {
                if (g.num != 1 || g.wt != KD_PB_LEN)
                    continue;
                int c = cb(ud, (const char *)key, klen, g.data, g.len);
                if (c < 0)
                    return c;
            }
            if (rc < 0)
                return -EBADMSG;
        }
        if (rc < 0)
            return -EBADMSG;
    }
    return 0;
}

static size_t values_size(const size_t *vlens, size_t nvals)
{
    size_t s = 0;
    for (size_t i = 0; i < nvals; i++)
        s += kd_pb_len_field_size(1, vlens[i]);
    return s;
}

static size_t entry_body_size(size_t klen, const size_t *vlens, size_t nvals)
{
    return kd_pb_len_field_size(1, klen) + kd_pb_len_field_size(2, values_size(vlens, nvals));
}

size_t kd_tun_blob_entry_size(size_t klen, const size_t *vlens, size_t nvals)
{
    size_t body = entry_body_size(klen, vlens, nvals);
    return kd_pb_varint_size(body) + body;
}

uint8_t *kd_tun_blob_put_entry(uint8_t *out, const char *key, size_t klen, const uint8_t *const *vals,
                               const size_t *vlens, size_t nvals)
{
    out = kd_pb_put_varint(out, entry_body_size(klen, vlens, nvals));
    out = kd_pb_put_len_field(out, 1, key, klen);
    out = kd_pb_put_len_header(out, 2, values_size(vlens, nvals));
    for (size_t i = 0; i < nvals; i++)
        out = kd_pb_put_len_field(out, 1, vals[i], vlens[i]);
    return out;
}

/* Size of the blob's entries when each is re-tagged as field `num`. */
static size_t blob_as_field_size(uint32_t num, const uint8_t *blob, size_t n)
{
    /* Each entry is [varint len][entry] already; a field adds only the tag. */
    size_t entries = 0;
    const uint8_t *p = blob, *end = blob + n;
    while (p < end) {
        uint64_t len = 0;
        int shift = 0;
        do {
            len |= (uint64_t)(*p & 0x7f) << shift;
            shift += 7;
        } while (*p++ & 0x80);
        p += len;
        entries++;
    }
    return n + entries * kd_pb_tag_size(num);
}

static uint8_t *put_blob_as_field(uint8_t *o, uint32_t num, const uint8_t *blob, size_t n)
{
    const uint8_t *p = blob, *end = blob + n;
    while (p < end) {
        const uint8_t *start = p;
        uint64_t len = 0;
        int shift = 0;
        do {
            len |= (uint64_t)(*p & 0x7f) << shift;
            shift += 7;
        } while (*p++ & 0x80);
        p += len;
        o = kd_pb_put_tag(o, num, KD_PB_LEN);
        memcpy(o, start, (size_t)(p - start));
        o += p - start;
    }
    return o;
}

size_t kd_tun_request_info_size(size_t method_len, const uint8_t *blob, size_t blob_len)
{
    size_t inner = kd_pb_len_field_size(1, method_len) + blob_as_field_size(2, blob, blob_len);
    return kd_pb_len_field_size(1, inner);
}

uint8_t *kd_tun_put_request_info(uint8_t *p, const char *method, size_t method_len, const uint8_t *blob,
                                 size_t blob_len)
{
    size_t inner = kd_pb_len_field_size(1, method_len) + blob_as_field_size(2, blob, blob_len);
    p = kd_pb_put_len_header(p, 1, inner);
    p = kd_pb_put_len_field(p, 1, method, method_len);
    return put_blob_as_field(p, 2, blob, blob_len);
}

size_t kd_tun_message_size(size_t data_len)
{
    return kd_pb_len_field_size(2, kd_pb_len_field_size(1, data_len));
}

uint8_t *kd_tun_put_message(uint8_t *p, const uint8_t *data, size_t len)
{
    p = kd_pb_put_len_header(p, 2, kd_pb_len_field_size(1, len));
    return kd_pb_put_len_field(p, 1, data, len);
}

size_t kd_tun_close_send_size(void)
{
    return 2;
}

uint8_t *kd_tun_put_close_send(uint8_t *p)
{
    return kd_pb_put_len_header(p, 3, 0);
}

int kd_tun_step(enum kd_tun_state s, enum kd_tun_kind k, const char **why)
{
    switch (s) {
    case KD_TUN_WAIT_DESCRIPTOR:
        if (k == KD_TUN_DESCRIPTOR)
            return KD_TUN_IDLE;
        *why = "the first message must be the descriptor";
        return -EPROTO;
    case KD_TUN_IDLE:
        if (k == KD_TUN_DESCRIPTOR)
            *why = "descriptor sent twice";
        else if (k == KD_TUN_ERROR)
            return KD_TUN_DONE; /* the agent gives up an unused tunnel */
        else
            *why = "response message on a tunnel that carries no call";
        return -EPROTO;
    case KD_TUN_BOUND:
        if (k == KD_TUN_HEADER)
            return KD_TUN_RESPONDING;
        if (k == KD_TUN_ERROR)
            return KD_TUN_DONE;
        *why = k == KD_TUN_DESCRIPTOR ? "descriptor sent twice" : "header must come first in a response";
        return -EPROTO;
    case KD_TUN_RESPONDING:
        if (k == KD_TUN_MESSAGE)
            return KD_TUN_RESPONDING;
        if (k == KD_TUN_TRAILER || k == KD_TUN_ERROR)
            return KD_TUN_DONE;
        *why = k == KD_TUN_HEADER ? "header sent twice" : "descriptor sent twice";
        return -EPROTO;
    case KD_TUN_DONE:
    default:
        *why = "message after the response ended";
        return -EPROTO;
    }
}

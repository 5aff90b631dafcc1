/* grpc.c — see grpc.h. */
#include "core/grpc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const status_names[] = {
    "OK",        "CANCELLED",       "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS",  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",    "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED",
};

const char *kd_grpc_status_name(int code)
{
    if (code < 0 || code > 16)
        return "UNKNOWN";
    return status_names[code];
}

void kd_grpc_deframer_init(struct kd_grpc_deframer *d, uint32_t max_len)
{
    memset(d, 0, sizeof(*d));
    d->max_len = max_len;
}

void kd_grpc_deframer_free(struct kd_grpc_deframer *d)
{
    free(d->buf);
    d->buf = NULL;
    d->cap = 0;
}

bool kd_grpc_deframer_idle(const struct kd_grpc_deframer *d)
{
    return d->hdr_len == 0;
}

static int start_message(struct kd_grpc_deframer *d)
{
    if (d->hdr[0] & ~1u)
        return -EPROTO; /* reserved flag bits (bit 0, compressed, is the caller's business) */
    d->msg_len = (uint32_t)d->hdr[1] << 24 | (uint32_t)d->hdr[2] << 16 | (uint32_t)d->hdr[3] << 8 | d->hdr[4];
    if (d->msg_len > d->max_len)
        return -EMSGSIZE;
    d->have = 0;
    return 0;
}

int kd_grpc_deframer_feed(struct kd_grpc_deframer *d, const uint8_t *data, size_t len, kd_grpc_msg_cb cb,
                          void *ud)
{
    while (len > 0) {
        if (d->hdr_len < KD_GRPC_PREFIX) {
            size_t take = KD_GRPC_PREFIX - d->hdr_len;
            if (take > len)
                take = len;
            memcpy(d->hdr + d->hdr_len, data, take);
            d->hdr_len += (uint8_t)take;
            data += take;
            len -= take;
            if (d->hdr_len < KD_GRPC_PREFIX)
                return 0;
            int rc = start_message(d);
            if (rc < 0)
                return rc;
        }
        uint32_t need = d->msg_len - d->have;
        if (d->have == 0 && len >= need) {
            /* The whole message is here: hand it over without copying. */
            d->hdr_len = 0;
            int rc = cb(ud, data, need, (d->hdr[0] & 1) != 0);
            if (rc < 0)
                return rc;
            data += need;
            len -= need;
            continue;
        }
        if (d->cap < d->msg_len) {
            /* Grow to the announced size only (bounded by max_len), never speculatively. */
            uint8_t *nb = realloc(d->buf, d->msg_len);
            if (nb == NULL)
                return -ENOMEM;
            d->buf = nb;
            d->cap = d->msg_len;
        }
        size_t take = len < need ? len : need;
        memcpy(d->buf + d->have, data, take);
        d->have += (uint32_t)take;
        data += take;
        len -= take;
        if (d->have == d->msg_len) {
            d->hdr_len = 0;
            int rc = cb(ud, d->buf, d->msg_len, (d->hdr[0] & 1) != 0);
            /* Large partial buffers are not kept for idle streams. */
            if (d->cap > 65536) {
                free(d->buf);
                d->buf = NULL;
                d->cap = 0;
            }
            if (rc < 0)
                return rc;
        }
    }
    return 0;
}

void kd_grpc_frame_prefix(uint8_t out[KD_GRPC_PREFIX], uint32_t len)
{
    kd_grpc_frame_prefix_flag(out, len, false);
}

void kd_grpc_frame_prefix_flag(uint8_t out[KD_GRPC_PREFIX], uint32_t len, bool compressed)
{
    out[0] = compressed ? 1 : 0;
    out[1] = (uint8_t)(len >> 24);
    out[2] = (uint8_t)(len >> 16);
    out[3] = (uint8_t)(len >> 8);
    out[4] = (uint8_t)len;
}

int kd_grpc_timeout_parse(const char *s, size_t len, uint64_t *us)
{
    uint64_t v = 0;
    if (len < 2 || len > 9)
        return -EINVAL;
    for (size_t i = 0; i + 1 < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -EINVAL;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    /* v < 10^8, so none of these multiplications overflow 64 bits. */
    switch (s[len - 1]) {
    case 'H':
        *us = v * 3600ull * 1000000ull;
        break;
    case 'M':
        *us = v * 60ull * 1000000ull;
        break;
    case 'S':
        *us = v * 1000000ull;
        break;
    case 'm':
        *us = v * 1000ull;
        break;
    case 'u':
        *us = v;
        break;
    case 'n':
        *us = (v + 999) / 1000; /* round up: a 1 ns deadline is not "no deadline" */
        break;
    default:
        return -EINVAL;
    }
    return 0;
}

void kd_grpc_timeout_format(uint64_t us, char out[16])
{
    static const struct {
        char unit;
        uint64_t per;
    } units[] = {{'u', 1}, {'m', 1000}, {'S', 1000000}, {'M', 60000000}, {'H', 3600000000ull}};
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        uint64_t v = (us + units[i].per - 1) / units[i].per;
        if (v <= 99999999) {
            snprintf(out, 16, "%llu%c", (unsigned long long)v, units[i].unit);
            return;
        }
    }
    snprintf(out, 16, "99999999H");
}

size_t kd_grpc_message_encode(const char *in, size_t len, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    if (cap == 0)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c >= 0x20 && c <= 0x7e && c != '%') {
            if (o + 2 > cap)
                break;
            out[o++] = (char)c;
        } else {
            if (o + 4 > cap)
                break;
            out[o++] = '%';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[o] = '\0';
    return o;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

size_t kd_grpc_message_decode(const char *in, size_t len, char *out, size_t cap)
{
    size_t o = 0;
    if (cap == 0)
        return 0;
    for (size_t i = 0; i < len && o + 1 < cap; i++) {
        if (in[i] == '%' && i + 2 < len && hexval(in[i + 1]) >= 0 && hexval(in[i + 2]) >= 0) {
            out[o++] = (char)(hexval(in[i + 1]) << 4 | hexval(in[i + 2]));
            i += 2;
        } else {
            out[o++] = in[i];
        }
    }
    out[o] = '\0';
    return o;
}

bool kd_grpc_metadata_key_valid(const char *key, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = key[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || c == '_' || c == '-' || c == '.'))
            return false;
    }
    return true;
}

/* tls_common.c — see tls_common.h. */
#include "core/tls_common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The first allocation of a queue: a TLS record's worth, grown by doubling. */
#define BQ_MIN 2048

void kd_bq_free(struct kd_bq *q)
{
    free(q->data);
    memset(q, 0, sizeof(*q));
}

int kd_bq_push(struct kd_bq *q, const void *p, size_t n)
{
    if (n == 0)
        return 0;
    if (q->cap - q->len < n && q->off > 0) {
        memmove(q->data, q->data + q->off, kd_bq_used(q));
        q->len -= q->off;
        q->off = 0;
    }
    if (q->cap - q->len < n) {
        if (n > SIZE_MAX / 2 - q->len)
            return -ENOMEM;
        size_t cap = q->cap ? q->cap * 2 : BQ_MIN;
        if (cap < q->len + n)
            cap = q->len + n;
        uint8_t *d = realloc(q->data, cap);
        if (d == NULL)
            return -ENOMEM;
        q->data = d;
        q->cap = cap;
    }
    memcpy(q->data + q->len, p, n);
    q->len += n;
    return 0;
}

size_t kd_bq_pop(struct kd_bq *q, void *out, size_t cap)
{
    size_t n = kd_bq_used(q);
    if (n > cap)
        n = cap;
    if (n == 0)
        return 0; /* data may be NULL: no memcpy, even of 0 bytes */
    memcpy(out, q->data + q->off, n);
    q->off += n;
    if (q->off == q->len)
        kd_bq_free(q);
    return n;
}

void kd_tls_first_err(char **err, const char *fmt, ...)
{
    if (*err != NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(err, fmt, ap) < 0)
        *err = NULL;
    va_end(ap);
}

void kd_tls_ctx_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static const struct {
    int code;
    const char *name;
} alert_names[] = {
    {0, "close notify"},
    {10, "unexpected message"},
    {20, "bad record mac"},
    {22, "record overflow"},
    {40, "handshake failure"},
    {42, "bad certificate"},
    {43, "unsupported certificate"},
    {44, "certificate revoked"},
    {45, "certificate expired"},
    {46, "certificate unknown"},
    {47, "illegal parameter"},
    {48, "unknown CA"},
    {49, "access denied"},
    {50, "decode error"},
    {51, "decrypt error"},
    {70, "protocol version"},
    {71, "insufficient security"},
    {80, "internal error"},
    {86, "inappropriate fallback"},
    {90, "user canceled"},
    {109, "missing extension"},
    {110, "unsupported extension"},
    {112, "unrecognized name"},
    {116, "certificate required"},
    {120, "no application protocol"},
};

const char *kd_tls_alert_name(int code)
{
    for (size_t i = 0; i < sizeof(alert_names) / sizeof(alert_names[0]); i++)
        if (alert_names[i].code == code)
            return alert_names[i].name;
    return "unknown alert";
}

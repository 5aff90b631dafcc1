/* tls_common.h — what both TLS backends (core/tls_openssl.c, core/tls_wolfssl.c) share and neither
 * library provides: the byte queues between the connection and the library, the first-error
 * record, and RFC 8446's alert names (so both backends log the same words). Internal to the
 * backends: no library header here, nothing for the rest of kasd.
 * Concurrency: a queue or error record belongs to one connection (one shard). */
#ifndef KD_CORE_TLS_COMMON_H
#define KD_CORE_TLS_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* data[off, len) is waiting; cap is the allocation. Invariant: data == NULL iff cap == 0, and an
 * empty queue is always freed (off == len implies data == NULL), so idle connections cost nothing. */
struct kd_bq {
    uint8_t *data;
    size_t off, len, cap;
};

static inline size_t kd_bq_used(const struct kd_bq *q)
{
    return q->len - q->off;
}
void kd_bq_free(struct kd_bq *q);
/* Append n bytes: 0, or -ENOMEM (the queue is unchanged). */
int kd_bq_push(struct kd_bq *q, const void *p, size_t n);
/* Take up to cap bytes into out: the count taken. */
size_t kd_bq_pop(struct kd_bq *q, void *out, size_t cap);

/* Record the first error of a connection in *err (vasprintf'd; later ones are consequences, e.g.
 * the alert sent after a failure, and are dropped). */
void kd_tls_first_err(char **err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A context-creation error into err[errlen] (either may be NULL/0). */
void kd_tls_ctx_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* "bad certificate", "unknown CA" ... for a TLS alert code (RFC 8446 section 6), or "unknown alert". */
const char *kd_tls_alert_name(int code);

#endif

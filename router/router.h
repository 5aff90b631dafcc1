/* router.h — the cross-shard router: an N×N matrix of SPSC mailboxes with doorbells.
 * Concurrency: ring (from, to) has producer `from` and consumer `to`; every other field of a
 * participant is touched only by that participant's thread, except `sleeping` (atomic, see below)
 * and the stats (single writer, relaxed readers).
 * Ownership: kd_msg pointers are transferred to the receiver; payloads from
 * kd_router_payload_alloc() always go back to their allocating participant to be freed there.
 *
 * Participants are numbered 0..n-1: shards first, then non-shard threads (the control thread).
 *
 *            to 0      to 1      to 2 (control)
 *   from 0   direct    ring01    ring02         send to self = direct handler call
 *   from 1   ring10    direct    ring12
 *   from 2   ring20    ring21    direct
 *
 * Doorbells (h2o/HAProxy rule: wake a receiver only if it sleeps, at most once):
 *   consumer, before blocking:  sleeping = 1 (seq_cst); re-check inbound rings; if non-empty,
 *                               stay awake (kd_router_prepare_sleep returns false).
 *   producer, after a push:     fence (seq_cst); if sleeping and exchange(sleeping, 0) == 1, ring
 *                               the doorbell (only the producer winning the exchange rings).
 * A shard producer rings a shard target with an io_uring msg_ring SQE on its own ring (submitted
 * with its next submit, flagged CQE_SKIP_SUCCESS), which posts a CQE tagged `doorbell_tag` on the
 * target's ring. A producer without a ring, or a target without a ring, uses the target's eventfd.
 *
 * When a ring is full the message goes to the sender's local overflow queue for that target, in
 * order; kd_router_drain() retries overflow before reading, and later messages to that target queue
 * behind it, so per-pair FIFO order is kept.
 */
#ifndef KD_ROUTER_ROUTER_H
#define KD_ROUTER_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/stat.h"
#include "router/ring.h"

struct io_uring;
struct kd_router;

enum kd_msg_type {
    KD_MSG_NONE = 0,
    KD_MSG_RELEASE = 1, /* router-internal: ptr is a payload to free at its owner */
    KD_MSG_USER = 16,   /* first type available to users of the router */
};

typedef void (*kd_router_handler)(void *ctx, const struct kd_msg *m);

struct kd_router_stats {
    kd_stat sent;            /* messages sent (including direct) */
    kd_stat received;        /* messages handled by this participant (including direct) */
    kd_stat direct;          /* sends to self, handled by a direct call */
    kd_stat overflowed;      /* messages that found the ring full and waited in overflow */
    kd_stat doorbells_sent;  /* wake-ups rung by this participant */
    kd_stat doorbells_saved; /* sends that needed no wake-up: the target was awake */
    kd_stat released_remote; /* payloads sent home to be freed */
};

/* n participants, ring_capacity a power of two. NULL on allocation failure or bad arguments. */
struct kd_router *kd_router_create(unsigned n, uint32_t ring_capacity);
/* Frees rings, overflow queues and the messages' payloads still queued (best effort, at exit). */
void kd_router_destroy(struct kd_router *r);

unsigned kd_router_size(const struct kd_router *r);

/* Called once by participant `self` from its own thread before it sends or receives.
 * ring: the participant's io_uring, or NULL for a non-shard thread.
 * doorbell_tag: the CQE user_data a msg_ring doorbell carries to this participant's ring.
 * eventfd: >= 0 lets anyone wake this participant by writing it; required when ring is NULL.
 * handler/ctx: called for every message delivered to `self` (from drain, or directly on self-send).
 * Returns 0 or -EINVAL. */
int kd_router_attach(struct kd_router *r, unsigned self, struct io_uring *ring, uint64_t doorbell_tag,
                     int eventfd, kd_router_handler handler, void *ctx);

/* Send *m from `self` to `to` (m->from is set here). Never fails and never blocks: a full ring
 * queues the message in self's overflow. to == self calls the handler before returning. */
void kd_router_send(struct kd_router *r, unsigned self, unsigned to, struct kd_msg *m);

/* Retry overflow, then deliver up to `budget` inbound messages to self's handler, taking from the
 * senders round-robin. Returns the number delivered. */
unsigned kd_router_drain(struct kd_router *r, unsigned self, unsigned budget);

/* true when self has inbound messages waiting (consumer-side check). */
bool kd_router_has_inbound(struct kd_router *r, unsigned self);

/* true when self's overflow still holds messages (then sleep only briefly: nobody will ring). */
bool kd_router_has_backlog(struct kd_router *r, unsigned self);

/* Mark self asleep. Returns false (and stays awake) when inbound messages are already waiting. */
bool kd_router_prepare_sleep(struct kd_router *r, unsigned self);

/* Mark self awake; call after every return from a blocking wait. */
void kd_router_awake(struct kd_router *r, unsigned self);

/* Payload memory that travels by pointer and is freed by the participant that allocated it. */
void *kd_router_payload_alloc(struct kd_router *r, unsigned self, size_t size);
void kd_router_payload_release(struct kd_router *r, unsigned self, void *payload);

const struct kd_router_stats *kd_router_stats(const struct kd_router *r, unsigned participant);

#endif

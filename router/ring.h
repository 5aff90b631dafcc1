/* ring.h — single-producer/single-consumer ring of fixed-size messages.
 * Concurrency: SPSC: exactly one producer thread calls kd_ring_push, exactly one consumer thread
 * calls kd_ring_pop_burst / kd_ring_is_empty. Head and tail live on separate cache lines; each side
 * caches the other's index and re-reads it (acquire) only when the cached value says full/empty.
 * Ownership: messages are copied by value; any pointer inside a message is transferred to the
 * consumer with it.
 *
 *   producer writes slots[tail & mask], then tail = tail + 1   (release)
 *   consumer reads  slots[head & mask], then head = head + 1   (release)
 *   empty: head == tail        full: tail - head == capacity
 */
#ifndef KD_ROUTER_RING_H
#define KD_ROUTER_RING_H

#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* One cross-shard message: small, fixed-size, never carries payload bytes (style.md rule 5). */
struct kd_msg {
    uint16_t type; /* kd_msg_type (router.h) or a user type >= KD_MSG_USER */
    uint16_t from; /* sending participant, filled in by kd_router_send */
    uint32_t u32;  /* small argument */
    uint64_t u64;  /* id or sequence number */
    void *ptr;     /* payload, transferred to the receiver */
    void *ptr2;    /* second pointer (e.g. a completion context) */
};
_Static_assert(sizeof(struct kd_msg) == 32, "kd_msg must stay 32 bytes: two per cache line");

struct kd_ring {
    alignas(64) _Atomic uint32_t tail; /* written by producer */
    uint32_t head_cache;               /* producer's last view of head */
    alignas(64) _Atomic uint32_t head; /* written by consumer */
    uint32_t tail_cache;               /* consumer's last view of tail */
    alignas(64) uint32_t mask;
    struct kd_msg *slots;
};

/* capacity must be a power of two >= 2. Returns 0 or -ENOMEM/-EINVAL. */
int kd_ring_init(struct kd_ring *r, uint32_t capacity);
void kd_ring_fini(struct kd_ring *r);

/* Producer side. false when the ring is full (nothing written). */
bool kd_ring_push(struct kd_ring *r, const struct kd_msg *m);

/* Consumer side. Copies up to `max` messages into `out`, returns how many. */
uint32_t kd_ring_pop_burst(struct kd_ring *r, struct kd_msg *out, uint32_t max);

/* Consumer side (exact); also safe from the producer as a hint. */
bool kd_ring_is_empty(struct kd_ring *r);

#endif

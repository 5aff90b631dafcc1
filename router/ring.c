/* ring.c — single-producer/single-consumer ring of fixed-size messages (contract in ring.h).
 *
 * Layout and invariants (indices are free-running uint32_t, reduced with `mask` only to address a
 * slot, so wraparound of the 32-bit counters is harmless as long as capacity <= 2^31):
 *
 *   line 0 (producer): tail, head_cache     line 1 (consumer): head, tail_cache     line 2: mask, slots
 *
 *   0 <= tail - head <= capacity                       (always, in modular arithmetic)
 *   head_cache is a past value of head:  tail - head_cache >= tail - head   (never says "room" wrongly)
 *   tail_cache is a past value of tail:  tail_cache - head <= tail - head   (never says "data" wrongly)
 *   slots[i & mask] for head <= i < tail hold messages the consumer has not read yet.
 *
 * Ordering: the producer writes the slot, then publishes tail with release; the consumer loads
 * tail with acquire before reading slots. Symmetrically the consumer reads the slots, then
 * publishes head with release, and the producer loads head with acquire before overwriting them.
 * The cached opposite index means each side touches the other's cache line only when its cached
 * view says full (producer) or empty (consumer), which in a busy pipeline is once per lap.
 */
#include "router/ring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Slots start on a cache line so that message i and i^1 share one line and no message straddles two. */
#define RING_ALIGN 64

int kd_ring_init(struct kd_ring *r, uint32_t capacity)
{
    /* capacity > 2^31 would make "tail - head == capacity" ambiguous with empty after a wrap. */
    if (capacity < 2 || (capacity & (capacity - 1)) != 0 || capacity > (UINT32_C(1) << 31))
        return -EINVAL;

    size_t bytes = (size_t)capacity * sizeof(struct kd_msg); /* a multiple of 64: capacity >= 2 */
    struct kd_msg *slots = aligned_alloc(RING_ALIGN, bytes);
    if (slots == NULL)
        return -ENOMEM;
    memset(slots, 0, bytes);

    atomic_init(&r->tail, 0);
    r->head_cache = 0;
    atomic_init(&r->head, 0);
    r->tail_cache = 0;
    r->mask = capacity - 1;
    r->slots = slots;
    return 0;
}

void kd_ring_fini(struct kd_ring *r)
{
    free(r->slots);
    r->slots = NULL;
}

bool kd_ring_push(struct kd_ring *r, const struct kd_msg *m)
{
    /* Only this thread writes tail: a relaxed load of our own index is enough. */
    uint32_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);

    if (tail - r->head_cache > r->mask) {
        /* The cache says full: look at the consumer's real position (acquire pairs with its
         * release so its reads of the slots we are about to overwrite are finished). */
        r->head_cache = atomic_load_explicit(&r->head, memory_order_acquire);
        if (tail - r->head_cache > r->mask)
            return false;
    }
    r->slots[tail & r->mask] = *m;
    atomic_store_explicit(&r->tail, tail + 1, memory_order_release);
    return true;
}

uint32_t kd_ring_pop_burst(struct kd_ring *r, struct kd_msg *out, uint32_t max)
{
    uint32_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint32_t avail = r->tail_cache - head;

    if (avail == 0) {
        /* The cache says empty: re-read the producer's index (acquire: its slot writes are visible). */
        r->tail_cache = atomic_load_explicit(&r->tail, memory_order_acquire);
        avail = r->tail_cache - head;
        if (avail == 0)
            return 0;
    }
    uint32_t n = avail < max ? avail : max;
    if (n == 0)
        return 0;

    /* Copy in at most two runs: up to the end of the slot array, then from its start. */
    uint32_t first = head & r->mask;
    uint32_t run = r->mask + 1 - first;
    if (run > n)
        run = n;
    memcpy(out, &r->slots[first], (size_t)run * sizeof(*out));
    if (run < n)
        memcpy(out + run, &r->slots[0], (size_t)(n - run) * sizeof(*out));

    atomic_store_explicit(&r->head, head + n, memory_order_release);
    return n;
}

bool kd_ring_is_empty(struct kd_ring *r)
{
    /* No cache here: the caches belong to one side each and this may be called from either.
     * Acquire on both so a consumer that sees "non-empty" may pop right away. */
    uint32_t head = atomic_load_explicit(&r->head, memory_order_acquire);
    uint32_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    return head == tail;
}

/* ring_test.c — SPSC ring: argument checks, full/empty edges, 32-bit index wraparound, and a real
 * producer/consumer pair pushing millions of sequence numbers through a small ring. */
#include <criterion/criterion.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "router/ring.h"

static struct kd_msg seq_msg(uint64_t seq)
{
    struct kd_msg m = {
        .type = 16, .from = 1, .u32 = (uint32_t)(seq * 7u), .u64 = seq, .ptr = (void *)(uintptr_t)~seq};
    return m;
}

static void check_seq_msg(const struct kd_msg *m, uint64_t seq)
{
    cr_assert_eq(m->u64, seq, "expected seq %llu, got %llu", (unsigned long long)seq,
                 (unsigned long long)m->u64);
    cr_assert_eq(m->u32, (uint32_t)(seq * 7u));
    cr_assert_eq(m->ptr, (void *)(uintptr_t)~seq);
    cr_assert_eq(m->type, 16);
}

/* Pop exactly `n` messages. pop_burst may return fewer than are queued: the consumer's cached tail is
 * re-read only when it says empty (ring.h), so a second call picks up the rest. */
static void pop_exactly(struct kd_ring *r, struct kd_msg *out, uint32_t n)
{
    uint32_t have = 0;
    for (int calls = 0; have < n; calls++) {
        cr_assert_lt(calls, 2, "a stale cache costs at most one extra call");
        uint32_t got = kd_ring_pop_burst(r, out + have, n - have);
        cr_assert_gt(got, 0, "expected %u more messages", n - have);
        have += got;
    }
}

/* Place all four indices at `start` as if `start` messages had already passed through. */
static void ring_rewind_to(struct kd_ring *r, uint32_t start)
{
    atomic_store(&r->tail, start);
    atomic_store(&r->head, start);
    r->head_cache = start;
    r->tail_cache = start;
}

Test(ring, init_rejects_bad_capacity)
{
    struct kd_ring r;
    cr_assert_eq(kd_ring_init(&r, 0), -EINVAL);
    cr_assert_eq(kd_ring_init(&r, 1), -EINVAL);
    cr_assert_eq(kd_ring_init(&r, 3), -EINVAL);
    cr_assert_eq(kd_ring_init(&r, 100), -EINVAL);
    cr_assert_eq(kd_ring_init(&r, UINT32_MAX), -EINVAL);
    cr_assert_eq(kd_ring_init(&r, (UINT32_C(1) << 31) + 2), -EINVAL);

    cr_assert_eq(kd_ring_init(&r, 2), 0);
    cr_assert(kd_ring_is_empty(&r));
    kd_ring_fini(&r);
    cr_assert_null(r.slots);
    kd_ring_fini(&r); /* idempotent */
}

Test(ring, slots_are_cache_line_aligned)
{
    struct kd_ring r;
    cr_assert_eq(kd_ring_init(&r, 64), 0);
    cr_assert_eq((uintptr_t)r.slots % 64, 0);
    cr_assert_eq(offsetof(struct kd_ring, head) - offsetof(struct kd_ring, tail), 64);
    kd_ring_fini(&r);
}

Test(ring, fill_to_capacity_then_full)
{
    struct kd_ring r;
    cr_assert_eq(kd_ring_init(&r, 8), 0);

    for (uint64_t i = 0; i < 8; i++) {
        struct kd_msg m = seq_msg(i);
        cr_assert(kd_ring_push(&r, &m), "push %llu should fit", (unsigned long long)i);
    }
    struct kd_msg extra = seq_msg(99);
    cr_assert_not(kd_ring_push(&r, &extra), "push on a full ring must fail");
    cr_assert_not(kd_ring_push(&r, &extra), "and keep failing");
    cr_assert_not(kd_ring_is_empty(&r));

    struct kd_msg out[16];
    cr_assert_eq(kd_ring_pop_burst(&r, out, 0), 0, "max 0 pops nothing");
    cr_assert_eq(kd_ring_pop_burst(&r, out, 3), 3);
    for (uint64_t i = 0; i < 3; i++)
        check_seq_msg(&out[i], i);

    /* Room for exactly three more: the failed push above must not have written anything. */
    for (uint64_t i = 8; i < 11; i++) {
        struct kd_msg m = seq_msg(i);
        cr_assert(kd_ring_push(&r, &m));
    }
    cr_assert_not(kd_ring_push(&r, &extra));

    pop_exactly(&r, out, 8);
    for (uint64_t i = 0; i < 8; i++)
        check_seq_msg(&out[i], i + 3);
    cr_assert(kd_ring_is_empty(&r));
    cr_assert_eq(kd_ring_pop_burst(&r, out, 16), 0);
    kd_ring_fini(&r);
}

Test(ring, pop_burst_across_the_slot_array_end)
{
    struct kd_ring r;
    cr_assert_eq(kd_ring_init(&r, 4), 0);
    struct kd_msg out[4];
    uint64_t next_push = 0, next_pop = 0;

    /* Offsets 0..3 into the array, then a full burst that wraps the slot array. */
    for (int round = 0; round < 4; round++) {
        struct kd_msg m = seq_msg(next_push++);
        cr_assert(kd_ring_push(&r, &m));
        cr_assert_eq(kd_ring_pop_burst(&r, out, 4), 1);
        check_seq_msg(&out[0], next_pop++);
        for (int i = 0; i < 4; i++) {
            m = seq_msg(next_push++);
            cr_assert(kd_ring_push(&r, &m));
        }
        cr_assert_eq(kd_ring_pop_burst(&r, out, 4), 4);
        for (int i = 0; i < 4; i++)
            check_seq_msg(&out[i], next_pop++);
    }
    kd_ring_fini(&r);
}

Test(ring, wraparound_of_32bit_indices)
{
    struct kd_ring r;
    cr_assert_eq(kd_ring_init(&r, 8), 0);
    ring_rewind_to(&r, UINT32_MAX - 5);

    /* Fill across the 2^32 boundary: tail wraps to small numbers while head is still huge. */
    for (uint64_t i = 0; i < 8; i++) {
        struct kd_msg m = seq_msg(i);
        cr_assert(kd_ring_push(&r, &m));
    }
    cr_assert_lt(atomic_load(&r.tail), 8u, "tail wrapped");
    struct kd_msg extra = seq_msg(999);
    cr_assert_not(kd_ring_push(&r, &extra), "full across the wrap");

    struct kd_msg out[8];
    uint64_t next_pop = 0, next_push = 8;
    cr_assert_eq(kd_ring_pop_burst(&r, out, 5), 5);
    for (int i = 0; i < 5; i++)
        check_seq_msg(&out[i], next_pop++);

    /* Keep streaming through the boundary with uneven bursts. */
    for (int step = 0; step < 1000; step++) {
        while (true) {
            struct kd_msg m = seq_msg(next_push);
            if (!kd_ring_push(&r, &m))
                break;
            next_push++;
        }
        uint32_t want = (uint32_t)(step % 8) + 1;
        pop_exactly(&r, out, want); /* the ring is full, so `want` are there */
        for (uint32_t i = 0; i < want; i++)
            check_seq_msg(&out[i], next_pop++);
    }
    while (next_pop < next_push) {
        uint32_t got = kd_ring_pop_burst(&r, out, 8);
        cr_assert_gt(got, 0);
        for (uint32_t i = 0; i < got; i++)
            check_seq_msg(&out[i], next_pop++);
    }
    cr_assert(kd_ring_is_empty(&r));
    kd_ring_fini(&r);
}

Test(ring, empty_exactly_at_uint32_max)
{
    struct kd_ring r;
    cr_assert_eq(kd_ring_init(&r, 2), 0);
    ring_rewind_to(&r, UINT32_MAX);
    cr_assert(kd_ring_is_empty(&r));
    struct kd_msg out[2], m = seq_msg(1);
    cr_assert_eq(kd_ring_pop_burst(&r, out, 2), 0);
    cr_assert(kd_ring_push(&r, &m));
    cr_assert_eq(atomic_load(&r.tail), 0u);
    cr_assert_not(kd_ring_is_empty(&r));
    cr_assert_eq(kd_ring_pop_burst(&r, out, 2), 1);
    check_seq_msg(&out[0], 1);
    cr_assert(kd_ring_is_empty(&r));
    kd_ring_fini(&r);
}

/* ---- two real threads ---- */

#define SPSC_MESSAGES 5000000ull
#define SPSC_CAPACITY 256

struct spsc_ctx {
    struct kd_ring ring;
    uint64_t producer_full; /* pushes that found the ring full (written by the producer only) */
    uint64_t errors;        /* written by the consumer only */
    uint64_t first_bad;
    uint64_t received;
};

static void *spsc_producer(void *arg)
{
    struct spsc_ctx *c = arg;
    for (uint64_t i = 0; i < SPSC_MESSAGES; i++) {
        struct kd_msg m = seq_msg(i);
        unsigned spins = 0;
        while (!kd_ring_push(&c->ring, &m)) {
            c->producer_full++;
            /* Yield now and then: on a loaded 2-core box the consumer may not be running. */
            if (++spins % 64 == 0)
                sched_yield();
        }
    }
    return NULL;
}

static void *spsc_consumer(void *arg)
{
    struct spsc_ctx *c = arg;
    struct kd_msg out[64];
    uint64_t next = 0;
    unsigned spins = 0, burst = 1;
    while (next < SPSC_MESSAGES) {
        uint32_t got = kd_ring_pop_burst(&c->ring, out, burst);
        burst = burst % 64 + 1; /* vary the burst size: 1..64 */
        if (got == 0) {
            if (++spins % 64 == 0)
                sched_yield();
            continue;
        }
        for (uint32_t i = 0; i < got; i++, next++) {
            const struct kd_msg *m = &out[i];
            if (m->u64 != next || m->ptr != (void *)(uintptr_t)~next || m->u32 != (uint32_t)(next * 7u)) {
                if (c->errors++ == 0)
                    c->first_bad = next;
                next = m->u64; /* resynchronise so one error is not reported millions of times */
            }
        }
    }
    c->received = next;
    return NULL;
}

Test(ring, two_threads_five_million_in_order, .timeout = 60)
{
    struct spsc_ctx c;
    memset(&c, 0, sizeof(c));
    cr_assert_eq(kd_ring_init(&c.ring, SPSC_CAPACITY), 0);
    /* Start near the 32-bit wrap so the threaded run also crosses it. */
    ring_rewind_to(&c.ring, UINT32_MAX - 1000);

    pthread_t prod, cons;
    cr_assert_eq(pthread_create(&cons, NULL, spsc_consumer, &c), 0);
    cr_assert_eq(pthread_create(&prod, NULL, spsc_producer, &c), 0);
    pthread_join(prod, NULL);
    pthread_join(cons, NULL);

    cr_assert_eq(c.errors, 0, "%llu sequence errors, first at %llu", (unsigned long long)c.errors,
                 (unsigned long long)c.first_bad);
    cr_assert_eq(c.received, SPSC_MESSAGES);
    cr_assert(kd_ring_is_empty(&c.ring));
    cr_log_info("producer saw the ring full %llu times", (unsigned long long)c.producer_full);
    kd_ring_fini(&c.ring);
}

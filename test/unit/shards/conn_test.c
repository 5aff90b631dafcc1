/* conn_test.c — the connection table: generations, staleness, capacity, invariants. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "shards/conn.h"

Test(conn, user_data_round_trip)
{
    uint64_t ud = kd_ud_make(KD_OP_SEND, 0xabcdef, 0xfffffffeu);
    cr_assert_eq(kd_ud_op(ud), KD_OP_SEND);
    cr_assert_eq(kd_ud_gen(ud), 0xabcdef);
    cr_assert_eq(kd_ud_slot(ud), 0xfffffffeu);
    /* the generation is cut to 24 bits, never spilling into the op */
    ud = kd_ud_make(KD_OP_RECV, 0xff123456u, 7);
    cr_assert_eq(kd_ud_op(ud), KD_OP_RECV);
    cr_assert_eq(kd_ud_gen(ud), 0x123456);
}

Test(conn, zero_capacity_rejected)
{
    struct kd_conntable t;
    cr_assert_eq(kd_conntable_init(&t, 0), -EINVAL);
}

Test(conn, alloc_until_full_then_refuse)
{
    struct kd_conntable t;
    cr_assert_eq(kd_conntable_init(&t, 8), 0);
    struct kd_conn *c[8];
    for (int i = 0; i < 8; i++) {
        c[i] = kd_conntable_alloc(&t);
        cr_assert_not_null(c[i]);
        cr_assert_eq(c[i]->state, KD_CONN_OPEN);
        cr_assert_eq(kd_conntable_validate(&t), 0);
    }
    cr_assert_eq(t.live, 8);
    cr_assert_null(kd_conntable_alloc(&t), "a full table refuses instead of growing");
    kd_conntable_free(&t, c[3]);
    cr_assert_eq(kd_conntable_validate(&t), 0);
    struct kd_conn *again = kd_conntable_alloc(&t);
    cr_assert_eq(again, c[3], "the freed slot is reused");
    cr_assert_eq(kd_conntable_validate(&t), 0);
    kd_conntable_fini(&t);
}

Test(conn, stale_generation_is_dropped)
{
    struct kd_conntable t;
    cr_assert_eq(kd_conntable_init(&t, 4), 0);
    struct kd_conn *c = kd_conntable_alloc(&t);
    uint64_t ud = kd_ud_make(KD_OP_RECV, c->gen, c->slot);
    cr_assert_eq(kd_conntable_lookup(&t, ud), c);
    kd_conntable_free(&t, c);
    cr_assert_null(kd_conntable_lookup(&t, ud), "a free slot is never live");
    struct kd_conn *c2 = kd_conntable_alloc(&t);
    cr_assert_eq(c2, c);
    cr_assert_null(kd_conntable_lookup(&t, ud), "the old generation is stale after reuse");
    cr_assert_eq(kd_conntable_lookup(&t, kd_ud_make(KD_OP_RECV, c2->gen, c2->slot)), c2);
    cr_assert_null(kd_conntable_lookup(&t, kd_ud_make(KD_OP_RECV, c2->gen, 99)), "out of range slot");
    kd_conntable_fini(&t);
}

Test(conn, generation_wraps_without_zero)
{
    struct kd_conntable t;
    cr_assert_eq(kd_conntable_init(&t, 1), 0);
    struct kd_conn *c = kd_conntable_alloc(&t);
    c->gen = KD_GEN_MASK; /* last generation before the wrap */
    kd_conntable_free(&t, c);
    cr_assert_eq(c->gen, 1, "generation 0 is skipped so a zeroed user_data never matches");
    cr_assert_eq(kd_conntable_validate(&t), 0);
    kd_conntable_fini(&t);
}

Test(conn, random_alloc_free_keeps_invariants)
{
    struct kd_conntable t;
    enum { CAP = 64 };
    struct kd_conn *live[CAP];
    uint64_t uds[CAP];
    int nlive = 0;
    unsigned seed = 12345;
    cr_assert_eq(kd_conntable_init(&t, CAP), 0);
    for (int step = 0; step < 20000; step++) {
        seed = seed * 1103515245u + 12345u;
        if ((seed >> 16) % 2 == 0 && nlive < CAP) {
            struct kd_conn *c = kd_conntable_alloc(&t);
            cr_assert_not_null(c);
            live[nlive] = c;
            uds[nlive] = kd_ud_make(KD_OP_RECV, c->gen, c->slot);
            nlive++;
        } else if (nlive > 0) {
            int i = (int)((seed >> 8) % (unsigned)nlive);
            uint64_t ud = uds[i];
            cr_assert_eq(kd_conntable_lookup(&t, ud), live[i]);
            kd_conntable_free(&t, live[i]);
            cr_assert_null(kd_conntable_lookup(&t, ud));
            live[i] = live[nlive - 1];
            uds[i] = uds[nlive - 1];
            nlive--;
        }
        cr_assert_eq(t.live, (uint32_t)nlive);
        if (step % 97 == 0)
            cr_assert_eq(kd_conntable_validate(&t), 0);
    }
    cr_assert_eq(kd_conntable_validate(&t), 0);
    kd_conntable_fini(&t);
}

/* A large table costs memory only for the slots in use: slots that were never handed out stay
 * zero pages (the whole point of sizing connections_per_shard generously). */
Test(conn, unused_slots_stay_untouched)
{
    struct kd_conntable t;
    enum { CAP = 1 << 18 };
    cr_assert_eq(kd_conntable_init(&t, CAP), 0);
    for (int i = 0; i < 100; i++)
        cr_assert_not_null(kd_conntable_alloc(&t));
    cr_assert_eq(kd_conntable_validate(&t), 0);
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)&t.slots[CAP / 4] + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t hi = (uintptr_t)&t.slots[CAP - 1] & ~((uintptr_t)page - 1);
    size_t npages = (hi - lo) / (size_t)page;
    unsigned char *vec = malloc(npages);
    cr_assert_not_null(vec);
    cr_assert_eq(mincore((void *)lo, npages * (size_t)page, vec), 0, "mincore: %s", strerror(errno));
    size_t resident = 0;
    for (size_t i = 0; i < npages; i++)
        resident += vec[i] & 1;
    cr_assert_eq(resident, 0, "%zu of %zu pages of never-used slots are resident", resident, npages);
    free(vec);
    kd_conntable_fini(&t);
}

/* After a storm has left, the slots above the highest live one are forgotten and their pages go
 * back to the kernel; the table stays consistent and hands them out again. */
Test(conn, trim_forgets_slots_above_the_highest_live_one)
{
    struct kd_conntable t;
    enum { CAP = 1 << 16, USED = 20000 };
    static struct kd_conn *c[USED];
    cr_assert_eq(kd_conntable_init(&t, CAP), 0);
    for (int i = 0; i < USED; i++)
        cr_assert_not_null(c[i] = kd_conntable_alloc(&t));
    for (int i = 0; i < USED; i++)
        if (i != 3 && i != 100)
            kd_conntable_free(&t, c[i]);
    cr_assert_eq(kd_conntable_trim(&t), USED - 101, "slots above the live slot 100 are forgotten");
    cr_assert_eq(kd_conntable_validate(&t), 0);
    cr_assert_eq(t.live, 2);
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)&t.slots[200] + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t hi = (uintptr_t)&t.slots[USED] & ~((uintptr_t)page - 1);
    size_t npages = (hi - lo) / (size_t)page;
    unsigned char *vec = malloc(npages);
    cr_assert_eq(mincore((void *)lo, npages * (size_t)page, vec), 0);
    size_t resident = 0;
    for (size_t i = 0; i < npages; i++)
        resident += vec[i] & 1;
    free(vec);
    cr_assert_eq(resident, 0, "%zu of %zu pages of forgotten slots are still resident", resident, npages);
    /* the table fills up again, every slot once, the two live ones never handed out twice */
    for (int i = 0; i < CAP - 2; i++) {
        struct kd_conn *x = kd_conntable_alloc(&t);
        cr_assert_not_null(x, "alloc %d", i);
        cr_assert(x != c[3] && x != c[100]);
        cr_assert_eq(x->state, KD_CONN_OPEN);
    }
    cr_assert_null(kd_conntable_alloc(&t));
    cr_assert_eq(kd_conntable_validate(&t), 0);
    cr_assert_eq(kd_conntable_trim(&t), 0, "nothing above the highest live slot");
    kd_conntable_fini(&t);
}

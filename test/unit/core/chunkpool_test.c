/* chunkpool_test.c — size classes, reuse, the bound on kept blocks, sizes past the largest class,
 * and per-thread pools (a block put back on another thread joins that thread's pool). */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "core/chunkpool.h"

/* The class a request of `size` bytes lands in. */
static unsigned cls(size_t size)
{
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++)
        if (size <= kd_chunkpool_class_size(i))
            return i;
    cr_assert_fail("no class for %zu", size);
    return 0;
}

static struct kd_chunkpool_stats st(void)
{
    struct kd_chunkpool_stats s;
    kd_chunkpool_stats(&s);
    return s;
}

Test(chunkpool, classes_fit_the_request)
{
    size_t prev = 0;
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++) {
        size_t sz = kd_chunkpool_class_size(i), cap = 0;
        cr_assert_gt(sz, prev);
        cr_assert_gt(kd_chunkpool_class_max(i), 0);
        /* The smallest request of this class, and the largest. */
        void *a = kd_chunkpool_get(prev + 1, &cap);
        cr_assert_not_null(a);
        cr_assert_eq(cap, sz, "class %u: %zu for %zu", i, cap, prev + 1);
        memset(a, 0xab, cap); /* the whole block is usable (ASan checks the bound) */
        void *b = kd_chunkpool_get(sz, &cap);
        cr_assert_eq(cap, sz);
        memset(b, 0xcd, cap);
        kd_chunkpool_put(a, sz);
        kd_chunkpool_put(b, sz);
        prev = sz;
    }
    /* A 64 KiB message with its prefix and a chunk header fits the largest class. */
    cr_assert_geq(kd_chunkpool_class_size(KD_CHUNKPOOL_CLASSES - 1), 65536 + 5 + 32);
    cr_assert_geq(kd_chunkpool_class_size(KD_CHUNKPOOL_CLASSES - 2), 16384 + 32);
    cr_assert_eq(kd_chunkpool_class_size(KD_CHUNKPOOL_CLASSES), 0);
    kd_chunkpool_drain();
}

Test(chunkpool, blocks_are_reused)
{
    size_t cap;
    unsigned k = cls(100);
    void *a = kd_chunkpool_get(100, &cap);
    cr_assert_eq(cap, kd_chunkpool_class_size(k));
    struct kd_chunkpool_stats s0 = st();
    kd_chunkpool_put(a, cap);
    cr_assert_eq(st().kept[k], s0.kept[k] + 1);
    cr_assert_eq(st().kept_bytes, s0.kept_bytes + cap);
    size_t cap2;
    void *b = kd_chunkpool_get(cap - 1, &cap2);
    cr_assert_eq(b, a, "the kept block comes back");
    cr_assert_eq(cap2, cap);
    struct kd_chunkpool_stats s1 = st();
    cr_assert_eq(s1.hits, s0.hits + 1);
    cr_assert_eq(s1.kept[k], s0.kept[k]);
    /* Another class does not take it. */
    kd_chunkpool_put(b, cap2);
    size_t cap3;
    void *c = kd_chunkpool_get(16000, &cap3);
    cr_assert_neq(c, b);
    cr_assert_eq(st().kept[k], 1);
    kd_chunkpool_put(c, cap3);
    kd_chunkpool_drain();
    s1 = st();
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++)
        cr_assert_eq(s1.kept[i], 0);
    cr_assert_eq(s1.kept_bytes, 0);
    kd_chunkpool_put(NULL, 100); /* ignored */
}

Test(chunkpool, malloc_interface)
{
    kd_chunkpool_free(NULL);
    void *z = kd_chunkpool_malloc(0);
    cr_assert_not_null(z);
    kd_chunkpool_free(z);
    size_t sizes[] = {1, 7, 48, 100, 300, 1000, 2928, 5000, 16394, 70000};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        uint8_t *p = kd_chunkpool_malloc(sizes[i]);
        cr_assert_not_null(p);
        cr_assert_eq((uintptr_t)p % 16, 0, "aligned like malloc");
        memset(p, 0x5a, sizes[i]);
        kd_chunkpool_free(p);
        /* calloc hands out zeroes even when the block comes back dirty from the pool */
        uint8_t *q = kd_chunkpool_calloc(1, sizes[i]);
        for (size_t j = 0; j < sizes[i]; j++)
            cr_assert_eq(q[j], 0, "size %zu byte %zu", sizes[i], j);
        kd_chunkpool_free(q);
    }
    cr_assert_null(kd_chunkpool_calloc(SIZE_MAX / 2, 4));
    cr_assert_null(kd_chunkpool_malloc(SIZE_MAX - 4));
    /* realloc keeps the bytes, in place while the block has room */
    uint8_t *r = kd_chunkpool_realloc(NULL, 10);
    for (int i = 0; i < 10; i++)
        r[i] = (uint8_t)i;
    uint8_t *r2 = kd_chunkpool_realloc(r, 20); /* 16 + 20 still fits the 64-byte class */
    cr_assert_eq(r2, r);
    uint8_t *r3 = kd_chunkpool_realloc(r2, 5000);
    cr_assert_not_null(r3);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(r3[i], i);
    memset(r3 + 10, 1, 4990);
    uint8_t *r4 = kd_chunkpool_realloc(r3, 100000); /* past the largest class */
    for (int i = 0; i < 10; i++)
        cr_assert_eq(r4[i], i);
    cr_assert_eq(r4[4999], 1);
    kd_chunkpool_free(r4);
    kd_chunkpool_drain();
}

/* Exact blocks (connection-lifetime state): the size asked, aligned, taken back by free and realloc,
 * and never kept by the pool, so they cannot pin a class's memory after the connection. */
Test(chunkpool, exact_blocks_bypass_the_pool)
{
    kd_chunkpool_drain();
    size_t sizes[] = {0, 1, 1024, 2928, 4096, 16394};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        struct kd_chunkpool_stats a = st();
        uint8_t *p = kd_chunkpool_malloc_exact(sizes[i]);
        cr_assert_not_null(p);
        cr_assert_eq((uintptr_t)p % 16, 0, "aligned like malloc");
        memset(p, 0x5a, sizes[i]);
        struct kd_chunkpool_stats b = st();
        cr_assert_eq(b.hits + b.misses, a.hits + a.misses, "size %zu: not served by the pool", sizes[i]);
        kd_chunkpool_free(p);
        cr_assert_eq(st().kept_bytes, a.kept_bytes, "size %zu: not kept after free", sizes[i]);
    }
    /* realloc of an exact block keeps its bytes and moves into the pool's classes */
    uint8_t *r = kd_chunkpool_malloc_exact(10);
    for (int i = 0; i < 10; i++)
        r[i] = (uint8_t)(i + 1);
    uint8_t *r2 = kd_chunkpool_realloc(r, 3000);
    cr_assert_not_null(r2);
    for (int i = 0; i < 10; i++)
        cr_assert_eq(r2[i], i + 1);
    kd_chunkpool_free(r2);
    cr_assert_null(kd_chunkpool_malloc_exact(SIZE_MAX - 4));
    kd_chunkpool_drain();
}

Test(chunkpool, kept_blocks_are_bounded)
{
    for (unsigned k = 0; k < KD_CHUNKPOOL_CLASSES; k++) {
        size_t max = kd_chunkpool_class_max(k), n = max + 5, cap = 0;
        void **v = calloc(n, sizeof(*v));
        for (size_t i = 0; i < n; i++) {
            v[i] = kd_chunkpool_get(kd_chunkpool_class_size(k), &cap);
            cr_assert_not_null(v[i]);
        }
        struct kd_chunkpool_stats s0 = st();
        for (size_t i = 0; i < n; i++)
            kd_chunkpool_put(v[i], cap);
        struct kd_chunkpool_stats s1 = st();
        cr_assert_eq(s1.kept[k], max, "class %u keeps %zu", k, s1.kept[k]);
        cr_assert_eq(s1.overflows, s0.overflows + 5);
        free(v);
        kd_chunkpool_drain();
    }
}

Test(chunkpool, past_the_largest_class_is_plain_malloc)
{
    size_t big = kd_chunkpool_class_size(KD_CHUNKPOOL_CLASSES - 1) + 1, cap = 0;
    void *p = kd_chunkpool_get(big, &cap);
    cr_assert_not_null(p);
    cr_assert_eq(cap, big);
    memset(p, 1, cap);
    struct kd_chunkpool_stats s0 = st();
    kd_chunkpool_put(p, cap);
    struct kd_chunkpool_stats s1 = st();
    cr_assert_eq(s1.overflows, s0.overflows + 1);
    cr_assert_eq(s1.kept_bytes, s0.kept_bytes);
    /* A size that is no class size (not made by get for a class) is freed, not kept. */
    void *q = malloc(1000);
    kd_chunkpool_put(q, 1000);
    cr_assert_eq(st().kept_bytes, s0.kept_bytes);
}

struct thread_arg {
    void *block;
    size_t cap;
    size_t kept_here;
    struct kd_chunkpool_stats before;
};

static void *other_thread(void *arg)
{
    struct thread_arg *a = arg;
    a->before = st();
    kd_chunkpool_put(a->block, a->cap); /* made on the main thread, kept here */
    a->kept_here = st().kept[cls(a->cap)];
    /* The thread exits with a block kept: its exit destructor frees it (ASan's leak check). */
    return NULL;
}

Test(chunkpool, pools_are_per_thread)
{
    kd_chunkpool_drain();
    struct thread_arg a = {0};
    a.block = kd_chunkpool_get(1000, &a.cap);
    unsigned k = cls(1000);
    cr_assert_eq(a.cap, kd_chunkpool_class_size(k));
    pthread_t t;
    cr_assert_eq(pthread_create(&t, NULL, other_thread, &a), 0);
    pthread_join(t, NULL);
    cr_assert_eq(a.before.kept[k], 0, "a new thread starts empty");
    cr_assert_eq(a.before.misses, 0);
    cr_assert_eq(a.kept_here, 1);
    cr_assert_eq(st().kept[k], 0, "the main thread's pool is untouched");
}

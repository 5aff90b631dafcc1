/* chunkpool.c — see chunkpool.h. A pool is a _Thread_local array of singly linked free lists (the
 * link lives in the free block itself). A pthread key whose destructor drains the lists is set the
 * first time a thread keeps a block, so a shard thread that exits gives its blocks back to glibc
 * (and leak checkers see them freed). */
#include "core/chunkpool.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
/* A kept block is poisoned (all but its link), so AddressSanitizer still reports a use after
 * kd_chunkpool_put as it would after free(). */
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct freeblock {
    struct freeblock *next;
};

struct pool {
    struct freeblock *head[KD_CHUNKPOOL_CLASSES];
    size_t kept[KD_CHUNKPOOL_CLASSES];
    unsigned long long hits, misses, overflows;
    bool registered; /* the thread-exit destructor is armed */
};

/* 3072 fits an nghttp2 session struct (2,928 bytes) without rounding it up to 4 KiB: every idle
 * agent connection has one. */
static const size_t class_size[KD_CHUNKPOOL_CLASSES] = {
    64,
    128,
    256,
    384,
    640,
    1024 + KD_CHUNKPOOL_SLACK,
    3072,
    4096 + KD_CHUNKPOOL_SLACK,
    16384 + KD_CHUNKPOOL_SLACK,
    65536 + KD_CHUNKPOOL_SLACK,
};
static const size_t class_max[KD_CHUNKPOOL_CLASSES] = {512, 512, 256, 256, 128, 128, 32, 32, 32, 16};

static _Thread_local struct pool tl_pool;
static pthread_key_t exit_key;
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;
static bool exit_key_ok;

static void drain(struct pool *p)
{
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++) {
        struct freeblock *b = p->head[i];
        while (b != NULL) {
            struct freeblock *n = b->next;
            UNPOISON(b, class_size[i]);
            free(b);
            b = n;
        }
        p->head[i] = NULL;
        p->kept[i] = 0;
    }
}

static void on_thread_exit(void *arg)
{
    struct pool *p = arg;
    drain(p);
    p->registered = false;
}

static void make_key(void)
{
    exit_key_ok = pthread_key_create(&exit_key, on_thread_exit) == 0;
}

/* The class whose blocks hold `size` bytes, or -1 past the largest. */
static int class_of(size_t size)
{
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++)
        if (size <= class_size[i])
            return (int)i;
    return -1;
}

void *kd_chunkpool_get(size_t size, size_t *cap)
{
    struct pool *p = &tl_pool;
    int k = class_of(size);
    if (k < 0) {
        *cap = size;
        return malloc(size);
    }
    struct freeblock *b = p->head[k];
    if (b != NULL) {
        UNPOISON(b, class_size[k]);
        p->head[k] = b->next;
        p->kept[k]--;
        p->hits++;
        *cap = class_size[k];
        return b;
    }
    p->misses++;
    void *m = malloc(class_size[k]);
    if (m != NULL)
        *cap = class_size[k];
    return m;
}

void kd_chunkpool_put(void *blk, size_t cap)
{
    if (blk == NULL)
        return;
    struct pool *p = &tl_pool;
    int k = class_of(cap);
    /* Only blocks of exactly a class size were made by get for that class. */
    if (k < 0 || class_size[k] != cap || p->kept[k] >= class_max[k]) {
        p->overflows++;
        free(blk);
        return;
    }
    if (!p->registered) {
        pthread_once(&exit_once, make_key);
        if (!exit_key_ok || pthread_setspecific(exit_key, p) != 0) {
            free(blk); /* no way to give it back at exit: do not keep it */
            return;
        }
        p->registered = true;
    }
    struct freeblock *b = blk;
    b->next = p->head[k];
    p->head[k] = b;
    p->kept[k]++;
    POISON((char *)b + sizeof(*b), cap - sizeof(*b));
}

/* The malloc-shaped interface: a header in front of the block says how big it is. 16 bytes keep
 * the caller's part aligned like malloc's (max_align_t). */
struct mhdr {
    size_t cap; /* the whole block, header included, as get returned it */
    size_t magic;
};
#define MHDR_MAGIC ((size_t)0x6b6463706f6f6cull) /* "kdcpool" */
_Static_assert(sizeof(struct mhdr) == 16, "header keeps 16-byte alignment");

void *kd_chunkpool_malloc(size_t size)
{
    if (size > SIZE_MAX - sizeof(struct mhdr))
        return NULL;
    size_t cap;
    struct mhdr *h = kd_chunkpool_get(sizeof(*h) + size, &cap);
    if (h == NULL)
        return NULL;
    h->cap = cap;
    h->magic = MHDR_MAGIC;
    return h + 1;
}

void *kd_chunkpool_malloc_exact(size_t size)
{
    if (size > SIZE_MAX - sizeof(struct mhdr))
        return NULL;
    /* kd_chunkpool_put keeps a block only when cap is exactly a class size; any other cap is freed. */
    struct mhdr *h = malloc(sizeof(*h) + size);
    if (h == NULL)
        return NULL;
    h->cap = sizeof(*h) + size;
    h->magic = MHDR_MAGIC;
    return h + 1;
}

void *kd_chunkpool_calloc(size_t n, size_t size)
{
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    void *p = kd_chunkpool_malloc(n * size);
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

static struct mhdr *mhdr_of(void *p)
{
    struct mhdr *h = (struct mhdr *)p - 1;
    if (h->magic != MHDR_MAGIC)
        abort(); /* not from kd_chunkpool_malloc, or freed twice: stop before the heap is corrupt */
    return h;
}

void kd_chunkpool_free(void *p)
{
    if (p == NULL)
        return;
    struct mhdr *h = mhdr_of(p);
    h->magic = 0;
    kd_chunkpool_put(h, h->cap);
}

void *kd_chunkpool_realloc(void *p, size_t size)
{
    if (p == NULL)
        return kd_chunkpool_malloc(size);
    struct mhdr *h = mhdr_of(p);
    size_t have = h->cap - sizeof(*h);
    if (size <= have)
        return p;
    void *n = kd_chunkpool_malloc(size);
    if (n == NULL)
        return NULL;
    memcpy(n, p, have);
    kd_chunkpool_free(p);
    return n;
}

void kd_chunkpool_drain(void)
{
    drain(&tl_pool);
}

void kd_chunkpool_stats(struct kd_chunkpool_stats *out)
{
    const struct pool *p = &tl_pool;
    out->kept_bytes = 0;
    for (unsigned i = 0; i < KD_CHUNKPOOL_CLASSES; i++) {
        out->kept[i] = p->kept[i];
        out->kept_bytes += p->kept[i] * class_size[i];
    }
    out->hits = p->hits;
    out->misses = p->misses;
    out->overflows = p->overflows;
}

size_t kd_chunkpool_class_size(unsigned i)
{
    return i < KD_CHUNKPOOL_CLASSES ? class_size[i] : 0;
}

size_t kd_chunkpool_class_max(unsigned i)
{
    return i < KD_CHUNKPOOL_CLASSES ? class_max[i] : 0;
}

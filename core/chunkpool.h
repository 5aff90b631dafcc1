/* chunkpool.h — per-thread free lists of message and output buffers in a few fixed size classes.
 * Concurrency: thread-local, no locks: each shard thread has its own pool. A block may be put back
 * on another thread than the one that got it (a connection handed off to another shard takes its
 * queued output along); it then simply joins that thread's pool.
 * Ownership: kd_chunkpool_get hands a block to the caller, kd_chunkpool_put takes it back.
 *
 * Why: every HTTP/2 message used to take a fresh 16 KiB malloc. On a shard thread that made glibc
 * trim the top of the arena on free (madvise) and regrow it on the next malloc (page faults): up to
 * half of kasd's CPU per routed call. Blocks of the classes below now cycle through a bounded free
 * list instead, so steady traffic never reaches glibc's top chunk; anything past the bounds (a
 * burst, or a size above the largest class) is plain malloc/free.
 *
 *   class   block bytes (header + payload)     kept at most     idle memory at most
 *     0          64                                 512                  32 KiB
 *     1         128                                 512                  64 KiB
 *     2         256                                 256                  64 KiB
 *     3         384                                 256                  96 KiB
 *     4         640                                 128                  80 KiB
 *     5        1024 + 128                           128                 144 KiB
 *     6        3072                                  32                  96 KiB
 *     7        4096 + 128                            32                 132 KiB
 *     8       16384 + 128                            32                 528 KiB
 *     9       65536 + 128                            16               1,026 KiB
 *                                                            per thread: 2.2 MiB at most
 *
 * The 128 bytes of slack let a 16 KiB (64 KiB) payload plus its gRPC prefix and the caller's chunk
 * header fit in one block of that class. The counts are sized for a shard with a few hundred calls
 * in flight: glibc's own per-thread cache keeps only 7 blocks of a size, so with 64 calls in flight
 * most small allocations fell through to its bins. Blocks kept by a thread are freed when it exits.
 *
 * kd_chunkpool_malloc/free/calloc/realloc are the same pool behind a malloc-shaped interface (the
 * block size sits in a 16-byte header), used as nghttp2's allocator (nghttp2_mem) and for small
 * per-call structs.
 */
#ifndef KD_CORE_CHUNKPOOL_H
#define KD_CORE_CHUNKPOOL_H

#include <stddef.h>

#define KD_CHUNKPOOL_CLASSES 10
#define KD_CHUNKPOOL_SLACK   128u

/* A block of at least `size` bytes; *cap gets its real size (pass that to put). NULL on ENOMEM. */
void *kd_chunkpool_get(size_t size, size_t *cap);
/* Give a block back; cap as returned by get. NULL is ignored. */
void kd_chunkpool_put(void *p, size_t cap);
/* malloc-shaped: any size (0 gives a valid block), free without the size, alignment as malloc's. */
void *kd_chunkpool_malloc(size_t size);
void *kd_chunkpool_calloc(size_t n, size_t size);
/* As kd_chunkpool_malloc, but exactly the size asked, straight from malloc and never rounded up to a
 * class: for blocks that live as long as a connection, where the rounding would be paid for the
 * whole of its life (nghttp2's session state, a call's stored request headers). kd_chunkpool_free
 * and _realloc take it like any other block. */
void *kd_chunkpool_malloc_exact(size_t size);
void *kd_chunkpool_realloc(void *p, size_t size);
void kd_chunkpool_free(void *p);
/* Free every block this thread keeps (tests; a thread's exit does it too). */
void kd_chunkpool_drain(void);

struct kd_chunkpool_stats {
    size_t kept[KD_CHUNKPOOL_CLASSES]; /* blocks on this thread's free lists now */
    size_t kept_bytes;
    unsigned long long hits, misses, overflows; /* get served from a list / from malloc; put freed */
};
/* This thread's pool. */
void kd_chunkpool_stats(struct kd_chunkpool_stats *out);
/* Size of class i's blocks, and how many a thread keeps at most. */
size_t kd_chunkpool_class_size(unsigned i);
size_t kd_chunkpool_class_max(unsigned i);

#endif

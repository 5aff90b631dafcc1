/* stat.h — single-writer counters that another thread may read.
 * Concurrency: one writer thread (the owning shard) increments; any thread reads (relaxed). On the
 * architectures we run on, a relaxed load+store is a plain mov: no lock prefix on the hot path.
 * Ownership: counters are embedded in their owner's struct.
 */
#ifndef KD_CORE_STAT_H
#define KD_CORE_STAT_H

#include <stdatomic.h>
#include <stdint.h>

typedef _Atomic uint64_t kd_stat;

static inline void kd_stat_add(kd_stat *s, uint64_t n)
{
    atomic_store_explicit(s, atomic_load_explicit(s, memory_order_relaxed) + n, memory_order_relaxed);
}

static inline void kd_stat_inc(kd_stat *s)
{
    kd_stat_add(s, 1);
}

static inline uint64_t kd_stat_get(const kd_stat *s)
{
    return atomic_load_explicit((kd_stat *)s, memory_order_relaxed);
}

#endif

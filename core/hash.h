/* hash.h — the hash that partitions agents across shards.
 * Concurrency: pure functions. Ownership: none.
 *
 * owner(agent_id) = kd_hash_u64(agent_id) % nshards. The finaliser of splitmix64 mixes all 64 bits,
 * so consecutive agent ids (GitLab allocates them sequentially) spread evenly.
 */
#ifndef KD_CORE_HASH_H
#define KD_CORE_HASH_H

#include <stdint.h>

static inline uint64_t kd_hash_u64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static inline unsigned kd_hash_owner(uint64_t agent_id, unsigned nshards)
{
    return (unsigned)(kd_hash_u64(agent_id) % nshards);
}

#endif

/* tracker.h — one shard's share of the fleet state in Redis (schema: docs/redis.md): the agent
 * connections and tunnel flags this shard owns, written in batches once per loop turn, re-synced
 * whole after every (re)connect; on shard 0 also the instance's record, heartbeat and the sweeper
 * of dead instances; and AgentTracker/GetConnectedAgents, answered from Redis.
 * Concurrency: shard-local, no locks; talks to Redis only through the shard's own connection.
 * Ownership: the tracker owns its entries; a connection entry is named by the register.c record
 * that created it until kd_tracker_conn_down() (after which that pointer is dead).
 *
 *   service ──conn_up/conn_down/tunnels──> desired state (all) + dirty list
 *   on_turn ──kd_tracker_flush──> one pipelined batch: SADD idx, HSET/HDEL, SADD/SREM, SREM idx
 *   redis up ──resync──> SMEMBERS idx, delete what is not wanted, rewrite what is
 */
#ifndef KD_SHARDS_TRACKER_H
#define KD_SHARDS_TRACKER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "shards/grpc.h"

struct kd_shard;
struct kd_redis;
struct kd_tracker;
struct kd_tracker_conn;

/* What every tracker of the process shares (read-only after start). */
struct kd_tracker_cfg {
    const char *prefix;       /* redis.key_prefix */
    char instance_id[17];     /* 16 hex digits */
    const char *private_addr; /* this instance's private API address, for its record */
    const char *version;
    unsigned nshards;
    uint32_t heartbeat_ms; /* SET alive every this often (default 10 s) */
    uint32_t ttl_ms;       /* alive key TTL (default 30 s) */
    uint32_t sweep_ms;     /* sweeper pass on shard 0 (default 30 s) */
    /* GetConnectedAgentsResponse bytes at most (limits.connected_agents_max_size, also capped at
     * limits.grpc_max_message_size); 0: 4 MiB - 64 KiB */
    uint32_t max_response;
    /* Shards whose state in Redis is not (yet, or no longer) complete: every tracker starts
     * counted, leaves once its re-sync has been applied and comes back when its connection drops.
     * GetConnectedAgents answers UNAVAILABLE while it is not 0, rather than a list missing this
     * instance's agents. Starts at nshards (kd_tracker_cfg_init); NULL: no such gate. */
    atomic_uint *unsynced;
};

/* Draw a fresh instance id into cfg (getrandom). */
void kd_tracker_cfg_init(struct kd_tracker_cfg *cfg);

struct kd_tracker *kd_tracker_new(struct kd_shard *s, const struct kd_tracker_cfg *cfg, struct kd_redis *r);
void kd_tracker_free(struct kd_tracker *t);

/* Redis connection events (from the shard's kd_redis hooks). */
void kd_tracker_redis_up(struct kd_tracker *t);
void kd_tracker_redis_down(struct kd_tracker *t);

/* An agent connection registered (meta: its AgentMeta as agentk sent it, borrowed). cur NULL: a new
 * entry, which is returned; otherwise the entry is updated and written again only if its
 * ConnectedAgentInfo changed. NULL on allocation failure (the connection is then not advertised). */
struct kd_tracker_conn *kd_tracker_conn_up(struct kd_tracker *t, struct kd_tracker_conn *cur,
                                           int64_t agent_id, int64_t project_id, int64_t pod_id,
                                           uint64_t connected_at_us, const uint8_t *meta, size_t meta_len);
void kd_tracker_conn_down(struct kd_tracker *t, struct kd_tracker_conn *c);
/* This instance holds ≥ 1 usable tunnel of the agent (present) or none (!present). */
void kd_tracker_tunnels(struct kd_tracker *t, int64_t agent_id, bool present);

/* Re-sync the whole state now if Redis is up, else at the next connect (KD_RT_TRACKER_RESYNC). */
void kd_tracker_request_resync(struct kd_tracker *t);

/* Once per loop turn: write the batch of changes. */
void kd_tracker_flush(struct kd_tracker *t);
/* The shard is stopping: remove every entry of this shard from Redis (shard 0 first deletes the
 * instance's alive key). The shard's Redis connection closes only after these are answered. */
void kd_tracker_stop(struct kd_tracker *t);

struct kd_tracker_stats {
    uint64_t conns, tunnels_flags;     /* entries wanted in Redis now */
    uint64_t writes, write_failures;   /* commands issued by the tracker / failed */
    uint64_t resyncs, swept_instances; /* full re-syncs; dead instances swept by this shard */
    uint64_t lookups, lookup_failures; /* GetConnectedAgents */
    uint64_t lookups_truncated;        /* ... answered OK with only the entries that fit */
};
void kd_tracker_stats(const struct kd_tracker *t, struct kd_tracker_stats *out);

/* An index member read back from Redis (bytes Redis returns: untrusted): 'c' (a connection:
 * key, agent, project), 't' (a tunnel flag: agent), or -1 for anything else. Exported for the
 * fuzz driver (test/fuzz/tracker_fuzz.c). */
int kd_tracker_parse_member(const char *s, size_t n, uint64_t *key, int64_t *agent, int64_t *project);

/* Encode a ConnectedAgentInfo; returns bytes written (buf NULL: the size). */
size_t kd_tracker_encode_info(uint8_t *buf, const uint8_t *meta, size_t meta_len, uint64_t connected_at_us,
                              int64_t pod_id, int64_t agent_id, int64_t project_id);

/* AgentTracker/GetConnectedAgents on the api listener (authenticated by the JWT like routed
 * calls; ud: unused). Answered from Redis by the accepting shard's tracker. */
extern const struct kd_grpc_method kd_tracker_get_connected_agents_method;

#endif

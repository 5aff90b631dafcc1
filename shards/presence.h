/* presence.h — one shard's view of where agents' tunnels are in the fleet: interest-based
 * subscriptions to agents' presence channels (Redis pub-sub), lookups of P:{a:A}:tunnels filtered
 * by the instances that are alive, a bounded route cache kept fresh by the events, and the peers'
 * private API addresses (schema: docs/redis.md).
 * Concurrency: shard-local, no locks. Commands go on the shard's own Redis connection; the
 * subscriptions on one dedicated subscriber connection per shard, owned here.
 * Ownership: a kd_presence_lookup is the caller's (embedded in its struct); it stays linked here
 * until its callback ran or kd_presence_lookup_cancel() unlinked it. Peer records handed to
 * callbacks are borrowed for the call only.
 *
 *   forward.c: no local tunnel for A ──watch(A)──> SUBSCRIBE P:{a:A}:presence (confirmed)
 *             ──lookup(A)──> (after the confirmation) SMEMBERS P:{a:A}:tunnels, liveness, addresses
 *             <──cb(peers)── live instances holding tunnels of A, this instance excluded
 *   peer publishes "+I" / "-I" ──> on_event(A, I, up) ──> forward.c wakes A's waiting calls
 *
 * Subscribe before looking up: a lookup's SMEMBERS is sent only after the SUBSCRIBE of its agent's
 * channel was confirmed, so an event published after the read is always received.
 */
#ifndef KD_SHARDS_PRESENCE_H
#define KD_SHARDS_PRESENCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/list.h"

struct kd_shard;
struct kd_redis;
struct kd_redis_opts;
struct kd_tracker_cfg;
struct kd_presence;

/* A peer instance: its id and the private API address it advertises ("ip:port", numeric). */
struct kd_presence_peer {
    char id[17];
    char address[96];
};

#define KD_PRESENCE_MAX_PEERS 16 /* candidates returned per lookup (random order beyond) */

struct kd_presence_cfg {
    const struct kd_tracker_cfg *tracker; /* prefix, own instance id, ttl */
    const struct kd_redis_opts *redis;    /* copied for the subscriber connection (subscriber=true) */
    uint32_t route_cache_size;            /* fleet.route_cache_size: agents with a cached route, LRU (0: 10000) */
    bool sharded;                         /* use SSUBSCRIBE/SPUBLISH (decided at start) */
    /* Read by forward.c (routing), set from the fleet.* configuration keys: */
    uint32_t recheck_ms;        /* fleet.recheck_interval: safety re-check of a waiting call (0: 5000) */
    bool poll;                  /* fleet.discovery: poll: no events, GitLab kas's polling schedule (S3 bench) */
    uint32_t peer_idle_ms;      /* fleet.peer_idle_timeout: close an unused peer connection (0: 60000) */
    uint32_t second_delay_ms;   /* fleet.second_candidate_delay: race the next candidate (0: 50) */
    uint32_t peer_connect_ms;   /* fleet.peer_connect_timeout: a peer not connected by then fails (0: 5000) */
    uint32_t peer_keepalive_ms, peer_keepalive_timeout_ms; /* private_api.listen.keepalive_*: PING peers */
    uint32_t peer_max_calls; /* calls on one peer connection before another is opened (0: 450) */
};

/* A peer went from 0 to >= 1 tunnels of the agent (up) or from >= 1 to 0, or stopped (!up). Only
 * for agents being watched. peer->address is "" for !up events of unknown peers. */
typedef void (*kd_presence_event_cb)(void *arg, int64_t agent_id, const struct kd_presence_peer *peer, bool up);

struct kd_presence *kd_presence_new(struct kd_shard *s, const struct kd_presence_cfg *cfg, struct kd_redis *cmd,
                                    kd_presence_event_cb on_event, void *arg);
void kd_presence_free(struct kd_presence *p);
/* The shard is stopping: close the subscriber connection (the shard's loop waits for it). */
void kd_presence_stop(struct kd_presence *p);

/* Interest in an agent, counted: while the count is > 0 (or the agent has a cached route) the shard
 * is subscribed to its channel and on_event reports its events. */
void kd_presence_watch(struct kd_presence *p, int64_t agent_id);
void kd_presence_unwatch(struct kd_presence *p, int64_t agent_id);

/* The cached route of an agent: the number of live peers written to out (up to max, random
 * order, 0 = known to have none), or -1 when nothing fresh is cached (do a lookup). */
int kd_presence_cached(struct kd_presence *p, int64_t agent_id, struct kd_presence_peer *out, size_t max);

/* An asynchronous lookup (embedded in the caller's struct; init with kd_presence_lookup_init). */
struct kd_presence_lookup;
typedef void (*kd_presence_lookup_cb)(struct kd_presence_lookup *lk, const struct kd_presence_peer *peers,
                                      size_t n, const char *err);
struct kd_presence_lookup {
    struct kd_list link; /* private */
    int64_t agent_id;    /* private */
    kd_presence_lookup_cb cb;
    bool pending; /* private: linked, callback not yet run */
};
void kd_presence_lookup_init(struct kd_presence_lookup *lk, kd_presence_lookup_cb cb);
/* Read Redis for the agent (fresh: ignore the cache, e.g. the safety re-check): subscribes first,
 * then SMEMBERS + liveness + addresses, fills the cache, and calls cb exactly once — possibly
 * before returning, with err set, when Redis is down. The caller watches the agent meanwhile. */
void kd_presence_lookup(struct kd_presence *p, struct kd_presence_lookup *lk, int64_t agent_id, bool fresh);
/* Unlink a pending lookup: its callback will not run. Harmless when not pending. */
void kd_presence_lookup_cancel(struct kd_presence *p, struct kd_presence_lookup *lk);

/* A peer answered a forwarded call as an instance it is not, or is unreachable: forget its address
 * (and drop it from every cached route) until its record is read again. */
void kd_presence_peer_bad(struct kd_presence *p, const char *instance_id);

/* true while this shard's subscriber connection is up (events flow). */
bool kd_presence_up(const struct kd_presence *p);

struct kd_presence_stats {
    uint64_t subscriptions;       /* channels subscribed now */
    uint64_t events_received;     /* presence messages received (any agent) */
    uint64_t lookups, lookup_failures;
    uint64_t cache_hits, cache_entries, cache_evictions;
    uint64_t cache_stale_hits; /* routes used while Redis was down (events may have been missed) */
    uint64_t sub_unconfirmed;  /* lookups that read without a confirmed SUBSCRIBE (refused, or slow) */
};
void kd_presence_stats(const struct kd_presence *p, struct kd_presence_stats *out);

/* A presence message ("+<16 hex>" or "-<16 hex>") from Redis (untrusted bytes): 1 (up) or 0 (down)
 * with the id copied into id[17], or -1. Exported for the fuzz driver. */
int kd_presence_parse_event(const char *msg, size_t len, char id[17]);
/* The agent id of a channel name "<prefix>:{a:<id>}:presence", or -1. Exported for fuzzing. */
int64_t kd_presence_parse_channel(const char *prefix, const char *ch, size_t len);
/* The "address" of an instance record (JSON written by the tracker; untrusted bytes) into
 * addr[cap]: 0, or -1 when missing, empty, escaped, not printable or too long. */
int kd_presence_parse_record(const char *rec, size_t len, char *addr, size_t cap);

#endif

/* pool.h — one shard's agents: each agent's idle tunnels, its calls waiting for a tunnel, and the
 * rule that matches the two. Knows nothing of gRPC: tunnels and waiting calls are intrusive
 * entries embedded in their owners (shards/tunnels.c, shards/backs.c).
 * Concurrency: shard-local, no locks. Ownership: the pool owns the agent records (created on
 * demand, freed as soon as nothing refers to them); entries belong to their embedding structs.
 *
 *   pool ── buckets[hash(id)] ── agent ─┬─ idle:    tunnel <-> tunnel     (FIFO: oldest first)
 *                                       ├─ waiting: wait <-> wait         (FIFO: oldest first)
 *                                       └─ pods:    (owned by register.c)
 *
 * Invariants (kd_pool_validate): a tunnel is on its agent's idle list iff t->idle; an idle tunnel
 * serves no waiting call of its agent (a match is taken at once); every agent is in the bucket of
 * its id; ntunnels counts attached tunnels; nagents counts agents; an agent with no tunnel, no
 * waiting call, no pod and no holder shard does not exist.
 */
#ifndef KD_SHARDS_POOL_H
#define KD_SHARDS_POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/list.h"

struct kd_pool_agent {
    int64_t id;
    int64_t project_id;
    struct kd_pool_agent *hnext;
    struct kd_list idle;
    struct kd_list waiting;
    struct kd_list pods; /* register.c's pod records */
    unsigned npods;      /* on that list (register.c holds it to limits.pods_per_agent) */
    unsigned ntunnels;
    unsigned nready; /* tunnels whose descriptor arrived and that have not ended (tunnels.c) */
    /* Several agents on one connection (backs.c, "holders"): a connection stays on the shard of
     * its first agent, so another agent's tunnels may live on a shard that does not own it.
     * Owner side: the other shards holding tunnels of the agent (bit per shard), with ready
     * tunnels and with idle ones, and whether this instance is advertised in Redis for it.
     * Holder side: what was last reported to the owner (bit 0: ready tunnels, bit 1: idle ones). */
    uint64_t holders_ready, holders_idle;
    bool advertised;
    uint8_t reported;
};

struct kd_pool_tunnel {
    struct kd_list link; /* agent->idle while idle */
    struct kd_pool_agent *agent;
    const char *methods; /* "/svc/method\0/svc/method\0...", owned by the embedding struct */
    size_t methods_len;
    bool idle;
};

struct kd_pool_wait {
    struct kd_list link; /* agent->waiting while waiting */
    struct kd_pool_agent *agent;
    const char *method; /* full method "/svc/method", owned by the embedding struct */
    size_t method_len;
};

struct kd_pool {
    struct kd_pool_agent **buckets;
    size_t nbuckets, nagents;
};

int kd_pool_init(struct kd_pool *p);
/* Frees every agent; waiting entries still queued are handed to drop (may be NULL). */
void kd_pool_fini(struct kd_pool *p, void (*drop)(struct kd_pool_wait *w));

struct kd_pool_agent *kd_pool_agent_find(struct kd_pool *p, int64_t id);
/* Find or create; NULL on allocation failure. */
struct kd_pool_agent *kd_pool_agent_get(struct kd_pool *p, int64_t id);
/* Free the agent if nothing refers to it any more. */
void kd_pool_agent_release(struct kd_pool *p, struct kd_pool_agent *a);

/* A tunnel stream of agent a exists (not yet usable: no descriptor). */
void kd_pool_tunnel_attach(struct kd_pool *p, struct kd_pool_agent *a, struct kd_pool_tunnel *t);
/* The tunnel's descriptor arrived (methods set): the oldest waiting call it serves is taken off
 * the wait list and returned (the tunnel stays busy), or NULL and the tunnel joins the idle list. */
struct kd_pool_wait *kd_pool_tunnel_ready(struct kd_pool *p, struct kd_pool_tunnel *t);
/* The tunnel ended: off the idle list if there, and the agent released. */
void kd_pool_tunnel_detach(struct kd_pool *p, struct kd_pool_tunnel *t);
bool kd_pool_tunnel_serves(const struct kd_pool_tunnel *t, const char *method, size_t len);

/* A call for agent a wants a tunnel: an idle tunnel serving w->method is taken off the idle list
 * and returned, or NULL and w joins the wait list (the caller arms its deadline). */
struct kd_pool_tunnel *kd_pool_wait_start(struct kd_pool *p, struct kd_pool_agent *a, struct kd_pool_wait *w);
/* Leave the wait list (deadline, cancellation); the agent is released. */
void kd_pool_wait_cancel(struct kd_pool *p, struct kd_pool_wait *w);
/* A waiting call of agent `id` whose entry satisfies match(w, ud), or NULL. */
struct kd_pool_wait *kd_pool_wait_find(struct kd_pool *p, int64_t id,
                                       bool (*match)(struct kd_pool_wait *w, void *ud), void *ud);

int kd_pool_validate(const struct kd_pool *p);

#endif

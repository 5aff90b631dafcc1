/* service.h — the kas service's per-shard state and the types its files share (private to
 * shards/: the rest of kasd talks to it through kas.h). One shard's service is split by noun:
 *   service.c   per-shard state: start, stop, the turn, message dispatch, stats
 *   tunnels.c   agents' reverse tunnels (ReverseTunnel/Connect): the tunnel automaton
 *   register.c  agent calls' authentication and hand-off gate, AgentRegistrar/Register and pods
 *   backs.c     the back halves of routed calls: matching a call to a tunnel, waiting, the
 *               holder shards of agents that share a connection
 *   forward.c   the fleet: offering a call to peer instances (peer tunnels, racing, retries,
 *               presence events)
 * A tunnel is in its agent's idle pool iff its state is IDLE; a back is on its agent's wait list
 * iff it is neither bound nor ended nor being offered to a peer.
 * Concurrency: everything here is one shard's, no locks.
 */
#ifndef KD_SHARDS_SERVICE_H
#define KD_SHARDS_SERVICE_H

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/chunkpool.h"
#include "core/clock.h"
#include "core/hash.h"
#include "core/list.h"
#include "core/log.h"
#include "core/pb.h"
#include "core/jwt.h"
#include "core/tokens.h"
#include "shards/agentconfig.h"
#include "shards/conn.h"
#include "shards/fleet.h"
#include "shards/kas.h"
#include "shards/pool.h"
#include "shards/presence.h"
#include "shards/redis.h"
#include "shards/tracker.h"
#include "shards/tunnel_codec.h"

#define MAX_HOLDER_SHARDS 64 /* holders are a bit per shard: more shards, no shared connections */

typedef struct kd_pool_agent agent_t;

struct tunnel {
    struct kd_pool_tunnel pt; /* pool entry: agent, methods, idle link */
    kd_grpc_call *call;
    enum kd_tun_state st;
    char *methods;     /* "/svc/method\0/svc/method\0..." (pt.methods) */
    struct back *back; /* the bound call */
    uint64_t resp_unacked;
    bool held;
    uint64_t acks_owed; /* request bytes to acknowledge once the tunnel's send queue drains */
    /* A peer tunnel: the call forwarded to another instance's gateway (a client call), which
     * relays the agent's ConnectRequest messages; not in any pool. */
    bool peer;
    bool ready;                 /* peer: the gateway said "tunnel ready" */
    struct kd_presence_peer to; /* peer: the instance */
    struct kd_fleet_chan *chan; /* peer: the connection it runs on */
};

enum wake { WAKE_START, WAKE_EVENT, WAKE_RECHECK, WAKE_POLL, WAKE_RETRY };

struct back {
    struct kd_pool_wait pw; /* pool entry while waiting: agent, method, wait link */
    void *front;            /* R's handle: passed back in messages, never dereferenced here */
    unsigned r;             /* R's shard */
    int64_t agent_id;
    struct tunnel *t; /* while bound */
    char *method;
    size_t method_len;
    uint8_t *md;
    size_t md_len;
    struct kd_timer timer;
    uint64_t start_ns; /* START arrived here (routing duration histogram) */
    bool bound, ended;
    struct kd_kas_shard *ks;
    /* the fleet */
    bool gateway;  /* KD_RT_START_GATEWAY: a local tunnel or nothing; never forwarded */
    bool watching; /* counted in kd_presence_watch */
    bool waited;   /* routing found nothing at first: the call waited */
    bool looking;  /* lk pending */
    uint8_t wake;  /* enum wake: what started the current forwarding attempts */
    uint8_t ncand, icand;
    uint32_t poll_ms; /* fleet.discovery poll: the next interval */
    /* An offer failed (unreachable, refused: not "no tunnel"): the holders are read again after
     * retry_ms (250 ms doubling up to fleet.recheck_interval) instead of at the next re-check, since
     * a peer that comes back (a healed link, a restart) announces nothing. */
    uint32_t retry_ms;
    bool retry_due, retry_armed;
    uint64_t event_gen; /* the presence event that last offered it to a peer */
    uint64_t deadline_ms;
    struct kd_presence_lookup lk;
    /* the peers being offered the call (KD_PRESENCE_MAX_PEERS entries), allocated at its first
     * offer to a peer: most routed calls find a tunnel here and never need them */
    struct kd_presence_peer *cand;
    struct kd_timer recheck;
    /* A second attempt raced against t (fleet.second_candidate_delay after t started without an
     * answer): the first to say "ready" gets the call, the other is cancelled before any request
     * byte. Both are NULL or unready peer tunnels while the back is on ks->forwarding. */
    struct tunnel *t2;
    struct kd_timer race;
    uint64_t tried;          /* holder shards that had no tunnel for it (see KD_RT_START_HOLDER) */
    uint64_t relay_id;       /* its relay to a holder shard (kd_rt_start.relay_id), 0: none */
    struct kd_list fwd_link; /* ks->forwarding while a peer is asked (off the wait list) */
};

struct pod {
    struct kd_list link;   /* agent->pods */
    struct pod *conn_next; /* the connection's pods */
    int64_t pod_id;
    uint64_t connected_at_us; /* wall clock */
    agent_t *agent;
    struct kd_tracker_conn *tracked; /* its entry in Redis (NULL: none) */
};

/* What an agent connection carries (kd_grpc_conn_user). */
struct agent_conn {
    int64_t agent_id;
    int64_t project_id; /* from the token */
    struct pod *pods;
    unsigned npods;      /* on pods (held to limits.pods_per_connection) */
    bool refusal_logged; /* one log line per connection, however often it retries */
};

struct kd_kas_shard {
    struct kd_shard *s;
    struct kd_kas *kas;
    bool stop_seen;
    struct kd_pool pool;
    struct kd_tracker *tracker; /* NULL without Redis */
    struct kd_agentconfig_shard *acfg;
    /* GitLab reuses one api JWT for many calls, and a full verification (base64, HMAC-SHA256,
     * JSON) per call was ~11 % of kasd's CPU on the routed path: verified tokens are cached here
     * (kd_jwt_cache: exact bytes compared, exp/nbf rechecked on every hit). Only for the api secret:
     * a token good there must not pass on the private listener. NULL: every call verified. */
    struct kd_jwt_cache *api_jwt;
    struct kd_kas_stats stats;
    struct kd_kas_route_hist route[KD_KAS_ROUTE_OUTCOMES];
    struct kd_presence *presence; /* NULL: no fleet */
    struct kd_fleet *fleet;
    struct kd_list forwarding; /* backs asking a peer */
    uint64_t event_gen;
    /* STARTs relayed to a holder shard, by relay id: a CANCEL_WAIT that finds no call here marks
     * the ones of its front, and one that comes back (KD_RT_START_BOUNCED, same id) marked is
     * ended at once instead of waiting for a tunnel nobody wants. A small ring: a bounce takes two
     * router hops; an entry overwritten only loses that shortcut (the call then ends at its
     * deadline, or its BOUND finds the caller gone). Ids are never reused, so a front address
     * reused by a later call cannot be mistaken for an earlier one. */
    struct away {
        uint64_t id;
        const void *front;
        uint16_t r;
        bool cancelled;
    } away[32];
    uint64_t relay_seq;
    /* agent.token_source: gitlab (register.c): tokens this shard has had resolved, by SHA-256, and
     * the agent calls suspended until the control thread answers for theirs. */
    struct tok_entry *tok_cache[256];
    size_t tok_entries;
    struct tok_wait *tok_waiting[256]; /* by the digest's first byte */
};

/* register.c */
void kas_token_resolved(struct kd_kas_shard *ks, const struct kd_msg *m);
void kas_token_stop(struct kd_kas_shard *ks);
void kas_token_cache_free(struct kd_kas_shard *ks);

/* backs.c */
bool kas_any_wait(struct kd_pool_wait *w, void *ud);
void kas_back_end(struct back *b, int status, const char *msg, const uint8_t *md, size_t mdlen);
void kas_back_unwatch(struct back *b);
void kas_bind_tunnel(struct back *b, struct tunnel *t);
void kas_count_woken(struct back *b, bool by_tunnel);
void kas_holder_state(struct kd_kas_shard *ks, const struct kd_msg *m);
void kas_relay_start(struct back *b, unsigned to, uint32_t flag, uint64_t tried);
void kas_tunnels_changed(struct kd_kas_shard *ks, agent_t *a);
void kas_wait_locally(struct back *b);

/* forward.c */
void kas_arm_recheck(struct back *b);
void kas_attempt_abort(struct back *b);
bool kas_fleet_on(const struct kd_kas_shard *ks);
bool kas_fleet_poll(const struct kd_kas_shard *ks);
void kas_forward(struct back *b, const struct kd_presence_peer *peers, size_t n, enum wake why);
void kas_look_up(struct back *b, bool fresh, enum wake why);
void kas_lookup_done(struct kd_presence_lookup *lk, const struct kd_presence_peer *peers, size_t n,
                     const char *err);
void kas_presence_event(void *arg, int64_t agent_id, const struct kd_presence_peer *peer, bool up);
void kas_race_cb(struct kd_timer *tm);
void kas_recheck_cb(struct kd_timer *tm);

/* service.c: send a router message from the shard */
void kas_post(struct kd_kas_shard *ks, unsigned to, uint16_t type, void *ptr, void *ptr2, uint32_t u32,
              uint64_t u64);
void kas_route_observe(struct kd_kas_shard *ks, struct back *b, int outcome);

/* tunnels.c */
int kas_tunnel_message(kd_grpc_call *call, const uint8_t *msg, size_t len);
void kas_tunnel_send(struct tunnel *t, const uint8_t *msg, size_t len);
void kas_tunnel_writable(kd_grpc_call *call);

#endif

/* kas.h — kasd's services on the shards: agents and reverse tunnels (agent listener), routed calls
 * (api listener), and the cross-shard protocol between a routed call's two halves.
 * Concurrency: every struct here is shard-local. A routed call has a front half on the shard R that
 * accepted the GitLab call and a back half on the agent's owner shard O; they talk only through
 * router messages (kd_shard_post), each half is touched only by its own shard, and neither frees
 * anything the other may still name (see the life rules below).
 * Ownership: payloads travel as kd_router_payload_alloc blocks and go home to be freed.
 *
 *   GitLab ──> api listener (shard R)                      agent listener (shard O = owner(agent))
 *              front {api call}  ── START ──────────────>  back {method, md}  -> waits, or binds an
 *                                <─ BOUND ──────────────   idle tunnel: RequestInfo to the agent
 *              request msgs      ── DATA ───────────────>  ConnectResponse.message to the agent
 *                                <─ ACK_REQ (credit) ────  (when the tunnel's send queue has room)
 *              half-close        ── HALF_CLOSE ─────────>  close_send
 *              send header       <─ HEADER ─────────────   agent Header
 *              send message      <─ RDATA ──────────────   agent Message
 *              (credit)          ── ACK_RESP ───────────>  resume reading the tunnel
 *              finish(status)    <─ END (terminal) ─────   agent Trailer / Error / loss / deadline
 *              client cancel     ── CANCEL / CANCEL_WAIT ─> RST the tunnel stream; END(CANCELLED)
 *              after END         ── FRONT_DONE ─────────>  back freed (bound backs only)
 *
 * Life rules: O sends exactly one END and nothing after it. R sends nothing to a back after
 * FRONT_DONE, and sends FRONT_DONE only after END and only for a back it learned from BOUND.
 * A back that was never bound is freed by O right after its END (R never knew its address).
 * A front is freed when it has seen END and its api call is over.
 */
#ifndef KD_SHARDS_KAS_H
#define KD_SHARDS_KAS_H

#include <stdbool.h>
#include <stdint.h>

#include "router/ring.h"
#include "shards/grpc.h"
#include "shards/shard.h"
#include "shards/tracker.h"

struct kd_tokens_handle;
struct kd_agentcfg_handle;
struct kd_agent_ident;
struct kd_agentconfig_shard;
struct kd_epoch;
struct kd_tracker;
struct kd_tracker_cfg;
struct kd_presence_cfg;

/* Router message types of routed calls. */
enum {
    KD_RT_START = KD_MSG_SHARD_USER, /* R->O ptr: struct kd_rt_start payload, ptr2: front, u64: agent id */
    KD_RT_DATA,                      /* R->O ptr: struct kd_rt_blob payload (a request message), ptr2: back */
    KD_RT_HALF_CLOSE,                /* R->O ptr2: back */
    KD_RT_CANCEL,                    /* R->O ptr2: back */
    KD_RT_CANCEL_WAIT,               /* R->O ptr2: front (compared, never dereferenced), u64: agent id */
    KD_RT_FRONT_DONE,                /* R->O ptr2: back */
    KD_RT_ACK_RESP,                  /* R->O ptr2: back, u64: response bytes the caller took */
    KD_RT_BOUND,                     /* O->R ptr2: front, ptr: back */
    KD_RT_HEADER,                    /* O->R ptr2: front, ptr: kd_rt_blob (md blob) */
    KD_RT_RDATA,                     /* O->R ptr2: front, ptr: kd_rt_blob (a response message) */
    KD_RT_END,                       /* O->R ptr2: front, u32: status, ptr: kd_rt_end payload */
    KD_RT_ACK_REQ,                   /* O->R ptr2: front, u64: request bytes handed to the tunnel */
    /* Observability (control/control.c, router participant n = the control thread). Every shard
     * answers a request on its own thread; the control thread never reads shard-local state. */
    KD_RT_STATS_REQ, /* control->shard u64: round number */
    KD_RT_STATS,     /* shard->control u64: round number, ptr: struct kd_kas_snapshot payload (release it) */
    /* Fleet tracking (shards/tracker.c): shard 0 re-registered the instance after its Redis
     * connection came back; every other shard re-syncs, in case peers swept the instance's entries
     * while its heartbeat was missing. */
    KD_RT_TRACKER_RESYNC, /* shard 0 -> shard */
    /* Several agents on one connection: a shard holding tunnels of an agent it does not own tells
     * the owner whenever it starts or stops having ready tunnels (bit 0 of u32) or idle ones (bit
     * 1). u64: agent id. The owner advertises the instance in Redis and hands calls to it. */
    KD_RT_HOLDER_STATE, /* holder shard -> owner shard */
    /* Agent tokens resolved by GitLab (agent.token_source: gitlab; control/gitlab.c): a shard asks
     * the control thread once per token it does not know, the control thread answers every shard
     * that asked (one GitLab request per token, whatever the number of shards and calls). */
    KD_RT_TOKEN_RESOLVE,  /* shard -> control, ptr: struct kd_rt_token_req payload */
    KD_RT_TOKEN_RESOLVED, /* control -> shard, ptr: struct kd_rt_token_ans payload */
};

#define KD_TOKEN_DIGEST_LEN 32 /* SHA-256 of the token: the only form a token is kept in */

struct kd_rt_token_req {
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    uint32_t len;
    char token[]; /* wiped by the control thread once its request to GitLab is written */
};

struct kd_rt_token_ans {
    uint8_t digest[KD_TOKEN_DIGEST_LEN];
    int32_t status;  /* 0 (known agent), KD_GRPC_UNAUTHENTICATED or KD_GRPC_UNAVAILABLE */
    uint32_t ttl_ms; /* how long the shard may keep the answer */
    int64_t agent_id, project_id;
    char why[160]; /* UNAVAILABLE: what went wrong with GitLab */
    uint32_t name_len;
    char name[]; /* agent_name */
};

struct kd_rt_blob {
    uint32_t len;
    uint8_t data[];
};

struct kd_rt_start {
    int64_t agent_id;
    uint64_t deadline_ms; /* absolute, monotonic ms: give up waiting for a tunnel then */
    uint32_t method_len, md_len;
    uint32_t flags;    /* KD_RT_START_* */
    uint32_t reply_to; /* the front's shard (a START relayed between owner and holder keeps it) */
    uint64_t tried;    /* holder shards that had no tunnel for it (KD_RT_START_BOUNCED) */
    uint64_t relay_id; /* owner -> holder relays: the owner's id of this relay (0: not relayed) */
    char data[];       /* method, then the md blob */
};

/* A kas-to-kas call arriving on the private listener (shards/fleet.c): the owner shard delivers it
 * to a local tunnel or ends it at once ("no tunnel here"), never forwards it; the agent's
 * ConnectRequest messages go to the front raw (RDATA), for the routing instance to decode. */
#define KD_RT_START_GATEWAY 1u
/* Owner -> holder shard: bind one of the holder's idle tunnels of the agent, or send the START back
 * (BOUNCED, this shard's bit set in tried): the call is routed on the owner again, without it. */
#define KD_RT_START_HOLDER 2u
#define KD_RT_START_BOUNCED 4u

struct kd_rt_end {
    uint32_t msg_len, md_len;
    char data[]; /* status message, then the trailer md blob */
};

/* Flow control between the halves: bytes in flight (sent, not acknowledged) before the sender
 * stops reading its side. */
#define KD_RT_WINDOW (1u << 20)

/* Process-wide, read-only after start (except the token table, swapped atomically on reload). */
struct kd_kas {
    struct kd_tokens_handle *tokens; /* agent tokens (NULL: every agent call is UNAUTHENTICATED) */
    bool gitlab_tokens; /* agent.token_source: gitlab: tokens are resolved by the control thread */
    struct kd_epoch *epoch;          /* shards pass a quiescent point each turn (token reloads) */
    uint8_t api_secret[128];         /* JWT secret of the api listener */
    size_t api_secret_len;           /* 0: no secret configured: api calls are UNAUTHENTICATED */
    uint32_t routing_timeout_ms;     /* cap on waiting for a tunnel (GitLab kas: 20 s) */
    uint32_t pods_per_connection;    /* limits.pods_per_connection (0: 16) */
    uint32_t pods_per_agent;         /* limits.pods_per_agent, on this instance (0: 1000) */
    uint32_t agent_meta_max;         /* limits.agent_meta_max_size: one Register's AgentMeta (0: 16 KiB) */
    uint32_t max_message;            /* limits.grpc_max_message_size: a routed call's messages, either
                                      * way, unwrapped from the tunnel (0: 4 MiB) */
    unsigned nshards;
    const struct kd_tracker_cfg *tracker; /* fleet state in Redis (NULL: none) */
    struct kd_agentcfg_handle *agentcfg;  /* agent configuration files (NULL: every agent gets the
                                           * empty configuration); swapped like the tokens */
    const char *gitlab_external_url;      /* told to agents in their configuration ("" if unset) */
    /* The fleet (kas-to-kas routing): NULL without Redis tracking (calls reach local tunnels only). */
    const struct kd_presence_cfg *presence;
    uint8_t private_secret[128]; /* JWT secret of the private listener (signs and verifies hops) */
    size_t private_secret_len;   /* 0: no private secret: no forwarding, gateway calls UNAUTHENTICATED */
    struct kd_tls_ctx *peer_tls;  /* dial peers' private listeners over TLS (NULL: h2c) */
    const char *peer_server_name; /* name verified in peers' certificates (NULL: the peer's IP) */
};

/* Server hooks (kd_server_opts): per-shard state and message dispatch. opts.user = struct kd_kas. */
int kd_kas_shard_start(struct kd_shard *s);
void kd_kas_shard_stop(struct kd_shard *s);
void kd_kas_on_message(struct kd_shard *s, const struct kd_msg *m);
void kd_kas_on_turn(struct kd_shard *s);

/* Methods of the agent listener (ReverseTunnel/Connect, AgentRegistrar/Register) and the api
 * listener's fallback (any method with kas-hop-routing-agent-id is routed). */
extern const struct kd_grpc_method kd_kas_connect_method;
extern const struct kd_grpc_method kd_kas_register_method;
extern const struct kd_grpc_method kd_kas_route_method;
/* The private listener's kas-to-kas method (/kasd.fleet.v1.Gateway/Tunnel, docs/operations.md). */
extern const struct kd_grpc_method kd_kas_gateway_method;
/* kd_grpc_server_cfg.on_conn_close of the agent listener. */
void kd_kas_agent_conn_close(struct kd_shard *s, void *user);

/* Counters of one shard, for tests and (later) metrics. */
struct kd_kas_stats {
    uint64_t agents, tunnels_idle, tunnels_busy, waiting_calls;
    uint64_t routed_ok, routed_failed, routed_no_tunnel, auth_failures, protocol_violations;
    uint64_t api_auth_failures;    /* api listener: JWT missing or refused (on the accepting shard) */
    uint64_t pods_refused_conn;    /* Register of a new pod_id refused: limits.pods_per_connection */
    uint64_t pods_refused_agent;   /* ... refused: limits.pods_per_agent */
    uint64_t meta_refused;         /* Register refused: AgentMeta over limits.agent_meta_max_size */
    uint64_t routed_by_status[17]; /* routed calls finished on the owner shard, by gRPC status code */
    /* The fleet (docs/operations.md, "Running a fleet"). On the routing instance: attempts to
     * forward a call to a peer, by how they ended before any request byte went out. */
    uint64_t fwd_ready, fwd_no_tunnel, fwd_failed;
    /* Second candidates raced against a first that had not answered within
     * fleet.second_candidate_delay (or had failed while another ran), and races they won. */
    uint64_t fwd_raced, fwd_race_won;
    /* Several agents on one connection: calls this (owner) shard handed to a shard holding the
     * agent's tunnels on a shared connection, and calls a holder shard sent back (no idle tunnel
     * served them any more). */
    uint64_t holder_handoffs, holder_bounces;
    /* On the gateway instance: kas-to-kas calls bound to a local tunnel, or answered no-tunnel. */
    uint64_t gw_ready, gw_no_tunnel;
    /* Calls that had to wait, by what got them routed: a local tunnel registering, a presence
     * event, the safety re-check, or (fleet.discovery: poll) a poll. */
    uint64_t woken_tunnel, woken_event, woken_recheck, woken_poll, woken_retry;
    uint64_t recheck_found;  /* safety re-checks that found a peer holding a tunnel (expected 0) */
    uint64_t peer_channels;  /* connections to peer instances open now */
    uint64_t forwarding;     /* calls being offered to a peer now (not yet ready) */
    /* The presence layer (shards/presence.h): channels subscribed now, events received, Redis
     * lookups (and failed ones), route cache hits (and hits used while Redis was down), routes
     * cached now, routes evicted (LRU). */
    uint64_t pr_subscriptions, pr_events, pr_lookups, pr_lookup_failures;
    uint64_t pr_cache_hits, pr_cache_stale_hits, pr_cache_entries, pr_cache_evictions;
    uint64_t pr_sub_unconfirmed;
    uint64_t token_redis_hits; /* agent tokens (token_source: gitlab) found in Redis (another instance's) */
};
void kd_kas_stats(struct kd_shard *s, struct kd_kas_stats *out);

/* Routing decision time on the owner shard: from a routed call's START arriving there to the call
 * being bound to a tunnel (success), its deadline passing with no tunnel (timeout), or the caller
 * cancelling while it waited (aborted). Buckets: upper bounds in seconds, from 50 µs to 20 s. */
#define KD_KAS_ROUTE_BUCKETS 18
extern const double kd_kas_route_bucket_le[KD_KAS_ROUTE_BUCKETS];
enum { KD_KAS_ROUTE_SUCCESS, KD_KAS_ROUTE_TIMEOUT, KD_KAS_ROUTE_ABORTED, KD_KAS_ROUTE_OUTCOMES };
struct kd_kas_route_hist {
    uint64_t buckets[KD_KAS_ROUTE_BUCKETS + 1]; /* per bucket, NOT cumulative; the last is +Inf */
    uint64_t count, sum_ns;
};

/* A shard's answer to KD_RT_STATS_REQ, built on the shard's own thread. */
struct kd_kas_snapshot {
    struct kd_kas_stats kas;
    struct kd_kas_route_hist route[KD_KAS_ROUTE_OUTCOMES];
    struct kd_tracker_stats tracker; /* zero without Redis tracking */
    uint32_t listeners_open;         /* listening sockets still open on this shard */
    bool stopping;                   /* the shard has seen the stop request */
};

/* --- shared between the service (O side: shards/service.h) and route.c (R side) --- */
struct kd_kas_shard;
struct kd_kas_shard *kd_kas_shard_of(struct kd_shard *s);
void kd_kas_back_message(struct kd_shard *s, const struct kd_msg *m);  /* R->O types */
void kd_kas_front_message(struct kd_shard *s, const struct kd_msg *m); /* O->R types */
/* Allocate/release payloads through the router so they are freed on the allocating shard. */
void *kd_kas_payload(struct kd_shard *s, size_t size);
void kd_kas_release(struct kd_shard *s, void *payload);
/* The api listener's authentication (GitLab's JWT): 0 when the call may go on; otherwise the call
 * was answered UNAUTHENTICATED and -1 is returned. */
int kd_kas_api_authenticate(kd_grpc_call *call);
/* Count an api call refused by kd_kas_api_authenticate. */
void kd_kas_count_api_auth_failure(struct kd_shard *s);
/* The shard's Redis tracker (shards/tracker.h), or NULL. */
struct kd_tracker *kd_kas_tracker(struct kd_shard *s);

/* The agent listener's authentication and placement, shared by its methods: resolve the bearer
 * token into *ident and make sure the call runs on the agent's owner shard. 1: the call was moved
 * (start() runs again there; return 0 from start()); 0: go on with *ident (agent_name is borrowed
 * from the token table: copy it to keep it past this turn); >0: the call was answered with that
 * status (UNAUTHENTICATED for a missing or unknown token). */
int kd_kas_agent_call_gate(kd_grpc_call *call, struct kd_agent_ident *ident);
/* A registration refused for an AgentMeta over limits.agent_meta_max_size (GetConfiguration's older
 * agentk path; Register counts its own): kasd_agent_pods_refused_total{limit="agent_meta_max_size"}. */
void kd_kas_count_meta_refused(struct kd_shard *s);

/* This shard's cache of verified api JWTs (core/jwt.h), or NULL (verify every call in full). */
struct kd_jwt_cache *kd_kas_api_jwt_cache(struct kd_shard *s);

/* This shard's GetConfiguration streams (shards/agentconfig.h). */
struct kd_agentconfig_shard *kd_kas_agentconfig(struct kd_shard *s);

/* An md blob as HTTP/2 headers (at most cap; transport headers, invalid keys and values HTTP/2
 * forbids are dropped; -bin values base64-encoded). Returns the count; *arena holds the bytes and is
 * kd_chunkpool_free'd by the caller (NULL when out of memory: then 0 is returned). */
size_t kd_kas_md_headers(const uint8_t *blob, size_t len, struct kd_h2_header *h, size_t cap, char **arena);

/* The routing metadata of a call (untrusted bytes; exported for test/fuzz/hop_fuzz.c): exactly one
 * positive decimal kas-hop-routing-agent-id; for a kas-to-kas call (gateway) also exactly one
 * kas-hop-method ("/pkg.Svc/Method", printable, <= 1024 bytes) and one kas-hop-instance (16
 * lower-case hex digits). Values point into the headers. 0, or a gRPC status with *why set. */
struct kd_kas_hop {
    int64_t agent_id;
    const char *method, *instance;
    size_t method_len, instance_len;
};
typedef bool (*kd_kas_header_fn)(void *ud, size_t i, struct kd_h2_header *out); /* i-th header, false past the end */
int kd_kas_parse_hop(kd_kas_header_fn get, void *ud, bool gateway, struct kd_kas_hop *out, const char **why);

/* A routed call's request metadata as an md blob for RequestInfo.meta (untrusted bytes; exported for
 * test/fuzz/md_fuzz.c): every header but transport ones (':'-pseudo headers, content-type, te,
 * grpc-timeout, ...), kas-hop-* and authorization; the values of a key in one entry, in order, at
 * the key's first occurrence (at most 64); -bin values base64-decoded as grpc-go reads them (a value
 * that does not decode is dropped). Returns a kd_chunkpool_malloc'd blob of *len bytes, NULL when out
 * of memory. */
uint8_t *kd_kas_request_md_blob(kd_kas_header_fn get, void *ud, size_t *len);

/* "Bearer <x>" from the call's authorization header; NULL if absent or not a bearer credential. */
const char *kd_kas_bearer(kd_grpc_call *call, size_t *len);

#endif

/* server.h — the set of shard threads behind kasd's listeners.
 * Concurrency: kd_server_* are called from one controlling thread (main, or a test); shards run on
 * their own threads. kd_server_stop() is async-signal-unsafe but thread-safe (a flag + eventfd).
 * Ownership: the server owns the shards, the router and every listening socket; the caller keeps
 * the option strings and ops tables alive until kd_server_destroy().
 *
 *   kd_server_create  binds every listener (one SO_REUSEPORT socket per shard), sizes tables
 *   kd_server_start   starts N pinned shard threads; returns once each has its io_uring or failed
 *   kd_server_stop    asks shards to stop accepting and finish (graceful), returns at once
 *   kd_server_wait    joins the shards
 *   kd_server_destroy frees everything
 */
#ifndef KD_SHARDS_SERVER_H
#define KD_SHARDS_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/h2.h"
#include "core/stat.h"
#include "router/ring.h"
#include "shards/redis.h"

struct kd_server;
struct kd_shard;
struct kd_conn_ops;
struct kd_router;

#define KD_MAX_LISTENERS 8

struct kd_server_listener {
    const char *name; /* "agent", "api", ... (logs, metrics) */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    const struct kd_conn_ops *ops;
    const void *cfg; /* protocol configuration, reachable with kd_conn_listener_cfg() */
};

struct kd_server_opts {
    unsigned shards; /* 0 = online CPUs */
    bool pin;        /* pin shard i to the i-th CPU (mod n) of the process's affinity mask */
    struct kd_server_listener listeners[KD_MAX_LISTENERS];
    unsigned nlisteners;
    uint32_t connections_per_shard;
    uint32_t recv_buffers;     /* per shard, power of two */
    uint32_t recv_buffer_size; /* bytes */
    uint32_t ring_size;        /* router ring capacity per shard pair, power of two */
    uint32_t shutdown_grace_ms;
    /* Optional hooks, each called on the shard's own thread. */
    void *user;                                                     /* borrowed; kd_server_user() */
    int (*on_shard_start)(struct kd_shard *s);                      /* <0 aborts start */
    void (*on_shard_stop)(struct kd_shard *s);                      /* after the last connection */
    void (*on_message)(struct kd_shard *s, const struct kd_msg *m); /* router types >= KD_MSG_SHARD_USER */
    void (*on_turn)(struct kd_shard *s); /* once per loop turn, before the shard may sleep */
    /* Redis: when set, every shard opens one connection with these options at start (before
     * on_shard_start, so services find it with kd_shard_redis() and take it over with
     * kd_redis_set_hooks()), keeps it through the drain, and frees it after on_shard_stop. Borrowed. */
    const struct kd_redis_opts *redis;
};

/* Per-shard counters: written by the shard, readable from any thread. */
struct kd_shard_stats {
    kd_stat accepted;
    kd_stat refused; /* accepted but closed at once: connection table full */
    kd_stat closed;
    kd_stat handoffs_out;
    kd_stat handoffs_in;
    kd_stat handoffs_refused; /* arrived but the table was full */
    kd_stat recv_bytes;
    kd_stat sent_bytes;
    kd_stat recvs;   /* receive completions that carried bytes (one per buffer) */
    kd_stat sends;   /* send operations submitted */
    kd_stat enobufs; /* recv re-armed after the buffer ring ran dry */
    kd_stat stale_cqes;
    kd_stat loops;
    kd_stat sleeps;
    kd_stat accept_errors;
    kd_stat memory_trims; /* heap returned to the kernel after many connections left (shard.c) */
    kd_stat buffer_sheds; /* receive buffers' pages returned to the kernel while quiet (shard.c) */
    kd_stat quiet_sheds;  /* connections told to shed memory after a quiet spell (conn.c) */
    /* gRPC listeners, by listener index (kd_server_opts.listeners): connections opened here
     * (accepted, not adopted) and closed here (after any hand-off), calls started, TLS handshakes
     * completed and failed, connections closed because our keepalive PING went unanswered.
     * http2_abuse: HTTP/2 abuse by reason (enum kd_h2_abuse, core/h2.h).
     * Summed over shards they describe the listener. */
    struct kd_listener_stats {
        kd_stat opened, closed, streams, tls_handshakes, tls_failures, keepalive_timeouts;
        kd_stat ws_upgrades, ws_refused,
            ws_bad_frames; /* WebSocket: 101 sent, upgrade refused, closed on a bad frame */
        kd_stat http2_abuse[KD_H2_ABUSE_COUNT];
    } listener[KD_MAX_LISTENERS];
    struct kd_redis_stats redis; /* the shard's Redis connection (kd_server_opts.redis) */
};

int kd_server_create(const struct kd_server_opts *opts, struct kd_server **out, char *err, size_t errlen);
int kd_server_start(struct kd_server *srv, char *err, size_t errlen);
void kd_server_stop(struct kd_server *srv);
int kd_server_wait(struct kd_server *srv);
void kd_server_destroy(struct kd_server *srv);

unsigned kd_server_nshards(const struct kd_server *srv);
/* The port listener i is bound to (resolves port 0). */
int kd_server_port(const struct kd_server *srv, unsigned listener);
/* The address listener i is bound to, formatted "127.0.0.1:41234" / "[::1]:41234". */
void kd_server_address(const struct kd_server *srv, unsigned listener, char *buf, size_t len);
const struct kd_shard_stats *kd_server_shard_stats(const struct kd_server *srv, unsigned shard);
struct kd_router *kd_server_router(struct kd_server *srv);
void *kd_server_user(const struct kd_server *srv);
/* Wake shard i (eventfd), from any thread: it runs a loop turn. */
void kd_server_wake(struct kd_server *srv, unsigned shard);

#endif

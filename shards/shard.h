/* shard.h — one shard: a thread, its io_uring, its connections, timers and mailboxes.
 * Concurrency: everything here is touched only by the shard's own thread, except what the router
 * and kd_shard_stats document. Nothing under shards/ takes a lock.
 * Ownership: the shard owns its ring, provided buffers, connection table and timer wheel.
 *
 * The loop (style.md rule 7), one turn:
 *
 *   ┌─> reap completions (≤ KD_SHARD_CQE_BUDGET)      accept / recv / send / cancel / doorbells
 *   │   drain mailboxes   (≤ KD_SHARD_MSG_BUDGET)     hand-offs, routed work
 *   │   run timers        (≤ KD_SHARD_TIMER_BUDGET)
 *   │   flush             on_flush() of dirty conns, then one send per conn with output
 *   │   stop check        stopping && no connection && no op in flight -> exit
 *   │   if work is left (budget hit): submit, no wait
 *   │   else prepare_sleep (router) -> submit_and_wait(timeout = next timer) -> awake
 *   └───────────────────────────────────────────────┘
 */
#ifndef KD_SHARDS_SHARD_H
#define KD_SHARDS_SHARD_H

#include <liburing.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/timerwheel.h"
#include "router/router.h"
#include "shards/conn.h"
#include "shards/server.h"

#define KD_SHARD_CQE_BUDGET   512
#define KD_SHARD_MSG_BUDGET   512
#define KD_SHARD_TIMER_BUDGET 1024
#define KD_MAX_CPUS           1024

/* Router message types owned by the shard layer; protocols use >= KD_MSG_SHARD_USER. */
enum {
    KD_MSG_HANDOFF = KD_MSG_USER, /* ptr: struct kd_handoff */
    KD_MSG_SHARD_USER = KD_MSG_USER + 16,
};

/* What travels with a connection between shards. Allocated by the sender with
 * kd_router_payload_alloc() and released by the receiver, so it is freed where it was made. */
struct kd_handoff {
    int fd;
    uint8_t listener;
    const struct kd_conn_ops *ops;
    void *ctx;
};

struct kd_shard_listener {
    struct kd_shard *shard;
    unsigned index;
    struct kd_timer rearm; /* re-arm accept a little later after an error such as EMFILE */
    int fd;
    bool armed;   /* multishot accept in flight */
    bool closing; /* cancel sent; close fd when the accept terminates */
};

struct kd_shard {
    unsigned id;
    struct kd_server *srv;
    pthread_t thread;
    struct io_uring ring;
    bool ring_ok;
    int eventfd;
    uint64_t eventfd_val;
    bool eventfd_armed;
    int start_err;       /* set by the thread before the start barrier */
    char start_msg[256]; /* what failed, for kd_server_start's error */

    /* provided buffer ring (bgid 0), registered by hand: liburing 2.3 lacks io_uring_setup_buf_ring */
    struct io_uring_buf_ring *br;
    size_t br_map_len;
    uint8_t *bufs;
    uint32_t nbufs, buf_size;
    uint32_t br_pending;         /* buffers added since the last advance */
    size_t bufs_len;             /* the mapping behind bufs (page-rounded) */
    bool defer_taskrun;          /* the ring runs with IORING_SETUP_DEFER_TASKRUN (see maybe_shed) */
    uint64_t bufs_used;          /* receive completions that consumed a buffer, ever */
    uint64_t shed_used, shed_ms; /* bufs_used and time at the last shed */
    uint64_t shed_check_used, shed_check_ms; /* bufs_used and time at the last look */

    struct kd_shard_listener listeners[KD_MAX_LISTENERS];
    unsigned nlisteners;
    unsigned listeners_open;

    struct kd_conntable conns;
    struct kd_list dirty; /* connections needing on_flush or a send this turn */
    struct kd_list sent;  /* connections that sent since their last on_quiet (conn.c) */
    uint32_t quiet_gen;   /* walks of `sent` so far */
    uint64_t quiet_ms;    /* time of the last walk */
    struct kd_timerwheel timers;
    uint64_t now_ms;
    uint32_t ops_inflight;            /* every op of this shard (conns, listeners, eventfd, wakes) */
    uint64_t wake_at_ns;              /* earliest kd_shard_wake_at pending (UINT64_MAX: none) */
    struct __kernel_timespec wake_ts; /* its time, read by the kernel when the SQE is submitted */

    bool stopping;          /* stop seen: listeners closing, connections told */
    bool force_closing;     /* the grace period is over: anything still arriving is closed */
    uint64_t stop_deadline; /* force-close remaining connections at this time */
    struct kd_timer stop_timer;

    /* Messages a shard posts to itself, delivered at the next mailbox step (see kd_shard_post). */
    struct kd_msg *local;
    uint32_t local_head, local_len, local_cap;

    struct kd_redis *redis; /* the shard's Redis connection (kd_server_opts.redis), or NULL */
    void *user;             /* protocol's per-shard state */
    struct kd_shard_stats stats;

    /* The stop barrier (see exit_ready in shard.c). Written by this shard, read by the others.
     * msgs_sent: messages this shard sent to a shard (itself included) with kd_shard_send/post;
     * msgs_handled: such messages this shard has handled, counted once the handler returned.
     * drained: stopping, with no connection, listener, operation or local message left. */
    _Atomic uint64_t msgs_sent, msgs_handled;
    _Atomic bool drained;
    uint64_t drained_since_ms; /* 0: not drained */
    uint32_t trim_peak;        /* most live connections since the heap was last trimmed (shard.c) */
    uint32_t trim_live;        /* live connections at the last look */
    uint64_t trim_left_ms;     /* when a connection was last seen to have left */
};

/* The server as shards see it (defined here, not in server.h: only shards/ looks inside). */
/* u32 of a message from the control thread that takes part in the stop barrier (see ctl_sent). */
#define KD_MSG_BARRIER 0x80000000u

struct kd_server {
    struct kd_server_opts opts;
    unsigned n;            /* shards; router participant n is the control thread */
    unsigned ncpu;         /* CPUs in the process's affinity mask */
    int cpus[KD_MAX_CPUS]; /* their numbers; shard i is pinned to cpus[i % ncpu] */
    struct kd_router *router;
    struct kd_shard *shards;
    struct sockaddr_storage bound[KD_MAX_LISTENERS];
    _Atomic bool stopping;
    /* The stop barrier's view of the control thread (participant n): messages it sent to shards
     * with KD_MSG_BARRIER in u32 (the Kubernetes API front door's routed calls), and messages from
     * shards it has handled. Stats rounds stay out of the barrier. */
    _Atomic uint64_t ctl_sent, ctl_handled;
    sem_t ready; /* each shard posts once it is set up (or failed) */
    sem_t go;    /* main posts once per shard when all are set up */
    _Atomic bool abort_start;
    bool started;
    bool joined;
};

/* --- used by protocols and the server --- */
/* Wake this shard's loop at CLOCK_MONOTONIC time mono_ns (kd_clock_ns), for work due between the
 * timer wheel's 1 ms ticks (the load generator's paced calls). An io_uring timeout: the loop turn it
 * ends runs the protocol's on_turn hook. A request no earlier than a pending one is dropped; an
 * earlier one adds a second timeout. Shard thread only. */
void kd_shard_wake_at(struct kd_shard *s, uint64_t mono_ns);
static inline unsigned kd_shard_id(const struct kd_shard *s)
{
    return s->id;
}
static inline uint64_t kd_shard_now_ms(const struct kd_shard *s)
{
    return s->now_ms;
}
static inline struct kd_timerwheel *kd_shard_timers(struct kd_shard *s)
{
    return &s->timers;
}
static inline void *kd_shard_user(const struct kd_shard *s)
{
    return s->user;
}
static inline void kd_shard_set_user(struct kd_shard *s, void *user)
{
    s->user = user;
}
/* The shard's Redis connection (NULL when the server has no kd_server_opts.redis). Services issue
 * their commands on it and take it over with kd_redis_set_hooks() (shards/redis.h). */
static inline struct kd_redis *kd_shard_redis(struct kd_shard *s)
{
    return s->redis;
}
struct kd_shard *kd_conn_shard(const struct kd_conn *c);
struct kd_router *kd_shard_router(const struct kd_shard *s);
unsigned kd_shard_count(const struct kd_shard *s);
/* Send a router message from this shard (m->type >= KD_MSG_SHARD_USER for protocols). */
void kd_shard_send(struct kd_shard *s, unsigned to, struct kd_msg *m);
/* Like kd_shard_send, but a message to this very shard is queued and delivered at the next
 * mailbox step instead of by a direct call. Why (a deviation from "send to self is a direct
 * call"): routed calls post from inside HTTP/2 callbacks; delivering the reply re-entrantly could
 * finish and free the very call whose callback is still on the stack. The queue keeps the cost of
 * a self-send at a copy, with no ring and no doorbell. */
void kd_shard_post(struct kd_shard *s, unsigned to, struct kd_msg *m);

/* --- internal to shards/ --- */
void *kd_shard_main(void *arg);
struct io_uring_sqe *kd_shard_sqe(struct kd_shard *s);
void kd_shard_wake(struct kd_shard *s); /* eventfd write, from any thread */

/* conn.c */
void kd_conn_accepted(struct kd_shard *s, int fd, unsigned listener);
void kd_conn_adopt(struct kd_shard *s, struct kd_handoff *h);
void kd_conn_complete(struct kd_shard *s, struct io_uring_cqe *cqe);
void kd_conn_flush_all(struct kd_shard *s);
uint64_t kd_conn_quiet_sweep(struct kd_shard *s);
void kd_conn_shutdown_all(struct kd_shard *s, bool force);
void kd_shard_buf_return(struct kd_shard *s, uint16_t bid);
const struct kd_conn_ops *kd_shard_listener_ops(const struct kd_shard *s, unsigned listener);

/* listener.c */
int kd_listener_bind(const struct sockaddr_storage *addr, socklen_t len, int *fd, char *err, size_t errlen);
void kd_listener_arm(struct kd_shard *s, unsigned i);
void kd_listener_complete(struct kd_shard *s, struct io_uring_cqe *cqe);
void kd_listener_close_all(struct kd_shard *s);
void kd_listener_init(struct kd_shard *s, unsigned i, int fd);
void kd_listener_format(const struct sockaddr_storage *ss, char *buf, size_t len);

#endif

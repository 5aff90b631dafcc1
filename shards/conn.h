/* conn.h — a connection on a shard, its protocol hooks, and the shard's connection table.
 * Concurrency: shard-local, no locks. A connection belongs to exactly one shard at a time; it moves
 * only through kd_conn_handoff(), at a quiescent point, after which the old shard never touches it.
 * Ownership: the table owns the kd_conn slots; the protocol owns `ctx` (it travels with a hand-off);
 * output bytes are copied into the connection's queue by kd_conn_write().
 *
 * io_uring user_data of every operation (style.md rule 6):
 *
 *   63      56 55                32 31                               0
 *   +---------+--------------------+----------------------------------+
 *   |   op    |  generation (24)   |            slot (32)             |
 *   +---------+--------------------+----------------------------------+
 *
 * A slot's generation is bumped when it is freed, so a completion that names an older generation is
 * stale and dropped (it can only arise from a bug or a CQE_SKIP race, and is counted). A connection
 * is freed only when `inflight` (operations submitted and not yet completed) is zero.
 *
 * Life of a connection:
 *   OPEN ──close()/EOF/error──> CLOSING ──inflight==0──> closed: fd closed, on_close, slot freed
 *   OPEN ──handoff(to)──> HANDOFF ──recv stopped, output flushed, inflight==0──> detached, sent to `to`,
 *                                  slot freed here; `to` adopts it (on_open(adopted=true)), recv re-armed
 */
#ifndef KD_SHARDS_CONN_H
#define KD_SHARDS_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/list.h"
#include "core/stat.h"

struct sockaddr;
struct sockaddr_storage;

struct kd_conn;
struct kd_shard;

/* Operation codes carried in user_data. */
enum kd_op {
    KD_OP_NONE = 0,
    KD_OP_ACCEPT,   /* slot = listener index on this shard */
    KD_OP_RECV,     /* multishot recv into the provided buffer ring */
    KD_OP_SEND,     /* one send of the head of the output queue */
    KD_OP_CANCEL,   /* cancellation of a connection's recv */
    KD_OP_DOORBELL, /* msg_ring doorbell from another shard (or its failure CQE on the sender) */
    KD_OP_EVENTFD,  /* read on the shard's eventfd (doorbell from a non-shard thread) */
    KD_OP_LCANCEL,  /* cancellation of a listener's accept */
    KD_OP_CONNECT,  /* outbound connect */
    KD_OP_WAKE,     /* a precise wake-up of the shard's loop (kd_shard_wake_at) */
};

#define KD_GEN_BITS 24u
#define KD_GEN_MASK ((1u << KD_GEN_BITS) - 1u)

static inline uint64_t kd_ud_make(enum kd_op op, uint32_t gen, uint32_t slot)
{
    return ((uint64_t)op << 56) | ((uint64_t)(gen & KD_GEN_MASK) << 32) | slot;
}
static inline enum kd_op kd_ud_op(uint64_t ud)
{
    return (enum kd_op)(ud >> 56);
}
static inline uint32_t kd_ud_gen(uint64_t ud)
{
    return (uint32_t)(ud >> 32) & KD_GEN_MASK;
}
static inline uint32_t kd_ud_slot(uint64_t ud)
{
    return (uint32_t)ud;
}

/* Protocol hooks. Every hook runs on the shard that currently owns the connection. */
struct kd_conn_ops {
    const char *name;
    /* The connection is live here: fresh from accept (adopted=false) or arriving by hand-off
     * (adopted=true; ctx is what the previous shard had). <0 closes it. */
    int (*on_open)(struct kd_conn *c, bool adopted);
    /* Bytes received; borrowed for the call only. <0 closes the connection. */
    int (*on_data)(struct kd_conn *c, const uint8_t *data, size_t len);
    /* Called once per loop turn, before writes are flushed, for connections that asked with
     * kd_conn_want_flush(): produce pending output now (one flush per turn, style.md rule 7). */
    void (*on_flush)(struct kd_conn *c);
    /* Leaving this shard (hand-off): drop shard-local things (timers) before the move. */
    void (*on_detach)(struct kd_conn *c);
    /* Outbound connection (kd_conn_connect) finished connecting; err 0 or negative errno. On
     * error the connection closes right after (on_close follows). */
    void (*on_connect)(struct kd_conn *c, int err);
    /* The shard is stopping: begin a graceful close (e.g. GOAWAY). NULL: close now. */
    void (*on_shutdown)(struct kd_conn *c);
    /* Final: the fd is closed; free ctx. err is 0 (clean), or a negative errno. */
    void (*on_close)(struct kd_conn *c, int err);
    /* Nothing was sent on the connection for one to two seconds since it last sent: give back memory
     * that only matters while bytes flow (gRPC: nghttp2's output frame buffer). Called once per quiet
     * spell, on an OPEN connection. NULL: nothing to shed. */
    void (*on_quiet)(struct kd_conn *c);
};

enum kd_conn_state { KD_CONN_FREE = 0, KD_CONN_OPEN, KD_CONN_HANDOFF, KD_CONN_CLOSING };

/* A chunk of queued output; chunks are filled to capacity before a new one is started. */
struct kd_outchunk {
    struct kd_outchunk *next;
    uint32_t off, len, cap;
    uint8_t data[];
};

struct kd_conn {
    uint32_t slot;
    uint32_t gen;
    int fd;
    uint8_t state;    /* enum kd_conn_state */
    uint8_t listener; /* index of the listener it came from (same on every shard); 0xff outbound */
    bool recv_armed;  /* a multishot recv is in flight */
    bool send_armed;  /* a send is in flight */
    bool peer_eof;    /* the peer half-closed: no more input */
    bool want_flush;  /* on dirty list for on_flush */
    bool connecting;  /* outbound connect in flight */
    bool finish;      /* close once queued output is sent (kd_conn_finish) */
    uint16_t inflight;
    int close_err;
    int handoff_to; /* target shard while HANDOFF */
    struct kd_shard *shard;
    const struct kd_conn_ops *ops;
    void *ctx;
    struct sockaddr_storage *connect_addr; /* while an outbound connect is in flight */
    struct kd_outchunk *out_head, *out_tail;
    size_t out_bytes;
    struct kd_list dirty; /* on the shard's flush list */
    struct kd_list sent;  /* on the shard's list of connections that sent lately (on_quiet) */
    uint32_t sent_gen;    /* the shard's quiet_gen when this connection last sent */
    struct kd_list link;  /* free list when FREE; shard's live list otherwise */
};

/* The connection table: a fixed array sized at boot (a mapping: zero pages until used), with a free
 * list. Slots [0, fresh) have been used at least once; slots [fresh, capacity) never were and are
 * neither touched nor listed, so a large limit costs memory only as connections come (131,072
 * slots are 17 MiB).
 * Invariants (kd_conntable_validate): live + free == fresh <= capacity; a free slot is FREE and on
 * the free list exactly once; a live slot is not FREE. */
struct kd_conntable {
    struct kd_conn *slots;
    uint32_t capacity;
    uint32_t fresh; /* slots handed out at least once: the next never-used slot */
    uint32_t live;
    struct kd_list free; /* FREE slots, LIFO so hot slots are reused while cache-warm */
    struct kd_list live_list;
};

int kd_conntable_init(struct kd_conntable *t, uint32_t capacity);
void kd_conntable_fini(struct kd_conntable *t);
/* A slot in state OPEN with a fresh generation, or NULL when the table is full. */
struct kd_conn *kd_conntable_alloc(struct kd_conntable *t);
/* After many connections left: forget the slots above the highest live one (they become never-used
 * again) and give their whole pages back to the kernel. Returns how many slots were forgotten. */
uint32_t kd_conntable_trim(struct kd_conntable *t);
/* Return the slot (state FREE, generation bumped). */
void kd_conntable_free(struct kd_conntable *t, struct kd_conn *c);
/* The live connection a user_data names, or NULL when the slot is free or the generation is stale. */
struct kd_conn *kd_conntable_lookup(struct kd_conntable *t, uint64_t user_data);
int kd_conntable_validate(const struct kd_conntable *t);

/* --- used by protocols --- */

/* Queue bytes for sending (copied). -ENOBUFS past the per-connection output cap (protocols bound
 * their output with flow control; this is the backstop), -EPIPE when closing. */
int kd_conn_write(struct kd_conn *c, const void *data, size_t len);
/* Ask for on_flush() before this turn's writes go out. */
void kd_conn_want_flush(struct kd_conn *c);
/* Begin closing (idempotent). Queued output is dropped. */
void kd_conn_close(struct kd_conn *c, int err);
/* Close once everything queued so far has been sent (e.g. after a final GOAWAY). */
void kd_conn_finish(struct kd_conn *c);
/* The listener's protocol configuration (kd_server_listener.cfg), NULL for outbound connections. */
const void *kd_conn_listener_cfg(const struct kd_conn *c);
/* Open an outbound TCP connection from shard s. ops->on_connect reports the result; ctx is the
 * protocol's state (on_close frees it, also on failure). NULL when the table is full or socket()
 * fails (then ctx is not taken). */
struct kd_conn *kd_conn_connect(struct kd_shard *s, const struct sockaddr *addr, unsigned addrlen,
                                const struct kd_conn_ops *ops, void *ctx);
/* Move this connection to shard `to` at the next quiescent point. -EINVAL if not OPEN or to is
 * out of range; to == current shard is a no-op. */
int kd_conn_handoff(struct kd_conn *c, unsigned to);
unsigned kd_conn_shard_id(const struct kd_conn *c);

/* Output cap per connection (bytes queued, not yet sent). */
#define KD_CONN_OUT_MAX (8u << 20)
/* Below this, a send completion asks the protocol for more output (on_flush). */
#define KD_CONN_OUT_LOW (256u << 10)

#endif

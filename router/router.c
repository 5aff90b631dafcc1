/* router.c — the cross-shard router (contract in router.h).
 *
 * Memory layout:
 *
 *   struct kd_router
 *     parts[n]     one struct participant each, cache-line aligned (see below)
 *     rings[n*n]   ring (from, to) at rings[from * n + to]; the diagonal is never initialised because a
 *                  send to self is a direct handler call
 *
 *   struct participant (p)
 *     line 0       sleeping: written by p (prepare_sleep / awake) and by producers (exchange to 0);
 *                  read by every producer after every push, so it shares its line with nothing
 *     lines 1..    attach info: written once by p in kd_router_attach before p can ever sleep;
 *                  producers read ring_fd / doorbell_tag / eventfd only after an acquire load of
 *                  sleeping == 1, which happens-after that attach (only prepare_sleep stores 1)
 *                  owner-only state: handler, round-robin cursor, overflow queues, spare chunk
 *     last lines   stats: single writer p, relaxed readers anywhere
 *
 * Doorbell protocol (Dekker-style store/fence/load on both sides, so that at least one side sees
 * the other's store):
 *
 *   consumer prepare_sleep:  sleeping = 1; fence; if any inbound tail moved: sleeping = 0, stay up
 *   producer after a push:   fence; if sleeping == 1 && exchange(sleeping, 0) == 1: ring
 *
 * Either the consumer sees the message and does not sleep, or the producer sees sleeping and rings.
 * The exchange lets exactly one producer ring per sleep; the others count a saved doorbell. A
 * doorbell that races with a consumer that decided to stay awake is spurious, never harmful.
 *
 * The io_uring doorbell is an IORING_OP_MSG_RING SQE prepared on the PRODUCER's ring and is NOT
 * submitted here: it goes to the kernel with the producer's next io_uring_submit*() call (a shard
 * always submits before it blocks, so the wake-up is delayed at most until the producer's current
 * loop iteration ends). It is flagged CQE_SKIP_SUCCESS; a failure CQE, if any, lands on the
 * producer's ring tagged with the producer's own doorbell_tag, so its loop treats it as a
 * (spurious) doorbell. Consequence for callers: do not call kd_router_send() between
 * io_uring_get_sqe() and the end of filling that SQE, because a full SQ makes the router submit.
 *
 * Handlers run inside kd_router_drain() (or inside kd_router_send() for a self-send). They may send
 * and release payloads, but must not call kd_router_drain() themselves: drain is not re-entrant.
 */
#include "router/router.h"

#include "core/chunkpool.h"

#include <assert.h>
#include <errno.h>
#include <liburing.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CACHE_LINE 64

/* Messages popped from one source before moving to the next: amortises the index loads while still
 * giving every sender a turn. */
#define DRAIN_BURST 32

/* 16-byte chunk header + 127 * 32-byte messages = 4080 bytes: one malloc per ~4 KiB of backlog. */
#define OVF_CHUNK_MSGS 127

#define PAYLOAD_MAGIC      0x6b64706cu /* "kdpl" */
#define PAYLOAD_MAGIC_DEAD 0x64656164u /* "dead": set before free to catch double release */

/* A run of messages waiting for room in one ring.
 * Invariant: head <= tail <= OVF_CHUNK_MSGS; msgs[head..tail) are queued, oldest first. */
struct ovf_chunk {
    struct ovf_chunk *next;
    uint32_t head, tail;
    struct kd_msg msgs[OVF_CHUNK_MSGS];
};

/* Overflow queue from one participant to one target, owned by the sending participant's thread.
 *
 *   first -> [head..tail) -> [head..tail) -> ... -> last -> NULL      empty: first == last == NULL
 *
 * Invariants: count == sum of (tail - head) over the chunks; count == 0 iff first == NULL; only the
 * last chunk may have tail < OVF_CHUNK_MSGS; an emptied chunk leaves the list at once (kept as the
 * participant's spare or freed).
 * FIFO: while count > 0 every new message to the target is appended here, never pushed to the ring,
 * so nothing overtakes an older message of the same pair. */
struct ovf_queue {
    struct ovf_chunk *first, *last;
    size_t count;
};

struct participant {
    alignas(CACHE_LINE) _Atomic int sleeping;

    alignas(CACHE_LINE) struct io_uring *ring; /* NULL for a non-shard thread */
    int ring_fd;
    int eventfd;
    uint64_t doorbell_tag;
    bool attached;
    kd_router_handler handler;
    void *ctx;
    unsigned rr_next;        /* first source the next drain looks at */
    unsigned ovf_busy;       /* number of targets whose overflow queue is non-empty */
    struct ovf_queue *ovf;   /* [n], indexed by target; ovf[self] stays empty */
    struct ovf_chunk *spare; /* one emptied chunk kept to avoid malloc/free churn at the edge of full */

    alignas(CACHE_LINE) struct kd_router_stats stats;
};

struct kd_router {
    unsigned n;
    uint32_t capacity;
    struct participant *parts;
    struct kd_ring *rings;
};

/* Header in front of every kd_router_payload_alloc() block. alignas keeps the user part aligned
 * for any type, like malloc's own result. */
struct payload_hdr {
    alignas(max_align_t) uint32_t owner;
    uint32_t magic;
};

static inline struct kd_ring *ring_at(struct kd_router *r, unsigned from, unsigned to)
{
    return &r->rings[(size_t)from * r->n + to];
}

static struct payload_hdr *payload_hdr(void *payload)
{
    struct payload_hdr *h = (struct payload_hdr *)(void *)((char *)payload - sizeof(struct payload_hdr));
    if (h->magic != PAYLOAD_MAGIC) {
        /* Not ours or already released: continuing would corrupt the heap somewhere else. */
        fprintf(stderr, "kd_router: bad payload %p (magic %#x)\n", payload, h->magic);
        abort();
    }
    return h;
}

static void payload_free(void *payload)
{
    struct payload_hdr *h = payload_hdr(payload);
    h->magic = PAYLOAD_MAGIC_DEAD;
    kd_chunkpool_free(h);
}

static void deliver(struct participant *p, const struct kd_msg *m)
{
    kd_stat_inc(&p->stats.received);
    if (m->type == KD_MSG_RELEASE)
        payload_free(m->ptr);
    else
        p->handler(p->ctx, m);
}

/* Wake `t` from `p`. Called only by the producer that won the exchange on t->sleeping, so the
 * acquire in that exchange makes t's attach info visible here. */
static void ring_doorbell(struct participant *p, const struct participant *t)
{
    if (p->ring != NULL && t->ring != NULL) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(p->ring);
        /* SQ full: push what is queued to the kernel to make room. Bounded, because a submit that
         * keeps failing (e.g. -EBUSY while the CQ overflows) must not turn send into a busy wait. */
        for (int i = 0; sqe == NULL && i < 4; i++) {
            io_uring_submit(p->ring);
            sqe = io_uring_get_sqe(p->ring);
        }
        if (sqe != NULL) {
            io_uring_prep_msg_ring(sqe, t->ring_fd, 0, t->doorbell_tag, 0);
            io_uring_sqe_set_flags(sqe, IOSQE_CQE_SKIP_SUCCESS);
            io_uring_sqe_set_data64(sqe, p->doorbell_tag);
            return;
        }
        /* No SQE at all: fall through to the eventfd if the target has one. */
    }
    if (t->eventfd < 0)
        return;
    uint64_t one = 1;
    ssize_t w;
    do
        w = write(t->eventfd, &one, sizeof(one));
    while (w < 0 && errno == EINTR);
    /* EAGAIN means the counter is near its maximum: the target is certain to wake already. */
}

static bool can_ring(const struct participant *p, const struct participant *t)
{
    return (p->ring != NULL && t->ring != NULL) || t->eventfd >= 0;
}

/* After making messages visible in ring (p -> to): wake `to` if it sleeps, at most once per sleep. */
static void notify(struct kd_router *r, struct participant *p, unsigned to)
{
    struct participant *t = &r->parts[to];

    /* Pairs with the fence in kd_router_prepare_sleep: our tail store is ordered before this load. */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&t->sleeping, memory_order_acquire) == 0) {
        kd_stat_inc(&p->stats.doorbells_saved);
        return;
    }
    /* A shard target without an eventfd cannot be woken by a ring-less producer: leave sleeping
     * set so the next shard producer rings; the target also wakes on its own timer. */
    if (!can_ring(p, t))
        return;
    if (atomic_exchange_explicit(&t->sleeping, 0, memory_order_acq_rel) == 0) {
        kd_stat_inc(&p->stats.doorbells_saved); /* another producer won the exchange and rings */
        return;
    }
    ring_doorbell(p, t);
    kd_stat_inc(&p->stats.doorbells_sent);
}

static void ovf_push(struct participant *p, struct ovf_queue *q, const struct kd_msg *m)
{
    struct ovf_chunk *c = q->last;
    if (c == NULL || c->tail == OVF_CHUNK_MSGS) {
        c = p->spare;
        if (c != NULL) {
            p->spare = NULL;
        } else {
            c = malloc(sizeof(*c));
            if (c == NULL) {
                /* send() has no failure path by contract; losing a message silently would be worse. */
                fprintf(stderr, "kd_router: out of memory for the overflow queue\n");
                abort();
            }
        }
        c->next = NULL;
        c->head = c->tail = 0;
        if (q->last != NULL)
            q->last->next = c;
        else
            q->first = c;
        q->last = c;
    }
    c->msgs[c->tail++] = *m;
    if (q->count++ == 0)
        p->ovf_busy++;
}

static void chunk_release(struct participant *p, struct ovf_chunk *c)
{
    if (p->spare == NULL)
        p->spare = c;
    else
        free(c);
}

/* Move as much of the overflow to `to` into the ring as fits, oldest first. */
static void ovf_flush(struct kd_router *r, struct participant *p, unsigned self, unsigned to)
{
    struct ovf_queue *q = &p->ovf[to];
    struct kd_ring *ring = ring_at(r, self, to);
    size_t moved = 0;

    while (q->first != NULL) {
        struct ovf_chunk *c = q->first;
        while (c->head < c->tail && kd_ring_push(ring, &c->msgs[c->head])) {
            c->head++;
            moved++;
        }
        if (c->head < c->tail)
            break; /* ring full again */
        q->first = c->next;
        if (q->first == NULL)
            q->last = NULL;
        chunk_release(p, c);
    }
    if (moved == 0)
        return;
    q->count -= moved;
    if (q->count == 0)
        p->ovf_busy--;
    /* One wake-up covers the whole batch: the target drains until the ring is empty. */
    notify(r, p, to);
}

struct kd_router *kd_router_create(unsigned n, uint32_t ring_capacity)
{
    /* kd_msg.from is 16 bits wide. */
    if (n == 0 || n > (unsigned)UINT16_MAX + 1)
        return NULL;
    if (ring_capacity < 2 || (ring_capacity & (ring_capacity - 1)) != 0 ||
        ring_capacity > (UINT32_C(1) << 31))
        return NULL;

    struct kd_router *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->n = n;
    r->capacity = ring_capacity;

    r->parts = aligned_alloc(CACHE_LINE, (size_t)n * sizeof(struct participant));
    r->rings = aligned_alloc(CACHE_LINE, (size_t)n * n * sizeof(struct kd_ring));
    if (r->parts == NULL || r->rings == NULL)
        goto fail;
    /* Zeroed rings have slots == NULL, so kd_ring_fini is safe on any of them, initialised or not. */
    memset(r->parts, 0, (size_t)n * sizeof(struct participant));
    memset(r->rings, 0, (size_t)n * n * sizeof(struct kd_ring));

    for (unsigned i = 0; i < n; i++) {
        struct participant *p = &r->parts[i];
        atomic_init(&p->sleeping, 0);
        p->ring_fd = -1;
        p->eventfd = -1;
        p->ovf = calloc(n, sizeof(struct ovf_queue));
        if (p->ovf == NULL)
            goto fail;
    }
    for (unsigned from = 0; from < n; from++)
        for (unsigned to = 0; to < n; to++)
            if (from != to && kd_ring_init(ring_at(r, from, to), ring_capacity) != 0)
                goto fail;
    return r;

fail:
    kd_router_destroy(r);
    return NULL;
}

/* Free what a queued message owns on behalf of the router: only RELEASE payloads are ours. */
static void discard(const struct kd_msg *m)
{
    if (m->type == KD_MSG_RELEASE && m->ptr != NULL)
        payload_free(m->ptr);
}

void kd_router_destroy(struct kd_router *r)
{
    if (r == NULL)
        return;
    /* At exit no participant runs any more, so one thread may play producer and consumer. */
    if (r->rings != NULL) {
        for (unsigned from = 0; from < r->n; from++) {
            for (unsigned to = 0; to < r->n; to++) {
                struct kd_ring *ring = ring_at(r, from, to);
                if (ring->slots == NULL)
                    continue;
                struct kd_msg burst[DRAIN_BURST];
                uint32_t got;
                while ((got = kd_ring_pop_burst(ring, burst, DRAIN_BURST)) != 0)
                    for (uint32_t i = 0; i < got; i++)
                        discard(&burst[i]);
                kd_ring_fini(ring);
            }
        }
        free(r->rings);
    }
    if (r->parts != NULL) {
        for (unsigned i = 0; i < r->n; i++) {
            struct participant *p = &r->parts[i];
            for (unsigned to = 0; p->ovf != NULL && to < r->n; to++) {
                struct ovf_chunk *c = p->ovf[to].first;
                while (c != NULL) {
                    struct ovf_chunk *next = c->next;
                    for (uint32_t k = c->head; k < c->tail; k++)
                        discard(&c->msgs[k]);
                    free(c);
                    c = next;
                }
            }
            free(p->ovf);
            free(p->spare);
        }
        free(r->parts);
    }
    free(r);
}

unsigned kd_router_size(const struct kd_router *r)
{
    return r->n;
}

int kd_router_attach(struct kd_router *r, unsigned self, struct io_uring *ring, uint64_t doorbell_tag,
                     int eventfd, kd_router_handler handler, void *ctx)
{
    if (r == NULL || self >= r->n || handler == NULL || (ring == NULL && eventfd < 0))
        return -EINVAL;
    struct participant *p = &r->parts[self];
    /* Producers may already read the attach info of a participant that has slept once; changing it
     * afterwards would be a data race, so attach is once only. */
    if (p->attached)
        return -EINVAL;
    p->ring = ring;
    p->ring_fd = ring != NULL ? ring->ring_fd : -1;
    p->eventfd = eventfd;
    p->doorbell_tag = doorbell_tag;
    p->handler = handler;
    p->ctx = ctx;
    p->rr_next = 0;
    p->attached = true;
    return 0;
}

void kd_router_send(struct kd_router *r, unsigned self, unsigned to, struct kd_msg *m)
{
    /* No error path by contract: a bad index is a programming error, caught in debug builds. */
    assert(self < r->n && to < r->n);
    struct participant *p = &r->parts[self];

    m->from = (uint16_t)self;
    kd_stat_inc(&p->stats.sent);
    if (to == self) {
        kd_stat_inc(&p->stats.direct);
        deliver(p, m);
        return;
    }
    struct ovf_queue *q = &p->ovf[to];
    if (q->count == 0 && kd_ring_push(ring_at(r, self, to), m)) {
        notify(r, p, to);
        return;
    }
    /* Ring full, or older messages to `to` already wait: queue behind them to keep pair FIFO. No
     * doorbell is needed: a full ring or a backlog means the target has inbound work and is awake or
     * already being woken by the push that made its ring non-empty. */
    ovf_push(p, q, m);
    kd_stat_inc(&p->stats.overflowed);
}

unsigned kd_router_drain(struct kd_router *r, unsigned self, unsigned budget)
{
    struct participant *p = &r->parts[self];
    unsigned n = r->n;

    if (p->ovf_busy != 0)
        for (unsigned to = 0; to < n && p->ovf_busy != 0; to++)
            if (p->ovf[to].count != 0)
                ovf_flush(r, p, self, to);

    /* Round-robin over sources, one burst each, until the budget is spent or a whole lap found
     * nothing. The copy-out before delivery frees the slots before handlers run (handlers may take
     * a while, and may send). */
    struct kd_msg burst[DRAIN_BURST];
    unsigned delivered = 0, idle = 0, src = p->rr_next;
    while (delivered < budget && idle < n) {
        if (src != self) {
            unsigned left = budget - delivered;
            uint32_t got =
                kd_ring_pop_burst(ring_at(r, src, self), burst, left < DRAIN_BURST ? left : DRAIN_BURST);
            for (uint32_t i = 0; i < got; i++)
                deliver(p, &burst[i]);
            delivered += got;
            idle = got != 0 ? 0 : idle + 1;
        } else {
            idle++;
        }
        src = src + 1 == n ? 0 : src + 1;
    }
    p->rr_next = src;
    return delivered;
}

bool kd_router_has_inbound(struct kd_router *r, unsigned self)
{
    for (unsigned src = 0; src < r->n; src++)
        if (src != self && !kd_ring_is_empty(ring_at(r, src, self)))
            return true;
    return false;
}

bool kd_router_has_backlog(struct kd_router *r, unsigned self)
{
    return r->parts[self].ovf_busy != 0;
}

bool kd_router_prepare_sleep(struct kd_router *r, unsigned self)
{
    struct participant *p = &r->parts[self];

    atomic_store_explicit(&p->sleeping, 1, memory_order_seq_cst);
    /* The store alone does not order the loads below before it in C11 (store->load may be
     * reordered); the fence pairs with the producer's fence in notify(). */
    atomic_thread_fence(memory_order_seq_cst);
    if (kd_router_has_inbound(r, self)) {
        atomic_store_explicit(&p->sleeping, 0, memory_order_relaxed);
        return false;
    }
    return true;
}

void kd_router_awake(struct kd_router *r, unsigned self)
{
    struct participant *p = &r->parts[self];
    /* Skip the store when a producer already cleared it: the line is read by every producer. */
    if (atomic_load_explicit(&p->sleeping, memory_order_relaxed) != 0)
        atomic_store_explicit(&p->sleeping, 0, memory_order_relaxed);
}

void *kd_router_payload_alloc(struct kd_router *r, unsigned self, size_t size)
{
    if (self >= r->n || size > SIZE_MAX - sizeof(struct payload_hdr))
        return NULL;
    struct payload_hdr *h = kd_chunkpool_malloc(sizeof(*h) + size);
    if (h == NULL)
        return NULL;
    h->owner = self;
    h->magic = PAYLOAD_MAGIC;
    return (char *)h + sizeof(*h);
}

void kd_router_payload_release(struct kd_router *r, unsigned self, void *payload)
{
    if (payload == NULL)
        return;
    struct payload_hdr *h = payload_hdr(payload);
    if (h->owner == self) {
        payload_free(payload);
        return;
    }
    /* Memory goes home: the owner's allocator (and its per-thread caches) gets its block back on the
     * thread that allocated it. */
    struct kd_msg m = {.type = KD_MSG_RELEASE, .ptr = payload};
    kd_router_send(r, self, h->owner, &m);
    kd_stat_inc(&r->parts[self].stats.released_remote);
}

const struct kd_router_stats *kd_router_stats(const struct kd_router *r, unsigned participant)
{
    return &r->parts[participant].stats;
}

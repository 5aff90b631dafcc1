/* conn.c — connections on a shard: the table, receive, queued output, close and hand-off.
 * See conn.h for the user_data layout and the state machine. */
#include "shards/conn.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/chunkpool.h"
#include "core/log.h"
#include "shards/shard.h"

/* Output chunks come from the shard's chunk pool (core/chunkpool.h), never a fresh malloc per flush.
 * The first chunk of an empty queue is small (most flushes are a few hundred bytes: a routed call's
 * HEADERS and one small DATA frame); once output backs up, chunks are 16 KiB. */
#define OUTCHUNK_FIRST 1024u
#define OUTCHUNK_SIZE  16384u

/* ---- table ---- */

int kd_conntable_init(struct kd_conntable *t, uint32_t capacity)
{
    memset(t, 0, sizeof(*t));
    if (capacity == 0)
        return -EINVAL;
    /* Mapped, not calloc'ed: calloc may clear the block itself (it does with MALLOC_PERTURB_), which
     * would touch every page; a fresh mapping is zero pages until a slot is first used. */
    size_t len = (size_t)capacity * sizeof(*t->slots);
    void *slots = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (slots == MAP_FAILED)
        return -ENOMEM;
    t->slots = slots;
    t->capacity = capacity;
    kd_list_init(&t->free);
    kd_list_init(&t->live_list);
    /* Slots from t->fresh on have never been used; they join the table one by one as the free list
     * runs dry (kd_conntable_alloc), so their pages are not touched until then. */
    return 0;
}

void kd_conntable_fini(struct kd_conntable *t)
{
    if (t->slots != NULL)
        munmap(t->slots, (size_t)t->capacity * sizeof(*t->slots));
    memset(t, 0, sizeof(*t));
}

struct kd_conn *kd_conntable_alloc(struct kd_conntable *t)
{
    struct kd_list *n = kd_list_pop_front(&t->free);
    struct kd_conn *c;
    if (n != NULL) {
        c = KD_CONTAINER_OF(n, struct kd_conn, link);
    } else if (t->fresh < t->capacity) {
        c = &t->slots[t->fresh];
        c->slot = t->fresh++;
        c->gen = 1;
    } else {
        return NULL;
    }
    uint32_t slot = c->slot, gen = c->gen;
    memset(c, 0, sizeof(*c));
    c->slot = slot;
    c->gen = gen;
    c->fd = -1;
    c->handoff_to = -1;
    c->state = KD_CONN_OPEN;
    kd_list_node_init(&c->dirty);
    kd_list_node_init(&c->sent);
    kd_list_push_back(&t->live_list, &c->link);
    t->live++;
    return c;
}

void kd_conntable_free(struct kd_conntable *t, struct kd_conn *c)
{
    kd_list_unlink(&c->link);
    if (kd_list_is_linked(&c->sent))
        kd_list_unlink(&c->sent);
    c->state = KD_CONN_FREE;
    c->fd = -1;
    c->ctx = NULL;
    c->ops = NULL;
    /* Generation 0 is never used, so a zeroed user_data can never look live. */
    c->gen = (c->gen + 1) & KD_GEN_MASK;
    if (c->gen == 0)
        c->gen = 1;
    kd_list_insert_before(t->free.next, &c->link);
    t->live--;
}

uint32_t kd_conntable_trim(struct kd_conntable *t)
{
    uint32_t top = 0; /* one past the highest live slot */
    for (const struct kd_list *n = t->live_list.next; n != &t->live_list; n = n->next) {
        const struct kd_conn *c = KD_CONTAINER_OF(n, struct kd_conn, link);
        if (c->slot + 1 > top)
            top = c->slot + 1;
    }
    if (top >= t->fresh)
        return 0;
    for (struct kd_list *n = t->free.next; n != &t->free;) {
        struct kd_list *next = n->next;
        if (KD_CONTAINER_OF(n, struct kd_conn, link)->slot >= top)
            kd_list_unlink(n);
        n = next;
    }
    /* Only whole pages inside [top, fresh) go; slots sharing a page with a live one keep their bytes,
     * which kd_conntable_alloc overwrites anyway when it hands them out again. Their generations
     * restart at 1: no operation is in flight for a freed slot (it is freed only when inflight is 0),
     * so no completion can name the old ones. */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)&t->slots[top] + page - 1) & ~(page - 1);
    uintptr_t hi = (uintptr_t)&t->slots[t->fresh] & ~(page - 1);
    if (hi > lo)
        madvise((void *)lo, hi - lo, MADV_DONTNEED);
    uint32_t dropped = t->fresh - top;
    t->fresh = top;
    return dropped;
}

struct kd_conn *kd_conntable_lookup(struct kd_conntable *t, uint64_t ud)
{
    uint32_t slot = kd_ud_slot(ud);
    if (slot >= t->capacity)
        return NULL;
    struct kd_conn *c = &t->slots[slot];
    if (c->state == KD_CONN_FREE || c->gen != kd_ud_gen(ud))
        return NULL;
    return c;
}

int kd_conntable_validate(const struct kd_conntable *t)
{
    uint32_t nfree = 0, nlive = 0;
    for (const struct kd_list *n = t->free.next; n != &t->free; n = n->next) {
        const struct kd_conn *c = KD_CONTAINER_OF(n, struct kd_conn, link);
        if (c->state != KD_CONN_FREE || c->gen == 0 || ++nfree > t->capacity)
            return -EINVAL;
    }
    for (const struct kd_list *n = t->live_list.next; n != &t->live_list; n = n->next) {
        const struct kd_conn *c = KD_CONTAINER_OF(n, struct kd_conn, link);
        if (c->state == KD_CONN_FREE || ++nlive > t->capacity)
            return -EINVAL;
    }
    if (nlive != t->live || t->fresh > t->capacity || nfree + nlive != t->fresh)
        return -EINVAL;
    return 0;
}

/* ---- helpers ---- */

struct kd_shard *kd_conn_shard(const struct kd_conn *c)
{
    return c->shard;
}

unsigned kd_conn_shard_id(const struct kd_conn *c)
{
    return c->shard->id;
}

static void mark_dirty(struct kd_conn *c)
{
    if (!kd_list_is_linked(&c->dirty))
        kd_list_push_back(&c->shard->dirty, &c->dirty);
}

static void op_begin(struct kd_conn *c)
{
    c->inflight++;
    c->shard->ops_inflight++;
}

static void op_end(struct kd_conn *c)
{
    c->inflight--;
    c->shard->ops_inflight--;
}

static void arm_recv(struct kd_conn *c)
{
    struct kd_shard *s = c->shard;
    struct io_uring_sqe *sqe = kd_shard_sqe(s);
    io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 0;
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_RECV, c->gen, c->slot));
    c->recv_armed = true;
    op_begin(c);
}

static void cancel_recv(struct kd_conn *c)
{
    struct io_uring_sqe *sqe = kd_shard_sqe(c->shard);
    io_uring_prep_cancel64(sqe, kd_ud_make(KD_OP_RECV, c->gen, c->slot), 0);
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_CANCEL, c->gen, c->slot));
    op_begin(c);
}

static void outchunk_free(struct kd_outchunk *ch)
{
    kd_chunkpool_put(ch, sizeof(*ch) + ch->cap);
}

static void free_output(struct kd_conn *c)
{
    struct kd_outchunk *ch = c->out_head;
    while (ch != NULL) {
        struct kd_outchunk *next = ch->next;
        outchunk_free(ch);
        ch = next;
    }
    c->out_head = c->out_tail = NULL;
    c->out_bytes = 0;
}

static void finalize(struct kd_conn *c)
{
    struct kd_shard *s = c->shard;
    if (kd_list_is_linked(&c->dirty))
        kd_list_unlink(&c->dirty);
    if (c->ops != NULL && c->ops->on_close != NULL)
        c->ops->on_close(c, c->close_err);
    close(c->fd);
    free(c->connect_addr);
    c->connect_addr = NULL;
    free_output(c);
    kd_stat_inc(&s->stats.closed);
    kd_conntable_free(&s->conns, c);
}

/* HANDOFF and quiescent: nothing in flight, nothing left to send. Ship it. */
static void detach(struct kd_conn *c)
{
    struct kd_shard *s = c->shard;
    struct kd_router *r = kd_shard_router(s);
    struct kd_handoff *h = kd_router_payload_alloc(r, s->id, sizeof(*h));
    if (h == NULL) {
        kd_conn_close(c, -ENOMEM);
        c->state = KD_CONN_CLOSING;
        finalize(c);
        return;
    }
    if (c->ops->on_detach != NULL)
        c->ops->on_detach(c);
    h->fd = c->fd;
    h->listener = c->listener;
    h->ops = c->ops;
    h->ctx = c->ctx;
    unsigned to = (unsigned)c->handoff_to;
    if (kd_list_is_linked(&c->dirty))
        kd_list_unlink(&c->dirty);
    kd_stat_inc(&s->stats.handoffs_out);
    kd_conntable_free(&s->conns, c);
    struct kd_msg m = {.type = KD_MSG_HANDOFF, .ptr = h};
    kd_shard_send(s, to, &m);
}

static void maybe_finish(struct kd_conn *c)
{
    if (c->state == KD_CONN_CLOSING && c->inflight == 0) {
        finalize(c);
    } else if (c->state == KD_CONN_HANDOFF && c->inflight == 0 && c->out_bytes == 0) {
        detach(c);
    } else if (c->state == KD_CONN_OPEN && (c->peer_eof || c->finish) && c->out_bytes == 0 &&
               !c->send_armed && !c->want_flush) {
        kd_conn_close(c, 0);
    }
}

/* ---- accept / adopt ---- */

static int conn_start(struct kd_shard *s, struct kd_conn *c, bool adopted)
{
    int rc = c->ops->on_open != NULL ? c->ops->on_open(c, adopted) : 0;
    if (rc < 0) {
        kd_conn_close(c, rc);
        maybe_finish(c);
        return rc;
    }
    if (c->state == KD_CONN_OPEN)
        arm_recv(c);
    if (s->stopping) {
        /* Arriving (e.g. by hand-off) after the grace period: nothing would close it later. */
        if (c->ops->on_shutdown != NULL && !s->force_closing)
            c->ops->on_shutdown(c);
        else
            kd_conn_close(c, 0);
    }
    maybe_finish(c);
    return 0;
}

void kd_conn_accepted(struct kd_shard *s, int fd, unsigned listener)
{
    struct kd_conn *c = kd_conntable_alloc(&s->conns);
    if (c == NULL) {
        /* Sized at boot; refuse and count rather than grow (style.md rule 8). */
        kd_stat_inc(&s->stats.refused); /* before close: whoever sees the close sees the count */
        close(fd);
        uint64_t n = kd_stat_get(&s->stats.refused);
        if ((n & (n - 1)) == 0) { /* log the 1st, 2nd, 4th, 8th ... refusal: visible, not a flood */
            struct kd_logline l;
            kd_log_begin(&l, KD_LOG_WARN, "connection_refused");
            kd_log_str(&l, "reason", "connection table full (limits.connections_per_shard)");
            kd_log_uint(&l, "capacity", s->conns.capacity);
            kd_log_uint(&l, "refused_total", n);
            kd_log_end(&l);
        }
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    kd_stat_inc(&s->stats.accepted);
    c->fd = fd;
    c->shard = s;
    c->listener = (uint8_t)listener;
    c->ops = kd_shard_listener_ops(s, listener);
    conn_start(s, c, false);
}

void kd_conn_adopt(struct kd_shard *s, struct kd_handoff *h)
{
    struct kd_conn *c = kd_conntable_alloc(&s->conns);
    int fd = h->fd;
    uint8_t listener = h->listener;
    const struct kd_conn_ops *ops = h->ops;
    void *ctx = h->ctx;
    kd_router_payload_release(kd_shard_router(s), s->id, h);
    if (c == NULL) {
        struct kd_conn tmp = {.fd = fd, .shard = s, .ops = ops, .ctx = ctx, .state = KD_CONN_CLOSING};
        kd_stat_inc(&s->stats.handoffs_refused);
        kd_log_msg(KD_LOG_WARN, "handoff_refused", "connection table full on the owner shard");
        if (ops->on_close != NULL)
            ops->on_close(&tmp, -ENFILE);
        close(fd);
        return;
    }
    kd_stat_inc(&s->stats.handoffs_in);
    c->fd = fd;
    c->shard = s;
    c->listener = listener;
    c->ops = ops;
    c->ctx = ctx;
    conn_start(s, c, true);
}

/* ---- completions ---- */

static void complete_connect(struct kd_shard *s, struct kd_conn *c, int res);

static void complete_recv(struct kd_shard *s, struct kd_conn *c, struct io_uring_cqe *cqe)
{
    bool more = (cqe->flags & IORING_CQE_F_MORE) != 0;
    int res = cqe->res;
    if (!more) {
        c->recv_armed = false;
        op_end(c);
    }
    if (res > 0) {
        uint16_t bid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
        const uint8_t *data = s->bufs + (size_t)bid * s->buf_size;
        kd_stat_add(&s->stats.recv_bytes, (uint64_t)res);
        kd_stat_inc(&s->stats.recvs);
        if (c->state == KD_CONN_OPEN || c->state == KD_CONN_HANDOFF) {
            int rc = c->ops->on_data(c, data, (size_t)res);
            if (rc < 0)
                kd_conn_close(c, rc);
        }
        kd_shard_buf_return(s, bid);
    } else if (res == 0) {
        c->peer_eof = true;
        if (c->state == KD_CONN_HANDOFF) /* nothing left to move: the peer is gone */
            kd_conn_close(c, 0);
    } else if (res == -ENOBUFS) {
        /* The ring ran dry: buffers come back at the end of this reap, then we re-arm below. */
        kd_stat_inc(&s->stats.enobufs);
    } else if (res != -ECANCELED) {
        kd_conn_close(c, res);
    }
    if (!more && !c->recv_armed && c->state == KD_CONN_OPEN && !c->peer_eof)
        arm_recv(c);
}

static void complete_send(struct kd_shard *s, struct kd_conn *c, int res)
{
    c->send_armed = false;
    op_end(c);
    if (res < 0) {
        if (c->state != KD_CONN_CLOSING)
            kd_conn_close(c, res);
        return;
    }
    kd_stat_add(&s->stats.sent_bytes, (uint64_t)res);
    size_t left = (size_t)res;
    while (left > 0 && c->out_head != NULL) {
        struct kd_outchunk *ch = c->out_head;
        size_t avail = ch->len - ch->off;
        size_t take = left < avail ? left : avail;
        ch->off += (uint32_t)take;
        left -= take;
        c->out_bytes -= take;
        if (ch->off == ch->len) {
            c->out_head = ch->next;
            if (c->out_head == NULL)
                c->out_tail = NULL;
            outchunk_free(ch);
        }
    }
    if (c->out_bytes > 0 && c->state != KD_CONN_CLOSING)
        mark_dirty(c);
    /* A protocol that stopped producing because the socket was behind (kd_h2_send) resumes. */
    if (c->out_bytes < KD_CONN_OUT_LOW && c->ops->on_flush != NULL && c->state != KD_CONN_CLOSING)
        kd_conn_want_flush(c);
}

void kd_conn_complete(struct kd_shard *s, struct io_uring_cqe *cqe)
{
    struct kd_conn *c = kd_conntable_lookup(&s->conns, cqe->user_data);
    if (c == NULL) {
        /* Stale: the slot moved on. A provided buffer still has to go back to the ring. */
        if (cqe->flags & IORING_CQE_F_BUFFER)
            kd_shard_buf_return(s, (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT));
        kd_stat_inc(&s->stats.stale_cqes);
        return;
    }
    switch (kd_ud_op(cqe->user_data)) {
    case KD_OP_RECV:
        complete_recv(s, c, cqe);
        break;
    case KD_OP_SEND:
        complete_send(s, c, cqe->res);
        break;
    case KD_OP_CANCEL:
        op_end(c);
        break;
    case KD_OP_CONNECT:
        complete_connect(s, c, cqe->res);
        break;
    default:
        break;
    }
    maybe_finish(c);
}

/* ---- output ---- */

int kd_conn_write(struct kd_conn *c, const void *data, size_t len)
{
    const uint8_t *p = data;
    if (c->state != KD_CONN_OPEN && c->state != KD_CONN_HANDOFF)
        return -EPIPE;
    if (c->out_bytes + len > KD_CONN_OUT_MAX)
        return -ENOBUFS;
    while (len > 0) {
        struct kd_outchunk *t = c->out_tail;
        if (t == NULL || t->len == t->cap) {
            size_t want = c->out_head == NULL ? OUTCHUNK_FIRST : OUTCHUNK_SIZE;
            size_t bsize;
            if (want < len)
                want = len;
            t = kd_chunkpool_get(sizeof(*t) + want, &bsize);
            if (t == NULL)
                return -ENOMEM;
            t->next = NULL;
            t->off = t->len = 0;
            t->cap = (uint32_t)(bsize - sizeof(*t));
            if (c->out_tail != NULL)
                c->out_tail->next = t;
            else
                c->out_head = t;
            c->out_tail = t;
        }
        /* Appending past the part an in-flight send covers is safe: chunks never move. */
        size_t take = t->cap - t->len;
        if (take > len)
            take = len;
        memcpy(t->data + t->len, p, take);
        t->len += (uint32_t)take;
        c->out_bytes += take;
        p += take;
        len -= take;
    }
    mark_dirty(c);
    return 0;
}

void kd_conn_want_flush(struct kd_conn *c)
{
    if (c->state == KD_CONN_FREE || c->state == KD_CONN_CLOSING)
        return;
    c->want_flush = true;
    mark_dirty(c);
}

static void arm_send(struct kd_conn *c)
{
    struct kd_outchunk *ch = c->out_head;
    struct io_uring_sqe *sqe = kd_shard_sqe(c->shard);
    io_uring_prep_send(sqe, c->fd, ch->data + ch->off, ch->len - ch->off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_SEND, c->gen, c->slot));
    c->send_armed = true;
    op_begin(c);
    kd_stat_inc(&c->shard->stats.sends);
    if (c->ops->on_quiet != NULL) {
        struct kd_shard *s = c->shard;
        c->sent_gen = s->quiet_gen;
        if (!kd_list_is_linked(&c->sent))
            kd_list_push_back(&s->sent, &c->sent);
    }
}

/* Connections that sent lately are on s->sent; every QUIET_MS the shard walks that list and calls
 * on_quiet for those that sent nothing since the previous walk (sent_gen is older), so a connection
 * is told one to two walks after its last send, once. Only connections that sent are walked: a
 * shard with 100k idle agents does no work here. Returns how long the shard may sleep before the
 * next walk is due (UINT64_MAX: nothing to walk). */
#define QUIET_MS 1000u
uint64_t kd_conn_quiet_sweep(struct kd_shard *s)
{
    if (kd_list_is_empty(&s->sent))
        return UINT64_MAX;
    uint64_t since = s->now_ms - s->quiet_ms;
    if (since < QUIET_MS)
        return QUIET_MS - since;
    struct kd_list *n = s->sent.next;
    while (n != &s->sent) {
        struct kd_list *next = n->next;
        struct kd_conn *c = KD_CONTAINER_OF(n, struct kd_conn, sent);
        if (c->sent_gen != s->quiet_gen) {
            kd_list_unlink(&c->sent);
            if (c->state == KD_CONN_OPEN && !c->send_armed && c->ops->on_quiet != NULL) {
                c->ops->on_quiet(c);
                kd_stat_inc(&s->stats.quiet_sheds);
            }
        }
        n = next;
    }
    s->quiet_gen++;
    s->quiet_ms = s->now_ms;
    return kd_list_is_empty(&s->sent) ? UINT64_MAX : QUIET_MS;
}

static void flush_one(struct kd_conn *c)
{
    if (c->want_flush) {
        c->want_flush = false;
        if (c->ops->on_flush != NULL && (c->state == KD_CONN_OPEN || c->state == KD_CONN_HANDOFF))
            c->ops->on_flush(c);
    }
    if (c->out_bytes > 0 && !c->send_armed && !c->connecting &&
        (c->state == KD_CONN_OPEN || c->state == KD_CONN_HANDOFF))
        arm_send(c);
    maybe_finish(c);
}

void kd_conn_flush_all(struct kd_shard *s)
{
    /* A flush may dirty other connections (a routed call writes to its peer on this shard); take
     * a few rounds, each over a snapshot, so a connection that keeps re-marking itself cannot spin
     * the loop: it waits for the next turn. */
    for (int round = 0; round < 4 && !kd_list_is_empty(&s->dirty); round++) {
        struct kd_list batch;
        kd_list_init(&batch);
        kd_list_splice_back(&batch, &s->dirty);
        struct kd_list *n;
        while ((n = kd_list_pop_front(&batch)) != NULL) {
            struct kd_conn *c = KD_CONTAINER_OF(n, struct kd_conn, dirty);
            flush_one(c);
        }
    }
}

/* ---- close / hand-off ---- */

void kd_conn_close(struct kd_conn *c, int err)
{
    if (c->state == KD_CONN_FREE || c->state == KD_CONN_CLOSING)
        return;
    c->state = KD_CONN_CLOSING;
    c->close_err = err;
    if (kd_list_is_linked(&c->dirty))
        kd_list_unlink(&c->dirty);
    /* shutdown() ends a pending recv (EOF) and a send stuck on a peer that does not read (EPIPE),
     * so inflight drains promptly; the cancel covers a recv the kernel has not started yet. */
    shutdown(c->fd, SHUT_RDWR);
    if (c->recv_armed)
        cancel_recv(c);
    if (c->connecting) {
        struct io_uring_sqe *sqe = kd_shard_sqe(c->shard);
        io_uring_prep_cancel64(sqe, kd_ud_make(KD_OP_CONNECT, c->gen, c->slot), 0);
        io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_CANCEL, c->gen, c->slot));
        op_begin(c);
    }
    /* finalize happens in maybe_finish once inflight reaches zero; the caller's completion path
     * or the next flush calls it. */
    mark_dirty(c);
}

int kd_conn_handoff(struct kd_conn *c, unsigned to)
{
    if (c->state != KD_CONN_OPEN || c->connecting || to >= kd_shard_count(c->shard))
        return -EINVAL;
    if (to == c->shard->id)
        return 0;
    if (c->shard->stopping) /* the target may already have left its loop */
        return -ESHUTDOWN;
    c->state = KD_CONN_HANDOFF;
    c->handoff_to = (int)to;
    if (c->recv_armed)
        cancel_recv(c);
    mark_dirty(c);
    return 0;
}

void kd_conn_finish(struct kd_conn *c)
{
    if (c->state != KD_CONN_OPEN)
        return;
    c->finish = true;
    mark_dirty(c);
}

const void *kd_conn_listener_cfg(const struct kd_conn *c)
{
    if (c->listener == 0xff)
        return NULL;
    return c->shard->srv->opts.listeners[c->listener].cfg;
}

struct kd_conn *kd_conn_connect(struct kd_shard *s, const struct sockaddr *addr, unsigned addrlen,
                                const struct kd_conn_ops *ops, void *ctx)
{
    if (addrlen > sizeof(struct sockaddr_storage))
        return NULL;
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    struct kd_conn *c = kd_conntable_alloc(&s->conns);
    /* The address must outlive the SQE; it is freed when the connect completes. */
    struct sockaddr_storage *sa = malloc(sizeof(*sa));
    if (c == NULL || sa == NULL) {
        if (c != NULL)
            kd_conntable_free(&s->conns, c);
        free(sa);
        close(fd);
        return NULL;
    }
    memcpy(sa, addr, addrlen);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = fd;
    c->shard = s;
    c->listener = 0xff;
    c->ops = ops;
    c->ctx = ctx;
    c->connecting = true;
    c->connect_addr = sa;
    struct io_uring_sqe *sqe = kd_shard_sqe(s);
    io_uring_prep_connect(sqe, fd, (struct sockaddr *)sa, addrlen);
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_CONNECT, c->gen, c->slot));
    op_begin(c);
    return c;
}

static void complete_connect(struct kd_shard *s, struct kd_conn *c, int res)
{
    op_end(c);
    c->connecting = false;
    free(c->connect_addr);
    c->connect_addr = NULL;
    if (c->state != KD_CONN_OPEN) /* closed while connecting */
        return;
    if (c->ops->on_connect != NULL)
        c->ops->on_connect(c, res);
    if (res < 0) {
        kd_conn_close(c, res);
        return;
    }
    if (c->state == KD_CONN_OPEN)
        arm_recv(c);
    mark_dirty(c); /* output queued while connecting goes now */
}

void kd_conn_shutdown_all(struct kd_shard *s, bool force)
{
    struct kd_list *n, *next;
    for (n = s->conns.live_list.next; n != &s->conns.live_list; n = next) {
        next = n->next;
        struct kd_conn *c = KD_CONTAINER_OF(n, struct kd_conn, link);
        if (force || c->ops->on_shutdown == NULL)
            kd_conn_close(c, 0);
        else
            c->ops->on_shutdown(c);
    }
}

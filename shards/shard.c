/* shard.c — the shard thread: its io_uring, its provided buffers, and the loop of shard.h. */
#include "shards/shard.h"

#include <errno.h>
#include <malloc.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/chunkpool.h"
#include "core/clock.h"
#include "core/log.h"

#define RING_ENTRIES 4096
#define CQ_ENTRIES   16384

static void on_router_msg(void *ctx, const struct kd_msg *m);

struct kd_router *kd_shard_router(const struct kd_shard *s)
{
    return s->srv->router;
}

unsigned kd_shard_count(const struct kd_shard *s)
{
    return s->srv->n;
}

const struct kd_conn_ops *kd_shard_listener_ops(const struct kd_shard *s, unsigned listener)
{
    return s->srv->opts.listeners[listener].ops;
}

/* Counted before the message can be seen by its receiver (the ring push publishes it). Messages to
 * the control thread count too (its front door's calls: END must reach it, and its FRONT_DONE come
 * back, before a shard may leave); the stats answers are sent uncounted (kd_router_send). */
static void count_sent(struct kd_shard *s, unsigned to)
{
    if (to <= s->srv->n)
        atomic_store_explicit(&s->msgs_sent, atomic_load_explicit(&s->msgs_sent, memory_order_relaxed) + 1,
                              memory_order_relaxed);
}

void kd_shard_send(struct kd_shard *s, unsigned to, struct kd_msg *m)
{
    count_sent(s, to);
    kd_router_send(s->srv->router, s->id, to, m);
}

void kd_shard_post(struct kd_shard *s, unsigned to, struct kd_msg *m)
{
    count_sent(s, to);
    if (to != s->id) {
        kd_router_send(s->srv->router, s->id, to, m);
        return;
    }
    if (s->local_len == s->local_cap) {
        uint32_t ncap = s->local_cap ? s->local_cap * 2 : 64;
        struct kd_msg *n = malloc(ncap * sizeof(*n));
        if (n == NULL)
            abort(); /* as the router's overflow: a lost message would corrupt a call's state */
        for (uint32_t i = 0; i < s->local_len; i++)
            n[i] = s->local[(s->local_head + i) % s->local_cap];
        free(s->local);
        s->local = n;
        s->local_head = 0;
        s->local_cap = ncap;
    }
    m->from = (uint16_t)s->id;
    s->local[(s->local_head + s->local_len) % s->local_cap] = *m;
    s->local_len++;
}

static unsigned drain_local(struct kd_shard *s, unsigned budget)
{
    unsigned n = 0;
    while (s->local_len > 0 && n < budget) {
        struct kd_msg m = s->local[s->local_head];
        s->local_head = (s->local_head + 1) % s->local_cap;
        s->local_len--;
        on_router_msg(s, &m);
        n++;
    }
    return n;
}

struct io_uring_sqe *kd_shard_sqe(struct kd_shard *s)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring);
    while (sqe == NULL) {
        /* SQ full: push what we have to the kernel and take a fresh slot. */
        io_uring_submit(&s->ring);
        sqe = io_uring_get_sqe(&s->ring);
    }
    return sqe;
}

void kd_shard_wake(struct kd_shard *s)
{
    uint64_t one = 1;
    ssize_t rc = write(s->eventfd, &one, sizeof(one));
    (void)rc; /* EAGAIN means the counter is already non-zero: the shard will wake anyway */
}

void kd_shard_wake_at(struct kd_shard *s, uint64_t mono_ns)
{
    if (mono_ns >= s->wake_at_ns)
        return;
    s->wake_at_ns = mono_ns;
    s->wake_ts.tv_sec = (long long)(mono_ns / 1000000000u);
    s->wake_ts.tv_nsec = (long long)(mono_ns % 1000000000u);
    struct io_uring_sqe *sqe = kd_shard_sqe(s);
    io_uring_prep_timeout(sqe, &s->wake_ts, 0, IORING_TIMEOUT_ABS);
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_WAKE, 0, 0));
    /* The SQE is read at submission, which may come later in this turn: submit now, so wake_ts can
     * be reused by the next request. */
    io_uring_submit(&s->ring);
    s->ops_inflight++;
}

void kd_shard_buf_return(struct kd_shard *s, uint16_t bid)
{
    io_uring_buf_ring_add(s->br, s->bufs + (size_t)bid * s->buf_size, s->buf_size, bid,
                          io_uring_buf_ring_mask(s->nbufs), (int)s->br_pending);
    s->br_pending++;
    s->bufs_used++;
}

/* Provided buffer ring, registered by hand (liburing 2.3 has no io_uring_setup_buf_ring). */
static int setup_buffers(struct kd_shard *s)
{
    const struct kd_server_opts *o = &s->srv->opts;
    s->nbufs = o->recv_buffers;
    s->buf_size = o->recv_buffer_size;
    s->br_map_len = (size_t)s->nbufs * sizeof(struct io_uring_buf);
    void *map = mmap(NULL, s->br_map_len, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (map == MAP_FAILED)
        return -errno;
    s->br = map;
    /* Mapped, not malloc'ed: page-aligned, so maybe_shed can drop its pages. */
    long page = sysconf(_SC_PAGESIZE);
    size_t len = (size_t)s->nbufs * s->buf_size;
    len = (len + (size_t)page - 1) / (size_t)page * (size_t)page;
    void *bufs = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (bufs == MAP_FAILED)
        return -errno;
    s->bufs = bufs;
    s->bufs_len = len;
    struct io_uring_buf_reg reg = {.ring_addr = (uintptr_t)s->br, .ring_entries = s->nbufs, .bgid = 0};
    int rc = io_uring_register_buf_ring(&s->ring, &reg, 0);
    if (rc < 0)
        return rc;
    io_uring_buf_ring_init(s->br);
    for (uint32_t i = 0; i < s->nbufs; i++)
        io_uring_buf_ring_add(s->br, s->bufs + (size_t)i * s->buf_size, s->buf_size, (unsigned short)i,
                              io_uring_buf_ring_mask(s->nbufs), (int)i);
    io_uring_buf_ring_advance(s->br, (int)s->nbufs);
    return 0;
}

static int setup_ring(struct kd_shard *s)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
    p.cq_entries = CQ_ENTRIES;
    int rc = io_uring_queue_init_params(RING_ENTRIES, &s->ring, &p);
    s->defer_taskrun = rc == 0;
    if (rc == -EINVAL) {
        /* Kernels before 6.1 lack DEFER_TASKRUN (and before 6.0 SINGLE_ISSUER): run without. */
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = CQ_ENTRIES;
        rc = io_uring_queue_init_params(RING_ENTRIES, &s->ring, &p);
        if (rc == 0 && s->id == 0)
            kd_log_msg(KD_LOG_WARN, "io_uring_degraded",
                       "SINGLE_ISSUER/DEFER_TASKRUN unavailable; running without them");
    }
    if (rc < 0) {
        snprintf(s->start_msg, sizeof(s->start_msg),
                 "io_uring is unavailable (io_uring_setup: %s); kasd needs Linux >= 6.0 with io_uring "
                 "enabled (sysctl kernel.io_uring_disabled=0, no seccomp filter blocking it)",
                 strerror(-rc));
        return rc;
    }
    s->ring_ok = true;
    if (!(p.features & IORING_FEAT_EXT_ARG)) {
        snprintf(s->start_msg, sizeof(s->start_msg), "io_uring lacks IORING_FEAT_EXT_ARG (Linux >= 5.11)");
        return -ENOTSUP;
    }
    return 0;
}

static void arm_eventfd(struct kd_shard *s)
{
    struct io_uring_sqe *sqe = kd_shard_sqe(s);
    io_uring_prep_read(sqe, s->eventfd, &s->eventfd_val, sizeof(s->eventfd_val), 0);
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_EVENTFD, 0, 0));
    s->eventfd_armed = true;
    s->ops_inflight++;
}

static void on_router_msg(void *ctx, const struct kd_msg *m)
{
    struct kd_shard *s = ctx;
    if (m->type == KD_MSG_HANDOFF) {
        kd_conn_adopt(s, m->ptr);
    } else if (m->type >= KD_MSG_SHARD_USER && s->srv->opts.on_message != NULL) {
        s->srv->opts.on_message(s, m);
    } else {
        kd_log_msg(KD_LOG_ERROR, "router_unknown_message", "type %u from %u dropped", m->type, m->from);
    }
    if (m->from < s->srv->n || (m->u32 & KD_MSG_BARRIER)) {
        /* The handler may have given this shard work again (an adopted connection): not drained
         * until the loop says so, and that is visible before the message counts as handled. */
        atomic_store_explicit(&s->drained, false, memory_order_relaxed);
        atomic_store_explicit(&s->msgs_handled,
                              atomic_load_explicit(&s->msgs_handled, memory_order_relaxed) + 1,
                              memory_order_release);
    }
}

/* Give up waiting for the other shards after this long (a peer that never settles must not keep
 * kasd from exiting). */
#define STOP_BARRIER_MS 5000

/* Whether a drained shard may leave its loop. Not before every shard is drained and no message
 * between shards is queued or being handled: a shard that left would strand what is sent to it (a
 * routed call's END, FRONT_DONE, ...) in the router's rings, and with it the call's state on both
 * sides (LeakSanitizer's report at exit after a grace period that cut calls off).
 *
 * Handled counts are read before sent counts. Both only grow, and a message is counted sent before
 * anyone can handle it, so equal sums mean that at a moment between the two reads every message
 * sent had been handled, its handler included; a drained shard sends only from a handler, so no
 * more can come. */
static bool exit_ready(struct kd_shard *s)
{
    struct kd_server *srv = s->srv;
    uint64_t handled = 0, sent = 0;
    if (s->now_ms - s->drained_since_ms >= STOP_BARRIER_MS)
        return true;
    for (unsigned i = 0; i < srv->n; i++)
        handled += atomic_load_explicit(&srv->shards[i].msgs_handled, memory_order_acquire);
    handled += atomic_load_explicit(&srv->ctl_handled, memory_order_acquire);
    for (unsigned i = 0; i < srv->n; i++)
        if (!atomic_load_explicit(&srv->shards[i].drained, memory_order_acquire))
            return false;
    atomic_thread_fence(memory_order_seq_cst);
    for (unsigned i = 0; i < srv->n; i++)
        sent += atomic_load_explicit(&srv->shards[i].msgs_sent, memory_order_acquire);
    sent += atomic_load_explicit(&srv->ctl_sent, memory_order_acquire);
    return handled == sent;
}

static void stop_timer_cb(struct kd_timer *t)
{
    struct kd_shard *s = KD_CONTAINER_OF(t, struct kd_shard, stop_timer);
    if (s->conns.live > 0) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_WARN, "shutdown_grace_expired");
        kd_log_uint(&l, "connections_closed", s->conns.live);
        kd_log_end(&l);
    }
    s->force_closing = true;
    kd_conn_shutdown_all(s, true);
}

static void begin_stop(struct kd_shard *s)
{
    s->stopping = true;
    kd_listener_close_all(s);
    kd_conn_shutdown_all(s, false);
    kd_timerwheel_add(&s->timers, &s->stop_timer, s->now_ms + s->srv->opts.shutdown_grace_ms);
}

static void dispatch(struct kd_shard *s, struct io_uring_cqe *cqe)
{
    switch (kd_ud_op(cqe->user_data)) {
    case KD_OP_RECV:
    case KD_OP_SEND:
    case KD_OP_CANCEL:
    case KD_OP_CONNECT:
        kd_conn_complete(s, cqe);
        break;
    case KD_OP_ACCEPT:
        kd_listener_complete(s, cqe);
        break;
    case KD_OP_LCANCEL:
        s->ops_inflight--;
        break;
    case KD_OP_EVENTFD:
        s->eventfd_armed = false;
        s->ops_inflight--;
        break;
    case KD_OP_DOORBELL:
        /* A wake-up (or a failed msg_ring we sent, which the target's own checks cover). */
        break;
    case KD_OP_WAKE: /* -ETIME: the time came; nothing to do but run this turn */
        s->ops_inflight--;
        s->wake_at_ns = UINT64_MAX; /* any later pending one still fires; a new request re-arms */
        break;
    default:
        kd_stat_inc(&s->stats.stale_cqes);
        break;
    }
}

/* Reap up to budget completions. Returns how many. */
static unsigned reap(struct kd_shard *s, unsigned budget)
{
    struct io_uring_cqe *cqes[64];
    unsigned total = 0;
    while (total < budget) {
        unsigned want = budget - total < 64 ? budget - total : 64;
        unsigned n = io_uring_peek_batch_cqe(&s->ring, cqes, want);
        if (n == 0)
            break;
        for (unsigned i = 0; i < n; i++)
            dispatch(s, cqes[i]);
        io_uring_cq_advance(&s->ring, n);
        total += n;
    }
    if (s->br_pending > 0) {
        io_uring_buf_ring_advance(s->br, (int)s->br_pending);
        s->br_pending = 0;
    }
    return total;
}

/* Give freed heap back to the kernel once many connections have left and the departures have
 * settled: glibc keeps freed memory in its arenas, so without this RSS stays at its peak after an
 * agent reconnect storm or a load burst has passed. The trim waits until no connection has left for
 * TRIM_SETTLE_MS (a storm leaving takes a while: trimming at its first 256 would leave the rest of
 * its memory behind), and happens when TRIM_CONNS or more have left since the last one and the
 * shard is about to sleep, so a busy shard never pays for it. Returns how long the shard may sleep
 * before it wants another look. */
#define TRIM_CONNS     256u
#define TRIM_SETTLE_MS 500u
static uint64_t maybe_trim(struct kd_shard *s, uint64_t wait_ms)
{
    uint32_t live = s->conns.live;
    if (live < s->trim_live)
        s->trim_left_ms = s->now_ms; /* someone left since the last look */
    s->trim_live = live;
    if (live > s->trim_peak)
        s->trim_peak = live;
    if (s->trim_peak - live < TRIM_CONNS)
        return UINT64_MAX;
    uint64_t quiet = s->now_ms - s->trim_left_ms;
    if (quiet < TRIM_SETTLE_MS)
        return TRIM_SETTLE_MS - quiet;
    if (wait_ms < 10)
        return TRIM_SETTLE_MS; /* busy: look again later */
    /* The pool's kept blocks (up to 2.2 MiB per thread) would pin heap pages the trim could give
     * back; the next burst refills the pool from malloc. */
    kd_chunkpool_drain();
    kd_conntable_trim(&s->conns);
    malloc_trim(0);
    s->trim_peak = live;
    kd_stat_inc(&s->stats.memory_trims);
    return UINT64_MAX;
}

/* Give the receive buffers' pages back to the kernel once the shard has gone quiet. The ring hands
 * buffers out in order, so any traffic touches all nbufs x buf_size bytes (16 MiB by default)
 * however few are in use at once, and an idle shard would keep them resident for good: at 5,000
 * idle agents that was a quarter of kasd's RSS. Here, between two reaps, every buffer whose
 * completion we have seen is back in the ring (complete_recv returns each one before the next
 * completion), and with DEFER_TASKRUN the kernel copies received bytes into them only inside
 * io_uring_enter on this thread. A submit during this turn (a full SQ, a doorbell,
 * kd_shard_wake_at) may have issued a recv inline and filled a buffer, but then its completion is
 * already in the CQ: so nothing is shed while the CQ holds anything (or has overflowed). Otherwise
 * the contents are dead and MADV_DONTNEED is safe: the next receive into a page faults in a zero
 * page.
 * Without DEFER_TASKRUN (kernels before 6.1) task work may run at any return to user space, between
 * a copy and our reap, so nothing is shed there.
 * Looked at when the shard is about to sleep, every SHED_CHECK_MS: shed when fewer than nbufs/32
 * buffers were used since the last look (a busy shard keeps its buffers: they would only fault back
 * in), at least SHED_MIN_BUFS (1 MiB by default) were used since the last shed, and the last shed is
 * SHED_EVERY_MS old. Returns how long the shard may sleep before it wants another look. */
#define SHED_CHECK_MS 250u
#define SHED_EVERY_MS 1000u
#define SHED_MIN_BUFS 64u
static uint64_t maybe_shed(struct kd_shard *s)
{
    if (!s->defer_taskrun || s->bufs_used - s->shed_used < SHED_MIN_BUFS)
        return UINT64_MAX; /* nothing worth shedding: sleep as long as the timers allow */
    uint64_t since = s->now_ms - s->shed_check_ms;
    if (since < SHED_CHECK_MS)
        return SHED_CHECK_MS - since;
    uint64_t recent = s->bufs_used - s->shed_check_used;
    s->shed_check_used = s->bufs_used;
    s->shed_check_ms = s->now_ms;
    if (recent >= s->nbufs / 32u || s->now_ms - s->shed_ms < SHED_EVERY_MS)
        return SHED_CHECK_MS;
    /* nothing between this check and the madvise enters the kernel's io_uring */
    if (io_uring_cq_ready(&s->ring) != 0 || io_uring_cq_has_overflow(&s->ring))
        return SHED_CHECK_MS;
    if (madvise(s->bufs, s->bufs_len, MADV_DONTNEED) == 0)
        kd_stat_inc(&s->stats.buffer_sheds);
    s->shed_used = s->bufs_used;
    s->shed_ms = s->now_ms;
    return UINT64_MAX;
}

static void loop(struct kd_shard *s)
{
    struct kd_server *srv = s->srv;
    struct kd_router *r = srv->router;
    for (;;) {
        kd_stat_inc(&s->stats.loops);
        s->now_ms = kd_clock_ms();
        unsigned reaped = reap(s, KD_SHARD_CQE_BUDGET);
        unsigned drained = kd_router_drain(r, s->id, KD_SHARD_MSG_BUDGET);
        drained += drain_local(s, KD_SHARD_MSG_BUDGET);
        if (!s->stopping && atomic_load_explicit(&srv->stopping, memory_order_acquire))
            begin_stop(s);
        s->now_ms = kd_clock_ms();
        size_t fired = kd_timerwheel_run(&s->timers, s->now_ms, KD_SHARD_TIMER_BUDGET);
        kd_conn_flush_all(s);
        if (!s->eventfd_armed) /* kept armed while stopping: the control thread still asks for stats */
            arm_eventfd(s);

        if (srv->opts.on_turn != NULL)
            srv->opts.on_turn(s);

        /* The shard's Redis connection outlives every other connection (services write to Redis on
         * their way out); once it is the only one left it finishes what is in flight and closes. */
        if (s->stopping && s->redis != NULL && !kd_redis_stopped(s->redis) && s->listeners_open == 0 &&
            s->conns.live <= kd_redis_nconns(s->redis))
            kd_redis_stop(s->redis);

        uint32_t own_ops = s->ops_inflight - (s->eventfd_armed ? 1u : 0u);
        bool settled =
            s->stopping && s->conns.live == 0 && s->listeners_open == 0 && own_ops == 0 && s->local_len == 0;
        if (settled) {
            if (s->drained_since_ms == 0)
                s->drained_since_ms = s->now_ms;
            atomic_store_explicit(&s->drained, true, memory_order_release);
            if (exit_ready(s)) {
                if (s->now_ms - s->drained_since_ms >= STOP_BARRIER_MS)
                    kd_log_msg(KD_LOG_WARN, "stop_barrier_timeout",
                               "messages between shards still in flight after %u ms; leaving",
                               STOP_BARRIER_MS);
                break;
            }
        }

        bool busy = reaped == KD_SHARD_CQE_BUDGET || drained >= KD_SHARD_MSG_BUDGET || s->local_len > 0 ||
                    fired == KD_SHARD_TIMER_BUDGET || !kd_list_is_empty(&s->dirty);
        if (busy) {
            io_uring_submit_and_get_events(&s->ring);
            continue;
        }
        uint64_t next = kd_timerwheel_next(&s->timers);
        uint64_t wait_ms = next == UINT64_MAX ? 60000 : (next > s->now_ms ? next - s->now_ms : 0);
        uint64_t trim_ms = maybe_trim(s, wait_ms);
        if (wait_ms > trim_ms)
            wait_ms = trim_ms;
        uint64_t shed_ms = maybe_shed(s);
        if (wait_ms > shed_ms)
            wait_ms = shed_ms;
        uint64_t quiet_ms = kd_conn_quiet_sweep(s);
        if (wait_ms > quiet_ms)
            wait_ms = quiet_ms;
        if (kd_router_has_backlog(r, s->id) && wait_ms > 1)
            wait_ms = 1; /* our overflow waits for room in a ring: nobody will ring us for that */
        if (settled && wait_ms > 1)
            wait_ms = 1; /* the others settling wakes nobody: look again soon */
        if (wait_ms == 0 || !kd_router_prepare_sleep(r, s->id)) {
            io_uring_submit_and_get_events(&s->ring);
            continue;
        }
        struct __kernel_timespec ts = {.tv_sec = (long long)(wait_ms / 1000),
                                       .tv_nsec = (long long)(wait_ms % 1000) * 1000000};
        struct io_uring_cqe *cqe;
        kd_stat_inc(&s->stats.sleeps);
        io_uring_submit_and_wait_timeout(&s->ring, &cqe, 1, &ts, NULL);
        kd_router_awake(r, s->id);
    }
}

static int setup(struct kd_shard *s)
{
    struct kd_server *srv = s->srv;
    int rc = setup_ring(s);
    if (rc < 0)
        return rc;
    rc = setup_buffers(s);
    if (rc < 0) {
        snprintf(s->start_msg, sizeof(s->start_msg), "provided buffer ring (%u x %u bytes): %s", s->nbufs,
                 s->buf_size, strerror(-rc));
        return rc;
    }
    rc = kd_conntable_init(&s->conns, srv->opts.connections_per_shard);
    if (rc < 0) {
        snprintf(s->start_msg, sizeof(s->start_msg), "connection table (%u): %s",
                 srv->opts.connections_per_shard, strerror(-rc));
        return rc;
    }
    kd_list_init(&s->dirty);
    kd_list_init(&s->sent);
    s->now_ms = kd_clock_ms();
    kd_timerwheel_init(&s->timers, s->now_ms);
    s->wake_at_ns = UINT64_MAX;
    kd_timer_init(&s->stop_timer, stop_timer_cb);
    rc = kd_router_attach(srv->router, s->id, &s->ring, kd_ud_make(KD_OP_DOORBELL, 0, 0), s->eventfd,
                          on_router_msg, s);
    if (rc < 0) {
        snprintf(s->start_msg, sizeof(s->start_msg), "router attach: %s", strerror(-rc));
        return rc;
    }
    if (srv->opts.redis != NULL) {
        struct kd_redis_opts ro = *srv->opts.redis;
        ro.stats = &s->stats.redis;
        if (ro.name == NULL)
            ro.name = "shard";
        char cname[128];
        if (ro.client_name != NULL) { /* one name per shard: "<client_name>-shard<N>" */
            snprintf(cname, sizeof(cname), "%s-shard%u", ro.client_name, s->id);
            ro.client_name = cname;
        }
        s->redis = kd_redis_new(s, &ro, NULL, NULL);
        if (s->redis == NULL) {
            snprintf(s->start_msg, sizeof(s->start_msg),
                     "redis connection: invalid options or out of memory");
            return -ENOMEM;
        }
    }
    if (srv->opts.on_shard_start != NULL) {
        rc = srv->opts.on_shard_start(s);
        if (rc < 0) {
            if (s->start_msg[0] == '\0')
                snprintf(s->start_msg, sizeof(s->start_msg), "shard start hook: %s", strerror(-rc));
            return rc;
        }
    }
    return 0;
}

static void teardown(struct kd_shard *s)
{
    kd_redis_free(s->redis); /* normally already closed: the loop exits only once it is */
    s->redis = NULL;
    if (s->ring_ok) {
        if (s->br != NULL)
            io_uring_unregister_buf_ring(&s->ring, 0);
        io_uring_queue_exit(&s->ring);
        s->ring_ok = false;
    }
    if (s->br != NULL)
        munmap(s->br, s->br_map_len);
    s->br = NULL;
    if (s->bufs != NULL)
        munmap(s->bufs, s->bufs_len);
    s->bufs = NULL;
    kd_conntable_fini(&s->conns);
    free(s->local);
    s->local = NULL;
}

void *kd_shard_main(void *arg)
{
    struct kd_shard *s = arg;
    struct kd_server *srv = s->srv;
    char name[16];
    kd_log_set_shard((int)s->id);
    snprintf(name, sizeof(name), "kasd-shard%u", s->id);
    pthread_setname_np(pthread_self(), name);
    if (srv->opts.pin && srv->ncpu > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(srv->cpus[s->id % srv->ncpu], &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    s->start_err = setup(s);
    sem_post(&srv->ready);
    while (sem_wait(&srv->go) < 0 && errno == EINTR)
        ;
    if (s->start_err == 0 && !atomic_load(&srv->abort_start)) {
        for (unsigned i = 0; i < s->nlisteners; i++)
            kd_listener_arm(s, i);
        arm_eventfd(s);
        loop(s);
        if (srv->opts.on_shard_stop != NULL)
            srv->opts.on_shard_stop(s);
    }
    /* Listener fds not yet closed (failed start) are closed by the server. */
    teardown(s);
    return NULL;
}

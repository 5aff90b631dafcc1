/* router_test.c — the cross-shard router with real threads: a 3-way mesh through tiny rings (overflow),
 * self-send, io_uring msg_ring doorbells between sleeping shards, eventfd doorbells with a non-shard
 * thread, payloads sent home to be freed, and FIFO order through the overflow queue.
 *
 * Assertions run on the test's main thread only: worker threads record what they saw and the main
 * thread checks it after join (criterion's asserts abort the calling thread). */
#include <criterion/criterion.h>

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "router/router.h"

#define MSG_DATA (KD_MSG_USER + 0)
#define MSG_PING (KD_MSG_USER + 1)
#define MSG_PONG (KD_MSG_USER + 2)
#define MSG_STOP (KD_MSG_USER + 3)

#define TAG_DOORBELL 0xd00bull
#define TAG_EVENTFD  0xefdull

static int make_eventfd(bool nonblock)
{
    int fd = eventfd(0, EFD_CLOEXEC | (nonblock ? EFD_NONBLOCK : 0));
    cr_assert_geq(fd, 0, "eventfd: %s", strerror(errno));
    return fd;
}

/* ---- argument checks ---- */

static void ignore_handler(void *ctx, const struct kd_msg *m)
{
}

Test(router, create_rejects_bad_arguments)
{
    cr_assert_null(kd_router_create(0, 64));
    cr_assert_null(kd_router_create(2, 0));
    cr_assert_null(kd_router_create(2, 1));
    cr_assert_null(kd_router_create(2, 48));
    cr_assert_null(kd_router_create(1, 3), "capacity is checked even without rings");
    cr_assert_null(kd_router_create(70000, 64), "kd_msg.from is 16 bits");

    struct kd_router *r = kd_router_create(1, 2);
    cr_assert_not_null(r);
    cr_assert_eq(kd_router_size(r), 1);
    kd_router_destroy(r);
    kd_router_destroy(NULL);
}

Test(router, attach_rejects_bad_arguments)
{
    struct kd_router *r = kd_router_create(2, 8);
    cr_assert_not_null(r);
    int efd = make_eventfd(true);
    cr_assert_eq(kd_router_attach(r, 2, NULL, 0, efd, ignore_handler, NULL), -EINVAL, "self out of range");
    cr_assert_eq(kd_router_attach(r, 0, NULL, 0, efd, NULL, NULL), -EINVAL, "no handler");
    cr_assert_eq(kd_router_attach(r, 0, NULL, 0, -1, ignore_handler, NULL), -EINVAL,
                 "a ring-less participant needs an eventfd");
    cr_assert_eq(kd_router_attach(r, 0, NULL, 0, efd, ignore_handler, NULL), 0);
    cr_assert_eq(kd_router_attach(r, 0, NULL, 0, efd, ignore_handler, NULL), -EINVAL, "attach is once only");
    kd_router_destroy(r);
    close(efd);
}

/* ---- (b) self-send is a direct call ---- */

struct direct_ctx {
    int calls;
    struct kd_msg seen;
};

static void direct_handler(void *ctx, const struct kd_msg *m)
{
    struct direct_ctx *d = ctx;
    d->calls++;
    d->seen = *m;
}

Test(router, self_send_is_a_direct_call)
{
    struct kd_router *r = kd_router_create(2, 8);
    cr_assert_not_null(r);
    int efd = make_eventfd(true);
    struct direct_ctx d = {0};
    cr_assert_eq(kd_router_attach(r, 1, NULL, 0, efd, direct_handler, &d), 0);

    struct kd_msg m = {.type = MSG_DATA, .from = 0, .u32 = 7, .u64 = 42, .ptr = &d};
    kd_router_send(r, 1, 1, &m);
    cr_assert_eq(d.calls, 1, "handler ran before send returned");
    cr_assert_eq(d.seen.from, 1, "from is filled in by send");
    cr_assert_eq(d.seen.u64, 42);
    cr_assert_eq(d.seen.ptr, &d);

    const struct kd_router_stats *st = kd_router_stats(r, 1);
    cr_assert_eq(kd_stat_get(&st->sent), 1);
    cr_assert_eq(kd_stat_get(&st->direct), 1);
    cr_assert_eq(kd_stat_get(&st->received), 1);
    cr_assert_eq(kd_stat_get(&st->doorbells_sent) + kd_stat_get(&st->doorbells_saved), 0);
    cr_assert_not(kd_router_has_inbound(r, 1), "nothing went through a ring");
    cr_assert_eq(kd_router_drain(r, 1, 100), 0);
    kd_router_destroy(r);
    close(efd);
}

/* ---- (f) overflow keeps FIFO order ---- */

struct fifo_ctx {
    uint64_t next; /* next expected sequence number */
    uint64_t errors;
};

static void fifo_handler(void *ctx, const struct kd_msg *m)
{
    struct fifo_ctx *f = ctx;
    if (m->u64 != f->next)
        f->errors++;
    f->next = m->u64 + 1;
}

/* Single thread plays both participants: each ring still has one producer and one consumer. */
Test(router, overflow_keeps_fifo_when_consumer_stalls)
{
    enum { CAP = 4, STALLED = 1000, LATE = 300 };
    struct kd_router *r = kd_router_create(2, CAP);
    cr_assert_not_null(r);
    int efd0 = make_eventfd(true), efd1 = make_eventfd(true);
    struct fifo_ctx f = {0};
    cr_assert_eq(kd_router_attach(r, 0, NULL, 0, efd0, ignore_handler, NULL), 0);
    cr_assert_eq(kd_router_attach(r, 1, NULL, 0, efd1, fifo_handler, &f), 0);

    uint64_t seq = 0;
    for (; seq < STALLED; seq++) {
        struct kd_msg m = {.type = MSG_DATA, .u64 = seq};
        kd_router_send(r, 0, 1, &m);
    }
    const struct kd_router_stats *s0 = kd_router_stats(r, 0);
    cr_assert_eq(kd_stat_get(&s0->overflowed), STALLED - CAP);
    cr_assert(kd_router_has_backlog(r, 0));
    cr_assert_not(kd_router_has_backlog(r, 1));
    cr_assert(kd_router_has_inbound(r, 1));

    /* The consumer takes what is in the ring; the ring now has room, but new messages must still
     * queue behind the backlog rather than overtake it. */
    cr_assert_eq(kd_router_drain(r, 1, 1000), CAP);
    cr_assert_eq(f.next, CAP);
    for (; seq < STALLED + LATE; seq++) {
        struct kd_msg m = {.type = MSG_DATA, .u64 = seq};
        kd_router_send(r, 0, 1, &m);
    }
    cr_assert_eq(kd_stat_get(&s0->overflowed), STALLED + LATE - CAP, "no overtaking while backlogged");

    /* Alternate producer drains (which retry overflow) and consumer drains until all arrived. */
    int rounds = 0;
    while (kd_router_has_backlog(r, 0) || kd_router_has_inbound(r, 1)) {
        kd_router_drain(r, 0, 16);
        kd_router_drain(r, 1, 3); /* a budget smaller than the ring: drain must honour it */
        cr_assert_lt(++rounds, 10000);
    }
    cr_assert_eq(f.errors, 0);
    cr_assert_eq(f.next, STALLED + LATE);
    cr_assert_eq(kd_stat_get(&kd_router_stats(r, 1)->received), STALLED + LATE);

    /* Back to the fast path once the backlog is gone. */
    struct kd_msg m = {.type = MSG_DATA, .u64 = seq++};
    kd_router_send(r, 0, 1, &m);
    cr_assert_eq(kd_stat_get(&s0->overflowed), STALLED + LATE - CAP);
    cr_assert_eq(kd_router_drain(r, 1, 10), 1);
    cr_assert_eq(f.errors, 0);
    kd_router_destroy(r);
    close(efd0);
    close(efd1);
}

struct rr_ctx {
    unsigned froms[256];
    unsigned n;
};

static void rr_handler(void *ctx, const struct kd_msg *m)
{
    struct rr_ctx *c = ctx;
    if (c->n < 256)
        c->froms[c->n] = m->from;
    c->n++;
}

Test(router, drain_is_round_robin_and_bounded)
{
    enum { N = 4, PER = 40 };
    struct kd_router *r = kd_router_create(N, 64);
    cr_assert_not_null(r);
    int efd[N];
    struct rr_ctx rr = {.n = 0};
    for (unsigned i = 0; i < N; i++) {
        efd[i] = make_eventfd(true);
        cr_assert_eq(kd_router_attach(r, i, NULL, 0, efd[i], i == 0 ? rr_handler : ignore_handler, &rr), 0);
    }
    for (unsigned from = 1; from < N; from++)
        for (unsigned k = 0; k < PER; k++) {
            struct kd_msg m = {.type = MSG_DATA, .u64 = k};
            kd_router_send(r, from, 0, &m);
        }
    cr_assert_eq(kd_router_drain(r, 0, 0), 0);
    /* Three small drains: each starts at the sender after the one the previous drain stopped at, so
     * one busy sender cannot starve the others. */
    for (unsigned d = 0; d < 3; d++) {
        cr_assert_eq(kd_router_drain(r, 0, 10), 10, "budget bounds delivery");
        for (unsigned k = 0; k < 10; k++)
            cr_assert_eq(rr.froms[d * 10 + k], d + 1, "drain %u took from sender %u", d,
                         rr.froms[d * 10 + k]);
    }
    unsigned total = 30, got;
    while ((got = kd_router_drain(r, 0, 7)) != 0) {
        cr_assert_leq(got, 7);
        total += got;
    }
    cr_assert_eq(total, (N - 1) * PER);
    cr_assert_eq(rr.n, total);
    cr_assert_not(kd_router_has_inbound(r, 0));
    kd_router_destroy(r);
    for (unsigned i = 0; i < N; i++)
        close(efd[i]);
}

/* ---- (a) 3 participants, everyone sends to everyone, spinning ---- */

#define MESH_N        3
#define MESH_PER_PAIR 1000000u
#define MESH_CAP      64
/* Messages per target between drains, cycling: batches larger than the ring force the overflow path,
 * small ones let the backlog clear so the direct ring path is exercised too. */
static const unsigned mesh_batches[] = {100, 8, 16, 3, 200, 32, 1, 64};
#define MESH_NBATCH (sizeof(mesh_batches) / sizeof(mesh_batches[0]))

struct mesh {
    struct kd_router *r;
    pthread_barrier_t start, end;
};

struct mesh_peer {
    struct mesh *mesh;
    unsigned self;
    int efd;
    uint64_t next[MESH_N]; /* next expected sequence number per sender */
    uint64_t from_peers;   /* messages received over rings */
    uint64_t self_calls;
    uint64_t batches; /* send rounds, one self-send each */
    uint64_t errors;
    uint64_t first_bad_from, first_bad_seq;
};

static void mesh_handler(void *ctx, const struct kd_msg *m)
{
    struct mesh_peer *p = ctx;
    if (m->from == p->self) {
        p->self_calls++;
        return;
    }
    bool ok = m->from < MESH_N && m->type == MSG_DATA && m->u64 == p->next[m->from] &&
              m->u32 == m->from * 100u + p->self && m->ptr == (void *)(uintptr_t)(m->u64 ^ 0x5a5a);
    if (!ok && p->errors++ == 0) {
        p->first_bad_from = m->from;
        p->first_bad_seq = m->u64;
    }
    if (m->from < MESH_N)
        p->next[m->from] = m->u64 + 1;
    p->from_peers++;
}

static void *mesh_thread(void *arg)
{
    struct mesh_peer *p = arg;
    struct kd_router *r = p->mesh->r;
    /* Nobody sleeps in this test, so the eventfd is never rung; attach requires one without a ring. */
    kd_router_attach(r, p->self, NULL, 0, p->efd, mesh_handler, p);
    pthread_barrier_wait(&p->mesh->start);

    for (uint64_t k = 0, b = 0; k < MESH_PER_PAIR; k += mesh_batches[b++ % MESH_NBATCH]) {
        uint64_t end = k + mesh_batches[b % MESH_NBATCH];
        for (unsigned to = 0; to < MESH_N; to++) {
            if (to == p->self)
                continue;
            for (uint64_t s = k; s < end && s < MESH_PER_PAIR; s++) {
                struct kd_msg m = {.type = MSG_DATA,
                                   .u32 = p->self * 100u + to,
                                   .u64 = s,
                                   .ptr = (void *)(uintptr_t)(s ^ 0x5a5a)};
                kd_router_send(r, p->self, to, &m);
            }
        }
        struct kd_msg me = {.type = MSG_DATA};
        kd_router_send(r, p->self, p->self, &me);
        kd_router_drain(r, p->self, 256);
        /* Every other round, wait for the backlog to clear (draining meanwhile, so nobody deadlocks)
         * so that the next round starts on the direct ring path instead of queueing behind it. */
        unsigned spins = 0;
        while (b % 2 == 0 && kd_router_has_backlog(r, p->self))
            if (kd_router_drain(r, p->self, 256) == 0 && ++spins % 16 == 0)
                sched_yield();
        p->batches++;
    }
    const uint64_t expect = (uint64_t)(MESH_N - 1) * MESH_PER_PAIR;
    unsigned idle = 0;
    while (kd_router_has_backlog(r, p->self) || p->from_peers < expect) {
        if (kd_router_drain(r, p->self, 256) == 0 && ++idle % 16 == 0)
            sched_yield(); /* 3 spinning threads on 2 cores: let the others run */
    }
    /* Keep the router alive until everyone is done with it. */
    pthread_barrier_wait(&p->mesh->end);
    return NULL;
}

Test(router, mesh_of_three_fifo_per_pair_under_overflow, .timeout = 120)
{
    struct mesh mesh;
    mesh.r = kd_router_create(MESH_N, MESH_CAP);
    cr_assert_not_null(mesh.r);
    pthread_barrier_init(&mesh.start, NULL, MESH_N);
    pthread_barrier_init(&mesh.end, NULL, MESH_N);

    struct mesh_peer peers[MESH_N];
    pthread_t th[MESH_N];
    memset(peers, 0, sizeof(peers));
    for (unsigned i = 0; i < MESH_N; i++) {
        peers[i].mesh = &mesh;
        peers[i].self = i;
        peers[i].efd = make_eventfd(true);
        cr_assert_eq(pthread_create(&th[i], NULL, mesh_thread, &peers[i]), 0);
    }
    for (unsigned i = 0; i < MESH_N; i++)
        pthread_join(th[i], NULL);

    uint64_t sent = 0, received = 0, overflowed = 0, direct = 0;
    for (unsigned i = 0; i < MESH_N; i++) {
        struct mesh_peer *p = &peers[i];
        cr_assert_eq(p->errors, 0, "participant %u: %llu order errors, first from %llu seq %llu", i,
                     (unsigned long long)p->errors, (unsigned long long)p->first_bad_from,
                     (unsigned long long)p->first_bad_seq);
        for (unsigned from = 0; from < MESH_N; from++)
            if (from != i)
                cr_assert_eq(p->next[from], MESH_PER_PAIR, "all of %u -> %u arrived", from, i);
        cr_assert_eq(p->from_peers, (uint64_t)(MESH_N - 1) * MESH_PER_PAIR);
        const uint64_t batches = p->batches;
        cr_assert_eq(p->self_calls, batches);

        const struct kd_router_stats *st = kd_router_stats(mesh.r, i);
        cr_assert_eq(kd_stat_get(&st->sent), (uint64_t)(MESH_N - 1) * MESH_PER_PAIR + batches);
        cr_assert_eq(kd_stat_get(&st->received), p->from_peers + p->self_calls);
        cr_assert_eq(kd_stat_get(&st->direct), batches);
        cr_assert_eq(kd_stat_get(&st->doorbells_sent), 0, "nobody ever slept");
        sent += kd_stat_get(&st->sent);
        received += kd_stat_get(&st->received);
        overflowed += kd_stat_get(&st->overflowed);
        direct += kd_stat_get(&st->direct);
        cr_assert_not(kd_router_has_inbound(mesh.r, i));
        cr_assert_not(kd_router_has_backlog(mesh.r, i));
    }
    cr_assert_eq(sent, received);
    cr_assert_gt(overflowed, 0, "batches larger than the ring must overflow");
    cr_assert_lt(overflowed + direct, sent, "some messages took the direct ring path");
    cr_log_info("mesh: %llu messages, %llu overflowed, %llu direct", (unsigned long long)sent,
                (unsigned long long)overflowed, (unsigned long long)direct);

    kd_router_destroy(mesh.r);
    pthread_barrier_destroy(&mesh.start);
    pthread_barrier_destroy(&mesh.end);
    for (unsigned i = 0; i < MESH_N; i++)
        close(peers[i].efd);
}

/* ---- a minimal shard loop: one io_uring, an armed eventfd read, doorbells as CQEs ---- */

struct shard {
    struct kd_router *r;
    unsigned self;
    struct io_uring ring;
    bool ring_ok;
    int efd;
    uint64_t efd_buf;
    bool stop;
    /* what the loop saw; read by the main thread after join */
    uint64_t waits, doorbell_cqes, eventfd_cqes, timeouts, lost_wakeups, cqe_errors;
};

/* IORING_SETUP_SINGLE_ISSUER binds the ring to the creating thread, hence this runs in the shard. */
static int shard_ring_init(struct shard *s)
{
    int ret = io_uring_queue_init(64, &s->ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
    if (ret == -EINVAL)
        ret = io_uring_queue_init(64, &s->ring, 0);
    s->ring_ok = ret == 0;
    return ret;
}

static void shard_arm_eventfd(struct shard *s)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring);
    if (sqe == NULL) {
        io_uring_submit(&s->ring);
        sqe = io_uring_get_sqe(&s->ring);
    }
    io_uring_prep_read(sqe, s->efd, &s->efd_buf, sizeof(s->efd_buf), 0);
    io_uring_sqe_set_data64(sqe, TAG_EVENTFD);
}

static unsigned shard_reap(struct shard *s)
{
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&s->ring, head, cqe)
    {
        uint64_t tag = io_uring_cqe_get_data64(cqe);
        if (tag == TAG_DOORBELL) {
            /* A doorbell, or a failed msg_ring of ours (same tag by design): either way just a wake-up. */
            if (cqe->res < 0)
                s->cqe_errors++;
            else
                s->doorbell_cqes++;
        } else if (tag == TAG_EVENTFD) {
            s->eventfd_cqes++;
            if (cqe->res < 0 && cqe->res != -EAGAIN)
                s->cqe_errors++;
            shard_arm_eventfd(s);
        } else {
            s->cqe_errors++;
        }
        seen++;
    }
    io_uring_cq_advance(&s->ring, seen);
    return seen;
}

/* The loop's blocking step: sleep only if the router agrees, wake on a doorbell or after 1 s. */
static void shard_wait(struct shard *s)
{
    if (!kd_router_prepare_sleep(s->r, s->self)) {
        io_uring_submit(&s->ring); /* still flush pending doorbells of ours */
        return;
    }
    s->waits++;
    struct __kernel_timespec ts = {.tv_sec = 1, .tv_nsec = 0};
    struct io_uring_cqe *cqe = NULL;
    int ret = io_uring_submit_and_wait_timeout(&s->ring, &cqe, 1, &ts, NULL);
    kd_router_awake(s->r, s->self);
    unsigned reaped = shard_reap(s);
    if (ret == -ETIME && reaped == 0) {
        s->timeouts++;
        /* Something was waiting for us, yet nobody rang: the wake-up was lost. */
        if (kd_router_has_inbound(s->r, s->self))
            s->lost_wakeups++;
    }
}

static void shard_loop(struct shard *s)
{
    while (!s->stop) {
        kd_router_drain(s->r, s->self, 256);
        if (s->stop || s->lost_wakeups != 0 || s->timeouts > 3)
            break;
        shard_wait(s);
    }
    io_uring_submit(&s->ring); /* doorbells prepared by the last handler calls */
}

/* ---- (c) ping-pong between two sleeping shards, doorbells via msg_ring ---- */

#define PINGPONG_ROUNDS 100000u

struct pingpong {
    struct kd_router *r;
    pthread_barrier_t ready, done;
    struct shard sh[2];
    uint64_t pongs, errors;
    int init_err[2];
};

static void pp_handler(void *ctx, const struct kd_msg *m)
{
    struct shard *s = ctx;
    struct pingpong *pp = (struct pingpong *)(void *)((char *)(s - s->self) - offsetof(struct pingpong, sh));
    if (m->type == MSG_STOP) {
        s->stop = true;
        return;
    }
    if (s->self == 1) { /* responder */
        struct kd_msg reply = {.type = MSG_PONG, .u64 = m->u64};
        if (m->type != MSG_PING)
            pp->errors++;
        kd_router_send(s->r, 1, 0, &reply);
        return;
    }
    if (m->type != MSG_PONG || m->u64 != pp->pongs)
        pp->errors++;
    pp->pongs++;
    struct kd_msg next = {.type = MSG_PING, .u64 = pp->pongs};
    if (pp->pongs == PINGPONG_ROUNDS) {
        next.type = MSG_STOP;
        s->stop = true;
    }
    kd_router_send(s->r, 0, 1, &next);
}

static void *pp_thread(void *arg)
{
    struct shard *s = arg;
    struct pingpong *pp = (struct pingpong *)(void *)((char *)(s - s->self) - offsetof(struct pingpong, sh));
    pp->init_err[s->self] = shard_ring_init(s);
    if (s->ring_ok) {
        s->efd = make_eventfd(true);
        shard_arm_eventfd(s);
        io_uring_submit(&s->ring);
        kd_router_attach(s->r, s->self, &s->ring, TAG_DOORBELL, s->efd, pp_handler, s);
    }
    pthread_barrier_wait(&pp->ready);
    if (pp->sh[0].ring_ok && pp->sh[1].ring_ok) {
        if (s->self == 0) {
            struct kd_msg first = {.type = MSG_PING, .u64 = 0};
            kd_router_send(s->r, 0, 1, &first);
        }
        shard_loop(s);
    }
    /* Both rings stay open until neither side can send a doorbell any more. */
    pthread_barrier_wait(&pp->done);
    if (s->ring_ok) {
        io_uring_queue_exit(&s->ring);
        close(s->efd);
    }
    return NULL;
}

Test(router, pingpong_doorbells_wake_sleeping_shards, .timeout = 120)
{
    struct pingpong *pp = calloc(1, sizeof(*pp));
    pp->r = kd_router_create(2, 16);
    cr_assert_not_null(pp->r);
    pthread_barrier_init(&pp->ready, NULL, 2);
    pthread_barrier_init(&pp->done, NULL, 2);
    pthread_t th[2];
    for (unsigned i = 0; i < 2; i++) {
        pp->sh[i].r = pp->r;
        pp->sh[i].self = i;
        pp->sh[i].efd = -1;
        cr_assert_eq(pthread_create(&th[i], NULL, pp_thread, &pp->sh[i]), 0);
    }
    for (unsigned i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    if (pp->init_err[0] == -ENOSYS || pp->init_err[0] == -EPERM)
        cr_skip_test("io_uring unavailable: %s", strerror(-pp->init_err[0]));
    cr_assert_eq(pp->init_err[0], 0, "io_uring_queue_init: %s", strerror(-pp->init_err[0]));
    cr_assert_eq(pp->init_err[1], 0, "io_uring_queue_init: %s", strerror(-pp->init_err[1]));

    for (unsigned i = 0; i < 2; i++) {
        cr_assert_eq(pp->sh[i].lost_wakeups, 0, "shard %u timed out with a message pending", i);
        if (pp->sh[i].timeouts != 0) /* only a stalled machine explains it; the game result decides */
            cr_log_warn("shard %u slept a full second %llu times", i, (unsigned long long)pp->sh[i].timeouts);
        cr_assert_eq(pp->sh[i].cqe_errors, 0, "shard %u got failed CQEs", i);
    }
    cr_assert_eq(pp->errors, 0);
    cr_assert_eq(pp->pongs, PINGPONG_ROUNDS);

    const struct kd_router_stats *st[2] = {kd_router_stats(pp->r, 0), kd_router_stats(pp->r, 1)};
    uint64_t rung = 0;
    for (unsigned i = 0; i < 2; i++) {
        uint64_t sent = kd_stat_get(&st[i]->sent);
        /* One notify per ring push: every message was either rung for or found its target awake. */
        cr_assert_eq(kd_stat_get(&st[i]->doorbells_sent) + kd_stat_get(&st[i]->doorbells_saved), sent);
        cr_assert_eq(kd_stat_get(&st[i]->overflowed), 0);
        /* Every msg_ring posts exactly one CQE on the target; the very last ones may land after the
         * target left its loop (it saw the message before it slept), hence the small slack. */
        uint64_t peer_rang = kd_stat_get(&st[1 - i]->doorbells_sent);
        cr_assert_leq(pp->sh[i].doorbell_cqes, peer_rang);
        cr_assert_geq(pp->sh[i].doorbell_cqes + 2, peer_rang);
        cr_assert_eq(pp->sh[i].eventfd_cqes, 0, "shards ring each other through msg_ring, not the eventfd");
        rung += kd_stat_get(&st[i]->doorbells_sent);
    }
    cr_assert_eq(kd_stat_get(&st[0]->sent), PINGPONG_ROUNDS + 1);
    cr_assert_eq(kd_stat_get(&st[1]->sent), PINGPONG_ROUNDS);
    /* Both sides sleep whenever idle, so most messages find their target asleep. */
    cr_assert_gt(rung, PINGPONG_ROUNDS / 5, "only %llu doorbells for %u round trips",
                 (unsigned long long)rung, PINGPONG_ROUNDS);
    cr_log_info("pingpong: %llu doorbells for %u messages, waits %llu/%llu", (unsigned long long)rung,
                2 * PINGPONG_ROUNDS + 1, (unsigned long long)pp->sh[0].waits,
                (unsigned long long)pp->sh[1].waits);

    kd_router_destroy(pp->r);
    pthread_barrier_destroy(&pp->ready);
    pthread_barrier_destroy(&pp->done);
    free(pp);
}

/* ---- (d) a non-shard thread (no ring, blocking eventfd) talking to a shard ---- */

#define CONTROL_ROUNDS 20000u

struct control_test {
    struct kd_router *r;
    pthread_barrier_t ready, done;
    struct shard shard; /* participant 0 */
    int ctl_efd;        /* participant 1: blocking eventfd */
    uint64_t replies, errors, ctl_waits, ctl_eventfd_wakes, ctl_timeouts, ctl_lost;
    int init_err;
};

static void ctl_shard_handler(void *ctx, const struct kd_msg *m)
{
    struct shard *s = ctx;
    if (m->type == MSG_STOP) {
        s->stop = true;
        return;
    }
    struct kd_msg reply = {.type = MSG_PONG, .u64 = m->u64 * 3};
    kd_router_send(s->r, 0, m->from, &reply);
}

static void ctl_handler(void *ctx, const struct kd_msg *m)
{
    struct control_test *c = ctx;
    if (m->type != MSG_PONG || m->u64 != c->replies * 3)
        c->errors++;
    c->replies++;
}

static void *ctl_shard_thread(void *arg)
{
    struct control_test *c = arg;
    struct shard *s = &c->shard;
    c->init_err = shard_ring_init(s);
    if (s->ring_ok) {
        s->efd = make_eventfd(true);
        shard_arm_eventfd(s);
        io_uring_submit(&s->ring);
        kd_router_attach(s->r, 0, &s->ring, TAG_DOORBELL, s->efd, ctl_shard_handler, s);
    }
    pthread_barrier_wait(&c->ready);
    if (s->ring_ok)
        shard_loop(s);
    pthread_barrier_wait(&c->done);
    if (s->ring_ok) {
        io_uring_queue_exit(&s->ring);
        close(s->efd);
    }
    return NULL;
}

/* The control thread's blocking step: poll the eventfd for up to 1 s, then read it to re-arm. */
static void ctl_wait(struct control_test *c)
{
    if (!kd_router_prepare_sleep(c->r, 1))
        return;
    c->ctl_waits++;
    struct pollfd pfd = {.fd = c->ctl_efd, .events = POLLIN};
    int n = poll(&pfd, 1, 1000);
    kd_router_awake(c->r, 1);
    if (n == 1) {
        uint64_t v;
        if (read(c->ctl_efd, &v, sizeof(v)) == (ssize_t)sizeof(v))
            c->ctl_eventfd_wakes++;
    } else if (n == 0) {
        c->ctl_timeouts++;
        if (kd_router_has_inbound(c->r, 1))
            c->ctl_lost++;
    }
}

static void *ctl_thread(void *arg)
{
    struct control_test *c = arg;
    kd_router_attach(c->r, 1, NULL, 0, c->ctl_efd, ctl_handler, c);
    pthread_barrier_wait(&c->ready);
    if (c->shard.ring_ok) {
        for (uint64_t i = 0; i < CONTROL_ROUNDS && c->ctl_timeouts < 3; i++) {
            struct kd_msg req = {.type = MSG_PING, .u64 = i};
            kd_router_send(c->r, 1, 0, &req);
            while (c->replies <= i && c->ctl_timeouts < 3) {
                if (kd_router_drain(c->r, 1, 64) == 0)
                    ctl_wait(c);
            }
        }
        struct kd_msg stop = {.type = MSG_STOP};
        kd_router_send(c->r, 1, 0, &stop);
    }
    pthread_barrier_wait(&c->done);
    return NULL;
}

Test(router, control_thread_eventfd_doorbells_both_ways, .timeout = 120)
{
    struct control_test *c = calloc(1, sizeof(*c));
    c->r = kd_router_create(2, 16);
    cr_assert_not_null(c->r);
    c->shard.r = c->r;
    c->shard.self = 0;
    c->shard.efd = -1;
    c->ctl_efd = make_eventfd(false);
    pthread_barrier_init(&c->ready, NULL, 2);
    pthread_barrier_init(&c->done, NULL, 2);
    pthread_t ts, tc;
    cr_assert_eq(pthread_create(&ts, NULL, ctl_shard_thread, c), 0);
    cr_assert_eq(pthread_create(&tc, NULL, ctl_thread, c), 0);
    pthread_join(ts, NULL);
    pthread_join(tc, NULL);
    if (c->init_err == -ENOSYS || c->init_err == -EPERM)
        cr_skip_test("io_uring unavailable: %s", strerror(-c->init_err));
    cr_assert_eq(c->init_err, 0);

    cr_assert_eq(c->ctl_lost, 0, "control thread timed out with a reply pending");
    cr_assert_eq(c->shard.lost_wakeups, 0, "shard timed out with a request pending");
    if (c->ctl_timeouts + c->shard.timeouts != 0)
        cr_log_warn("%llu one-second waits timed out",
                    (unsigned long long)(c->ctl_timeouts + c->shard.timeouts));
    cr_assert_eq(c->shard.cqe_errors, 0);
    cr_assert_eq(c->errors, 0);
    cr_assert_eq(c->replies, CONTROL_ROUNDS);

    const struct kd_router_stats *ss = kd_router_stats(c->r, 0), *cs = kd_router_stats(c->r, 1);
    /* The control thread has no ring, so it can only ring the shard's eventfd, and the shard can only
     * ring the control thread's eventfd: no msg_ring CQE may show up anywhere. */
    cr_assert_eq(c->shard.doorbell_cqes, 0);
    cr_assert_gt(kd_stat_get(&cs->doorbells_sent), 0);
    cr_assert_gt(kd_stat_get(&ss->doorbells_sent), 0);
    cr_assert_gt(c->shard.eventfd_cqes, 0, "the shard was woken through its eventfd");
    cr_assert_gt(c->ctl_eventfd_wakes, 0);
    /* An eventfd read consumes every write before it, so wakes <= doorbells. */
    cr_assert_leq(c->shard.eventfd_cqes, kd_stat_get(&cs->doorbells_sent));
    cr_assert_leq(c->ctl_eventfd_wakes, kd_stat_get(&ss->doorbells_sent));
    cr_assert_eq(kd_stat_get(&ss->doorbells_sent) + kd_stat_get(&ss->doorbells_saved),
                 kd_stat_get(&ss->sent));
    cr_assert_eq(kd_stat_get(&cs->doorbells_sent) + kd_stat_get(&cs->doorbells_saved),
                 kd_stat_get(&cs->sent));
    cr_log_info("control: shard rang %llu, control rang %llu for %u round trips",
                (unsigned long long)kd_stat_get(&ss->doorbells_sent),
                (unsigned long long)kd_stat_get(&cs->doorbells_sent), CONTROL_ROUNDS);

    kd_router_destroy(c->r);
    pthread_barrier_destroy(&c->ready);
    pthread_barrier_destroy(&c->done);
    close(c->ctl_efd);
    free(c);
}

/* ---- (e) payloads go home to be freed ---- */

#define PAYLOADS 50000u

struct payload_test {
    struct kd_router *r;
    pthread_barrier_t ready;
    int efd[2];
    uint64_t handled, errors; /* on B */
    uint64_t a_handler_calls; /* on A: must stay 0, RELEASE is router-internal */
};

static void payload_fill(unsigned char *p, size_t size, uint64_t seed)
{
    for (size_t i = 0; i < size; i++)
        p[i] = (unsigned char)(seed + i * 31);
}

static void payload_a_handler(void *ctx, const struct kd_msg *m)
{
    struct payload_test *t = ctx;
    t->a_handler_calls++;
}

static void payload_b_handler(void *ctx, const struct kd_msg *m)
{
    struct payload_test *t = ctx;
    const unsigned char *p = m->ptr;
    bool ok = m->type == MSG_DATA && ((uintptr_t)p % alignof(max_align_t)) == 0;
    for (size_t i = 0; ok && i < m->u32; i++)
        ok = p[i] == (unsigned char)(m->u64 + i * 31);
    if (!ok)
        t->errors++;
    t->handled++;
    /* B is done with it: the router carries it back to A. */
    kd_router_payload_release(t->r, 1, m->ptr);
}

static void *payload_a_thread(void *arg)
{
    struct payload_test *t = arg;
    kd_router_attach(t->r, 0, NULL, 0, t->efd[0], payload_a_handler, t);
    pthread_barrier_wait(&t->ready);

    /* A local release frees on the spot and sends nothing. */
    void *local = kd_router_payload_alloc(t->r, 0, 100);
    kd_router_payload_release(t->r, 0, local);

    for (uint64_t i = 0; i < PAYLOADS; i++) {
        uint32_t size = (uint32_t)(i % 257);
        void *p = kd_router_payload_alloc(t->r, 0, size);
        if (p == NULL)
            abort();
        payload_fill(p, size, i);
        struct kd_msg m = {.type = MSG_DATA, .u32 = size, .u64 = i, .ptr = p};
        kd_router_send(t->r, 0, 1, &m);
        if (i % 64 == 0)
            kd_router_drain(t->r, 0, 256); /* free what came back so far */
    }
    unsigned idle = 0;
    while (kd_router_has_backlog(t->r, 0) || kd_stat_get(&kd_router_stats(t->r, 0)->received) < PAYLOADS)
        if (kd_router_drain(t->r, 0, 256) == 0 && ++idle % 16 == 0)
            sched_yield();
    return NULL;
}

static void *payload_b_thread(void *arg)
{
    struct payload_test *t = arg;
    kd_router_attach(t->r, 1, NULL, 0, t->efd[1], payload_b_handler, t);
    pthread_barrier_wait(&t->ready);
    unsigned idle = 0;
    while (t->handled < PAYLOADS || kd_router_has_backlog(t->r, 1))
        if (kd_router_drain(t->r, 1, 256) == 0 && ++idle % 16 == 0)
            sched_yield();
    return NULL;
}

Test(router, payloads_are_freed_by_their_owner, .timeout = 60)
{
    struct payload_test t;
    memset(&t, 0, sizeof(t));
    t.r = kd_router_create(2, 32);
    cr_assert_not_null(t.r);
    t.efd[0] = make_eventfd(true);
    t.efd[1] = make_eventfd(true);
    pthread_barrier_init(&t.ready, NULL, 2);
    pthread_t ta, tb;
    cr_assert_eq(pthread_create(&ta, NULL, payload_a_thread, &t), 0);
    cr_assert_eq(pthread_create(&tb, NULL, payload_b_thread, &t), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);

    cr_assert_eq(t.errors, 0, "payload bytes or alignment damaged in transit");
    cr_assert_eq(t.handled, PAYLOADS);
    cr_assert_eq(t.a_handler_calls, 0, "RELEASE messages never reach the handler");
    const struct kd_router_stats *a = kd_router_stats(t.r, 0), *b = kd_router_stats(t.r, 1);
    cr_assert_eq(kd_stat_get(&b->released_remote), PAYLOADS);
    cr_assert_eq(kd_stat_get(&a->released_remote), 0, "A's own release was local");
    cr_assert_eq(kd_stat_get(&a->received), PAYLOADS, "A received every RELEASE");
    cr_assert_eq(kd_stat_get(&a->sent), PAYLOADS);
    cr_assert_eq(kd_stat_get(&b->sent), PAYLOADS);
    /* Leaks, if any, are reported by LeakSanitizer when built with -fsanitize=address. */
    kd_router_destroy(t.r);
    pthread_barrier_destroy(&t.ready);
    close(t.efd[0]);
    close(t.efd[1]);
}

Test(router, destroy_frees_queued_release_payloads)
{
    struct kd_router *r = kd_router_create(2, 4);
    cr_assert_not_null(r);
    int efd0 = make_eventfd(true), efd1 = make_eventfd(true);
    cr_assert_eq(kd_router_attach(r, 0, NULL, 0, efd0, ignore_handler, NULL), 0);
    cr_assert_eq(kd_router_attach(r, 1, NULL, 0, efd1, ignore_handler, NULL), 0);
    cr_assert_null(kd_router_payload_alloc(r, 2, 10), "bad owner");
    cr_assert_null(kd_router_payload_alloc(r, 0, SIZE_MAX - 4), "size overflow");
    kd_router_payload_release(r, 1, NULL); /* no-op */

    /* 10 payloads of A released on B without A draining: 4 RELEASEs in the ring, 6 in B's overflow.
     * Plus a plain user message whose pointer is not the router's to free. */
    static int not_ours;
    for (int i = 0; i < 10; i++)
        kd_router_payload_release(r, 1, kd_router_payload_alloc(r, 0, 64));
    struct kd_msg m = {.type = MSG_DATA, .ptr = &not_ours};
    kd_router_send(r, 0, 1, &m);
    cr_assert_eq(kd_stat_get(&kd_router_stats(r, 1)->overflowed), 6);
    cr_assert_eq(kd_stat_get(&kd_router_stats(r, 1)->released_remote), 10);
    kd_router_destroy(r); /* LeakSanitizer checks the 10 blocks were freed */
    close(efd0);
    close(efd1);
}

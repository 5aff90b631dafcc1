/* router_bench.c — cross-shard router throughput and round-trip latency between two io_uring shards.
 *
 *   one-way   A sends N messages to B as fast as it can (backpressure: when the ring is full, A
 *             drains its overflow before sending more). B either spins on drain or runs the real
 *             shard loop shape: drain, prepare_sleep, submit_and_wait, awake (so doorbells happen).
 *   ping-pong A sends PING, B answers PONG, A times the round trip; both spin or both sleep.
 *
 * Each scenario uses a fresh router and two threads that create their own io_uring (required with
 * IORING_SETUP_SINGLE_ISSUER) and pin themselves to the first two CPUs the process may use.
 *
 * Usage: router_bench [--messages N] [--roundtrips N] [--capacity N] [--json FILE]
 */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "router/router.h"

#define MSG_DATA (KD_MSG_USER + 0)
#define MSG_PING (KD_MSG_USER + 1)
#define MSG_PONG (KD_MSG_USER + 2)
#define MSG_STOP (KD_MSG_USER + 3)

#define TAG_DOORBELL 0xd00bull

enum kind { ONE_WAY, PING_PONG };

struct scenario;

/* One participant thread. Everything but the results is touched by its own thread only. */
struct side {
    struct scenario *sc;
    unsigned self;
    int cpu;
    bool pinned;
    struct io_uring ring;
    int ring_err;
    bool plain_ring; /* the kernel refused SINGLE_ISSUER|DEFER_TASKRUN */
    bool stop;
    uint64_t received, pongs;
    uint64_t waits, doorbell_cqes, timeouts;
};

struct scenario {
    enum kind kind;
    bool sleeping; /* idle shards block in submit_and_wait instead of spinning */
    uint64_t count;
    uint64_t warmup;
    struct kd_router *r;
    pthread_barrier_t ready, done;
    struct side side[2];
    uint64_t t_start, t_end; /* ONE_WAY: first send on A, last delivery on B */
    uint64_t *samples;       /* PING_PONG: round-trip times in ns */
    atomic_bool finished;
};

struct result {
    double msgs_per_sec;
    double doorbells_per_msg;
    uint64_t p50, p99, p999;
    uint64_t timeouts;
    bool ok;
};

static int cpus[2] = {0, 1};
static long ncpu = 1;
static bool one_cpu; /* both threads share a CPU: spinners must yield */
static uint32_t capacity = 256;
static const char *uring_flags_used = "?";

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static bool pin_self(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

/* Pick the first two CPUs this process may run on (usually 0 and 1). */
static void choose_cpus(void)
{
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;
    int found = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
            if (CPU_ISSET(c, &set))
                cpus[found++] = c;
    if (found == 0)
        cpus[found++] = 0;
    if (found < 2) {
        cpus[1] = cpus[0];
        one_cpu = true;
    }
}

/* Push doorbell SQEs the router prepared on our ring (router.h: "submitted with its next submit"). */
static void flush_sq(struct side *s)
{
    if (io_uring_sq_ready(&s->ring) != 0)
        io_uring_submit(&s->ring);
}

static void reap(struct side *s)
{
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&s->ring, head, cqe)
    {
        if (io_uring_cqe_get_data64(cqe) == TAG_DOORBELL)
            s->doorbell_cqes++;
        seen++;
    }
    io_uring_cq_advance(&s->ring, seen);
}

/* What a loop does when drain found no more work: block until a doorbell (sleeping mode) or go
 * round again (spinning mode). */
static void idle(struct side *s)
{
    struct kd_router *r = s->sc->r;
    if (!s->sc->sleeping) {
        flush_sq(s);
        if (one_cpu)
            sched_yield();
        return;
    }
    if (!kd_router_prepare_sleep(r, s->self)) {
        flush_sq(s);
        return;
    }
    s->waits++;
    struct __kernel_timespec ts = {.tv_sec = 1, .tv_nsec = 0};
    struct io_uring_cqe *cqe;
    int ret = io_uring_submit_and_wait_timeout(&s->ring, &cqe, 1, &ts, NULL);
    kd_router_awake(r, s->self);
    if (ret == -ETIME)
        s->timeouts++; /* nobody rang for a second: a lost doorbell, reported in the table */
    reap(s);
}

static void handler_a(void *ctx, const struct kd_msg *m)
{
    struct side *s = ctx;
    if (m->type == MSG_PONG)
        s->pongs++;
}

static void handler_b(void *ctx, const struct kd_msg *m)
{
    struct side *s = ctx;
    struct scenario *sc = s->sc;
    switch (m->type) {
    case MSG_DATA:
        if (++s->received == sc->count) {
            sc->t_end = now_ns();
            s->stop = true;
        }
        break;
    case MSG_PING: {
        struct kd_msg pong = {.type = MSG_PONG, .u64 = m->u64};
        kd_router_send(sc->r, s->self, m->from, &pong);
        break;
    }
    case MSG_STOP:
        s->stop = true;
        break;
    }
}

static void run_one_way_sender(struct side *s)
{
    struct scenario *sc = s->sc;
    struct kd_router *r = sc->r;
    sc->t_start = now_ns();
    for (uint64_t i = 0; i < sc->count; i++) {
        struct kd_msg m = {.type = MSG_DATA, .u64 = i};
        kd_router_send(r, 0, 1, &m);
        flush_sq(s);
        /* Backpressure instead of an ever-growing overflow queue: flush it before sending more. */
        if ((i & 31) == 31)
            while (kd_router_has_backlog(r, 0)) {
                kd_router_drain(r, 0, 64);
                flush_sq(s);
                if (one_cpu)
                    sched_yield();
            }
    }
    while (kd_router_has_backlog(r, 0)) {
        kd_router_drain(r, 0, 64);
        flush_sq(s);
        if (one_cpu)
            sched_yield();
    }
    flush_sq(s);
    while (!atomic_load(&sc->finished))
        sched_yield();
}

static void run_ping_pong_sender(struct side *s)
{
    struct scenario *sc = s->sc;
    struct kd_router *r = sc->r;
    for (uint64_t i = 0; i < sc->warmup + sc->count; i++) {
        uint64_t t0 = now_ns();
        struct kd_msg ping = {.type = MSG_PING, .u64 = i};
        kd_router_send(r, 0, 1, &ping);
        while (s->pongs <= i) {
            kd_router_drain(r, 0, 64);
            if (s->pongs > i)
                break;
            idle(s);
        }
        if (i >= sc->warmup)
            sc->samples[i - sc->warmup] = now_ns() - t0;
    }
    struct kd_msg stop = {.type = MSG_STOP};
    kd_router_send(r, 0, 1, &stop);
    flush_sq(s);
}

static void run_receiver(struct side *s)
{
    struct scenario *sc = s->sc;
    while (!s->stop) {
        kd_router_drain(sc->r, 1, 256);
        if (s->stop)
            break;
        idle(s);
    }
    flush_sq(s);
    atomic_store(&sc->finished, true);
}

static void *side_thread(void *arg)
{
    struct side *s = arg;
    struct scenario *sc = s->sc;
    s->pinned = pin_self(s->cpu);
    /* SINGLE_ISSUER binds the ring to this thread; DEFER_TASKRUN runs completions only when we wait. */
    s->ring_err = io_uring_queue_init(64, &s->ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
    if (s->ring_err == -EINVAL) {
        s->ring_err = io_uring_queue_init(64, &s->ring, 0);
        s->plain_ring = true;
    }
    if (s->ring_err == 0)
        kd_router_attach(sc->r, s->self, &s->ring, TAG_DOORBELL, -1, s->self == 0 ? handler_a : handler_b, s);
    pthread_barrier_wait(&sc->ready);

    if (sc->side[0].ring_err == 0 && sc->side[1].ring_err == 0) {
        if (s->self == 1)
            run_receiver(s);
        else if (sc->kind == ONE_WAY)
            run_one_way_sender(s);
        else
            run_ping_pong_sender(s);
    }
    /* Keep both rings open until neither side can post a msg_ring to the other. */
    pthread_barrier_wait(&sc->done);
    if (s->ring_err == 0)
        io_uring_queue_exit(&s->ring);
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array. */
static uint64_t percentile(const uint64_t *v, uint64_t n, double p)
{
    uint64_t rank = (uint64_t)(p * (double)n + 0.999999);
    if (rank == 0)
        rank = 1;
    if (rank > n)
        rank = n;
    return v[rank - 1];
}

static struct result run(enum kind kind, bool sleeping, uint64_t count)
{
    struct result res = {0};
    struct scenario *sc = calloc(1, sizeof(*sc));
    if (sc == NULL)
        return res;
    sc->kind = kind;
    sc->sleeping = sleeping;
    sc->count = count;
    sc->warmup = kind == PING_PONG ? (count / 10 < 1000 ? count / 10 : 1000) : 0;
    sc->r = kd_router_create(2, capacity);
    if (kind == PING_PONG)
        sc->samples = malloc(count * sizeof(uint64_t));
    if (sc->r == NULL || (kind == PING_PONG && sc->samples == NULL)) {
        fprintf(stderr, "router_bench: out of memory\n");
        exit(1);
    }
    atomic_init(&sc->finished, false);
    pthread_barrier_init(&sc->ready, NULL, 2);
    pthread_barrier_init(&sc->done, NULL, 2);
    pthread_t th[2];
    for (unsigned i = 0; i < 2; i++) {
        sc->side[i].sc = sc;
        sc->side[i].self = i;
        sc->side[i].cpu = cpus[i];
        if (pthread_create(&th[i], NULL, side_thread, &sc->side[i]) != 0) {
            perror("pthread_create");
            exit(1);
        }
    }
    for (unsigned i = 0; i < 2; i++)
        pthread_join(th[i], NULL);

    for (unsigned i = 0; i < 2; i++) {
        if (sc->side[i].ring_err != 0) {
            fprintf(stderr, "router_bench: io_uring_queue_init: %s\n", strerror(-sc->side[i].ring_err));
            exit(1);
        }
        /* Only this (main) thread writes the global, after the join. */
        uring_flags_used = sc->side[i].plain_ring ? "none (SINGLE_ISSUER|DEFER_TASKRUN refused)"
                                                  : "SINGLE_ISSUER|DEFER_TASKRUN";
        if (!sc->side[i].pinned)
            fprintf(stderr, "router_bench: warning: could not pin thread %u to CPU %d\n", i, sc->side[i].cpu);
    }
    const struct kd_router_stats *a = kd_router_stats(sc->r, 0), *b = kd_router_stats(sc->r, 1);
    uint64_t rung = kd_stat_get(&a->doorbells_sent) + kd_stat_get(&b->doorbells_sent);
    res.timeouts = sc->side[0].timeouts + sc->side[1].timeouts;
    if (kind == ONE_WAY) {
        double secs = (double)(sc->t_end - sc->t_start) / 1e9;
        res.msgs_per_sec = (double)count / secs;
        res.doorbells_per_msg = (double)rung / (double)count;
        res.ok = sc->side[1].received == count;
    } else {
        qsort(sc->samples, count, sizeof(uint64_t), cmp_u64);
        res.p50 = percentile(sc->samples, count, 0.50);
        res.p99 = percentile(sc->samples, count, 0.99);
        res.p999 = percentile(sc->samples, count, 0.999);
        /* two messages per round trip, warm-up included in both counts */
        res.doorbells_per_msg = (double)rung / (double)(2 * (count + sc->warmup));
        res.ok = sc->side[0].pongs == count + sc->warmup;
    }

    kd_router_destroy(sc->r);
    pthread_barrier_destroy(&sc->ready);
    pthread_barrier_destroy(&sc->done);
    free(sc->samples);
    free(sc);
    return res;
}

static uint64_t parse_count(const char *flag, const char *v)
{
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (errno != 0 || *end != '\0' || n == 0 || n > (1ull << 40)) {
        fprintf(stderr, "router_bench: bad value for %s: %s\n", flag, v);
        exit(2);
    }
    return n;
}

static void usage(void)
{
    fprintf(stderr, "usage: router_bench [--messages N] [--roundtrips N] [--capacity N] [--json FILE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    uint64_t messages = 2000000, roundtrips = 50000;
    uint64_t cap_arg = capacity;
    const char *json_path = NULL;
    for (int i = 1; i < argc; i += 2) { /* every flag takes one value */
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--messages") == 0)
            messages = parse_count(argv[i], argv[i + 1]);
        else if (strcmp(argv[i], "--roundtrips") == 0)
            roundtrips = parse_count(argv[i], argv[i + 1]);
        else if (strcmp(argv[i], "--capacity") == 0)
            cap_arg = parse_count(argv[i], argv[i + 1]);
        else if (strcmp(argv[i], "--json") == 0)
            json_path = argv[i + 1];
        else
            usage();
    }
    if (cap_arg < 2 || (cap_arg & (cap_arg - 1)) != 0 || cap_arg > (1u << 24)) {
        fprintf(stderr, "router_bench: --capacity must be a power of two in [2, 2^24]\n");
        return 2;
    }
    capacity = (uint32_t)cap_arg;

    choose_cpus();
    struct utsname u;
    if (uname(&u) != 0)
        strcpy(u.release, "unknown");

    struct result tp_spin = run(ONE_WAY, false, messages);
    struct result tp_sleep = run(ONE_WAY, true, messages);
    struct result pp_spin = run(PING_PONG, false, roundtrips);
    struct result pp_sleep = run(PING_PONG, true, roundtrips);

    printf("router_bench: %s %s, %ld CPU(s) online; io_uring flags: %s; ring capacity %u\n", u.sysname,
           u.release, ncpu, uring_flags_used, capacity);
    if (one_cpu)
        printf("threads: only one CPU available: both pinned to CPU %d, spinning loops yield\n", cpus[0]);
    else
        printf("threads: A pinned to CPU %d, B pinned to CPU %d (pthread_setaffinity_np)\n", cpus[0],
               cpus[1]);
    printf("\n%-22s %-9s %12s %12s %14s\n", "one-way A->B", "target", "messages", "Mmsg/s", "doorbells/msg");
    printf("%-22s %-9s %12llu %12.2f %14.5f\n", "", "spinning", (unsigned long long)messages,
           tp_spin.msgs_per_sec / 1e6, tp_spin.doorbells_per_msg);
    printf("%-22s %-9s %12llu %12.2f %14.5f\n", "", "sleeping", (unsigned long long)messages,
           tp_sleep.msgs_per_sec / 1e6, tp_sleep.doorbells_per_msg);
    printf("\n%-22s %-9s %12s %9s %9s %9s %14s\n", "ping-pong A<->B", "both", "roundtrips", "p50 ns",
           "p99 ns", "p99.9 ns", "doorbells/msg");
    printf("%-22s %-9s %12llu %9llu %9llu %9llu %14.5f\n", "", "spinning", (unsigned long long)roundtrips,
           (unsigned long long)pp_spin.p50, (unsigned long long)pp_spin.p99, (unsigned long long)pp_spin.p999,
           pp_spin.doorbells_per_msg);
    printf("%-22s %-9s %12llu %9llu %9llu %9llu %14.5f\n", "", "sleeping", (unsigned long long)roundtrips,
           (unsigned long long)pp_sleep.p50, (unsigned long long)pp_sleep.p99,
           (unsigned long long)pp_sleep.p999, pp_sleep.doorbells_per_msg);

    uint64_t timeouts = tp_spin.timeouts + tp_sleep.timeouts + pp_spin.timeouts + pp_sleep.timeouts;
    bool ok = tp_spin.ok && tp_sleep.ok && pp_spin.ok && pp_sleep.ok;
    if (timeouts != 0)
        printf("\nWARNING: %llu waits timed out after 1 s (lost doorbell?)\n", (unsigned long long)timeouts);
    if (!ok)
        printf("\nERROR: a scenario did not deliver every message\n");

    if (json_path != NULL) {
        FILE *f = fopen(json_path, "w");
        if (f == NULL) {
            perror(json_path);
            return 1;
        }
        fprintf(f,
                "{\n  \"machine\": {\"nproc\": %ld, \"kernel\": \"%s\", \"cpu_a\": %d, \"cpu_b\": %d, "
                "\"one_cpu\": %s, \"uring_flags\": \"%s\"},\n",
                ncpu, u.release, cpus[0], cpus[1], one_cpu ? "true" : "false", uring_flags_used);
        fprintf(f, "  \"ring_capacity\": %u,\n", capacity);
        fprintf(f, "  \"one_way\": [\n");
        fprintf(f,
                "    {\"target\": \"spinning\", \"messages\": %llu, \"msgs_per_sec\": %.0f, "
                "\"doorbells_per_msg\": %.6f},\n",
                (unsigned long long)messages, tp_spin.msgs_per_sec, tp_spin.doorbells_per_msg);
        fprintf(f,
                "    {\"target\": \"sleeping\", \"messages\": %llu, \"msgs_per_sec\": %.0f, "
                "\"doorbells_per_msg\": %.6f}\n",
                (unsigned long long)messages, tp_sleep.msgs_per_sec, tp_sleep.doorbells_per_msg);
        fprintf(f, "  ],\n  \"ping_pong\": [\n");
        const struct result *pp[2] = {&pp_spin, &pp_sleep};
        for (int i = 0; i < 2; i++)
            fprintf(f,
                    "    {\"mode\": \"%s\", \"roundtrips\": %llu, \"p50_ns\": %llu, \"p99_ns\": %llu, "
                    "\"p999_ns\": %llu, \"doorbells_per_msg\": %.6f}%s\n",
                    i == 0 ? "spinning" : "sleeping", (unsigned long long)roundtrips,
                    (unsigned long long)pp[i]->p50, (unsigned long long)pp[i]->p99,
                    (unsigned long long)pp[i]->p999, pp[i]->doorbells_per_msg, i == 0 ? "," : "");
        fprintf(f, "  ],\n  \"timeouts\": %llu,\n  \"ok\": %s\n}\n", (unsigned long long)timeouts,
                ok ? "true" : "false");
        fclose(f);
    }
    return ok ? 0 : 1;
}

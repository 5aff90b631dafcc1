/* server.c — creating, starting and stopping the shard set. Runs on the controlling thread only. */
#include "shards/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <sched.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/log.h"
#include "router/router.h"
#include "shards/shard.h"

static int bound_port(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)ss)->sin_port);
    return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
}

static void set_port(struct sockaddr_storage *ss, int port)
{
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
}

static bool is_pow2(uint32_t v)
{
    return v >= 2 && (v & (v - 1)) == 0;
}

int kd_server_create(const struct kd_server_opts *opts, struct kd_server **out, char *err, size_t errlen)
{
    *out = NULL;
    if (opts->nlisteners > KD_MAX_LISTENERS || !is_pow2(opts->recv_buffers) || opts->recv_buffers > 32768 ||
        opts->recv_buffer_size == 0 || !is_pow2(opts->ring_size) || opts->connections_per_shard == 0) {
        snprintf(err, errlen, "invalid server options (listeners, buffer or ring sizes)");
        return -EINVAL;
    }
    struct kd_server *srv = calloc(1, sizeof(*srv));
    if (srv == NULL)
        return -ENOMEM;
    srv->opts = *opts;
    /* The CPUs this process may run on (taskset, cgroup cpusets), not every online CPU: shards
     * are pinned inside that set, and by default there is one shard per CPU in it. */
    cpu_set_t allowed;
    srv->ncpu = 0;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
        for (int c = 0; c < CPU_SETSIZE && srv->ncpu < KD_MAX_CPUS; c++)
            if (CPU_ISSET(c, &allowed))
                srv->cpus[srv->ncpu++] = c;
    }
    if (srv->ncpu == 0) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        for (long c = 0; c < ncpu && c < KD_MAX_CPUS; c++)
            srv->cpus[srv->ncpu++] = (int)c;
        if (srv->ncpu == 0)
            srv->cpus[srv->ncpu++] = 0;
    }
    srv->n = opts->shards ? opts->shards : srv->ncpu;
    sem_init(&srv->ready, 0, 0);
    sem_init(&srv->go, 0, 0);
    srv->shards = calloc(srv->n, sizeof(*srv->shards));
    /* Participant n is the control thread (observability); it attaches itself. */
    srv->router = kd_router_create(srv->n + 1, opts->ring_size);
    if (srv->shards == NULL || srv->router == NULL) {
        snprintf(err, errlen, "out of memory creating %u shards", srv->n);
        kd_server_destroy(srv);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < srv->n; i++) {
        struct kd_shard *s = &srv->shards[i];
        s->id = i;
        s->srv = srv;
        s->nlisteners = opts->nlisteners;
        for (unsigned j = 0; j < KD_MAX_LISTENERS; j++)
            s->listeners[j].fd = -1;
        s->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (s->eventfd < 0) {
            int e = errno;
            snprintf(err, errlen, "eventfd: %s", strerror(e));
            kd_server_destroy(srv);
            return -e;
        }
    }
    /* Bind every listener on every shard now, so a busy port fails the start with a clear message
     * before any thread runs. Port 0: the first bind picks the port, the others share it. */
    for (unsigned j = 0; j < opts->nlisteners; j++) {
        struct sockaddr_storage addr = opts->listeners[j].addr;
        for (unsigned i = 0; i < srv->n; i++) {
            int fd;
            int rc = kd_listener_bind(&addr, opts->listeners[j].addrlen, &fd, err, errlen);
            if (rc < 0) {
                size_t used = strlen(err);
                snprintf(err + used, errlen - used, " (%s listener)", opts->listeners[j].name);
                kd_server_destroy(srv);
                return rc;
            }
            if (i == 0) {
                socklen_t len = sizeof(addr);
                getsockname(fd, (struct sockaddr *)&addr, &len);
                srv->bound[j] = addr;
                set_port(&addr, bound_port(&addr));
            }
            kd_listener_init(&srv->shards[i], j, fd);
            srv->shards[i].listeners_open++;
        }
    }
    *out = srv;
    return 0;
}

int kd_server_start(struct kd_server *srv, char *err, size_t errlen)
{
    unsigned created = 0;
    int rc = 0;
    for (unsigned i = 0; i < srv->n; i++) {
        int e = pthread_create(&srv->shards[i].thread, NULL, kd_shard_main, &srv->shards[i]);
        if (e != 0) {
            snprintf(err, errlen, "starting shard %u: %s", i, strerror(e));
            rc = -e;
            break;
        }
        created++;
    }
    for (unsigned i = 0; i < created; i++)
        while (sem_wait(&srv->ready) < 0 && errno == EINTR)
            ;
    for (unsigned i = 0; i < created && rc == 0; i++) {
        struct kd_shard *s = &srv->shards[i];
        if (s->start_err < 0) {
            snprintf(err, errlen, "shard %u: %s", i,
                     s->start_msg[0] ? s->start_msg : strerror(-s->start_err));
            rc = s->start_err;
        }
    }
    if (rc < 0)
        atomic_store(&srv->abort_start, true);
    for (unsigned i = 0; i < created; i++)
        sem_post(&srv->go);
    if (rc < 0) {
        for (unsigned i = 0; i < created; i++)
            pthread_join(srv->shards[i].thread, NULL);
        srv->joined = true;
        return rc;
    }
    srv->started = true;
    return 0;
}

void kd_server_stop(struct kd_server *srv)
{
    atomic_store_explicit(&srv->stopping, true, memory_order_release);
    for (unsigned i = 0; i < srv->n; i++)
        kd_shard_wake(&srv->shards[i]);
}

int kd_server_wait(struct kd_server *srv)
{
    if (!srv->started || srv->joined)
        return 0;
    for (unsigned i = 0; i < srv->n; i++)
        pthread_join(srv->shards[i].thread, NULL);
    srv->joined = true;
    return 0;
}

void kd_server_destroy(struct kd_server *srv)
{
    if (srv == NULL)
        return;
    if (srv->started && !srv->joined) {
        kd_server_stop(srv);
        kd_server_wait(srv);
    }
    if (srv->shards != NULL) {
        for (unsigned i = 0; i < srv->n; i++) {
            struct kd_shard *s = &srv->shards[i];
            for (unsigned j = 0; j < KD_MAX_LISTENERS; j++)
                if (s->listeners[j].fd >= 0)
                    close(s->listeners[j].fd);
            if (s->eventfd > 0)
                close(s->eventfd);
        }
    }
    kd_router_destroy(srv->router);
    free(srv->shards);
    sem_destroy(&srv->ready);
    sem_destroy(&srv->go);
    free(srv);
}

unsigned kd_server_nshards(const struct kd_server *srv)
{
    return srv->n;
}

int kd_server_port(const struct kd_server *srv, unsigned listener)
{
    return bound_port(&srv->bound[listener]);
}

void kd_server_address(const struct kd_server *srv, unsigned listener, char *buf, size_t len)
{
    kd_listener_format(&srv->bound[listener], buf, len);
}

const struct kd_shard_stats *kd_server_shard_stats(const struct kd_server *srv, unsigned shard)
{
    return &srv->shards[shard].stats;
}

struct kd_router *kd_server_router(struct kd_server *srv)
{
    return srv->router;
}

void *kd_server_user(const struct kd_server *srv)
{
    return srv->opts.user;
}

void kd_server_wake(struct kd_server *srv, unsigned shard)
{
    if (shard < srv->n)
        kd_shard_wake(&srv->shards[shard]);
}

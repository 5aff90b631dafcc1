/* listener.c — listening sockets: one SO_REUSEPORT socket per shard per address, multishot accept.
 * The kernel spreads new connections over the shards' sockets; each shard accepts only on its own. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/log.h"
#include "shards/shard.h"

#define LISTEN_BACKLOG  4096
#define ACCEPT_RETRY_MS 20

static void format_addr(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        port = ntohs(in->sin_port);
        snprintf(buf, len, "%s:%d", host, port);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        port = ntohs(in6->sin6_port);
        snprintf(buf, len, "[%s]:%d", host, port);
    }
}

int kd_listener_bind(const struct sockaddr_storage *addr, socklen_t len, int *out, char *err, size_t errlen)
{
    char where[64];
    int one = 1;
    format_addr(addr, where, sizeof(where));
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "listen %s: socket: %s", where, strerror(e));
        return -e;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) {
        int e = errno;
        snprintf(err, errlen, "listen %s: SO_REUSEPORT: %s", where, strerror(e));
        close(fd);
        return -e;
    }
    if (addr->ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)addr, len) < 0 || listen(fd, LISTEN_BACKLOG) < 0) {
        int e = errno;
        snprintf(err, errlen, "listen %s: %s", where, strerror(e));
        close(fd);
        return -e;
    }
    *out = fd;
    return 0;
}

void kd_listener_format(const struct sockaddr_storage *ss, char *buf, size_t len)
{
    format_addr(ss, buf, len);
}

void kd_listener_arm(struct kd_shard *s, unsigned i)
{
    struct kd_shard_listener *l = &s->listeners[i];
    struct io_uring_sqe *sqe = kd_shard_sqe(s);
    io_uring_prep_multishot_accept(sqe, l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_ACCEPT, 0, i));
    l->armed = true;
    s->ops_inflight++;
}

static void close_listener(struct kd_shard *s, struct kd_shard_listener *l)
{
    if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
        s->listeners_open--;
    }
}

static void rearm_cb(struct kd_timer *t)
{
    struct kd_shard_listener *l = KD_CONTAINER_OF(t, struct kd_shard_listener, rearm);
    if (!l->closing && !l->armed && l->fd >= 0)
        kd_listener_arm(l->shard, l->index);
}

void kd_listener_complete(struct kd_shard *s, struct io_uring_cqe *cqe)
{
    unsigned i = kd_ud_slot(cqe->user_data);
    if (i >= s->nlisteners) {
        kd_stat_inc(&s->stats.stale_cqes);
        return;
    }
    struct kd_shard_listener *l = &s->listeners[i];
    bool more = (cqe->flags & IORING_CQE_F_MORE) != 0;
    if (!more) {
        l->armed = false;
        s->ops_inflight--;
    }
    if (cqe->res >= 0) {
        if (l->closing)
            close(cqe->res);
        else
            kd_conn_accepted(s, cqe->res, i);
    } else if (cqe->res != -ECANCELED) {
        /* EMFILE/ENFILE/ENOMEM: the connection stays in the backlog; retry shortly instead of
         * spinning on the same error. */
        kd_stat_inc(&s->stats.accept_errors);
        uint64_t n = kd_stat_get(&s->stats.accept_errors);
        if ((n & (n - 1)) == 0) {
            struct kd_logline ll;
            kd_log_begin(&ll, KD_LOG_WARN, "accept_failed");
            kd_log_uint(&ll, "listener", i);
            kd_log_errno(&ll, cqe->res);
            kd_log_uint(&ll, "failures_total", n);
            kd_log_end(&ll);
        }
    }
    if (!l->armed) {
        if (l->closing)
            close_listener(s, l);
        else if (cqe->res >= 0 || cqe->res == -ECANCELED)
            kd_listener_arm(s, i);
        else
            kd_timerwheel_add(&s->timers, &l->rearm, s->now_ms + ACCEPT_RETRY_MS);
    }
}

void kd_listener_close_all(struct kd_shard *s)
{
    for (unsigned i = 0; i < s->nlisteners; i++) {
        struct kd_shard_listener *l = &s->listeners[i];
        if (l->closing)
            continue;
        l->closing = true;
        kd_timerwheel_cancel(&s->timers, &l->rearm);
        if (l->armed) {
            struct io_uring_sqe *sqe = kd_shard_sqe(s);
            io_uring_prep_cancel64(sqe, kd_ud_make(KD_OP_ACCEPT, 0, i), 0);
            io_uring_sqe_set_data64(sqe, kd_ud_make(KD_OP_LCANCEL, 0, i));
            s->ops_inflight++;
        } else {
            close_listener(s, l);
        }
    }
}

void kd_listener_init(struct kd_shard *s, unsigned i, int fd)
{
    struct kd_shard_listener *l = &s->listeners[i];
    l->shard = s;
    l->index = i;
    l->fd = fd;
    l->armed = l->closing = false;
    kd_timer_init(&l->rearm, rearm_cb);
}

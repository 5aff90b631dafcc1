/* control_fuzz.c — the observability listener (/metrics, /liveness, /readiness) as a scraper or
 * anyone else who reaches it sends bytes to it. Each input goes two ways:
 *  1. the input is what one client sends on one connection: it is written to a loopback socket
 *     accepted by a real core/httpd server (h2o: HTTP/1.1, h2c by prior knowledge or Upgrade, as
 *     kasd runs it), whose requests are answered by control/control.c's kd_control_route exactly as
 *     the control thread does (a request it queues for a round gets 200 "ok"); the driver reads
 *     until the server closes;
 *  2. the input split into a method and a path goes to kd_control_route directly, so bytes h2o
 *     would refuse reach it too (the first byte: split point, and bit 7 the stop flag).
 * Checks: kd_control_route queues a request exactly for GET or HEAD of one of the three paths
 * (not answerable from the stop flag alone), and otherwise answers 404 for any other path, 405 for
 * any other method, 503 /readiness and 200 /liveness while draining, with a body of the length
 * given; the server closes the connection once the client is gone (no connection is kept). */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/httpd.h"
#include "control/control.h"
#include "test/fuzz/fuzz.h"

static bool is(const char *s, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

/* kd_control_route, and the contract of control.h checked against its result. */
static int route(const char *method, size_t mlen, const char *path, size_t plen, bool draining,
                 struct kd_control_answer *now)
{
    int ep = kd_control_route(method, mlen, path, plen, draining, now);
    bool known = is(path, plen, "/metrics") || is(path, plen, "/liveness") || is(path, plen, "/readiness");
    bool readable = is(method, mlen, "GET") || is(method, mlen, "HEAD");
    if (ep >= 0) {
        CHECK(known && readable);
        CHECK(ep == KD_CONTROL_METRICS || ep == KD_CONTROL_LIVENESS || ep == KD_CONTROL_READINESS);
        CHECK(ep == (is(path, plen, "/metrics")    ? KD_CONTROL_METRICS
                     : is(path, plen, "/liveness") ? KD_CONTROL_LIVENESS
                                                   : KD_CONTROL_READINESS));
        CHECK(!draining || ep == KD_CONTROL_METRICS);
        return ep;
    }
    CHECK(ep == -1 && now->body != NULL && now->content_type != NULL && strlen(now->body) == now->len);
    if (!known)
        CHECK(now->status == 404);
    else if (!readable)
        CHECK(now->status == 405);
    else if (is(path, plen, "/readiness"))
        CHECK(draining && now->status == 503);
    else
        CHECK(draining && is(path, plen, "/liveness") && now->status == 200);
    return ep;
}

static struct kd_httpd *srv;
static struct sockaddr_in srv_addr;
static unsigned nreq;

static void on_request(void *ud, struct kd_httpd_req *req, const char *method, size_t mlen, const char *path,
                       size_t plen)
{
    struct kd_control_answer now;
    /* The stop flag changes from one request to the next, so both answers are reached. */
    if (route(method, mlen, path, plen, (nreq++ & 1) != 0, &now) >= 0)
        kd_httpd_respond(req, 200, "text/plain; charset=utf-8", "ok\n", 3);
    else
        kd_httpd_respond(req, now.status, now.content_type, now.body, now.len);
}

static void on_wake(void *ud)
{
}

static void setup(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    srv_addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(srv_addr);
    CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&srv_addr, sizeof(srv_addr)) == 0 && listen(fd, 64) == 0 &&
          getsockname(fd, (struct sockaddr *)&srv_addr, &len) == 0);
    struct kd_httpd_opts o = {.listen_fd = fd, .wake_fd = -1, .on_wake = on_wake, .on_request = on_request};
    char err[128];
    CHECK(kd_httpd_create(&o, &srv, err, sizeof(err)) == 0);
}

/* One connection: the input written (in pieces while the server runs), the write side shut, the
 * answers read until the server closes, then the client closes. */
static void over_http(const uint8_t *data, size_t size)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    CHECK(fd >= 0);
    if (connect(fd, (struct sockaddr *)&srv_addr, sizeof(srv_addr)) < 0 && errno != EINPROGRESS)
        abort();
    size_t off = 0;
    bool shut = false, eof = false;
    char buf[65536];
    /* h2o answers what it has and closes once it sees the client's EOF; a few hundred turns of
     * its loop are far more than any input needs (a turn waits at most 1 ms). */
    for (int turn = 0; turn < 500 && !eof; turn++) {
        if (off < size) {
            ssize_t n = write(fd, data + off, size - off);
            if (n > 0)
                off += (size_t)n;
            else if (n < 0 && errno != EAGAIN && errno != ENOTCONN)
                off = size; /* the server closed: nothing more goes in */
        }
        if (off == size && !shut) {
            shutdown(fd, SHUT_WR);
            shut = true;
        }
        kd_httpd_run(srv, 1);
        for (;;) {
            ssize_t n = read(fd, buf, sizeof(buf));
            if (n > 0)
                continue;
            if (n == 0 || (errno != EAGAIN && errno != EINTR))
                eof = true;
            break;
        }
    }
    close(fd);
    for (int turn = 0; turn < 500 && kd_httpd_connections(srv) != 0; turn++)
        kd_httpd_run(srv, 1);
    CHECK(kd_httpd_connections(srv) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (srv == NULL)
        setup();
    over_http(data, size);

    if (size > 0) {
        size_t split = 1 + data[0] % 8;
        if (split > size)
            split = size;
        struct kd_control_answer now;
        route((const char *)data + 1, split - 1, (const char *)data + split, size - split,
              (data[0] & 0x80) != 0, &now);
    }
    return 0;
}

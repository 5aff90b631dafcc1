/* httpd.c — kd_httpd on libh2o-evloop 2.2 (contract in httpd.h). The only file that includes h2o.
 *
 * Request handles: h2o owns each h2o_req_t and frees it (with its memory pool) when the stream or
 * the connection ends, which may happen before the caller answers. So a handle is malloc'd here
 * and linked both ways with a small "link" block allocated from the request's pool with a dispose
 * callback:
 *
 *   kd_httpd_req { h2o_req_t *req } <──────> link { kd_httpd_req *r }   (in req->pool)
 *
 *   request freed first:  link dispose sets r->req = NULL; respond() later only frees r
 *   respond() first:      sends, sets link->r = NULL, frees r; the later dispose does nothing
 */
#include "core/httpd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define H2O_USE_LIBUV 0
#include <h2o.h>

struct kd_httpd {
    h2o_globalconf_t config;
    h2o_context_t ctx;
    h2o_accept_ctx_t accept_ctx;
    h2o_evloop_t *loop;
    h2o_socket_t *listener;
    h2o_socket_t *waker;
    struct kd_httpd_opts o;
};

struct handler {
    h2o_handler_t super;
    struct kd_httpd *h;
};

struct req_link {
    struct kd_httpd_req *r;
};

struct kd_httpd_req {
    h2o_req_t *req; /* NULL once h2o freed the request */
    struct req_link *link;
};

static void link_dispose(void *p)
{
    struct req_link *l = p;
    if (l->r != NULL) {
        l->r->req = NULL;
        l->r->link = NULL;
    }
}

static int on_req(h2o_handler_t *self, h2o_req_t *req)
{
    struct kd_httpd *h = ((struct handler *)self)->h;
    struct kd_httpd_req *r = malloc(sizeof(*r));
    if (r == NULL) {
        h2o_send_error_503(req, "Service Unavailable", "out of memory", 0);
        return 0;
    }
    struct req_link *l = h2o_mem_alloc_shared(&req->pool, sizeof(*l), link_dispose);
    l->r = r;
    r->req = req;
    r->link = l;
    h->o.on_request(h->o.ud, r, req->method.base, req->method.len, req->path_normalized.base,
                    req->path_normalized.len);
    return 0;
}

void kd_httpd_respond(struct kd_httpd_req *r, int status, const char *content_type, const char *body,
                      size_t len)
{
    h2o_req_t *req = r->req;
    if (req != NULL) {
        r->link->r = NULL;
        req->res.status = status;
        req->res.reason = status == 200   ? "OK"
                          : status == 404 ? "Not Found"
                          : status == 405 ? "Method Not Allowed"
                                          : "Service Unavailable";
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type,
                       strlen(content_type));
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL, NULL, H2O_STRLIT("no-store"));
        req->res.content_length = len;
        h2o_send_inline(req, body, len);
    }
    free(r);
}

static void on_accept(h2o_socket_t *listener, const char *err)
{
    struct kd_httpd *h = listener->data;
    if (err != NULL)
        return;
    /* Accept what is queued; h2o_evloop_socket_accept returns NULL on EAGAIN (and on EMFILE, when
     * the connection stays queued in the kernel until an fd frees up). */
    for (int i = 0; i < 64; i++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept(listener);
        if (sock == NULL)
            break;
        h2o_accept(&h->accept_ctx, sock);
    }
}

static void on_wake(h2o_socket_t *sock, const char *err)
{
    struct kd_httpd *h = sock->data;
    /* h2o already read the eventfd (which resets its counter); the bytes mean nothing. */
    h2o_buffer_consume(&sock->input, sock->input->size);
    if (err != NULL) {
        /* Cannot happen with an eventfd; stop watching rather than spin. */
        h2o_socket_read_stop(sock);
        return;
    }
    h->o.on_wake(h->o.ud);
}

int kd_httpd_create(const struct kd_httpd_opts *o, struct kd_httpd **out, char *err, size_t errlen)
{
    *out = NULL;
    struct kd_httpd *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    h->o = *o;
    if (fcntl(o->listen_fd, F_SETFL, O_NONBLOCK) < 0 ||
        (o->wake_fd >= 0 && fcntl(o->wake_fd, F_SETFL, O_NONBLOCK) < 0)) {
        int e = errno;
        snprintf(err, errlen, "fcntl: %s", strerror(e));
        free(h);
        return -e;
    }
    h2o_config_init(&h->config);
    /* HTTP/1.1 idle keep-alive and request timeout: short, so a stop does not wait on idle scrapers. */
    h->config.http1.req_timeout = 10000;
    h->config.http1.upgrade_to_http2 = 1; /* Upgrade: h2c (prior knowledge works without it) */
    h2o_hostconf_t *host = h2o_config_register_host(&h->config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
    struct handler *hd = (struct handler *)h2o_create_handler(path, sizeof(*hd));
    hd->super.on_req = on_req;
    hd->h = h;
    h->loop = h2o_evloop_create();
    h2o_context_init(&h->ctx, h->loop, &h->config);
    h->accept_ctx.ctx = &h->ctx;
    h->accept_ctx.hosts = h->config.hosts;
    h->listener = h2o_evloop_socket_create(h->loop, o->listen_fd, H2O_SOCKET_FLAG_DONT_READ);
    h->listener->data = h;
    h2o_socket_read_start(h->listener, on_accept);
    if (o->wake_fd >= 0) {
        h->waker = h2o_evloop_socket_create(h->loop, o->wake_fd, 0);
        h->waker->data = h;
        h2o_socket_read_start(h->waker, on_wake);
    }
    *out = h;
    return 0;
}

void kd_httpd_run(struct kd_httpd *h, int timeout_ms)
{
    h2o_evloop_run(h->loop, timeout_ms < 0 ? INT32_MAX : timeout_ms);
}

void kd_httpd_close_listener(struct kd_httpd *h)
{
    if (h->listener != NULL) {
        h2o_socket_read_stop(h->listener);
        h2o_socket_close(h->listener);
        h->listener = NULL;
    }
}

size_t kd_httpd_connections(struct kd_httpd *h)
{
    size_t n = 0;
    for (h2o_linklist_t *l = h->ctx.http1._conns.next; l != &h->ctx.http1._conns; l = l->next)
        n++;
    for (h2o_linklist_t *l = h->ctx.http2._conns.next; l != &h->ctx.http2._conns; l = l->next)
        n++;
    return n;
}

/* h2o keeps freed socket buffers on a per-thread recycle list (thread-local in h2o 2.2) that nothing
 * empties: once the thread exits they are unreachable. Free them while the thread still can. */
static void recycle_drain(h2o_mem_recycle_t *r)
{
    /* A recycled block's first word links to the next (h2o's memory.c keeps the chunk type private). */
    while (r->_link != NULL) {
        void *c = r->_link;
        r->_link = *(struct st_h2o_mem_recycle_chunk_t **)c;
        free(c);
    }
    r->cnt = 0;
}

bool kd_httpd_destroy(struct kd_httpd *h)
{
    if (h == NULL)
        return true;
    kd_httpd_close_listener(h);
    if (h->waker != NULL) {
        h2o_socket_read_stop(h->waker);
        h2o_socket_close(h->waker);
        h->waker = NULL;
    }
    if (kd_httpd_connections(h) != 0)
        return false; /* see httpd.h: leaving it allocated beats freeing it under live connections */
    /* Let the closes above finish (h2o frees closed sockets in its loop). */
    h2o_evloop_run(h->loop, 0);
    h2o_multithread_queue_t *queue = h->ctx.queue;
    h2o_context_dispose(&h->ctx);
#if H2O_LIBRARY_VERSION_MAJOR == 0 && H2O_LIBRARY_VERSION_MINOR == 13
    /* libh2o 0.13 (h2o 2.2): h2o_multithread_destroy_queue() closes the queue but never frees it
     * on the evloop build (h2o 2.3 added the free). */
    free(queue);
#else
    (void)queue;
#endif
    h2o_config_dispose(&h->config);
    h2o_evloop_destroy(h->loop);
    free(h);
    recycle_drain(&h2o_socket_buffer_prototype.allocator);
    return true;
}

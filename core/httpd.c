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

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define H2O_USE_LIBUV 0
#include <h2o.h>
#include <h2o/http1.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* One listening socket with its own h2o configuration (limits) and request callback. h2o
 * dispatches by Host, not by socket, so each site gets its own globalconf and context; they share
 * the one loop. */
struct site {
    h2o_globalconf_t config;
    h2o_context_t ctx;
    h2o_accept_ctx_t accept_ctx;
    h2o_socket_t *listener;
    struct kd_httpd *h;
    struct kd_httpd_site_opts o;
    SSL_CTX *ssl; /* h2o's TLS is OpenSSL's, whatever kasd's own TLS backend is */
};

struct kd_httpd_upgraded {
    struct kd_httpd *h;
    SSL_CTX *tls;            /* kd_httpd_connect over TLS: the client context (borrowed) */
    const char *server_name; /* and the name its certificate must carry (borrowed) */
    h2o_socket_t *sock;      /* NULL until the 101 went out, and after close */
    kd_httpd_up_fn fn;
    void *ud;
    bool open, reading, want_read, writing, in_cb, close_pending, dead;
    struct kd_httpd_upgraded *prev, *next;
};

struct kd_httpd {
    h2o_evloop_t *loop;
    struct kd_httpd_upgraded *upgraded; /* connections taken over after a 101 */
    h2o_socket_t *waker;
    struct kd_httpd_opts o;
    struct site *sites[KD_HTTPD_MAX_SITES];
    size_t nsites;
};

struct handler {
    h2o_handler_t super;
    struct site *site;
};

struct req_link {
    struct kd_httpd_req *r;
};

struct kd_httpd_req {
    struct kd_httpd *h;
    h2o_req_t *req; /* NULL once h2o freed the request */
    struct req_link *link;
    /* streaming (kd_httpd_start) */
    h2o_generator_t gen;
    kd_httpd_event_fn on_event;
    void *ud;
    bool started, finished, can_send, in_send, proceed_pending, abort_pending, released, gone_pending;
};

static void link_dispose(void *p)
{
    struct req_link *l = p;
    struct kd_httpd_req *r = l->r;
    if (r != NULL && r->released) {
        free(r); /* h2o no longer names its generator */
    } else if (r != NULL) {
        r->req = NULL;
        r->link = NULL;
        r->can_send = false;
        if (r->in_send)
            r->gone_pending = true; /* told when kd_httpd_send returns */
        else if (r->on_event != NULL && !r->finished)
            r->on_event(r->ud, KD_HTTPD_GONE);
    }
}

static int on_req(h2o_handler_t *self, h2o_req_t *req)
{
    struct site *site = ((struct handler *)self)->site;
    struct kd_httpd_req *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        h2o_send_error_503(req, "Service Unavailable", "out of memory", 0);
        return 0;
    }
    struct req_link *l = h2o_mem_alloc_shared(&req->pool, sizeof(*l), link_dispose);
    l->r = r;
    r->h = site->h;
    r->req = req;
    r->link = l;
    site->o.on_request(site->o.ud, r, req->method.base, req->method.len, req->path_normalized.base,
                       req->path_normalized.len);
    return 0;
}

/* ---- request accessors ---- */

bool kd_httpd_req_alive(const struct kd_httpd_req *r)
{
    return r->req != NULL;
}

bool kd_httpd_req_header(const struct kd_httpd_req *r, size_t i, struct kd_httpd_header *out)
{
    if (r->req == NULL || i >= r->req->headers.size)
        return false;
    const h2o_header_t *hd = &r->req->headers.entries[i];
    *out = (struct kd_httpd_header){hd->name->base, hd->name->len, hd->value.base, hd->value.len};
    return true;
}

void kd_httpd_req_target(const struct kd_httpd_req *r, const char **path, size_t *plen, const char **query,
                         size_t *qlen)
{
    *path = *query = "";
    *plen = *qlen = 0;
    if (r->req == NULL)
        return;
    const h2o_iovec_t *p = &r->req->input.path;
    size_t q = r->req->input.query_at;
    *path = p->base;
    *plen = q == SIZE_MAX ? p->len : q;
    if (q != SIZE_MAX && q < p->len) {
        *query = p->base + q + 1;
        *qlen = p->len - q - 1;
    }
}

void kd_httpd_req_body(const struct kd_httpd_req *r, const uint8_t **body, size_t *len)
{
    *body = NULL;
    *len = 0;
    if (r->req != NULL && r->req->entity.base != NULL) {
        *body = (const uint8_t *)r->req->entity.base;
        *len = r->req->entity.len;
    }
}

/* ---- streamed answers ---- */

static void add_headers(h2o_req_t *req, const struct kd_httpd_header *hs, size_t n);

static void gen_proceed(h2o_generator_t *g, h2o_req_t *req)
{
    struct kd_httpd_req *r = (struct kd_httpd_req *)((char *)g - offsetof(struct kd_httpd_req, gen));
    if (r->abort_pending) {
        r->abort_pending = false;
        h2o_send(req, NULL, 0, H2O_SEND_STATE_ERROR);
        return;
    }
    if (r->finished)
        return;
    if (r->in_send) { /* called from inside h2o_send: delivered when it returns */
        r->proceed_pending = true;
        return;
    }
    r->can_send = true;
    if (r->on_event != NULL)
        r->on_event(r->ud, KD_HTTPD_PROCEED);
}

static void gen_stop(h2o_generator_t *g, h2o_req_t *req)
{
    (void)g;
    (void)req; /* the request's pool dispose follows: GONE is told there */
}

void kd_httpd_watch(struct kd_httpd_req *r, kd_httpd_event_fn fn, void *ud)
{
    r->on_event = fn;
    r->ud = ud;
}

static const char *reason_of(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 206:
        return "Partial Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 406:
        return "Not Acceptable";
    case 409:
        return "Conflict";
    case 410:
        return "Gone";
    case 413:
        return "Payload Too Large";
    case 415:
        return "Unsupported Media Type";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return "";
    }
}

void kd_httpd_start(struct kd_httpd_req *r, int status, const struct kd_httpd_header *hs, size_t n,
                    int64_t content_length)
{
    h2o_req_t *req = r->req;
    if (req == NULL || r->started)
        return;
    r->started = true;
    req->res.status = status;
    req->res.reason = reason_of(status);
    add_headers(req, hs, n);
    if (content_length >= 0)
        req->res.content_length = (size_t)content_length;
    r->gen.proceed = gen_proceed;
    r->gen.stop = gen_stop;
    h2o_start_response(req, &r->gen);
    r->can_send = true;
}

bool kd_httpd_can_send(const struct kd_httpd_req *r)
{
    return r->req != NULL && r->started && r->can_send && !r->finished;
}

void kd_httpd_send(struct kd_httpd_req *r, const void *data, size_t len, bool final)
{
    if (!kd_httpd_can_send(r))
        return;
    h2o_iovec_t buf = h2o_iovec_init(data, len);
    r->can_send = false;
    r->in_send = true;
    if (final)
        r->finished = true;
    h2o_send(r->req, &buf, len > 0 ? 1 : 0, final ? H2O_SEND_STATE_FINAL : H2O_SEND_STATE_IN_PROGRESS);
    r->in_send = false;
    if (r->gone_pending) {
        r->gone_pending = false; /* the caller sees !kd_httpd_req_alive(): no event from in here */
        return;
    }
    if (r->proceed_pending && !r->finished) {
        r->proceed_pending = false;
        r->can_send = true; /* the caller sees kd_httpd_can_send(): no event from in here */
    }
}

void kd_httpd_abort(struct kd_httpd_req *r)
{
    if (r->req == NULL || r->finished)
        return;
    r->finished = true;
    if (!r->started) {
        h2o_send_error_502(r->req, "Bad Gateway", "", H2O_SEND_ERROR_KEEP_HEADERS);
        return;
    }
    if (!r->can_send) {
        r->abort_pending = true; /* a send is in flight: the error follows at its proceed */
        return;
    }
    r->can_send = false;
    h2o_send(r->req, NULL, 0, H2O_SEND_STATE_ERROR);
}

/* ---- upgrades ---- */

const char *kd_httpd_req_upgrade_value(const struct kd_httpd_req *r, size_t *len)
{
    if (r->req == NULL || r->req->upgrade.base == NULL || r->req->version >= 0x200)
        return NULL;
    *len = r->req->upgrade.len;
    return r->req->upgrade.base;
}

static void up_unlink_free(struct kd_httpd_upgraded *u)
{
    if (u->prev)
        u->prev->next = u->next;
    else
        u->h->upgraded = u->next;
    if (u->next)
        u->next->prev = u->prev;
    free(u);
}

static void up_do_close(struct kd_httpd_upgraded *u)
{
    if (u->sock != NULL) {
        u->sock->data = NULL;
        h2o_socket_close(u->sock);
        u->sock = NULL;
    }
    up_unlink_free(u);
}

/* Deliver an event; a close asked for inside it happens after it. DATA points into the socket's
 * input buffer, consumed after the callback (consuming it all frees the buffer). Returns false if
 * u is gone. */
static bool up_event(struct kd_httpd_upgraded *u, int ev, const uint8_t *data, size_t len)
{
    u->in_cb = true;
    u->fn(u->ud, ev, data, len);
    u->in_cb = false;
    if (ev == KD_HTTPD_UP_DATA && u->sock != NULL)
        h2o_buffer_consume(&u->sock->input, len);
    if (u->close_pending) {
        up_do_close(u);
        return false;
    }
    return true;
}

static void up_on_read(h2o_socket_t *sock, const char *err)
{
    struct kd_httpd_upgraded *u = sock->data;
    if (u == NULL)
        return;
    if (sock->input->size > 0 &&
        !up_event(u, KD_HTTPD_UP_DATA, (const uint8_t *)sock->input->bytes, sock->input->size))
        return;
    if (err != NULL && !u->dead) {
        u->dead = true;
        h2o_socket_read_stop(sock);
        u->reading = false;
        if (err == h2o_socket_error_closed)
            up_event(u, KD_HTTPD_UP_EOF, NULL, 0);
        else
            up_event(u, KD_HTTPD_UP_ERROR, (const uint8_t *)err, strlen(err));
    }
}

static void up_set_read(struct kd_httpd_upgraded *u)
{
    bool on = u->want_read && u->open && !u->dead && u->sock != NULL;
    if (on && !u->reading)
        h2o_socket_read_start(u->sock, up_on_read);
    else if (!on && u->reading)
        h2o_socket_read_stop(u->sock);
    u->reading = on;
}

static void up_on_written(h2o_socket_t *sock, const char *err)
{
    struct kd_httpd_upgraded *u = sock->data;
    if (u == NULL)
        return;
    u->writing = false;
    if (err != NULL) {
        if (!u->dead) {
            u->dead = true;
            up_set_read(u);
            up_event(u, KD_HTTPD_UP_ERROR, NULL, 0);
        }
        return;
    }
    up_event(u, KD_HTTPD_UP_WRITTEN, NULL, 0);
}

static void up_on_switched(void *ud, h2o_socket_t *sock, size_t reqsize)
{
    struct kd_httpd_upgraded *u = ud;
    if (sock == NULL) { /* the 101 could not be written */
        u->dead = true;
        up_event(u, KD_HTTPD_UP_ERROR, NULL, 0);
        return;
    }
    u->sock = sock;
    sock->data = u;
    h2o_buffer_consume(&sock->input, reqsize); /* the request head; what follows is the client's */
    u->open = true;
    u->want_read = true;
    if (!up_event(u, KD_HTTPD_UP_OPEN, NULL, 0))
        return;
    if (sock->input->size > 0 &&
        !up_event(u, KD_HTTPD_UP_DATA, (const uint8_t *)sock->input->bytes, sock->input->size))
        return;
    up_set_read(u);
}

static void up_opened(h2o_socket_t *sock, const char *err)
{
    struct kd_httpd_upgraded *u = sock->data;
    if (u == NULL)
        return;
    if (err != NULL) {
        u->dead = true;
        up_event(u, KD_HTTPD_UP_ERROR, (const uint8_t *)err, strlen(err));
        return;
    }
    u->open = true;
    u->want_read = true;
    if (!up_event(u, KD_HTTPD_UP_OPEN, NULL, 0))
        return;
    up_set_read(u);
}

static void up_on_connect(h2o_socket_t *sock, const char *err)
{
    struct kd_httpd_upgraded *u = sock->data;
    if (u == NULL)
        return;
    if (err == NULL && u->tls != NULL) {
        /* h2o checks the certificate against the CAs of the context and the name */
        h2o_socket_ssl_handshake(sock, u->tls, u->server_name, up_opened);
        return;
    }
    if (err != NULL) {
        u->dead = true;
        up_event(u, KD_HTTPD_UP_ERROR, (const uint8_t *)err, strlen(err));
        return;
    }
    u->open = true;
    u->want_read = true;
    if (!up_event(u, KD_HTTPD_UP_OPEN, NULL, 0))
        return;
    up_set_read(u);
}

struct kd_httpd_tls {
    SSL_CTX *ctx;
};

struct kd_httpd_tls *kd_httpd_client_tls_new(const char *ca_file, const char *server_name, char *err,
                                             size_t errlen)
{
    struct kd_httpd_tls *t = calloc(1, sizeof(*t));
    const char *what = "out of memory";
    if (t == NULL || (t->ctx = SSL_CTX_new(TLS_client_method())) == NULL)
        goto fail;
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    /* The name (or address) the certificate must carry, checked by OpenSSL during the handshake:
     * h2o 2.2 sends it as SNI but does not check the certificate against it. */
    what = server_name;
    X509_VERIFY_PARAM *vp = SSL_CTX_get0_param(t->ctx);
    unsigned char ipbuf[16];
    bool is_ip = inet_pton(AF_INET, server_name, ipbuf) == 1 || inet_pton(AF_INET6, server_name, ipbuf) == 1;
    if ((is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, server_name)
               : X509_VERIFY_PARAM_set1_host(vp, server_name, 0)) != 1)
        goto fail;
    what = ca_file != NULL ? ca_file : "the system's CA store";
    if ((ca_file != NULL ? SSL_CTX_load_verify_locations(t->ctx, ca_file, NULL)
                         : SSL_CTX_set_default_verify_paths(t->ctx)) != 1)
        goto fail;
    return t;
fail : {
    char why[256] = "";
    unsigned long e = ERR_get_error();
    if (e != 0)
        ERR_error_string_n(e, why, sizeof(why));
    ERR_clear_error();
    snprintf(err, errlen, "TLS: %s%s%s", what, why[0] ? ": " : "", why);
    if (t != NULL)
        SSL_CTX_free(t->ctx);
    free(t);
    return NULL;
}
}

void kd_httpd_client_tls_free(struct kd_httpd_tls *t)
{
    if (t != NULL) {
        SSL_CTX_free(t->ctx);
        free(t);
    }
}

struct kd_httpd_upgraded *kd_httpd_connect(struct kd_httpd *h, const struct sockaddr *sa, unsigned salen,
                                           const struct kd_httpd_tls *tls, const char *server_name,
                                           kd_httpd_up_fn fn, void *ud)
{
    struct kd_httpd_upgraded *u = calloc(1, sizeof(*u));
    if (u == NULL)
        return NULL;
    u->tls = tls != NULL ? tls->ctx : NULL;
    u->server_name = server_name;
    u->h = h;
    u->fn = fn;
    u->ud = ud;
    u->sock = h2o_socket_connect(h->loop, (struct sockaddr *)sa, salen, up_on_connect);
    if (u->sock == NULL) {
        free(u);
        return NULL;
    }
    u->sock->data = u;
    u->next = h->upgraded;
    if (u->next)
        u->next->prev = u;
    h->upgraded = u;
    return u;
}

struct kd_httpd_upgraded *kd_httpd_upgrade(struct kd_httpd_req *r, const struct kd_httpd_header *hs, size_t n,
                                           kd_httpd_up_fn fn, void *ud)
{
    h2o_req_t *req = r->req;
    struct kd_httpd_upgraded *u = NULL;
    if (req != NULL && !r->started && req->version < 0x200 && (u = calloc(1, sizeof(*u))) != NULL) {
        u->h = r->h;
        u->fn = fn;
        u->ud = ud;
        u->next = u->h->upgraded;
        if (u->next)
            u->next->prev = u;
        u->h->upgraded = u;
        req->res.status = 101;
        req->res.reason = "Switching Protocols";
        add_headers(req, hs, n);
        r->finished = true; /* h2o frees the request once the 101 is out: that is no GONE */
        h2o_http1_upgrade(req, NULL, 0, up_on_switched, u);
    }
    if (r->link != NULL)
        r->link->r = NULL;
    free(r);
    return u;
}

void kd_httpd_up_read(struct kd_httpd_upgraded *u, bool on)
{
    u->want_read = on;
    up_set_read(u); /* h2o allows read_start/stop from inside its callbacks */
}

void kd_httpd_up_write(struct kd_httpd_upgraded *u, const void *data, size_t len)
{
    if (u->sock == NULL || !u->open || u->writing || u->dead)
        return;
    h2o_iovec_t buf = h2o_iovec_init(data, len);
    u->writing = true;
    h2o_socket_write(u->sock, &buf, 1, up_on_written);
}

void kd_httpd_up_close(struct kd_httpd_upgraded *u)
{
    if (u->in_cb) {
        u->close_pending = true;
        return;
    }
    up_do_close(u);
}

void kd_httpd_release(struct kd_httpd_req *r)
{
    r->on_event = NULL;
    if (r->req == NULL || !r->started) {
        if (r->link != NULL)
            r->link->r = NULL;
        free(r);
        return;
    }
    r->released = true; /* h2o may still call the generator: freed when it frees the request */
}

static void add_headers(h2o_req_t *req, const struct kd_httpd_header *hs, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        /* h2o wants lower-case names (HTTP/2 requires them; HTTP/1 writes them as given) */
        char *name = h2o_mem_alloc_pool(&req->pool, hs[i].name_len + 1);
        for (size_t j = 0; j < hs[i].name_len; j++) {
            char c = hs[i].name[j];
            name[j] = c >= 'A' && c <= 'Z' ? (char)(c + 32) : c;
        }
        name[hs[i].name_len] = '\0';
        char *value = h2o_mem_alloc_pool(&req->pool, hs[i].value_len + 1);
        memcpy(value, hs[i].value, hs[i].value_len);
        value[hs[i].value_len] = '\0';
        h2o_add_header_by_str(&req->pool, &req->res.headers, name, hs[i].name_len, 1, NULL, value,
                              hs[i].value_len);
    }
}

void kd_httpd_respond_headers(struct kd_httpd_req *r, int status, const char *content_type,
                              const struct kd_httpd_header *hs, size_t n, const char *body, size_t len)
{
    h2o_req_t *req = r->req;
    if (req != NULL && !r->started) {
        r->link->r = NULL;
        req->res.status = status;
        req->res.reason = reason_of(status);
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type,
                       strlen(content_type));
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CACHE_CONTROL, NULL, H2O_STRLIT("no-store"));
        add_headers(req, hs, n);
        req->res.content_length = len;
        h2o_send_inline(req, body, len);
    } else if (req != NULL) {
        r->link->r = NULL;
    }
    free(r);
}

void kd_httpd_respond(struct kd_httpd_req *r, int status, const char *content_type, const char *body,
                      size_t len)
{
    kd_httpd_respond_headers(r, status, content_type, NULL, 0, body, len);
}

static void on_accept(h2o_socket_t *listener, const char *err)
{
    struct site *site = listener->data;
    if (err != NULL)
        return;
    /* Accept what is queued; h2o_evloop_socket_accept returns NULL on EAGAIN (and on EMFILE, when
     * the connection stays queued in the kernel until an fd frees up). */
    for (int i = 0; i < 64; i++) {
        h2o_socket_t *sock = h2o_evloop_socket_accept(listener);
        if (sock == NULL)
            break;
        h2o_accept(&site->accept_ctx, sock);
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

/* TLS for a site: h2o terminates TLS with an OpenSSL context it is handed (ALPN h2, else HTTP/1.1). */
static SSL_CTX *site_tls(const struct kd_httpd_site_opts *o, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    const char *what = "out of memory";
    if (ctx == NULL)
        goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    what = o->cert_file;
    if (SSL_CTX_use_certificate_chain_file(ctx, o->cert_file) != 1)
        goto fail;
    what = o->key_file;
    if (SSL_CTX_use_PrivateKey_file(ctx, o->key_file, SSL_FILETYPE_PEM) != 1)
        goto fail;
    what = "the key does not match the certificate";
    if (SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    h2o_ssl_register_alpn_protocols(ctx, h2o_http2_alpn_protocols);
    return ctx;
fail : {
    char why[256] = "";
    unsigned long e = ERR_get_error();
    if (e != 0)
        ERR_error_string_n(e, why, sizeof(why));
    ERR_clear_error();
    snprintf(err, errlen, "TLS: %s%s%s", what, why[0] ? ": " : "", why);
    SSL_CTX_free(ctx);
    return NULL;
}
}

int kd_httpd_tls_check(const char *cert_file, const char *key_file, char *err, size_t errlen)
{
    struct kd_httpd_site_opts o = {.cert_file = cert_file, .key_file = key_file};
    SSL_CTX *ctx = site_tls(&o, err, errlen);
    if (ctx == NULL)
        return -EINVAL;
    SSL_CTX_free(ctx);
    return 0;
}

int kd_httpd_add_site(struct kd_httpd *h, const struct kd_httpd_site_opts *o, char *err, size_t errlen)
{
    if (h->nsites == KD_HTTPD_MAX_SITES) {
        snprintf(err, errlen, "too many HTTP listeners");
        return -ENOSPC;
    }
    if (fcntl(o->listen_fd, F_SETFL, O_NONBLOCK) < 0) {
        int e = errno;
        snprintf(err, errlen, "fcntl: %s", strerror(e));
        return -e;
    }
    SSL_CTX *ssl = NULL;
    if (o->cert_file != NULL && (ssl = site_tls(o, err, errlen)) == NULL)
        return -EINVAL;
    struct site *site = calloc(1, sizeof(*site));
    if (site == NULL) {
        SSL_CTX_free(ssl);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    site->ssl = ssl;
    site->h = h;
    site->o = *o;
    h2o_config_init(&site->config);
    /* HTTP/1.1 idle keep-alive and request timeout: short by default, so a stop does not wait on
     * idle scrapers. */
    site->config.http1.req_timeout = o->req_timeout_ms ? o->req_timeout_ms : 10000;
    site->config.http1.upgrade_to_http2 = 1; /* Upgrade: h2c (prior knowledge works without it) */
    site->config.server_name = h2o_iovec_init(H2O_STRLIT("kasd"));
    if (o->max_body > 0)
        site->config.max_request_entity_size = o->max_body;
    if (o->idle_timeout_ms > 0)
        site->config.http2.idle_timeout = o->idle_timeout_ms;
    h2o_hostconf_t *host =
        h2o_config_register_host(&site->config, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
    struct handler *hd = (struct handler *)h2o_create_handler(path, sizeof(*hd));
    hd->super.on_req = on_req;
    hd->site = site;
    h2o_context_init(&site->ctx, h->loop, &site->config);
    site->accept_ctx.ctx = &site->ctx;
    site->accept_ctx.hosts = site->config.hosts;
    site->accept_ctx.ssl_ctx = ssl;
    site->listener = h2o_evloop_socket_create(h->loop, o->listen_fd, H2O_SOCKET_FLAG_DONT_READ);
    site->listener->data = site;
    h2o_socket_read_start(site->listener, on_accept);
    h->sites[h->nsites++] = site;
    return 0;
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
    if (o->wake_fd >= 0 && fcntl(o->wake_fd, F_SETFL, O_NONBLOCK) < 0) {
        int e = errno;
        snprintf(err, errlen, "fcntl: %s", strerror(e));
        free(h);
        return -e;
    }
    h->loop = h2o_evloop_create();
    struct kd_httpd_site_opts so = {.listen_fd = o->listen_fd, .on_request = o->on_request, .ud = o->ud};
    int rc = kd_httpd_add_site(h, &so, err, errlen);
    if (rc < 0) {
        h2o_evloop_destroy(h->loop);
        free(h);
        return rc;
    }
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
    /* Writes started outside the loop (answers sent from router messages) that completed at once
     * leave their sockets on h2o's pending lists, whose callbacks (a generator's proceed, the end
     * of an answer) run only after the next poll: do not let that poll block. */
    if (h->loop->_pending_as_client != NULL || h->loop->_pending_as_server != NULL)
        timeout_ms = 0;
    h2o_evloop_run(h->loop, timeout_ms < 0 ? INT32_MAX : timeout_ms);
}

void kd_httpd_close_listener(struct kd_httpd *h)
{
    for (size_t i = 0; i < h->nsites; i++) {
        struct site *site = h->sites[i];
        if (site->listener != NULL) {
            h2o_socket_read_stop(site->listener);
            h2o_socket_close(site->listener);
            site->listener = NULL;
        }
    }
}

size_t kd_httpd_connections(struct kd_httpd *h)
{
    size_t n = 0;
    for (size_t i = 0; i < h->nsites; i++) {
        h2o_context_t *ctx = &h->sites[i]->ctx;
        for (h2o_linklist_t *l = ctx->http1._conns.next; l != &ctx->http1._conns; l = l->next)
            n++;
        for (h2o_linklist_t *l = ctx->http2._conns.next; l != &ctx->http2._conns; l = l->next)
            n++;
    }
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
    while (h->upgraded != NULL) /* their owners were told to stop; the connections close here */
        up_do_close(h->upgraded);
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
    for (size_t i = 0; i < h->nsites; i++) {
        struct site *site = h->sites[i];
        h2o_multithread_queue_t *queue = site->ctx.queue;
        h2o_context_dispose(&site->ctx);
#if H2O_LIBRARY_VERSION_MAJOR == 0 && H2O_LIBRARY_VERSION_MINOR == 13
        /* libh2o 0.13 (h2o 2.2): h2o_multithread_destroy_queue() closes the queue but never frees
         * it on the evloop build (h2o 2.3 added the free). */
        free(queue);
#else
        (void)queue;
#endif
        h2o_config_dispose(&site->config);
        SSL_CTX_free(site->ssl);
        free(site);
    }
    h2o_evloop_destroy(h->loop);
    free(h);
    recycle_drain(&h2o_socket_buffer_prototype.allocator);
    return true;
}

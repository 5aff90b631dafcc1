/* httpd.h — a small HTTP server (HTTP/1.1, and HTTP/2 cleartext by prior knowledge or by Upgrade: h2c)
 * on h2o's own event loop, for one thread. core/httpd.c is the only file that includes h2o (and
 * through it OpenSSL's headers): nothing of h2o appears here.
 * Concurrency: single thread: every function is called from the thread that runs kd_httpd_run(),
 * except kd_httpd_create() which may run on another thread before that thread starts.
 * Ownership: the server owns the listening fd and the wake fd given to it (closed on destroy). A
 * request handle is owned by the server until the caller answers it with kd_httpd_respond(), exactly
 * once, now or later; a handle whose client went away stays valid until then (the answer is dropped).
 *
 *   on_request(ud, req, method, path)  ─ answer now ─> kd_httpd_respond(req, ...)
 *                                      └ or keep req and answer from a later callback (on_wake, a
 *                                        timeout computed by the caller around kd_httpd_run)
 */
#ifndef KD_CORE_HTTPD_H
#define KD_CORE_HTTPD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kd_httpd;
struct kd_httpd_req;
struct kd_httpd_header;

struct kd_httpd_opts {
    int listen_fd; /* bound and listening; made non-blocking here */
    int wake_fd;   /* an eventfd the loop watches (-1: none); its counter is reset before on_wake */
    void (*on_wake)(void *ud);
    /* method and path are NOT NUL-terminated; path excludes the query string. */
    void (*on_request)(void *ud, struct kd_httpd_req *req, const char *method, size_t method_len,
                       const char *path, size_t path_len);
    void *ud;
};

/* Further listening sockets on the same loop, each with its own callback and limits. */
#define KD_HTTPD_MAX_SITES 4
struct kd_httpd_site_opts {
    int listen_fd; /* bound and listening; made non-blocking here */
    void (*on_request)(void *ud, struct kd_httpd_req *req, const char *method, size_t method_len,
                       const char *path, size_t path_len);
    void *ud;
    size_t max_body;          /* largest request body accepted (413 beyond); 0: h2o's default */
    uint32_t req_timeout_ms;  /* HTTP/1.1: a request head must arrive within this (0: 10 s) */
    uint32_t idle_timeout_ms; /* HTTP/2: a connection with no frames either way is closed (0: h2o's) */
    const char *cert_file;    /* with key_file: TLS (ALPN h2, else HTTP/1.1), TLS 1.2 or later */
    const char *key_file;
};

/* Sets up the loop, the accept handler of o->listen_fd and the wake fd. 0, or -errno with a
 * message in err. */
int kd_httpd_create(const struct kd_httpd_opts *o, struct kd_httpd **out, char *err, size_t errlen);

/* One loop turn: wait up to timeout_ms (-1: until something happens) for I/O, run callbacks. */
void kd_httpd_run(struct kd_httpd *h, int timeout_ms);

/* Answer a request (body copied). Frees the handle; a request whose client left is just freed. */
void kd_httpd_respond(struct kd_httpd_req *req, int status, const char *content_type, const char *body,
                      size_t len);

/* Loads cert_file and key_file as kd_httpd_add_site would (0, or -EINVAL with the reason). */
int kd_httpd_tls_check(const char *cert_file, const char *key_file, char *err, size_t errlen);

/* Another listening socket (site) on h's loop. 0, or -errno with a message in err. */
int kd_httpd_add_site(struct kd_httpd *h, const struct kd_httpd_site_opts *o, char *err, size_t errlen);

/* Answer with extra headers (names in any case; copied). Frees the handle like kd_httpd_respond. */
void kd_httpd_respond_headers(struct kd_httpd_req *req, int status, const char *content_type,
                              const struct kd_httpd_header *hs, size_t n, const char *body, size_t len);

/* ---- the request, while its client is there (kd_httpd_req_alive) ---- */

struct kd_httpd_header {
    const char *name; /* lower-case as h2o gives it (HTTP/1 names are folded) */
    size_t name_len;
    const char *value;
    size_t value_len;
};
bool kd_httpd_req_alive(const struct kd_httpd_req *req);
/* Header i (0-based) in arrival order; false past the end. */
bool kd_httpd_req_header(const struct kd_httpd_req *req, size_t i, struct kd_httpd_header *out);
/* The request target as received: path (not normalized, not decoded) and query (after '?', "" if none). */
void kd_httpd_req_target(const struct kd_httpd_req *req, const char **path, size_t *plen, const char **query,
                         size_t *qlen);
/* The whole request body (h2o 2.2 reads it before the callback runs); NULL/0 if none. */
void kd_httpd_req_body(const struct kd_httpd_req *req, const uint8_t **body, size_t *len);

/* ---- streamed answers ----
 *
 *   kd_httpd_watch(req, fn, ud)            GONE is told if the client leaves from now on
 *   kd_httpd_start(req, status, headers)   can_send
 *   kd_httpd_send(req, data, len, final)   data borrowed until PROCEED (or GONE); then can_send again
 *   ... final send, or kd_httpd_abort()    (the client sees a reset stream / closed connection)
 *   kd_httpd_release(req)                  the caller is done; no more events
 *
 * Events are never delivered from inside kd_httpd_send/start/abort: after kd_httpd_send, check
 * kd_httpd_can_send() (h2o took the data at once: send more now, no PROCEED follows) and
 * kd_httpd_req_alive() (the client left during the send: no GONE follows). After a final send or an
 * abort, GONE is not told. */
enum { KD_HTTPD_PROCEED = 1, KD_HTTPD_GONE = 2 };
typedef void (*kd_httpd_event_fn)(void *ud, int event);
void kd_httpd_watch(struct kd_httpd_req *req, kd_httpd_event_fn fn, void *ud);
/* Status and headers (hop-by-hop headers are the caller's business); content_length -1: unknown
 * (chunked on HTTP/1.1). */
void kd_httpd_start(struct kd_httpd_req *req, int status, const struct kd_httpd_header *hs, size_t n,
                    int64_t content_length);
bool kd_httpd_can_send(const struct kd_httpd_req *req);
void kd_httpd_send(struct kd_httpd_req *req, const void *data, size_t len, bool final);
/* End the answer as failed: 502 if nothing was started, else the stream is reset / the connection
 * closed so the client cannot take a cut body for a whole one. */
void kd_httpd_abort(struct kd_httpd_req *req);
void kd_httpd_release(struct kd_httpd_req *req);

/* ---- protocol upgrades (HTTP/1.1 only: SPDY or WebSocket for kubectl exec/attach/port-forward) ----
 *
 *   kd_httpd_req_upgrade_value(req)          the client asked for an upgrade
 *   u = kd_httpd_upgrade(req, headers, fn)   101 (with "connection: upgrade") is written; req is done
 *   fn(OPEN) then DATA... from the client; kd_httpd_up_write(u, bytes) borrowed until WRITTEN
 *   fn(EOF) the client closed its side; fn(ERROR) the connection broke (or the 101 could not go out;
 *   data/len may hold a reason text)
 *   kd_httpd_up_close(u)                     the caller is done: the connection closes, no more events
 * Events are never delivered from inside kd_httpd_upgrade/up_write/up_read/up_close. */
enum { KD_HTTPD_UP_OPEN = 1, KD_HTTPD_UP_DATA, KD_HTTPD_UP_EOF, KD_HTTPD_UP_ERROR, KD_HTTPD_UP_WRITTEN };
struct kd_httpd_upgraded;
typedef void (*kd_httpd_up_fn)(void *ud, int ev, const uint8_t *data, size_t len);
/* The Upgrade value of an HTTP/1.1 request (NULL when none, or HTTP/2). */
const char *kd_httpd_req_upgrade_value(const struct kd_httpd_req *req, size_t *len);
/* Answer 101 with headers hs (which should hold "upgrade") and take the connection over. The
 * request handle is released here. NULL when out of memory or the request is gone. */
struct kd_httpd_upgraded *kd_httpd_upgrade(struct kd_httpd_req *req, const struct kd_httpd_header *hs,
                                           size_t n, kd_httpd_up_fn fn, void *ud);
/* An outgoing TCP connection on the loop, driven like an upgraded one: OPEN once connected (and,
 * with tls, once the TLS handshake verified the server's certificate against the context's CAs and
 * server_name), or ERROR (data/len: h2o's reason); then DATA/EOF/ERROR/WRITTEN; kd_httpd_up_write
 * after OPEN. NULL when the socket could not be made. tls and server_name are borrowed for the
 * connection's life. (For calls to GitLab's internal API from the control thread.) */
struct sockaddr;
struct kd_httpd_tls;
/* A client TLS context verifying servers with ca_file (NULL: the system's store) and the name (or IP
 * address) server_name. NULL with the reason in err. */
struct kd_httpd_tls *kd_httpd_client_tls_new(const char *ca_file, const char *server_name, char *err,
                                             size_t errlen);
void kd_httpd_client_tls_free(struct kd_httpd_tls *t);
struct kd_httpd_upgraded *kd_httpd_connect(struct kd_httpd *h, const struct sockaddr *sa, unsigned salen,
                                           const struct kd_httpd_tls *tls, const char *server_name,
                                           kd_httpd_up_fn fn, void *ud);
/* Reading from the client on or off (flow control: DATA stops until turned on again). */
void kd_httpd_up_read(struct kd_httpd_upgraded *u, bool on);
/* Write bytes to the client; one write at a time (the next after WRITTEN). */
void kd_httpd_up_write(struct kd_httpd_upgraded *u, const void *data, size_t len);
void kd_httpd_up_close(struct kd_httpd_upgraded *u);

/* Stop accepting: every listening socket is closed; open connections finish their current requests. */
void kd_httpd_close_listener(struct kd_httpd *h);

/* Connections (HTTP/1 and HTTP/2) still open. */
size_t kd_httpd_connections(struct kd_httpd *h);

/* Free everything. If connections are still open, h2o offers no way to close them one by one in
 * this version, so the loop and context are left allocated (a bounded leak at exit) rather than
 * freed under live connections; returns false then. */
bool kd_httpd_destroy(struct kd_httpd *h);

#endif

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

struct kd_httpd_opts {
    int listen_fd; /* bound and listening; made non-blocking here */
    int wake_fd;   /* an eventfd the loop watches (-1: none); its counter is reset before on_wake */
    void (*on_wake)(void *ud);
    /* method and path are NOT NUL-terminated; path excludes the query string. */
    void (*on_request)(void *ud, struct kd_httpd_req *req, const char *method, size_t method_len,
                       const char *path, size_t path_len);
    void *ud;
};

/* Sets up the loop and the accept handler. 0, or -errno with a message in err. */
int kd_httpd_create(const struct kd_httpd_opts *o, struct kd_httpd **out, char *err, size_t errlen);

/* One loop turn: wait up to timeout_ms (-1: until something happens) for I/O, run callbacks. */
void kd_httpd_run(struct kd_httpd *h, int timeout_ms);

/* Answer a request (body copied). Frees the handle; a request whose client left is just freed. */
void kd_httpd_respond(struct kd_httpd_req *req, int status, const char *content_type, const char *body,
                      size_t len);

/* Stop accepting: the listening socket is closed; open connections finish their current requests. */
void kd_httpd_close_listener(struct kd_httpd *h);

/* Connections (HTTP/1 and HTTP/2) still open. */
size_t kd_httpd_connections(struct kd_httpd *h);

/* Free everything. If connections are still open, h2o offers no way to close them one by one in
 * this version, so the loop and context are left allocated (a bounded leak at exit) rather than
 * freed under live connections; returns false then. */
bool kd_httpd_destroy(struct kd_httpd *h);

#endif

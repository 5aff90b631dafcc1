/* control.h — the control thread: the observability listener (/metrics, /liveness, /readiness) on
 * core/httpd (h2o), and router participant n (= number of shards).
 * Concurrency: kd_control_create/start/stop/destroy are called by the main thread; everything else
 * runs on the control thread. The control thread never touches shard-local state: it asks every
 * shard through the router (KD_RT_STATS_REQ, answered with a KD_RT_STATS snapshot built on the
 * shard), and reads only single-writer counters (kd_shard_stats, kd_router_stats) directly. Shards
 * never wait for it: they answer with a non-blocking router send and go on.
 * Ownership: the control owns its listening socket, its eventfd and the h2o loop; it borrows the
 * server, which must outlive it (stop the control after kd_server_wait, before kd_server_destroy).
 *
 *   HTTP request ─> queued for the next round ─> round k: STATS_REQ(k) to every shard
 *   shard i: STATS(k, snapshot) ─> stored ─> all n answered, or 2 s passed ─> answer queued requests
 */
#ifndef KD_CONTROL_CONTROL_H
#define KD_CONTROL_CONTROL_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

struct kd_server;
struct kd_control;

/* How long a round waits for the shards' answers; a shard that misses it fails /liveness. */
#define KD_CONTROL_ROUND_TIMEOUT_MS 2000

/* Binds the observability listener now (so a busy port fails the start with a clear message). */
int kd_control_create(struct kd_server *srv, const struct sockaddr_storage *addr, socklen_t addrlen,
                      struct kd_control **out, char *err, size_t errlen);
/* "127.0.0.1:8151", the bound address (port 0 resolved). */
void kd_control_address(const struct kd_control *c, char *buf, size_t len);
/* The Kubernetes API front door (control/kubeapi.h) on the same thread: binds now (a busy port fails
 * the start); cfg's strings must outlive the control. Call before kd_control_start. */
struct kd_kubeapi_cfg;
int kd_control_add_kubeapi(struct kd_control *c, const struct sockaddr_storage *addr, socklen_t addrlen,
                           const struct kd_kubeapi_cfg *cfg, size_t max_body, const char *cert_file,
                           const char *key_file, char *err, size_t errlen);
void kd_control_kubeapi_address(const struct kd_control *c, char *buf, size_t len);
/* Agent tokens resolved by GitLab (control/gitlab.h) on this thread. Call before kd_control_start;
 * cfg's secret must outlive the control. */
struct kd_gitlab_cfg;
void kd_control_set_gitlab(struct kd_control *c, const struct kd_gitlab_cfg *cfg);
/* Starts the control thread. 0 or -errno (message in err). */
int kd_control_start(struct kd_control *c, char *err, size_t errlen);
/* Answers what is pending (503), stops the thread and joins it. */
void kd_control_stop(struct kd_control *c);
void kd_control_destroy(struct kd_control *c);

/* What the observability listener does with a request, from its method and path alone (untrusted
 * bytes, not NUL-terminated, as core/httpd.h hands them over) and whether kasd is stopping:
 *   returns the endpoint whose next round answers the request (GET or HEAD of /metrics, /liveness,
 *   /readiness, and not answerable from the stop flag alone), or
 *   returns -1 with *now filled: answer at once (404 other paths, 405 other methods, and /readiness
 *   503 and /liveness 200 while draining). now->body is static, now->len bytes.
 * Pure, any thread. Exported for test/fuzz/control_fuzz.c. */
enum kd_control_endpoint { KD_CONTROL_METRICS, KD_CONTROL_LIVENESS, KD_CONTROL_READINESS };
struct kd_control_answer {
    int status;
    const char *content_type;
    const char *body;
    size_t len;
};
int kd_control_route(const char *method, size_t mlen, const char *path, size_t plen, bool draining,
                     struct kd_control_answer *now);

#endif

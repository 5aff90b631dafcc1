/* kubeapi.h — the Kubernetes API front door (kubernetes_api.listen): an HTTP request for
 * <prefix>... from kubectl, the GitLab UI or a CI job becomes a routed
 * KubernetesApi/MakeRequest call to the agent its credential names, and the agent's answer streams
 * back (docs/kubernetes_api.md).
 * Concurrency: runs on the control thread (control/control.c), router participant n. Each request is
 * the front half of a routed call (the protocol of shards/kas.h): START goes to the agent's owner
 * shard, which binds a tunnel (or forwards to a peer instance) exactly as for an api-listener call;
 * BOUND, HEADER, RDATA, END and ACK_REQ come back here.
 * Ownership: the front door owns its requests' state; payloads go home through the router.
 *
 *   HTTP request ─> CORS, prefix, credential ─> START(MakeRequest) ─> owner shard
 *                  <─ BOUND: header message, body (1 MiB window, ACK_REQ), trailer, half-close
 *   agent's HttpResponse messages (RDATA) ─> status + headers, body chunks (each acknowledged
 *   when h2o has written it: a slow client slows the agent), trailer ─> final
 */
#ifndef KD_CONTROL_KUBEAPI_H
#define KD_CONTROL_KUBEAPI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kd_router;
struct kd_msg;
struct kd_httpd_req;
struct kd_hm_imp;

/* Checks a credential's token for agent_id: 0 (allowed; *imp filled, strings valid until the next
 * call), -ENOENT (unknown token) or -EPERM (known, this agent not allowed). */
typedef int (*kd_kubeapi_authorize_fn)(void *ud, const char *token, size_t len, int64_t agent_id,
                                       struct kd_hm_imp *imp);

struct kd_kubeapi_cfg {
    const char *prefix;                /* URL path prefix, ends with '/' (default "/k8s-proxy/") */
    kd_kubeapi_authorize_fn authorize; /* NULL: every credential is refused */
    void *authorize_ud;
    const char *const *origins; /* CORS: allowed Origin values (exact match) */
    size_t norigins;
    uint32_t routing_timeout_ms; /* longest wait for the agent's tunnel */
    size_t max_header_message;   /* largest encoded request header message (limits.grpc_max_message_size) */
    const char *via;             /* our Via value, e.g. "gRPC/1.0 kasd/0.1.0" */
};

struct kd_kubeapi_stats {
    uint64_t requests, proxied, upgraded, unauthorized, forbidden, bad_requests, no_tunnel, failed, active;
};

struct kd_kubeapi;
struct kd_server;
/* srv: its router (this thread is participant nshards), its stop flag (new requests get 503 once it
 * is set) and the stop barrier's counters for the control thread (shards/shard.h). */
int kd_kubeapi_create(struct kd_server *srv, const struct kd_kubeapi_cfg *cfg, struct kd_kubeapi **out);
/* kd_httpd_site_opts.on_request of the front door's listener. */
void kd_kubeapi_on_request(void *ud, struct kd_httpd_req *req, const char *method, size_t mlen,
                           const char *path, size_t plen);
/* A router message for the front door: true if it was one (KD_RT_BOUND .. KD_RT_ACK_REQ). */
bool kd_kubeapi_on_message(struct kd_kubeapi *k, const struct kd_msg *m);
/* Check credentials with GitLab (control/gitlab.h) when cfg.authorize is NULL. */
struct kd_gitlab;
void kd_kubeapi_set_gitlab(struct kd_kubeapi *k, struct kd_gitlab *g);
/* Whether kasd is stopping (no new requests are routed then). */
bool kd_kubeapi_stopping(const struct kd_kubeapi *k);
void kd_kubeapi_stats(const struct kd_kubeapi *k, struct kd_kubeapi_stats *out);
/* The process is stopping and the shards are gone: answer what is open and free everything. */
void kd_kubeapi_destroy(struct kd_kubeapi *k);

#endif

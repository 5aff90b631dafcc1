/* gitlab.h — GitLab's internal API for kas, called from the control thread: agent tokens resolved
 * with GET <gitlab.address>/api/v4/internal/kubernetes/agent_info (agent.token_source: gitlab).
 * Concurrency: control thread only. Shards ask with KD_RT_TOKEN_RESOLVE and get KD_RT_TOKEN_RESOLVED
 * (shards/kas.h); the process-wide cache and the single flight per token live here, so a reconnect
 * storm of one agent costs GitLab one request, whatever the shards and calls.
 * Ownership: a request holds a copy of the token until its HTTP request is written (then wiped);
 * the cache keeps SHA-256 digests of tokens, never tokens.
 *
 *   shard: RESOLVE(digest, token) ─> cached? ─ yes ─> RESOLVED to that shard
 *                                    └ in flight for the digest? add the shard as a waiter
 *                                    └ else: request (or queue it behind gitlab.max_requests)
 *   GitLab 200 JSON {agent_id, project_id, agent_name}  -> known (cached agent_info_cache_ttl)
 *          401/403/404                                  -> UNAUTHENTICATED (agent_info_cache_error_ttl)
 *          anything else, no answer within gitlab.timeout -> UNAVAILABLE (not cached)
 */
#ifndef KD_CONTROL_GITLAB_H
#define KD_CONTROL_GITLAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct kd_server;
struct kd_httpd;
struct kd_msg;
struct kd_gitlab;
struct kd_httpd_tls;

struct kd_gitlab_cfg {
    struct sockaddr_storage addrs[4]; /* resolved at start (no DNS on the control thread), tried in order */
    socklen_t addrlens[4];
    unsigned naddrs;
    struct kd_httpd_tls *tls; /* https:// (NULL: plain HTTP) */
    char server_name[300];    /* the name GitLab's certificate must carry (the address's host) */
    char host[300];           /* Host header: the address as configured */
    char prefix[256];         /* path prefix of the address ("" or "/gitlab") */
    const uint8_t *secret;    /* gitlab.authentication_secret_file: signs Gitlab-Kas-Api-Request */
    size_t secret_len;
    uint32_t timeout_ms, cache_ttl_ms, error_ttl_ms;
    unsigned max_requests; /* at once; more wait */
};

struct kd_gitlab_stats {
    uint64_t requests, ok, unauthenticated, failed, cache_hits, coalesced, cached;
    /* the front door's credentials (authorize_proxy_user, job/allowed_agents) */
    uint64_t auth_ok, auth_denied, auth_failed, auth_cache_hits;
};

/* A Kubernetes API front door credential checked by GitLab (control/kubeapi.c):
 *   pat: POST <address>/api/v4/internal/kubernetes/authorize_proxy_user
 *        {"agent_id", "access_type": "personal_access_token", "access_key"}
 *   ci:  GET <address>/api/v4/job/allowed_agents with Job-Token
 * and the impersonation GitLab kas derives from the answer (docs/kubernetes_api.md). */
enum kd_gitlab_cred { KD_GITLAB_PAT, KD_GITLAB_CI };
struct kd_gitlab_auth {
    int status; /* 200 allowed; 401 unknown credential; 403 not allowed for the agent; 503 GitLab failed */
    const char *why;
    const char *username; /* NULL: no impersonation (access as the agent) */
    const char *const *groups;
    size_t ngroups;
    const char *uid;
};
typedef void (*kd_gitlab_auth_fn)(void *ud, const struct kd_gitlab_auth *a);
struct kd_gitlab_wait;
/* Check a credential for agent_id. 1: answered now (fn called before returning); 0: *w set, fn is
 * called later (exactly once) unless kd_gitlab_cancel(*w) is called first. Strings in the answer
 * are valid during fn only. */
int kd_gitlab_authorize(struct kd_gitlab *g, enum kd_gitlab_cred kind, const char *token, size_t len,
                        int64_t agent_id, kd_gitlab_auth_fn fn, void *ud, struct kd_gitlab_wait **w);
void kd_gitlab_cancel(struct kd_gitlab_wait *w);

struct kd_gitlab;
int kd_gitlab_create(struct kd_server *srv, struct kd_httpd *httpd, const struct kd_gitlab_cfg *cfg,
                     struct kd_gitlab **out);
/* KD_RT_TOKEN_RESOLVE: true if it was one. */
bool kd_gitlab_on_message(struct kd_gitlab *g, const struct kd_msg *m);
/* Requests past their deadline fail; returns the next deadline (ms, UINT64_MAX: none). */
uint64_t kd_gitlab_tick(struct kd_gitlab *g, uint64_t now_ms);
void kd_gitlab_stats(const struct kd_gitlab *g, struct kd_gitlab_stats *out);
/* One line for /readiness: GitLab's state as the last requests saw it. Returns its length. */
size_t kd_gitlab_health(const struct kd_gitlab *g, char *buf, size_t cap);
void kd_gitlab_destroy(struct kd_gitlab *g);

#endif

/* httpmap.h — HTTP requests and responses as the messages of KubernetesApi/MakeRequest
 * (gitlab.agent.grpctool.HttpRequest / HttpResponse, wire.md "Kubernetes API through the tunnel"),
 * for the Kubernetes API front door (control/kubeapi.c). It does what GitLab kas's front door does to
 * a request before it enters the tunnel: header names in Go's canonical form, values of one name
 * grouped, hop-by-hop headers and the user's credentials removed, `Via` added, the query parsed into
 * a map, impersonation as HeaderExtra in `extra`; and the reverse for the agent's answer.
 * Concurrency: pure. Ownership: encoders return malloc'd buffers (the caller frees them); the
 * response parser borrows its input.
 *
 *   front door                                     agent
 *   HttpRequest{header{request, extra?, content_length}}  ─>
 *   HttpRequest{data{bytes}} ...                          ─>
 *   HttpRequest{trailer{}}                                ─>   (then the call half-closes)
 *                            <─ HttpResponse{header{response{status_code, status, header}}}
 *                            <─ HttpResponse{data{bytes}} ...
 *                            <─ HttpResponse{trailer{}}
 */
#ifndef KD_CORE_HTTPMAP_H
#define KD_CORE_HTTPMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kd_hm_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* Impersonation (HeaderExtra.imp_config), as client-go's rest.ImpersonationConfig. */
struct kd_hm_imp {
    const char *username; /* NULL: no impersonation (extra left unset) */
    const char *const *groups;
    size_t ngroups;
    const char *uid; /* NULL: unset */
};

struct kd_hm_request {
    const char *method;
    size_t method_len;
    const char *url_path; /* decoded (kd_hm_path_decode), prefix already stripped, starts with '/' */
    size_t url_path_len;
    const char *query; /* raw, after '?': parsed here; gitlab-agent-id and gitlab-csrf-token dropped */
    size_t query_len;
    const struct kd_hm_header *headers; /* as received (any case) */
    size_t nheaders;
    const char *via; /* appended as a Via value, e.g. "gRPC/1.0 kasd/0.1" */
    /* A protocol upgrade the client asked for (its Upgrade value, e.g. "SPDY/3.1"), or NULL. As
     * kas does, "Upgrade: <it>" and "Connection: upgrade" are then put back after the hop-by-hop
     * headers were removed. */
    const char *upgrade;
    size_t upgrade_len;
    const struct kd_hm_imp *imp;
    int64_t content_length; /* -1: unknown */
};

/* The header message. 0, -ENOMEM, or -E2BIG when it would exceed max bytes. */
int kd_hm_encode_request_header(const struct kd_hm_request *rq, size_t max, uint8_t **out, size_t *out_len);

/* HttpRequest{data{data}}: bytes needed, and the writer (returns the end). */
size_t kd_hm_data_size(size_t n);
uint8_t *kd_hm_put_data(uint8_t *p, const void *data, size_t n);
/* HttpRequest{upgradeData{data}}: bytes of an upgraded connection (after a 101). */
size_t kd_hm_upgrade_size(size_t n);
uint8_t *kd_hm_put_upgrade(uint8_t *p, const void *data, size_t n);
/* HttpRequest{trailer{}} */
extern const uint8_t kd_hm_trailer[2];

/* Go's textproto.CanonicalMIMEHeaderKey into out (len bytes): "content-type" -> "Content-Type".
 * Names with bytes outside HTTP token characters are copied unchanged, as Go does. */
void kd_hm_canonical(const char *name, size_t len, char *out);

/* Percent-decode a request path into out (room for len bytes): the length, or -1 on a bad escape
 * or an escaped NUL. */
long kd_hm_path_decode(const char *in, size_t len, char *out);

enum kd_hm_kind { KD_HM_HEADER = 1, KD_HM_DATA = 2, KD_HM_TRAILER = 3, KD_HM_UPGRADE = 4 };
struct kd_hm_response {
    enum kd_hm_kind kind;
    int32_t status_code;    /* HEADER */
    const uint8_t *headers; /* HEADER: the HttpResponse message (for kd_hm_response_headers) */
    size_t headers_len;
    const uint8_t *data; /* DATA, UPGRADE */
    size_t data_len;
};
/* One HttpResponse message. 0, or -EBADMSG (malformed, no or unknown oneof member, several). */
int kd_hm_parse_response(const uint8_t *msg, size_t len, struct kd_hm_response *out);

/* The response headers worth giving the HTTP client, one call per value: hop-by-hop headers, the
 * headers the agent's Connection names, Content-Length (returned in *content_length, -1 if absent
 * or not a plain decimal), Server and CORS headers dropped; names or values HTTP forbids (CR, LF,
 * NUL, non-token names) dropped. Stops early if fn returns non-zero. 0, or -EBADMSG. */
int kd_hm_response_headers(const struct kd_hm_response *r, int64_t *content_length,
                           int (*fn)(void *ud, const char *name, size_t nlen, const char *value, size_t vlen),
                           void *ud);

/* The first value of response header `name` (any case) in *value, or false. Also headers the
 * filter above drops (Upgrade of a 101). */
bool kd_hm_response_header(const struct kd_hm_response *r, const char *name, const char **value, size_t *len);

/* A Kubernetes Status object (JSON) for an error kasd answers itself, with the reason the API
 * server uses for code. Writes at most cap bytes (truncating the message); returns the length. */
size_t kd_hm_status_json(int code, const char *message, char *buf, size_t cap);

#endif

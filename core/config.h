/* config.h — kasd's configuration: YAML (libyaml) into a validated struct.
 * Concurrency: loaded once by the main thread before shards start; read-only afterwards.
 * Ownership: kd_config owns every string in it; kd_config_free() releases them.
 *
 * Keys follow GitLab kas where kas has them (agent.listen.address, api.listen.address,
 * redis.server.address, ...). Unknown keys are errors. Every error names the file, line and column,
 * the dotted key and what was expected, e.g.
 *   kasd.yaml:7:14: api.listen.address: expected host:port (like 127.0.0.1:8153), got "localhost"
 * The reference of every key lives in docs/configuration.md.
 */
#ifndef KD_CORE_CONFIG_H
#define KD_CORE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

enum kd_log_level { KD_LOG_DEBUG = 0, KD_LOG_INFO = 1, KD_LOG_WARN = 2, KD_LOG_ERROR = 3 };

struct kd_listen_cfg {
    char *address;                /* as written: "127.0.0.1:8150", "[::1]:8150"; port 0 = ephemeral */
    struct sockaddr_storage addr; /* parsed numerically (no DNS lookups at start) */
    socklen_t addrlen;
    char *authentication_secret_file; /* api / private_api: JWT secret, base64 in the file; else NULL */
    char *certificate_file;           /* TLS: PEM chain; with key_file, the listener speaks TLS (ALPN h2) */
    char *key_file;                   /* TLS: PEM private key */
    char *client_ca_file;             /* private_api: require client certificates from these CAs (mTLS) */
    /* gRPC listeners (agent, api, private_api): */
    uint32_t max_connection_age_ms;       /* GOAWAY after this age (± 10 % jitter); 0 = never */
    uint32_t max_connection_age_grace_ms; /* then calls in flight have this long */
    uint32_t keepalive_time_ms;           /* nothing received this long: PING the peer */
    uint32_t keepalive_timeout_ms;        /* that PING unanswered this long: close */
    uint32_t keepalive_min_time_ms;       /* client PINGs closer than this are strikes (3: GOAWAY) */
    int websocket;                        /* agent: also accept HTTP/2 inside WebSocket (ws-tunnel); 1 / 0 */
};

struct kd_config {
    char *source; /* file name used in messages, "<defaults>" when built-in */

    unsigned shards; /* 0 = one per online CPU */

    struct {
        struct kd_listen_cfg listen;
        char *token_file;        /* embedded token resolver: token -> agent (NULL: none configured) */
        char *configuration_dir; /* per-agent configuration files <name or id>.yaml (NULL: none) */
        char *token_source;      /* agent.token_source: "file" (NULL: the default) or "gitlab" */
    } agent;
    struct {
        char *external_url; /* gitlab.external_url: GitLab's public URL, told to agents (NULL: "") */
        char *address;      /* gitlab.address: http://host[:port][/prefix] of GitLab's internal API */
        char
            *authentication_secret_file; /* gitlab.authentication_secret_file: signs Gitlab-Kas-Api-Request */
        char *ca_file;                   /* gitlab.ca_file: CAs for https:// (NULL: the system store) */
        uint32_t timeout_ms;             /* gitlab.timeout: one request to GitLab */
        uint32_t agent_info_cache_ttl_ms;       /* gitlab.agent_info_cache_ttl: a known agent token is kept */
        uint32_t agent_info_cache_error_ttl_ms; /* gitlab.agent_info_cache_error_ttl: a refused one */
    } gitlab;
    struct {
        struct kd_listen_cfg listen;
    } api;
    struct {
        struct kd_listen_cfg listen;
        char *advertise_address; /* private_api.advertise_address: numeric ip:port peers dial (NULL: the bound
                                    address) */
        struct {
            /* How this instance dials its peers' private listeners: TLS when the private listener
             * has a certificate (a fleet's private listeners are all TLS or all h2c). */
            char *ca_file;          /* private_api.client.ca_file: CAs verifying peers (NULL: system store) */
            char *server_name;      /* private_api.client.server_name: name verified (NULL: the peer's IP) */
            char *certificate_file; /* private_api.client.certificate_file: client certificate (mTLS) */
            char *key_file;         /* private_api.client.key_file */
        } client;
    } private_api;
    struct {
        uint32_t recheck_ms;       /* fleet.recheck_interval: safety re-check of a waiting call */
        char *discovery;           /* fleet.discovery: "events" (default) or "poll" (benchmark comparison) */
        uint32_t route_cache_size; /* fleet.route_cache_size: agents with a cached route per shard */
        uint32_t peer_idle_ms;     /* fleet.peer_idle_timeout: close an unused peer connection */
        uint32_t second_delay_ms;  /* fleet.second_candidate_delay: race the next candidate after this */
        uint32_t peer_connect_ms;  /* fleet.peer_connect_timeout: a peer not connected by then is failed */
    } fleet;
    struct {
        struct kd_listen_cfg listen;
    } observability;
    struct {
        /* The Kubernetes API front door (docs/kubernetes_api.md): on when the section is present. */
        bool enabled;
        struct kd_listen_cfg listen; /* kubernetes_api.listen.address (127.0.0.1:8154) */
        char *url_path_prefix;       /* kubernetes_api.url_path_prefix: ends with '/' (default /k8s-proxy/) */
        char *access_token_file;     /* kubernetes_api.access_token_file: static user tokens (NULL: none) */
        char *allowed_origins;       /* kubernetes_api.allowed_origins: CORS origins, '\n'-joined */
        unsigned n_allowed_origins;
        uint32_t max_request_body_size; /* kubernetes_api.max_request_body_size: bytes (16 MiB) */
    } kubernetes_api;

    struct {
        bool configured;     /* false: kasd starts its own redis-server on a loopback port */
        char *address;       /* redis.server.address: "host:port" or "unix:/path" */
        char *username;      /* redis.username, NULL when unset */
        char *password_file; /* redis.password_file, NULL when unset */
        unsigned database;   /* redis.database */
        char *key_prefix;    /* redis.key_prefix, default "gitlab-kas" */
        char *password;      /* the contents of password_file (one trailing newline cut), or NULL */
        uint32_t dial_timeout_ms;
        uint32_t read_timeout_ms;  /* redis.read_timeout: a reply outstanding longer fails the connection */
        uint32_t write_timeout_ms; /* redis.write_timeout: output stuck this long fails the connection */
        uint32_t heartbeat_ms;     /* redis.heartbeat_interval: the instance's alive key is refreshed */
        uint32_t instance_ttl_ms;  /* redis.instance_ttl: alive key TTL (> heartbeat_interval) */
        uint32_t sweep_ms;         /* redis.sweep_interval: dead instances looked for */
        struct {
            int enabled;            /* redis.tls.enabled: 1 on, 0 off, -1 unset (no tls section: off) */
            char *ca_file;          /* CAs verifying the server (NULL: the system store) */
            char *server_name;      /* name verified in the server's certificate (default: host part) */
            char *certificate_file; /* client certificate (mTLS), with key_file */
            char *key_file;
        } tls;
        struct {
            char *master_name; /* redis.sentinel.master_name; NULL: no Sentinel */
            char *addresses;   /* redis.sentinel.addresses: n_addresses entries, '\n'-separated */
            unsigned n_addresses;
            char *password_file; /* redis.sentinel.password_file */
            char *password;      /* its contents */
        } sentinel;
    } redis;

    struct {
        unsigned connections_per_shard; /* limits.connections_per_shard: accepted beyond it are refused */
        unsigned recv_buffers;          /* limits.recv_buffers_per_shard: power of two */
        unsigned recv_buffer_size;      /* limits.recv_buffer_size: bytes per provided buffer */
        unsigned router_ring_size;      /* limits.router_ring_size: messages per shard pair */
        uint32_t shutdown_grace_ms;     /* limits.shutdown_grace: in-flight work may finish this long */
        uint32_t grpc_max_message_size; /* limits.grpc_max_message_size: bytes per gRPC message */
        uint32_t grpc_max_concurrent_streams; /* limits.grpc_max_concurrent_streams: per connection */
        uint32_t grpc_max_header_list_size;   /* limits.grpc_max_header_list_size: metadata bytes per call */
        /* HTTP/2 abuse limits of every gRPC listener (core/h2.h struct kd_h2_limits) */
        uint32_t h2_rapid_reset_burst;      /* limits.h2_rapid_reset_burst: client RST_STREAMs in a burst */
        uint32_t h2_rapid_reset_rate;       /* limits.h2_rapid_reset_rate: ... regained per second */
        uint32_t h2_settings_burst;         /* limits.h2_settings_burst: SETTINGS frames in a burst */
        uint32_t h2_settings_rate;          /* limits.h2_settings_rate: ... regained per second */
        uint32_t h2_ping_strikes;           /* limits.h2_ping_strikes: too-early client PINGs tolerated */
        uint32_t routing_timeout_ms;        /* limits.routing_timeout: longest wait for an agent's tunnel */
        uint32_t pods_per_connection;       /* limits.pods_per_connection: pod_ids one connection registers */
        uint32_t pods_per_agent;            /* limits.pods_per_agent: pod_ids of one agent on this instance */
        uint32_t agent_meta_max_size;       /* limits.agent_meta_max_size: one Register's AgentMeta, bytes */
        uint32_t connected_agents_max_size; /* limits.connected_agents_max_size: GetConnectedAgents bytes */
    } limits;

    struct {
        /* grpc.response_compression: enum kd_compress_alg (identity 0, gzip 1) for response messages
         * to callers whose grpc-accept-encoding lists it */
        unsigned response_compression;
    } grpc;

    struct {
        enum kd_log_level level; /* log.level: debug | info | warn | error */
    } log;
};

/* Fill *c with the built-in defaults (listeners on 127.0.0.1 at kas's ports, embedded Redis). */
int kd_config_defaults(struct kd_config *c);

/* Parse YAML over the defaults already in *c. On error returns -EINVAL (or -errno for I/O) and
 * writes one line naming file:line:col, key and expectation into err. *c stays freeable either way. */
int kd_config_load_file(struct kd_config *c, const char *path, char *err, size_t errlen);
int kd_config_load_string(struct kd_config *c, const char *name, const char *yaml, size_t len, char *err,
                          size_t errlen);

void kd_config_free(struct kd_config *c);

/* Parse "host:port" / "[v6]:port" numerically. 0 or -EINVAL. Exposed for reuse and tests. */
int kd_config_parse_hostport(const char *s, struct sockaddr_storage *ss, socklen_t *len);

/* Parse a Go-style duration ("250ms", "10s", "2h", "1m30s") into milliseconds. 0 or -EINVAL. */
int kd_config_parse_duration(const char *s, uint64_t *ms);

const char *kd_log_level_name(enum kd_log_level l);

/* Largest document kd_config_yaml_check() accepts. */
#define KD_CONFIG_YAML_DOC_MAX (1024u * 1024)

/* Check that buf[0..len) is one well-formed YAML document whose top level is a mapping (an empty
 * or null document counts as an empty mapping); the content is not interpreted. libyaml stays in
 * this file: other modules validate YAML through this. 0, or -EINVAL (syntax, shape, more than one
 * document), -EFBIG (len > KD_CONFIG_YAML_DOC_MAX), -ENOMEM, with one line
 * "NAME:LINE:COL: message" in err (LINE and COL from 1). Thread-safe (no shared state). */
int kd_config_yaml_check(const char *name, const char *buf, size_t len, char *err, size_t errlen);

#endif

/* grpc.h — gRPC on shard connections: server listeners with a method table, and client channels.
 * Concurrency: shard-local, no locks. A call belongs to its connection's shard; a call is handed
 * to another shard only by message (router), never by touching it from there.
 * Ownership: the connection owns its calls (core/h2.h rules: a call is valid until its handler's
 * on_done returns). Method tables and server options are borrowed for the server's life.
 *
 * Every function here that changes a call also schedules the connection's flush, so a handler
 * can act from anywhere on the shard (a router message, a timer) and the bytes leave this turn.
 *
 *   socket ─recv─> [TLS] ─> nghttp2 (core/h2.c) ─> on_call ─> method table ─> handler
 *   handler ─kd_grpc_*─> nghttp2 ─> [TLS] ─> kd_conn_write ─> one send per loop turn
 */
#ifndef KD_SHARDS_GRPC_H
#define KD_SHARDS_GRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "core/grpc.h"
#include "core/h2.h"

struct kd_conn;
struct kd_conn_ops;
struct kd_shard;
struct kd_tls_ctx;

typedef struct kd_h2_call kd_grpc_call;

/* A method: start() runs when a call for `path` arrives. It sets a handler with
 * kd_grpc_accept(), or answers at once with kd_grpc_finish(), or returns a gRPC status > 0 to
 * reject. */
struct kd_grpc_method {
    const char *path; /* "/pkg.Service/Method"; NULL for the fallback */
    int (*start)(kd_grpc_call *call, void *ud);
    void *ud;
};

struct kd_grpc_server_cfg {
    const char *name; /* listener name for logs */
    const struct kd_grpc_method *methods;
    size_t nmethods;
    const struct kd_grpc_method *fallback; /* any other path; NULL: UNIMPLEMENTED */
    struct kd_tls_ctx *tls;                /* NULL: h2c (prior knowledge) */
    uint32_t max_message;                  /* default 4 MiB */
    const char *max_message_key;           /* named in the refusal of a larger message (or NULL) */
    uint32_t max_concurrent_streams;       /* default 500 (agentk opens up to 500 tunnel streams) */
    uint32_t max_header_list;              /* default 1 MiB (SETTINGS_MAX_HEADER_LIST_SIZE) */
    uint32_t keepalive_ms;                 /* nothing received this long: PING; default 50 s */
    uint32_t keepalive_timeout_ms;         /* that PING unanswered this long: close; default 20 s */
    uint32_t ping_min_interval_ms;         /* client pings closer than this are strikes; default 20 s */
    uint32_t max_connection_age_ms;        /* 0 = none; GOAWAY after age ± 10 % jitter */
    uint32_t max_connection_age_grace_ms;  /* then close after this much longer; default 60 s */
    uint32_t handshake_timeout_ms;         /* no complete preface/TLS handshake by then: close */
    const struct kd_h2_limits *h2_limits;  /* HTTP/2 abuse limits (borrowed); NULL: core/h2.h's defaults */
    uint8_t response_compression; /* enum kd_compress_alg: 0 identity; gzip for callers accepting it */
    bool websocket;               /* also HTTP/2 inside WebSocket (core/ws.h), by first bytes */
    bool lean;                    /* kd_h2_opts.lean: memory before CPU (agent connections) */
    /* A connection of this listener closed; `user` is what kd_grpc_conn_set_user stored (or NULL).
     * Runs on the connection's shard after every call on it has ended. */
    void (*on_conn_close)(struct kd_shard *s, void *user);
};

/* Fill defaults into the zero fields of cfg. */
void kd_grpc_server_cfg_defaults(struct kd_grpc_server_cfg *cfg);

/* The connection ops of a gRPC listener; its kd_server_listener.cfg must be a kd_grpc_server_cfg. */
extern const struct kd_conn_ops kd_grpc_server_ops;

/* The standard grpc.health.v1.Health/Check method (answers SERVING for "" and "kasd"). */
extern const struct kd_grpc_method kd_grpc_health_method;

/* --- calls (server and client) --- */
void kd_grpc_accept(kd_grpc_call *call, const struct kd_h2_handler *handler, void *user);
int kd_grpc_send_headers(kd_grpc_call *call, const struct kd_h2_header *md, size_t n);
int kd_grpc_send_message(kd_grpc_call *call, const uint8_t *data, size_t len);
int kd_grpc_finish(kd_grpc_call *call, int status, const char *message, const struct kd_h2_header *md,
                   size_t n);
int kd_grpc_close_send(kd_grpc_call *call);
void kd_grpc_cancel(kd_grpc_call *call, int status, const char *message);
void kd_grpc_hold_input(kd_grpc_call *call, bool hold);
/* Server: a marked call ends with status OK as soon as its connection sends GOAWAY (max
 * connection age, shutdown) instead of running into the grace period: its on_done runs then, as
 * for any end. For calls that hold nothing in flight — an idle reverse tunnel, a long-lived watch
 * stream — so the client reopens them on its next connection first (grpc-go never moves streams).
 * Marking a call on a connection that has sent GOAWAY already ends it within this loop turn (not
 * inside the caller's callback). Unmark before the call carries work that must finish. */
void kd_grpc_call_set_end_on_goaway(kd_grpc_call *call, bool on);
/* The connection a call lives on. */
struct kd_conn *kd_grpc_call_conn(const kd_grpc_call *call);

/* Per-connection service state (e.g. which agent the connection belongs to). Moves with the
 * connection in a hand-off. */
void *kd_grpc_conn_user(const kd_grpc_call *call);
void kd_grpc_conn_set_user(kd_grpc_call *call, void *user);

/* Move the call's connection to shard `to` and start this call again there: the call is parked
 * (its messages, half-close and cancellation are recorded, input is held), the connection is
 * handed off at the next quiescent point, and on the new shard the method's start() runs again
 * for every parked call, followed by the recorded events. Returns 0 (the caller's start() then
 * returns 0 without touching the call again) or -EINVAL (already moving, or to is out of range:
 * the call is left as it was). Other calls already running on the connection keep running until
 * the move; new calls arriving meanwhile are parked too. */
int kd_grpc_call_move(kd_grpc_call *call, unsigned to);
unsigned kd_grpc_call_shard(const kd_grpc_call *call);

/* Suspend a call from inside its method's start() while its service waits for something (an agent
 * token resolved by GitLab): the call is parked like a moving one (messages, half-close and
 * cancellation recorded, input held) until kd_grpc_call_resume() runs start() again and replays.
 * gone(ud) is called (on this shard) if the call ends meanwhile, or its connection is handed to
 * another shard (where start() runs again); after it the service must forget the call. 0 (the
 * caller's start() returns 0), -EINVAL (not inside start()) or -ENOMEM. */
int kd_grpc_call_suspend(kd_grpc_call *call, void (*gone)(void *ud), void *ud);
/* Start a suspended call again, on this shard. false if it is not suspended here (any more). */
bool kd_grpc_call_resume(kd_grpc_call *call);

/* --- client channels --- */
struct kd_grpc_channel;

struct kd_grpc_channel_opts {
    const struct sockaddr *addr;
    socklen_t addrlen;
    const char *authority;   /* :authority, e.g. "127.0.0.1:8153" */
    struct kd_tls_ctx *tls;  /* NULL: h2c */
    const char *server_name; /* TLS: SNI and verified name */
    uint32_t max_message;    /* default 4 MiB */
    uint8_t compression; /* enum kd_compress_alg: every call sends grpc-encoding and compressed messages */
    /* 0: off. Not connected within connect_timeout_ms, or a keepalive PING (sent after keepalive_ms
     * without receiving anything) unanswered for keepalive_timeout_ms: the channel fails and its
     * calls end UNAVAILABLE, instead of waiting for TCP to give up (a blackholed peer). */
    uint32_t connect_timeout_ms, keepalive_ms, keepalive_timeout_ms;
};

/* Open a connection from shard s. Calls may start at once; they go out once connected, or end
 * with UNAVAILABLE naming the address and the reason. NULL when no connection slot is free. */
struct kd_grpc_channel *kd_grpc_channel_open(struct kd_shard *s, const struct kd_grpc_channel_opts *o);
/* Start a call. md: extra metadata. timeout_us 0 = none. NULL when the channel is closed. */
kd_grpc_call *kd_grpc_channel_call(struct kd_grpc_channel *ch, const char *path,
                                   const struct kd_h2_header *md, size_t nmd, uint64_t timeout_us,
                                   const struct kd_h2_handler *handler, void *user);
/* false once the channel failed, got GOAWAY or was closed: open a new one for new calls. */
bool kd_grpc_channel_usable(const struct kd_grpc_channel *ch);
/* Close the channel: live calls end with UNAVAILABLE; the struct is freed once closed. */
void kd_grpc_channel_close(struct kd_grpc_channel *ch);

/* HealthCheckRequest { string service = 1; }: the service name (the last one; "" when absent), or
 * NULL when the message is malformed. Exposed for test/fuzz/request_fuzz.c. */
const uint8_t *kd_grpc_health_service(const uint8_t *p, size_t len, size_t *slen);

#endif

/* h2.h — gRPC over one HTTP/2 connection, server or client side, driven from memory buffers.
 * This module is the only one that knows nghttp2 (core/h2.c); nothing of nghttp2 shows here.
 * Concurrency: a kd_h2 and its calls belong to the thread that owns the connection (they move
 * with it in a hand-off). No locks.
 * Ownership: the session owns its calls; a call lives from its start until its handler's
 * on_done returns (then it is freed: the handler must drop its pointer there). Message bytes
 * given to callbacks are borrowed for the call; bytes given to send functions are copied.
 *
 * Server side: on_call(call) runs when a request's headers are complete. It returns 0 after
 * setting a handler (kd_h2_call_set_handler), or a gRPC status > 0 to answer at once with a
 * trailers-only response. Unknown paths are the caller's business (it returns UNIMPLEMENTED).
 *
 * Flow control: inbound bytes are acknowledged (WINDOW_UPDATE) once the handler's on_message has
 * returned, unless the handler holds input (kd_h2_call_hold_input) — a relay holds input while
 * its other side is congested, so the peer stops at its window. Outbound, kd_h2_call_send_message
 * returns 1 once the call's queued bytes pass KD_H2_CALL_HIGH_WATER: the handler should stop
 * producing until on_writable.
 */
#ifndef KD_CORE_H2_H
#define KD_CORE_H2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kd_h2;
struct kd_h2_call;

#define KD_H2_CALL_HIGH_WATER (256u << 10)

struct kd_h2_header {
    const char *name;
    size_t namelen;
    const char *value;
    size_t valuelen;
};

struct kd_h2_handler {
    /* Client: the response headers arrived (metadata via kd_h2_call_header). */
    int (*on_headers)(struct kd_h2_call *c);
    /* One whole message. <0: the call fails (server: INTERNAL, client: cancelled). */
    int (*on_message)(struct kd_h2_call *c, const uint8_t *msg, size_t len);
    /* Server: the client half-closed (no more messages). */
    void (*on_half_close)(struct kd_h2_call *c);
    /* Queued output drained below the low-water mark after send_message returned 1. */
    void (*on_writable)(struct kd_h2_call *c);
    /* Final. Server: the call ended; status is what was sent, or CANCELLED (peer reset),
     * DEADLINE_EXCEEDED (deadline passed: the session already answered), UNAVAILABLE (connection
     * gone). Client: the call's status from trailers, or a local one (UNAVAILABLE when the
     * connection failed, CANCELLED, DEADLINE_EXCEEDED, INTERNAL on a protocol error). The call is
     * freed when this returns. */
    void (*on_done)(struct kd_h2_call *c, int status, const char *message);
};

/* What a peer did that the session refused or ended the connection for (kd_h2_opts.on_abuse). A
 * small fixed set: metrics label them by kd_h2_abuse_name. Connection-ending reasons are reported
 * once per connection; header_overflow and hpack once per refused request. */
enum kd_h2_abuse {
    KD_H2_ABUSE_RAPID_RESET,     /* server: streams reset faster than the reset budget (GOAWAY
                                  * ENHANCE_YOUR_CALM; CVE-2023-44487) */
    KD_H2_ABUSE_PING_FLOOD,      /* server: pings past the strikes (GOAWAY too_many_pings), or PING
                                  * ACKs piling up unread */
    KD_H2_ABUSE_SETTINGS_FLOOD,  /* SETTINGS frames faster than the settings budget (GOAWAY
                                  * ENHANCE_YOUR_CALM), ACKs piling up unread, too many entries */
    KD_H2_ABUSE_HEADER_OVERFLOW, /* server: request headers over max_header_list or the budget
                                  * (the call gets RESOURCE_EXHAUSTED) */
    KD_H2_ABUSE_HPACK,           /* a refused header block that decoded to > 32x its wire size (an
                                  * HPACK bomb), or an HPACK decoding error (GOAWAY COMPRESSION_ERROR) */
    KD_H2_ABUSE_PROTOCOL_ERROR,  /* any other connection error (nghttp2's GOAWAY, not HTTP/2) */
    KD_H2_ABUSE_COUNT
};
const char *kd_h2_abuse_name(enum kd_h2_abuse reason);

/* The abuse limits of a session (kd_h2_opts.limits; kasd's limits.h2_* configuration keys). Past
 * any of them the connection gets GOAWAY ENHANCE_YOUR_CALM and on_abuse. A budget is a token
 * bucket: `burst` at most, `rate` regained per second. */
struct kd_h2_limits {
    /* Server: client RST_STREAMs (as nghttp2's default stream reset limit; its own limit is set to
     * twice these as a backstop). */
    uint32_t reset_burst, reset_rate;
    /* SETTINGS frames (not ACKs), either side. Clients send one or two. */
    uint32_t settings_burst, settings_rate;
    /* Server, with ping_min_interval_ms: client PINGs closer than that tolerated (strikes; reset
     * whenever we send headers or data, as grpc-go); one more and the connection ends. */
    uint32_t ping_strikes;
};
#define KD_H2_RESET_BURST    1000
#define KD_H2_RESET_RATE     33
#define KD_H2_SETTINGS_BURST 100
#define KD_H2_SETTINGS_RATE  10
#define KD_H2_PING_STRIKES   2

struct kd_h2_opts {
    bool server;
    uint32_t max_message; /* bytes; larger messages fail with RESOURCE_EXHAUSTED */
    /* The configuration key behind max_message, appended to that refusal so an operator knows what
     * to raise (NULL: grpc-go's wording alone). */
    const char *max_message_key;
    uint32_t max_concurrent_streams; /* server: advertised SETTINGS_MAX_CONCURRENT_STREAMS */
    uint32_t max_header_list;        /* bytes of header names+values accepted per block */
    /* Header bytes (as max_header_list counts them) all live calls of the connection may hold
     * together; 0: 2 x max_header_list + 4 KiB per concurrent stream. A request over either limit
     * is answered RESOURCE_EXHAUSTED (server) without being stored. */
    uint32_t header_budget;
    uint32_t initial_window;       /* per-stream receive window */
    uint32_t ping_min_interval_ms; /* server: pings closer than this are strikes; 0 = no policy */
    /* enum kd_compress_alg (core/compress.h); 0 = identity. Server: compress response messages with
     * it for callers whose grpc-accept-encoding lists it. Client: every call sends grpc-encoding and
     * compresses every non-empty message. Inbound, gzip and deflate are always accepted (the flag
     * with identity is INTERNAL, other encodings UNIMPLEMENTED) and handlers see inflated bytes;
     * max_message bounds both the wire size and the inflated size (RESOURCE_EXHAUSTED). */
    uint8_t send_compression;
    /* Memory before CPU, for connections that hold long-lived idle streams and carry few calls each
     * (agents): the header blocks we send use no HPACK dynamic table (every header a literal or a
     * static-table reference; what the peer sends is decoded with its table as usual), and a
     * server's request headers are moved into one block of their exact size once complete. About
     * 1.1 + 0.8 KiB less per idle agent's connection; about 25 bytes and one small allocation more
     * per call. */
    bool lean;
    /* The abuse limits (copied); NULL: the KD_H2_* defaults above. */
    const struct kd_h2_limits *limits;
    /* Server: a new call. */
    int (*on_call)(void *ud, struct kd_h2_call *c);
    /* Either side: the peer sent GOAWAY (client: stop using this session for new calls). */
    void (*on_goaway)(void *ud, uint32_t error_code);
    /* Either side, optional: the peer abused the protocol (see enum kd_h2_abuse); detail names it
     * for the log. Runs inside kd_h2_recv or kd_h2_send: count and log, nothing else. */
    void (*on_abuse)(void *ud, enum kd_h2_abuse reason, const char *detail);
    void *ud;
};

struct kd_h2 *kd_h2_new(const struct kd_h2_opts *o);
/* Ends every live call (on_done with UNAVAILABLE "connection closed") and frees the session. */
void kd_h2_free(struct kd_h2 *h);

/* The opts.ud given at creation. */
void *kd_h2_ud(const struct kd_h2 *h);
/* End every live call now with status/message (on_done), e.g. "connect 10.0.0.1:8155: refused". */
void kd_h2_abort(struct kd_h2 *h, int status, const char *message);

/* Bytes from the peer. 0, or negative errno when the connection must be closed (after the
 * GOAWAY that kd_h2_send still produces). err names the cause for the log. */
int kd_h2_recv(struct kd_h2 *h, const uint8_t *data, size_t len, const char **err);

/* Produce pending output: write(ud, data, len) is called for each piece until nothing is left;
 * it returns 0 to go on, 1 to stop for now (the socket is behind: call again later), or <0 on an
 * error (returned). */
typedef int (*kd_h2_write_fn)(void *ud, const uint8_t *data, size_t len);
int kd_h2_send(struct kd_h2 *h, kd_h2_write_fn write, void *ud);
/* true when the session has nothing more to do (peer and we are done, e.g. after GOAWAY). */
bool kd_h2_finished(const struct kd_h2 *h);
bool kd_h2_want_write(const struct kd_h2 *h);
/* The connection has been quiet for a while: give the pages of nghttp2's output frame buffer back to
 * the kernel (they hold no live bytes between two kd_h2_send calls; the next frame faults a zeroed
 * page back in). A no-op while output is pending. Returns the bytes given back, 0 if none. */
size_t kd_h2_shed(struct kd_h2 *h);

/* Graceful (error_code 0): GOAWAY announcing no new streams; calls in flight carry on. Sent once per
 * connection: later calls are no-ops. A GOAWAY with an error is final: at most one follows the
 * graceful one (ours or nghttp2's for a connection error), never more. */
void kd_h2_goaway(struct kd_h2 *h, uint32_t error_code, const char *debug);
/* Send a keepalive PING unless one is outstanding (sent, its ACK not received). */
void kd_h2_ping(struct kd_h2 *h);
/* When (now_us clock, microseconds) the outstanding keepalive PING was sent; 0 when none is
 * (never sent, or its ACK arrived). The peer's own pings are acknowledged by nghttp2 and play no
 * part here. */
uint64_t kd_h2_ping_outstanding_since(const struct kd_h2 *h);
/* Fail calls whose deadline is <= now_us (server: DEADLINE_EXCEEDED to the client; client: RST
 * and on_done DEADLINE_EXCEEDED). Returns the next deadline, or UINT64_MAX. The answer may be
 * earlier than the true next deadline (never later) when the call that had it ended: calling again
 * at that time finds nothing due and returns the exact one. Cheap while nothing is due: it does not
 * walk the calls then. */
uint64_t kd_h2_expire(struct kd_h2 *h, uint64_t now_us);
size_t kd_h2_live_calls(const struct kd_h2 *h);
/* Counters for metrics and tests. */
struct kd_h2_counters {
    uint64_t calls_started, pings_received, ping_strikes;
    uint64_t pings_sent, ping_acks; /* our keepalive PINGs and the ACKs they got */
    uint64_t headers_refused;       /* requests over max_header_list or header_budget */
    uint64_t goaways_sent;          /* GOAWAY frames written (ours and nghttp2's) */
    uint64_t last_ping_ack_us;      /* when the last ACK arrived (0: never) */
};
const struct kd_h2_counters *kd_h2_counters(const struct kd_h2 *h);

/* Client: start a call. md: metadata (lower-case names, "-bin" values already base64). timeout_us
 * 0 = none; otherwise sent as grpc-timeout and enforced by kd_h2_expire from now_us. */
struct kd_h2_call *kd_h2_call_start(struct kd_h2 *h, const char *path, const char *authority,
                                    const struct kd_h2_header *md, size_t nmd, uint64_t now_us,
                                    uint64_t timeout_us, const struct kd_h2_handler *handler, void *user);

/* Either side. */
void kd_h2_call_set_handler(struct kd_h2_call *c, const struct kd_h2_handler *handler, void *user);
void *kd_h2_call_user(const struct kd_h2_call *c);
const struct kd_h2_handler *kd_h2_call_handler(const struct kd_h2_call *c);
struct kd_h2 *kd_h2_call_session(const struct kd_h2_call *c);
const char *kd_h2_call_path(const struct kd_h2_call *c);
/* Request (server) or response (client) headers, i-th entry; false past the end. Pseudo-headers
 * and HTTP/2 connection headers are included as received; the caller filters. */
bool kd_h2_call_header(const struct kd_h2_call *c, size_t i, struct kd_h2_header *out);
/* First value of a header by name (exact, lower-case), or NULL. */
const char *kd_h2_call_header_value(const struct kd_h2_call *c, const char *name, size_t *len);
/* Trailers received (client), i-th entry. */
bool kd_h2_call_trailer(const struct kd_h2_call *c, size_t i, struct kd_h2_header *out);
/* Absolute deadline (same clock as now_us given to the session), or 0 when none. */
uint64_t kd_h2_call_deadline(const struct kd_h2_call *c);
/* Server: response headers (":status 200", content-type added here) plus md. Optional: the first
 * message or finish sends them if not sent. */
int kd_h2_call_send_headers(struct kd_h2_call *c, const struct kd_h2_header *md, size_t n);
/* Queue one message (framed here). 0, 1 (over the high-water mark: pause), or negative errno
 * (-EPIPE when the call is over). */
int kd_h2_call_send_message(struct kd_h2_call *c, const uint8_t *data, size_t len);
/* Server: end the call with a status (trailers; trailers-only if nothing was sent). */
int kd_h2_call_finish(struct kd_h2_call *c, int status, const char *message, const struct kd_h2_header *md,
                      size_t n);
/* Client: half-close (END_STREAM after queued messages). */
int kd_h2_call_close_send(struct kd_h2_call *c);
/* Either side: abort with RST_STREAM(CANCEL); on_done(status, message) follows at once. */
void kd_h2_call_cancel(struct kd_h2_call *c, int status, const char *message);
/* Server: mark (true) or unmark the call to end when the connection goes away: kd_h2_end_marked
 * finishes it with OK. For calls that hold nothing the client waits for (an idle tunnel, a
 * long-lived watch), so the client reopens them on a new connection at once instead of losing
 * them at the end of the grace period. */
void kd_h2_call_set_end_on_goaway(struct kd_h2_call *c, bool on);
/* Server: finish every marked live call with OK and run its on_done now (trailers go out with the
 * next kd_h2_send). Must not run inside a handler callback of this session. Returns how many. */
size_t kd_h2_end_marked(struct kd_h2 *h);
/* Stop (true) or resume (false) acknowledging inbound bytes for this call. */
void kd_h2_call_hold_input(struct kd_h2_call *c, bool hold);
size_t kd_h2_call_queued(const struct kd_h2_call *c);

#endif

/* grpc.c — see grpc.h. One struct gconn per connection, server or client, owning the HTTP/2
 * session, the optional TLS state, the optional WebSocket state (agent listener: agentk's ws:// and
 * wss:// addresses) and two shard-local timers (call deadlines; housekeeping: handshake timeout,
 * idle keepalive ping, max connection age).
 *
 * Byte path of a server connection ("wire" says which way the plaintext goes):
 *
 *   recv ─> [TLS] ─> wire_in ─┬─ SNIFF: first byte 'G' (and no ALPN h2) ─> WS_HEAD, else ─> H2
 *                             ├─ H2 ─────────────────────────────────────────────> h2_in (nghttp2)
 *                             ├─ WS_HEAD: kd_ws_handshake ─> 101 (or 4xx and finish) ─> WS
 *                             └─ WS: kd_ws_decode ─ binary payload ─> h2_in; ping ─> pong
 *   on_flush: kd_h2_send ─> H2: write_out ─> [TLS] ─> kd_conn_write
 *                          WS: ws_write_out: staged into binary frames of <= 16 KiB ─> [TLS] ─> ...
 *
 * While SNIFF or WS_HEAD nothing of HTTP/2 is sent: a WebSocket client must see the 101 first. */
#include "shards/grpc.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "core/log.h"
#include "core/tls.h"
#include "core/ws.h"
#include "shards/conn.h"
#include "shards/shard.h"

#define DEFAULT_MAX_MESSAGE    (4u << 20)
#define TLS_READ_CHUNK         16384
#define H2_PREFACE_LEN         24
#define NGHTTP2_NO_ERROR_CODE  0
#define ENHANCE_YOUR_CALM_CODE 0xb
/* Payload per outbound WebSocket frame: far below agentk's 10 MiB message read limit, and small
 * enough to stage on the stack. */
#define WS_OUT_FRAME 16384

/* How plaintext bytes of a connection are read (see the picture at the top). */
enum wire {
    WIRE_H2 = 0,  /* HTTP/2 directly (clients; listeners without WebSocket) */
    WIRE_SNIFF,   /* nothing received yet: the first byte decides */
    WIRE_WS_HEAD, /* reading the HTTP/1.1 upgrade request */
    WIRE_WS,      /* HTTP/2 inside binary WebSocket frames */
};

/* A call waiting for its connection to reach the owner shard (kd_grpc_call_move). */
struct parked_msg {
    struct parked_msg *next;
    size_t len;
    uint8_t data[];
};

struct parked {
    struct parked *next;
    kd_grpc_call *call;
    const struct kd_grpc_method *m;
    struct parked_msg *head, *tail;
    bool half_closed;
    /* suspended by its service (kd_grpc_call_suspend): told when the call ends or leaves the shard */
    void (*gone)(void *ud);
    void *gone_ud;
};

#define PARKED_BYTES_MAX (1u << 20)

struct gconn {
    struct kd_conn *c; /* NULL once the connection is closed (client: channel kept for its user) */
    struct kd_h2 *h;
    struct kd_tls *tls;
    const struct kd_grpc_server_cfg *cfg; /* server */
    bool server;
    bool handshake_ok; /* TLS done (if any) and the HTTP/2 preface seen (client: the server's first bytes) */
    bool goaway_sent;
    bool end_marked_due; /* a call was marked after GOAWAY: end it in the next flush */
    bool usable;         /* client: may start calls */
    bool user_ref;       /* client: the channel's user still holds it */
    bool tls_alpn_checked;
    uint8_t abuse_logged; /* bit per enum kd_h2_abuse: logged once per connection */
    uint64_t bytes_in;
    uint64_t opened_ms;
    uint64_t last_rx_ms;
    /* House-keeping of either side (server: the listener's; client: the channel's options; 0: off):
     * no handshake by opened_ms + handshake_ms, or a PING unanswered for keepalive_timeout_ms,
     * closes the connection; keepalive_ms without receiving anything sends that PING. */
    uint32_t handshake_ms, keepalive_ms, keepalive_timeout_ms;
    uint64_t age_goaway_at; /* 0: none */
    uint64_t age_close_at;  /* 0: not yet */
    struct kd_timer deadline_timer;
    struct kd_timer house_timer;
    char authority[80];
    char peer[64];
    uint32_t max_message;
    void *user;            /* service state: kd_grpc_conn_user */
    int moving_to;         /* -1, or the shard this connection is being handed to */
    struct parked *parked; /* calls to start again after the move */
    size_t parked_bytes;
    const struct kd_grpc_method *starting; /* the method whose start() is running */
    /* WebSocket. The decoder is plain memory inside the gconn, so a partial frame (header bytes,
     * mask phase, control payload) travels with the connection in a hand-off. */
    uint8_t wire;                  /* enum wire */
    bool ws_closing;               /* a close frame or an HTTP error answer is out: no more frames */
    struct kd_ws_handshake *ws_hs; /* WIRE_WS_HEAD only */
    struct kd_ws_decoder ws;       /* WIRE_WS */
};

static uint64_t now_us(void)
{
    return kd_clock_ns() / 1000u;
}

void kd_grpc_server_cfg_defaults(struct kd_grpc_server_cfg *cfg)
{
    if (cfg->max_message == 0)
        cfg->max_message = DEFAULT_MAX_MESSAGE;
    if (cfg->max_concurrent_streams == 0)
        cfg->max_concurrent_streams = 500;
    if (cfg->max_header_list == 0)
        cfg->max_header_list = 1u << 20;
    if (cfg->keepalive_ms == 0)
        cfg->keepalive_ms = 50000;
    if (cfg->keepalive_timeout_ms == 0)
        cfg->keepalive_timeout_ms = 20000; /* grpc-go's server default */
    if (cfg->ping_min_interval_ms == 0)
        cfg->ping_min_interval_ms = 20000;
    if (cfg->handshake_timeout_ms == 0)
        cfg->handshake_timeout_ms = 10000;
    if (cfg->max_connection_age_ms != 0 && cfg->max_connection_age_grace_ms == 0)
        cfg->max_connection_age_grace_ms = 60000;
}

static struct gconn *call_gconn(const kd_grpc_call *call)
{
    return kd_h2_ud(kd_h2_call_session(call));
}

struct kd_conn *kd_grpc_call_conn(const kd_grpc_call *call)
{
    return call_gconn(call)->c;
}

static void want_flush(struct gconn *g)
{
    if (g->c != NULL)
        kd_conn_want_flush(g->c);
}

/* ---- timers ---- */

static void arm_deadline(struct gconn *g)
{
    if (g->c == NULL || g->h == NULL)
        return;
    struct kd_shard *s = kd_conn_shard(g->c);
    uint64_t next = kd_h2_expire(g->h, now_us());
    if (next == UINT64_MAX) {
        kd_timerwheel_cancel(kd_shard_timers(s), &g->deadline_timer);
        return;
    }
    uint64_t ms = (next + 999) / 1000;
    if (!kd_timer_is_armed(&g->deadline_timer) || g->deadline_timer.expire_ms != ms)
        kd_timerwheel_add(kd_shard_timers(s), &g->deadline_timer, ms);
}

static void deadline_cb(struct kd_timer *t)
{
    struct gconn *g = KD_CONTAINER_OF(t, struct gconn, deadline_timer);
    arm_deadline(g); /* expires what is due, re-arms for the next */
    want_flush(g);
}

static void arm_house(struct gconn *g)
{
    if (g->c == NULL)
        return;
    struct kd_shard *s = kd_conn_shard(g->c);
    uint64_t next = UINT64_MAX;
    uint64_t ping_us = g->h != NULL ? kd_h2_ping_outstanding_since(g->h) : 0;
    if (!g->handshake_ok) {
        if (g->handshake_ms)
            next = g->opened_ms + g->handshake_ms;
    } else if (ping_us != 0) {
        if (g->keepalive_timeout_ms)
            next = ping_us / 1000 + g->keepalive_timeout_ms;
    } else if (g->keepalive_ms) {
        next = g->last_rx_ms + g->keepalive_ms;
    }
    if (g->age_close_at != 0 && g->age_close_at < next)
        next = g->age_close_at;
    else if (g->age_goaway_at != 0 && g->age_close_at == 0 && g->age_goaway_at < next)
        next = g->age_goaway_at;
    if (next == UINT64_MAX)
        kd_timerwheel_cancel(kd_shard_timers(s), &g->house_timer);
    else
        kd_timerwheel_add(kd_shard_timers(s), &g->house_timer, next);
}

/* This server connection's listener counters on the shard that has it now (NULL for clients). */
static struct kd_listener_stats *lstats(struct gconn *g)
{
    if (!g->server || g->c == NULL || g->c->listener >= KD_MAX_LISTENERS)
        return NULL;
    return &kd_conn_shard(g->c)->stats.listener[g->c->listener];
}

static void count(struct gconn *g, size_t field)
{
    struct kd_listener_stats *ls = lstats(g);
    if (ls != NULL)
        kd_stat_inc((kd_stat *)((char *)ls + field));
}
#define COUNT(g, f) count(g, offsetof(struct kd_listener_stats, f))

static void log_conn(struct gconn *g, enum kd_log_level lvl, const char *event, const char *why)
{
    struct kd_logline l;
    kd_log_begin(&l, lvl, event);
    if (g->server)
        kd_log_str(&l, "listener", g->cfg->name);
    else
        kd_log_str(&l, "target", g->authority);
    if (g->peer[0])
        kd_log_str(&l, "peer", g->peer);
    if (why)
        kd_log_str(&l, "reason", why);
    kd_log_end(&l);
}

/* Counted every time, logged once per connection and reason: a flood must not become a flood of
 * log lines. */
static void on_abuse(void *ud, enum kd_h2_abuse reason, const char *detail)
{
    struct gconn *g = ud;
    struct kd_listener_stats *ls = lstats(g);
    if (ls != NULL && (unsigned)reason < KD_H2_ABUSE_COUNT)
        kd_stat_inc(&ls->http2_abuse[reason]);
    if (g->abuse_logged & (1u << reason))
        return;
    g->abuse_logged |= (uint8_t)(1u << reason);
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_WARN, "http2_abuse");
    if (g->server)
        kd_log_str(&l, "listener", g->cfg->name);
    else
        kd_log_str(&l, "target", g->authority);
    if (g->peer[0])
        kd_log_str(&l, "peer", g->peer);
    kd_log_str(&l, "reason", kd_h2_abuse_name(reason));
    if (detail)
        kd_log_str(&l, "detail", detail);
    kd_log_end(&l);
}

/* GOAWAY (no new streams; calls in flight carry on), and the calls marked to end at GOAWAY end
 * now, after it in the byte stream: the client has seen the GOAWAY by the time they end, so it
 * opens their replacements on a new connection. Not for use inside a handler callback. */
static void send_goaway(struct gconn *g, const char *debug)
{
    kd_h2_goaway(g->h, NGHTTP2_NO_ERROR_CODE, debug);
    g->goaway_sent = true;
    g->end_marked_due = false;
    kd_h2_end_marked(g->h);
    want_flush(g);
}

void kd_grpc_call_set_end_on_goaway(kd_grpc_call *call, bool on)
{
    struct gconn *g = call_gconn(call);
    kd_h2_call_set_end_on_goaway(call, on);
    if (on && g->goaway_sent && g->server) {
        g->end_marked_due = true; /* on_flush ends it, outside the caller's callback */
        want_flush(g);
    }
}

static void house_cb(struct kd_timer *t)
{
    struct gconn *g = KD_CONTAINER_OF(t, struct gconn, house_timer);
    struct kd_shard *s = kd_conn_shard(g->c);
    uint64_t now = kd_shard_now_ms(s);
    if (!g->handshake_ok) {
        if (g->handshake_ms == 0 || now < g->opened_ms + g->handshake_ms) {
            arm_house(g);
            return;
        }
        if (!g->server) {
            char msg[200];
            snprintf(msg, sizeof(msg), "connect %s: no %s answer within %u ms", g->authority,
                     g->tls ? "TLS and HTTP/2" : "HTTP/2", g->handshake_ms);
            g->usable = false;
            kd_h2_abort(g->h, KD_GRPC_UNAVAILABLE, msg); /* its calls end now, not when TCP gives up */
            log_conn(g, KD_LOG_INFO, "connect_timeout", msg);
        } else {
            log_conn(g, KD_LOG_INFO, "handshake_timeout",
                     g->tls ? "TLS handshake or HTTP/2 preface not complete in time"
                            : "HTTP/2 preface not received in time");
        }
        kd_conn_close(g->c, -ETIMEDOUT);
        return;
    }
    if (g->age_close_at != 0 && now >= g->age_close_at) {
        log_conn(g, KD_LOG_INFO, "max_connection_age_close", "grace period over");
        kd_conn_close(g->c, 0);
        return;
    }
    uint64_t ping_us = kd_h2_ping_outstanding_since(g->h);
    if (ping_us != 0 && g->keepalive_timeout_ms && now >= ping_us / 1000 + g->keepalive_timeout_ms) {
        /* A peer that is gone without a FIN or RST (host down, NAT entry dropped) answers nothing;
         * without this its connection and calls would stay until TCP gives up, if ever. */
        char why[96];
        snprintf(why, sizeof(why), "keepalive PING not answered within %u ms", g->keepalive_timeout_ms);
        COUNT(g, keepalive_timeouts);
        log_conn(g, KD_LOG_INFO, "keepalive_timeout", why);
        if (!g->server) {
            char msg[200];
            snprintf(msg, sizeof(msg), "%s: %s", g->authority, why);
            g->usable = false;
            kd_h2_abort(g->h, KD_GRPC_UNAVAILABLE, msg);
        }
        kd_conn_close(g->c, -ETIMEDOUT);
        return;
    }
    if (g->age_goaway_at != 0 && g->age_close_at == 0 && now >= g->age_goaway_at) {
        /* Ask the client to go elsewhere (it reconnects, possibly to another instance); calls in
         * flight get the grace period, calls marked to end at GOAWAY end now. */
        send_goaway(g, "max_age");
        g->age_close_at = now + g->cfg->max_connection_age_grace_ms;
    }
    /* Idle (nothing received for keepalive_ms): PING; its ACK, not just any byte, clears it. A
     * peer's own keepalive pings count as received bytes, so they postpone ours. */
    if (ping_us == 0 && g->keepalive_ms && now >= g->last_rx_ms + g->keepalive_ms)
        kd_h2_ping(g->h);
    want_flush(g);
    arm_house(g);
}

/* ---- byte paths ---- */

/* Bytes queued for the socket beyond which nghttp2 is not asked for more: a peer whose TCP
 * window is closed (a slow reader) holds at most this much here, whatever its HTTP/2 windows
 * allow; the rest waits in the calls' own queues, bounded by their flow control. */
#define OUT_HIGH (1u << 20)

static int write_out(void *ud, const uint8_t *data, size_t len)
{
    struct gconn *g = ud;
    int rc;
    if (g->tls == NULL) {
        rc = kd_conn_write(g->c, data, len);
        return rc < 0 ? rc : (g->c->out_bytes > OUT_HIGH ? 1 : 0);
    }
    rc = kd_tls_write(g->tls, data, len);
    return rc < 0 ? rc : (kd_tls_output_pending(g->tls) + g->c->out_bytes > OUT_HIGH ? 1 : 0);
}

static int drain_tls(struct gconn *g)
{
    uint8_t buf[16384];
    while (kd_tls_output_pending(g->tls) > 0) {
        size_t n = kd_tls_take_output(g->tls, buf, sizeof(buf));
        int rc = kd_conn_write(g->c, buf, n);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int h2_in(struct gconn *g, const uint8_t *data, size_t len)
{
    const char *err = NULL;
    if (g->goaway_sent && g->c->finish)
        return 0; /* closing after a protocol error (later TLS records of the same read) */
    if (!g->handshake_ok && g->bytes_in >= (g->server ? H2_PREFACE_LEN : 1) &&
        (g->tls == NULL || kd_tls_handshake_done(g->tls))) {
        g->handshake_ok = true;
        arm_house(g);
    }
    int rc = kd_h2_recv(g->h, data, len, &err);
    if (rc < 0) {
        if (g->abuse_logged == 0) /* else said already, with the reason */
            log_conn(g, KD_LOG_INFO, "http2_error", err);
        /* nghttp2 queued a GOAWAY: send it, then close. */
        g->goaway_sent = true;
        kd_conn_finish(g->c);
        return 0;
    }
    return 0;
}

/* Bytes for the peer that do not come from nghttp2 (the 101, pongs, close frames). */
static int out_raw(struct gconn *g, const void *data, size_t len)
{
    if (g->c == NULL)
        return -EPIPE;
    return g->tls != NULL ? kd_tls_write(g->tls, data, len) : kd_conn_write(g->c, data, len);
}

static int ws_payload(void *ud, const uint8_t *data, size_t len)
{
    struct gconn *g = ud;
    if (g->goaway_sent && g->c->finish)
        return 0; /* the HTTP/2 session failed: its GOAWAY is on the way, ignore the rest */
    g->bytes_in += len;
    return h2_in(g, data, len);
}

static int ws_ping(void *ud, const uint8_t *payload, size_t len)
{
    struct gconn *g = ud;
    uint8_t f[KD_WS_FRAME_HDR_MAX + 125];
    size_t h = kd_ws_frame_header(f, KD_WS_OP_PONG, true, len);
    memcpy(f + h, payload, len);
    return out_raw(g, f, h + len);
}

static const struct kd_ws_events ws_events = {.on_data = ws_payload, .on_ping = ws_ping};

/* Send our close frame (once) and close when it is out. */
static void ws_close(struct gconn *g, uint16_t code, const char *why)
{
    if (g->ws_closing)
        return;
    g->ws_closing = true;
    uint8_t f[KD_WS_CLOSE_FRAME_MAX];
    out_raw(g, f, kd_ws_close_frame(f, code, why));
    kd_conn_finish(g->c);
}

/* Plaintext bytes (after TLS, if any): HTTP/2 directly, or inside WebSocket. */
static void wire_in(struct gconn *g, const uint8_t *data, size_t len)
{
    if (len == 0)
        return;
    if (g->wire == WIRE_SNIFF) {
        /* HTTP/2's client preface starts "PRI * HTTP/2.0", a WebSocket upgrade "GET ": the first
         * byte tells them apart. A TLS client that negotiated ALPN h2 promised HTTP/2 (kas decides
         * by ALPN too), so its bytes go to nghttp2 whatever they are. */
        if (data[0] == 'G' && (g->tls == NULL || kd_tls_alpn(g->tls) == NULL)) {
            g->ws_hs = kd_ws_handshake_new(0);
            if (g->ws_hs == NULL) {
                kd_conn_close(g->c, -ENOMEM);
                return;
            }
            g->wire = WIRE_WS_HEAD;
        } else {
            g->wire = WIRE_H2;
            kd_conn_want_flush(g->c); /* our SETTINGS, held while sniffing */
        }
    }
    if (g->wire == WIRE_H2) {
        g->bytes_in += len;
        h2_in(g, data, len);
        return;
    }
    if (g->wire == WIRE_WS_HEAD) {
        if (g->ws_closing)
            return; /* refused: the answer is on its way, the rest is not read */
        size_t used;
        int st = kd_ws_handshake_feed(g->ws_hs, data, len, &used);
        if (st == 0)
            return;
        int rc = out_raw(g, g->ws_hs->resp, g->ws_hs->resp_len);
        if (st != 101 || rc < 0) {
            COUNT(g, ws_refused);
            log_conn(g, KD_LOG_INFO, "websocket_upgrade_refused", rc < 0 ? strerror(-rc) : g->ws_hs->reason);
            g->ws_closing = true;
            kd_conn_finish(g->c);
            return;
        }
        COUNT(g, ws_upgrades);
        kd_ws_handshake_free(g->ws_hs);
        g->ws_hs = NULL;
        kd_ws_decoder_init(&g->ws, 0);
        g->wire = WIRE_WS;
        kd_conn_want_flush(g->c); /* the 101, then our SETTINGS in the first binary frame */
        data += used;
        len -= used;
    }
    if (g->ws_closing || len == 0)
        return;
    int rc = kd_ws_decode(&g->ws, data, len, &ws_events, g);
    if (rc < 0) {
        kd_conn_close(g->c, rc);
    } else if (rc == 1) {
        if (!g->ws.peer_closed) {
            COUNT(g, ws_bad_frames);
            log_conn(g, KD_LOG_INFO, "websocket_bad_frame", g->ws.close_why);
        }
        /* A close from the peer is echoed with its code (RFC 6455 5.5.1). */
        ws_close(g, g->ws.close_code, g->ws.peer_closed ? NULL : g->ws.close_why);
    }
}

static int on_data(struct kd_conn *c, const uint8_t *data, size_t len)
{
    struct gconn *g = c->ctx;
    g->last_rx_ms = kd_shard_now_ms(kd_conn_shard(c));
    if (g->goaway_sent && c->finish)
        return 0; /* closing after a protocol error: ignore the rest */
    if (g->tls == NULL) {
        wire_in(g, data, len);
    } else {
        if (kd_tls_feed(g->tls, data, len) < 0)
            return -ENOMEM;
        uint8_t buf[TLS_READ_CHUNK];
        for (;;) {
            ssize_t n = kd_tls_read(g->tls, buf, sizeof(buf));
            if (n == 0)
                break;
            if (n < 0) {
                if (!g->tls_alpn_checked && !kd_tls_handshake_done(g->tls))
                    COUNT(g, tls_failures);
                if (n != -ECONNRESET)
                    log_conn(g, KD_LOG_INFO, g->handshake_ok ? "tls_error" : "tls_handshake_failed",
                             kd_tls_error(g->tls));
                drain_tls(g); /* an alert may be waiting */
                kd_conn_finish(c);
                return 0;
            }
            if (!g->tls_alpn_checked && kd_tls_handshake_done(g->tls)) {
                g->tls_alpn_checked = true;
                const char *alpn = kd_tls_alpn(g->tls);
                if (alpn != NULL && strcmp(alpn, "h2") != 0) {
                    COUNT(g, tls_failures);
                    log_conn(g, KD_LOG_INFO, "tls_handshake_failed", "ALPN protocol is not h2");
                    kd_conn_close(c, -EPROTO);
                    return 0;
                }
                COUNT(g, tls_handshakes);
            }
            wire_in(g, buf, (size_t)n);
            /* During a hand-off keep going: records already fed must be decrypted here (their
             * calls get parked), or they would wait on the new shard for the peer's next bytes. */
            if (c->state == KD_CONN_CLOSING)
                return 0;
        }
        if (!g->tls_alpn_checked && kd_tls_handshake_done(g->tls)) {
            g->tls_alpn_checked = true;
            COUNT(g, tls_handshakes);
        }
    }
    kd_conn_want_flush(c);
    return 0;
}

/* What nghttp2 produces on a WebSocket connection, staged into binary frames: one frame per
 * WS_OUT_FRAME bytes rather than one per HTTP/2 frame (nghttp2 hands them over one by one). */
struct ws_out {
    struct gconn *g;
    size_t len;
    uint8_t buf[WS_OUT_FRAME];
};

static int ws_out_frame(struct ws_out *o)
{
    if (o->len == 0)
        return 0;
    uint8_t h[KD_WS_FRAME_HDR_MAX];
    int rc = out_raw(o->g, h, kd_ws_frame_header(h, KD_WS_OP_BINARY, true, o->len));
    if (rc >= 0)
        rc = out_raw(o->g, o->buf, o->len);
    o->len = 0;
    return rc < 0 ? rc : 0;
}

static int ws_write_out(void *ud, const uint8_t *data, size_t len)
{
    struct ws_out *o = ud;
    while (len > 0) {
        size_t n = sizeof(o->buf) - o->len;
        if (n > len)
            n = len;
        memcpy(o->buf + o->len, data, n);
        o->len += n;
        data += n;
        len -= n;
        if (o->len == sizeof(o->buf)) {
            int rc = ws_out_frame(o);
            if (rc < 0)
                return rc;
        }
    }
    struct gconn *g = o->g;
    size_t queued = g->c->out_bytes + o->len + (g->tls ? kd_tls_output_pending(g->tls) : 0);
    return queued > OUT_HIGH ? 1 : 0;
}

/* Quiet for a second or two: the HTTP/2 session's output frame buffer holds nothing live. With
 * thousands of idle agents its resident page was about a fifth of kasd's memory per agent. */
static void on_quiet(struct kd_conn *c)
{
    struct gconn *g = c->ctx;
    if (g->h != NULL)
        kd_h2_shed(g->h);
}

static void on_flush(struct kd_conn *c)
{
    struct gconn *g = c->ctx;
    if (g->end_marked_due) {
        g->end_marked_due = false;
        kd_h2_end_marked(g->h);
    }
    int rc = 0;
    if (c->out_bytes > OUT_HIGH) {
        /* the peer reads slowly: wait for the queue to drain */
    } else if (g->wire == WIRE_H2) {
        rc = kd_h2_send(g->h, write_out, g);
    } else if (g->wire == WIRE_WS && !g->ws_closing) {
        struct ws_out o = {.g = g};
        rc = kd_h2_send(g->h, ws_write_out, &o);
        if (rc == 0)
            rc = ws_out_frame(&o);
        /* The session is over (GOAWAY sent, or a protocol error): end the WebSocket cleanly. */
        if (rc == 0 && (kd_h2_finished(g->h) || c->finish))
            ws_close(g, KD_WS_CLOSE_NORMAL, NULL);
    }
    /* SNIFF and WS_HEAD: no HTTP/2 yet; the TLS handshake or our HTTP answer may be waiting. */
    if (rc == 0 && g->tls != NULL)
        rc = drain_tls(g);
    if (rc < 0) {
        kd_conn_close(c, rc);
        return;
    }
    arm_deadline(g);
    if (kd_h2_finished(g->h))
        kd_conn_finish(c);
}

static void on_detach(struct kd_conn *c)
{
    struct gconn *g = c->ctx;
    struct kd_shard *s = kd_conn_shard(c);
    kd_timerwheel_cancel(kd_shard_timers(s), &g->deadline_timer);
    kd_timerwheel_cancel(kd_shard_timers(s), &g->house_timer);
}

/* Hand-off: the slot on the old shard is about to be freed; until the new shard adopts the
 * connection nothing may reach it through g->c. */
static void on_detach_server(struct kd_conn *c)
{
    struct gconn *g = c->ctx;
    on_detach(c);
    g->c = NULL;
}

static void free_gconn(struct gconn *g)
{
    kd_ws_handshake_free(g->ws_hs);
    g->ws_hs = NULL;
    kd_h2_free(g->h);
    g->h = NULL;
    if (g->tls)
        kd_tls_free(g->tls);
    g->tls = NULL;
    free(g);
}

static void on_close(struct kd_conn *c, int err)
{
    struct gconn *g = c->ctx;
    if (g == NULL)
        return;
    on_detach(c);
    if (kd_log_enabled(KD_LOG_DEBUG)) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_DEBUG, "connection_closed");
        kd_log_str(&l, "peer", g->peer);
        if (err < 0)
            kd_log_errno(&l, err);
        kd_log_end(&l);
    }
    /* Handlers that hear "connection closed" may still ask which connection and shard their
     * call is on: g->c stays valid (the closing connection, or the stand-in of a refused
     * adoption) until they are all done. Their writes are refused: the connection is closing. */
    g->c = c;
    g->usable = false;
    COUNT(g, closed);
    if (g->h != NULL) {
        kd_h2_free(g->h); /* every live call ends with UNAVAILABLE */
        g->h = NULL;
    }
    if (g->server && g->cfg->on_conn_close != NULL)
        g->cfg->on_conn_close(kd_conn_shard(c), g->user);
    g->user = NULL;
    c->ctx = NULL;
    g->c = NULL;
    if (g->user_ref)
        return; /* the channel's user frees it with kd_grpc_channel_close */
    free_gconn(g);
}

static void on_shutdown(struct kd_conn *c)
{
    struct gconn *g = c->ctx;
    if (g->wire == WIRE_SNIFF || g->wire == WIRE_WS_HEAD) {
        kd_conn_close(c, 0); /* no session yet: nothing to say goodbye in */
        return;
    }
    if (!g->goaway_sent)
        send_goaway(g, "server shutting down");
    else if (g->server)
        kd_h2_end_marked(g->h); /* after a max-age GOAWAY: calls marked since end now too */
    kd_conn_want_flush(c);
}

/* ---- server ---- */

static void peer_name(struct kd_conn *c, char *buf, size_t len)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char host[INET6_ADDRSTRLEN] = "?";
    buf[0] = '\0';
    if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) < 0)
        return;
    if (ss.ss_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof(host));
        snprintf(buf, len, "%s:%u", host, ntohs(((struct sockaddr_in *)&ss)->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof(host));
        snprintf(buf, len, "[%s]:%u", host, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    }
}

/* ---- parking calls across a connection hand-off ---- */

static struct parked *find_parked(struct gconn *g, kd_grpc_call *call, struct parked ***link)
{
    struct parked **pp = &g->parked;
    for (; *pp != NULL; pp = &(*pp)->next)
        if ((*pp)->call == call) {
            if (link)
                *link = pp;
            return *pp;
        }
    return NULL;
}

static void free_parked(struct gconn *g, struct parked *p)
{
    struct parked_msg *m = p->head;
    while (m != NULL) {
        struct parked_msg *n = m->next;
        g->parked_bytes -= m->len;
        free(m);
        m = n;
    }
    free(p);
}

static int park_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct gconn *g = call_gconn(call);
    struct parked *p = find_parked(g, call, NULL);
    if (p == NULL)
        return 0;
    if (g->parked_bytes + len > PARKED_BYTES_MAX) {
        kd_h2_call_cancel(call, KD_GRPC_RESOURCE_EXHAUSTED, "too much data before the call could start");
        return 0;
    }
    struct parked_msg *m = malloc(sizeof(*m) + len);
    if (m == NULL)
        return -ENOMEM;
    m->next = NULL;
    m->len = len;
    memcpy(m->data, msg, len);
    g->parked_bytes += len;
    if (p->tail)
        p->tail->next = m;
    else
        p->head = m;
    p->tail = m;
    return 0;
}

static void park_half_close(kd_grpc_call *call)
{
    struct parked *p = find_parked(call_gconn(call), call, NULL);
    if (p != NULL)
        p->half_closed = true;
}

static void park_done(kd_grpc_call *call, int status, const char *message)
{
    struct gconn *g = call_gconn(call);
    struct parked **link;
    struct parked *p = find_parked(g, call, &link);
    if (p != NULL) {
        *link = p->next;
        if (p->gone != NULL)
            p->gone(p->gone_ud);
        free_parked(g, p);
    }
}

static const struct kd_h2_handler park_handler = {
    .on_message = park_message, .on_half_close = park_half_close, .on_done = park_done};

static int park(struct gconn *g, kd_grpc_call *call, const struct kd_grpc_method *m)
{
    struct parked *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return KD_GRPC_RESOURCE_EXHAUSTED;
    p->call = call;
    p->m = m;
    p->next = g->parked;
    g->parked = p;
    kd_h2_call_set_handler(call, &park_handler, NULL);
    kd_h2_call_hold_input(call, true);
    return 0;
}

/* Start a parked call again (its method's start()), then replay what it received meanwhile. */
static void restart_parked(struct gconn *g, struct parked *p)
{
    kd_grpc_call *call = p->call;
    kd_h2_call_set_handler(call, NULL, NULL);
    g->starting = p->m;
    int rc = p->m->start(call, p->m->ud);
    g->starting = NULL;
    const struct kd_h2_handler *h = kd_h2_call_handler(call);
    if (h == &park_handler) {
        /* start() parked it again (suspended, or moving): what it received so far stays recorded,
         * ahead of anything that comes later, in its new record. */
        struct parked *np = find_parked(g, call, NULL);
        if (np != NULL && np != p) {
            np->head = p->head;
            np->tail = p->tail;
            np->half_closed = np->half_closed || p->half_closed;
            p->head = p->tail = NULL;
        }
    } else if (h == NULL) {
        /* rejected, or neither accepted nor answered: answer (a no-op if it already was) */
        kd_h2_call_finish(call, rc > 0 ? rc : KD_GRPC_INTERNAL, rc > 0 ? NULL : "call could not start", NULL,
                          0);
    } else {
        for (struct parked_msg *m = p->head; m != NULL && kd_h2_call_handler(call) == h; m = m->next)
            if (h->on_message && h->on_message(call, m->data, m->len) < 0)
                kd_h2_call_cancel(call, KD_GRPC_INTERNAL, "handler failed");
        if (p->half_closed && kd_h2_call_handler(call) == h && h->on_half_close)
            h->on_half_close(call);
        kd_h2_call_hold_input(call, false);
    }
    free_parked(g, p);
}

/* On the new shard: start every parked call again, then replay what it received meanwhile. */
static void unpark_all(struct gconn *g)
{
    struct parked *list = g->parked, *rev = NULL;
    g->parked = NULL;
    while (list != NULL) { /* oldest first */
        struct parked *n = list->next;
        list->next = rev;
        rev = list;
        list = n;
    }
    while (rev != NULL) {
        struct parked *p = rev;
        rev = p->next;
        restart_parked(g, p);
    }
    want_flush(g);
}

int kd_grpc_call_suspend(kd_grpc_call *call, void (*gone)(void *ud), void *ud)
{
    struct gconn *g = call_gconn(call);
    if (!g->server || g->starting == NULL || g->c == NULL)
        return -EINVAL;
    if (park(g, call, g->starting) != 0)
        return -ENOMEM;
    g->parked->gone = gone; /* park() put it first */
    g->parked->gone_ud = ud;
    return 0;
}

bool kd_grpc_call_resume(kd_grpc_call *call)
{
    struct gconn *g = call_gconn(call);
    struct parked **link;
    struct parked *p = find_parked(g, call, &link);
    if (p == NULL || g->moving_to >= 0)
        return false; /* a moving connection restarts its parked calls on the new shard */
    *link = p->next;
    restart_parked(g, p);
    want_flush(g);
    return true;
}

int kd_grpc_call_move(kd_grpc_call *call, unsigned to)
{
    struct gconn *g = call_gconn(call);
    if (!g->server || g->moving_to >= 0 || g->starting == NULL || g->c == NULL)
        return -EINVAL;
    if (to == kd_conn_shard_id(g->c))
        return -EINVAL;
    int rc = kd_conn_handoff(g->c, to);
    if (rc < 0)
        return rc;
    g->moving_to = (int)to;
    /* Calls suspended by their service here start again on the new shard: their owners on this
     * shard forget them now (their hooks are this shard's). */
    for (struct parked *p = g->parked; p != NULL; p = p->next)
        if (p->gone != NULL) {
            p->gone(p->gone_ud);
            p->gone = NULL;
        }
    return park(g, call, g->starting) == 0 ? 0 : -ENOMEM;
}

unsigned kd_grpc_call_shard(const kd_grpc_call *call)
{
    return kd_conn_shard_id(call_gconn(call)->c);
}

void *kd_grpc_conn_user(const kd_grpc_call *call)
{
    return call_gconn(call)->user;
}

void kd_grpc_conn_set_user(kd_grpc_call *call, void *user)
{
    call_gconn(call)->user = user;
}

static int server_on_call(void *ud, struct kd_h2_call *call)
{
    struct gconn *g = ud;
    COUNT(g, streams);
    const char *path = kd_h2_call_path(call);
    const struct kd_grpc_method *m = NULL;
    for (size_t i = 0; i < g->cfg->nmethods; i++) {
        if (strcmp(g->cfg->methods[i].path, path) == 0) {
            m = &g->cfg->methods[i];
            break;
        }
    }
    if (m == NULL)
        m = g->cfg->fallback;
    if (m == NULL) {
        char msg[300];
        snprintf(msg, sizeof(msg), "unknown method %.250s", path);
        kd_h2_call_finish(call, KD_GRPC_UNIMPLEMENTED, msg, NULL, 0);
        return 0;
    }
    if (g->moving_to >= 0)
        return park(g, call, m);
    g->starting = m;
    int rc = m->start(call, m->ud);
    g->starting = NULL;
    return rc;
}

static int server_open(struct kd_conn *c, bool adopted)
{
    struct gconn *g;
    struct kd_shard *s = kd_conn_shard(c);
    if (adopted) {
        g = c->ctx;
        g->c = c;
        kd_timer_init(&g->deadline_timer, deadline_cb);
        kd_timer_init(&g->house_timer, house_cb);
        g->moving_to = -1;
        arm_deadline(g);
        arm_house(g);
        unpark_all(g);
        kd_conn_want_flush(c);
        return 0;
    }
    const struct kd_grpc_server_cfg *cfg = kd_conn_listener_cfg(c);
    g = calloc(1, sizeof(*g));
    if (g == NULL)
        return -ENOMEM;
    g->c = c;
    g->cfg = cfg;
    g->server = true;
    g->moving_to = -1;
    g->wire = cfg->websocket ? WIRE_SNIFF : WIRE_H2;
    g->opened_ms = g->last_rx_ms = kd_shard_now_ms(s);
    g->handshake_ms = cfg->handshake_timeout_ms;
    g->keepalive_ms = cfg->keepalive_ms;
    g->keepalive_timeout_ms = cfg->keepalive_timeout_ms;
    g->max_message = cfg->max_message;
    kd_timer_init(&g->deadline_timer, deadline_cb);
    kd_timer_init(&g->house_timer, house_cb);
    peer_name(c, g->peer, sizeof(g->peer));
    struct kd_h2_opts o = {
        .server = true,
        .max_message = cfg->max_message,
        .max_message_key = cfg->max_message_key,
        .max_concurrent_streams = cfg->max_concurrent_streams,
        .max_header_list = cfg->max_header_list,
        .initial_window = 1u << 20,
        .ping_min_interval_ms = cfg->ping_min_interval_ms,
        .limits = cfg->h2_limits,
        .send_compression = cfg->response_compression,
        .lean = cfg->lean,
        .on_call = server_on_call,
        .on_abuse = on_abuse,
        .ud = g,
    };
    g->h = kd_h2_new(&o);
    if (g->h == NULL) {
        free(g);
        return -ENOMEM;
    }
    if (cfg->tls != NULL) {
        g->tls = kd_tls_new(cfg->tls, NULL);
        if (g->tls == NULL) {
            kd_h2_free(g->h);
            free(g);
            return -ENOMEM;
        }
    }
    if (cfg->max_connection_age_ms != 0) {
        /* ±10 % jitter so a fleet's connections made at one moment do not all leave together. */
        uint64_t j = cfg->max_connection_age_ms / 10;
        uint64_t r = (kd_clock_ns() ^ ((uint64_t)c->slot << 20)) % (2 * j + 1);
        g->age_goaway_at = g->opened_ms + cfg->max_connection_age_ms - j + r;
    }
    c->ctx = g;
    COUNT(g, opened);
    arm_house(g);
    kd_conn_want_flush(c); /* our SETTINGS go out first */
    return 0;
}

const struct kd_conn_ops kd_grpc_server_ops = {
    .name = "grpc",
    .on_open = server_open,
    .on_data = on_data,
    .on_flush = on_flush,
    .on_detach = on_detach_server,
    .on_shutdown = on_shutdown,
    .on_close = on_close,
    .on_quiet = on_quiet,
};

/* ---- call wrappers: act, then make sure the bytes leave this turn ---- */

void kd_grpc_accept(kd_grpc_call *call, const struct kd_h2_handler *handler, void *user)
{
    kd_h2_call_set_handler(call, handler, user);
}

int kd_grpc_send_headers(kd_grpc_call *call, const struct kd_h2_header *md, size_t n)
{
    int rc = kd_h2_call_send_headers(call, md, n);
    want_flush(call_gconn(call));
    return rc;
}

int kd_grpc_send_message(kd_grpc_call *call, const uint8_t *data, size_t len)
{
    int rc = kd_h2_call_send_message(call, data, len);
    want_flush(call_gconn(call));
    return rc;
}

int kd_grpc_finish(kd_grpc_call *call, int status, const char *message, const struct kd_h2_header *md,
                   size_t n)
{
    int rc = kd_h2_call_finish(call, status, message, md, n);
    want_flush(call_gconn(call));
    return rc;
}

int kd_grpc_close_send(kd_grpc_call *call)
{
    int rc = kd_h2_call_close_send(call);
    want_flush(call_gconn(call));
    return rc;
}

void kd_grpc_cancel(kd_grpc_call *call, int status, const char *message)
{
    struct gconn *g = call_gconn(call);
    kd_h2_call_cancel(call, status, message);
    want_flush(g);
}

void kd_grpc_hold_input(kd_grpc_call *call, bool hold)
{
    kd_h2_call_hold_input(call, hold);
    want_flush(call_gconn(call));
}

/* ---- health ---- */

/* HealthCheckRequest { string service = 1; }: the service name, or NULL if malformed. */
const uint8_t *kd_grpc_health_service(const uint8_t *p, size_t len, size_t *slen)
{
    const uint8_t *end = p + len, *svc = (const uint8_t *)"";
    *slen = 0;
    while (p < end) {
        uint64_t key = 0;
        int shift = 0;
        do {
            if (p >= end || shift > 63)
                return NULL;
            key |= (uint64_t)(*p & 0x7f) << shift;
            shift += 7;
        } while (*p++ & 0x80);
        unsigned wt = key & 7;
        uint64_t v = 0;
        shift = 0;
        if (wt == 0 || wt == 2) {
            do {
                if (p >= end || shift > 63)
                    return NULL;
                v |= (uint64_t)(*p & 0x7f) << shift;
                shift += 7;
            } while (*p++ & 0x80);
            if (wt == 2) {
                if (v > (uint64_t)(end - p))
                    return NULL;
                if ((key >> 3) == 1) {
                    svc = p;
                    *slen = (size_t)v;
                }
                p += v;
            }
        } else if (wt == 1 && end - p >= 8) {
            p += 8;
        } else if (wt == 5 && end - p >= 4) {
            p += 4;
        } else {
            return NULL;
        }
    }
    return svc;
}

static int health_message(struct kd_h2_call *call, const uint8_t *msg, size_t len)
{
    size_t slen;
    const uint8_t *svc = kd_grpc_health_service(msg, len, &slen);
    if (svc == NULL)
        return kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "malformed HealthCheckRequest", NULL, 0), 0;
    if (slen != 0 && !(slen == 4 && memcmp(svc, "kasd", 4) == 0))
        return kd_grpc_finish(call, KD_GRPC_NOT_FOUND, "unknown service", NULL, 0), 0;
    static const uint8_t serving[] = {0x08, 0x01}; /* HealthCheckResponse { status: SERVING } */
    kd_grpc_send_message(call, serving, sizeof(serving));
    kd_grpc_finish(call, KD_GRPC_OK, NULL, NULL, 0);
    return 0;
}

static void health_half_close(struct kd_h2_call *call)
{
    /* Unary: a half-close without a request is a client bug. finish() refuses a second status. */
    kd_grpc_finish(call, KD_GRPC_INTERNAL, "missing HealthCheckRequest", NULL, 0);
}

static void health_done(struct kd_h2_call *call, int status, const char *message)
{
}

static const struct kd_h2_handler health_handler = {
    .on_message = health_message,
    .on_half_close = health_half_close,
    .on_done = health_done,
};

static int health_start(kd_grpc_call *call, void *ud)
{
    kd_grpc_accept(call, &health_handler, NULL);
    return 0;
}

const struct kd_grpc_method kd_grpc_health_method = {
    .path = "/grpc.health.v1.Health/Check",
    .start = health_start,
};

/* ---- client channels ---- */

static void client_goaway(void *ud, uint32_t code)
{
    struct gconn *g = ud;
    g->usable = false;
}

static int client_open(struct kd_conn *c, bool adopted)
{
    return 0;
}

static void client_connect(struct kd_conn *c, int err)
{
    struct gconn *g = c->ctx;
    if (err < 0) {
        char msg[200];
        snprintf(msg, sizeof(msg), "connect %s: %s", g->authority, strerror(-err));
        g->usable = false;
        kd_h2_abort(g->h, KD_GRPC_UNAVAILABLE, msg);
        log_conn(g, KD_LOG_INFO, "connect_failed", strerror(-err));
        return;
    }
    peer_name(c, g->peer, sizeof(g->peer));
    kd_conn_want_flush(c); /* handshake_ok once the server's first HTTP/2 bytes arrive (h2_in) */
}

static const struct kd_conn_ops client_ops = {
    .name = "grpc-client",
    .on_open = client_open,
    .on_connect = client_connect,
    .on_data = on_data,
    .on_flush = on_flush,
    .on_detach = on_detach,
    .on_shutdown = on_shutdown,
    .on_close = on_close,
    .on_quiet = on_quiet,
};

struct kd_grpc_channel *kd_grpc_channel_open(struct kd_shard *s, const struct kd_grpc_channel_opts *o)
{
    struct gconn *g = calloc(1, sizeof(*g));
    if (g == NULL)
        return NULL;
    g->server = false;
    g->moving_to = -1;
    g->usable = true;
    g->user_ref = true;
    g->max_message = o->max_message ? o->max_message : DEFAULT_MAX_MESSAGE;
    snprintf(g->authority, sizeof(g->authority), "%s", o->authority);
    kd_timer_init(&g->deadline_timer, deadline_cb);
    kd_timer_init(&g->house_timer, house_cb);
    struct kd_h2_opts ho = {
        .server = false,
        .max_message = g->max_message,
        .max_concurrent_streams = 100,
        .max_header_list = 65536,
        .initial_window = 1u << 20,
        .send_compression = o->compression,
        .on_goaway = client_goaway,
        .on_abuse = on_abuse,
        .ud = g,
    };
    g->h = kd_h2_new(&ho);
    if (g->h == NULL) {
        free(g);
        return NULL;
    }
    if (o->tls != NULL) {
        g->tls = kd_tls_new(o->tls, o->server_name);
        if (g->tls == NULL || kd_tls_connect(g->tls) < 0) {
            free_gconn(g);
            return NULL;
        }
    }
    g->c = kd_conn_connect(s, o->addr, o->addrlen, &client_ops, g);
    if (g->c == NULL) {
        free_gconn(g);
        return NULL;
    }
    g->opened_ms = g->last_rx_ms = kd_shard_now_ms(s);
    g->handshake_ms = o->connect_timeout_ms;
    g->keepalive_ms = o->keepalive_ms;
    g->keepalive_timeout_ms = o->keepalive_timeout_ms;
    arm_house(g);
    kd_conn_want_flush(g->c); /* preface + SETTINGS (+ ClientHello) wait for the connect */
    return (struct kd_grpc_channel *)g;
}

kd_grpc_call *kd_grpc_channel_call(struct kd_grpc_channel *ch, const char *path,
                                   const struct kd_h2_header *md, size_t nmd, uint64_t timeout_us,
                                   const struct kd_h2_handler *handler, void *user)
{
    struct gconn *g = (struct gconn *)ch;
    if (!g->usable || g->c == NULL || g->h == NULL)
        return NULL;
    kd_grpc_call *call =
        kd_h2_call_start(g->h, path, g->authority, md, nmd, now_us(), timeout_us, handler, user);
    if (call != NULL) {
        kd_conn_want_flush(g->c);
        if (timeout_us)
            arm_deadline(g);
    }
    return call;
}

bool kd_grpc_channel_usable(const struct kd_grpc_channel *ch)
{
    const struct gconn *g = (const struct gconn *)ch;
    return g->usable && g->c != NULL;
}

void kd_grpc_channel_close(struct kd_grpc_channel *ch)
{
    struct gconn *g = (struct gconn *)ch;
    g->user_ref = false;
    g->usable = false;
    if (g->c == NULL) {
        free_gconn(g);
        return;
    }
    kd_conn_close(g->c, 0); /* on_close frees it */
}

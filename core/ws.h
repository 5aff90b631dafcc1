/* ws.h — the server side of WebSocket (RFC 6455) as agentk's ws:// and wss:// kas addresses use
 * it: an HTTP/1.1 Upgrade with `Sec-WebSocket-Protocol: ws-tunnel`, then a plain byte stream (here
 * HTTP/2) carried in binary messages whose boundaries mean nothing. Pure byte work, no I/O: the
 * caller feeds what it received and writes what it is given. Written here rather than taken from a
 * library because no C WebSocket library Debian packages fits a shard loop on our own buffers:
 * libwebsockets owns the sockets and the event loop; libwslay parses no HTTP upgrade, its event
 * layer gathers each message and queues each outbound message in its own allocations (up to
 * agentk's 10 MiB per message), and its frame layer pulls input through a recv callback.
 * Concurrency: none inside; each object belongs to one connection (shard-local, no locks). The
 * state is plain memory and moves with its connection in a hand-off.
 * Ownership: input bytes are borrowed for the call; callbacks get borrowed slices valid for the
 * callback only; output is written to caller memory.
 *
 * What is never done: extensions (permessage-deflate is not negotiated, so RSV bits are always a
 * protocol error), text messages (close 1003), client frames without a mask (close 1002).
 */
#ifndef KD_CORE_WS_H
#define KD_CORE_WS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KD_WS_PROTOCOL        "ws-tunnel" /* the subprotocol agentk asks for and kas answers */
#define KD_WS_HEAD_MAX        8192        /* default bound on the upgrade request's head */
#define KD_WS_MAX_MESSAGE     (10u << 20) /* default message limit: agentk's own read limit */
#define KD_WS_ACCEPT_LEN      28          /* base64 of a SHA-1 */
#define KD_WS_FRAME_HDR_MAX   10          /* server frames carry no mask */
#define KD_WS_CLOSE_FRAME_MAX (2 + 125)   /* header + code + reason, a control frame's limit */

enum kd_ws_opcode {
    KD_WS_OP_CONT = 0x0,
    KD_WS_OP_TEXT = 0x1,
    KD_WS_OP_BINARY = 0x2,
    KD_WS_OP_CLOSE = 0x8,
    KD_WS_OP_PING = 0x9,
    KD_WS_OP_PONG = 0xa,
};

/* Close codes used here (RFC 6455 7.4.1). */
enum kd_ws_close_code {
    KD_WS_CLOSE_NORMAL = 1000,
    KD_WS_CLOSE_GOING_AWAY = 1001,
    KD_WS_CLOSE_PROTOCOL = 1002,
    KD_WS_CLOSE_UNSUPPORTED = 1003, /* text frames: the tunnel is binary */
    KD_WS_CLOSE_NO_STATUS = 1005,   /* never sent: a close frame without a code */
    KD_WS_CLOSE_TOO_BIG = 1009,
};

/* ---- the upgrade request ---- */

/* The Sec-WebSocket-Accept value for a key: base64(SHA-1(key ++ RFC 6455 GUID)), NUL-terminated. */
void kd_ws_accept_key(const char *key, size_t len, char out[KD_WS_ACCEPT_LEN + 1]);

/* Check a complete request head (request line and header lines, up to and including the empty
 * line). Returns the HTTP status to answer: 101 (then `accept` holds Sec-WebSocket-Accept), 400
 * (*reason names what was wrong), 426 (Sec-WebSocket-Version is not 13). Checks: `GET`,
 * `HTTP/1.1`, a Host header, Upgrade lists `websocket`, Connection lists `upgrade` (both token
 * lists, case-insensitive), Sec-WebSocket-Version 13, one Sec-WebSocket-Key that is base64 of 16
 * bytes, and Sec-WebSocket-Protocol offers `ws-tunnel`. Extensions offered are ignored. */
int kd_ws_upgrade_check(const char *head, size_t len, char accept[KD_WS_ACCEPT_LEN + 1], const char **reason);

/* Reads the head as it arrives in any split, then holds the answer to write.
 * Invariants: len <= max; status == 0 until the head is complete or over the limit; once status
 * is set, resp[0..resp_len) is the whole answer (101, or an error with `Connection: close`). */
struct kd_ws_handshake {
    uint32_t len, max;  /* bytes of head held; the limit (431 beyond it) */
    uint32_t scan;      /* where the search for the empty line resumes */
    int status;         /* 0: reading; else the status answered */
    const char *reason; /* refused: why (static text) */
    uint32_t resp_len;
    char resp[384];
    char head[]; /* max bytes */
};

/* head_max 0: KD_WS_HEAD_MAX. NULL when out of memory. */
struct kd_ws_handshake *kd_ws_handshake_new(size_t head_max);
void kd_ws_handshake_free(struct kd_ws_handshake *h);
/* Feed received bytes. Returns 0 while the head is incomplete (all of data taken, *used = len), or
 * the status once it is decided; *used is then the bytes of data that belonged to the head (what
 * follows already belongs to the WebSocket stream). Feeding after the decision takes nothing and
 * returns the status again. */
int kd_ws_handshake_feed(struct kd_ws_handshake *h, const uint8_t *data, size_t len, size_t *used);

/* ---- frames from the client ---- */

struct kd_ws_events {
    /* Payload bytes of binary messages, unmasked, in order (message boundaries are not reported:
     * the tunnel is a byte stream). <0 stops decoding and is returned. */
    int (*on_data)(void *ud, const uint8_t *data, size_t len);
    /* A ping: answer it with a pong carrying the same payload (<= 125 bytes). */
    int (*on_ping)(void *ud, const uint8_t *payload, size_t len);
};

/* Decoder state; zero it with kd_ws_decoder_init. It carries a frame across any split of the
 * input (a partial header, the mask offset, a partial control payload).
 * Invariants: hdr_len < hdr_need <= 14 while a header is being read; remaining is the payload left
 * in the current frame; a control frame's payload is gathered in ctl (<= 125 bytes); once done,
 * nothing more is decoded. */
struct kd_ws_decoder {
    uint64_t max_message; /* a data message longer than this: close 1009 */
    uint64_t message_len; /* payload of the current data message so far */
    uint64_t remaining;   /* payload left in the current frame */
    uint64_t frame_off;   /* payload of the current frame already seen (the mask phase) */
    uint8_t hdr[14];
    uint8_t hdr_len, hdr_need;
    uint8_t opcode;  /* of the current frame */
    bool fin;        /* of the current frame */
    bool in_message; /* a fragmented data message is open (continuations expected) */
    bool in_payload; /* the header is read; payload bytes follow */
    uint8_t mask[4];
    uint8_t ctl_len;
    uint8_t ctl[125];
    /* Set when decoding ended (returned 1): */
    bool done;
    bool peer_closed;      /* the client sent a close frame (echo it) */
    uint16_t close_code;   /* the code to send in our close frame */
    const char *close_why; /* why we close (static text), for the log and the close reason */
};

/* max_message 0: KD_WS_MAX_MESSAGE. */
void kd_ws_decoder_init(struct kd_ws_decoder *d, uint64_t max_message);
/* Decode received bytes (any split). Returns 0 when all of data was consumed and the stream goes
 * on; 1 when it ended (a close frame from the client, or a protocol error): close_code,
 * close_why and peer_closed say how, and the caller sends kd_ws_close_frame and finishes; <0 an
 * error returned by a callback. Bytes after the end are ignored. */
int kd_ws_decode(struct kd_ws_decoder *d, const uint8_t *data, size_t len, const struct kd_ws_events *ev,
                 void *ud);

/* ---- frames to the client (server frames are never masked) ---- */

/* Header of a frame with `len` payload bytes into out; returns its size (2, 4 or 10). */
size_t kd_ws_frame_header(uint8_t out[KD_WS_FRAME_HDR_MAX], enum kd_ws_opcode op, bool fin, uint64_t len);
/* A whole close frame: code, then reason cut to fit 123 bytes (code 1005 or 0: no payload at all).
 * Returns its size. */
size_t kd_ws_close_frame(uint8_t out[KD_WS_CLOSE_FRAME_MAX], uint16_t code, const char *reason);

#endif

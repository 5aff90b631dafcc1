/* ws.c — see ws.h. The upgrade check reads the head once, line by line, keeping only flags and the
 * key; the decoder is a byte-driven state machine (header, then payload) so that any split of the
 * input gives the same result as one call with everything. */
#include "core/ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/base64.h"
#include "core/sha1.h"

static const char ws_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"; /* RFC 6455 1.3 */

/* ---- upgrade ---- */

/* RFC 6455 4.1: the key is a random 16-byte value, base64-encoded: 22 symbols and "==". A key
 * whose padding bits are set does not decode to exactly those 16 bytes, so it is refused. */
static bool key_valid(const char *k, size_t n)
{
    uint8_t raw[18];
    return n == 24 && kd_base64_decode(k, n, raw, sizeof(raw), KD_B64_STRICT) == 16;
}

void kd_ws_accept_key(const char *key, size_t len, char out[KD_WS_ACCEPT_LEN + 1])
{
    struct kd_sha1 c;
    uint8_t md[KD_SHA1_LEN];
    kd_sha1_init(&c);
    kd_sha1_update(&c, key, len);
    kd_sha1_update(&c, ws_guid, sizeof(ws_guid) - 1);
    kd_sha1_final(&c, md);
    kd_base64_encode(md, sizeof(md), out);
}

static bool is_ows(char c)
{
    return c == ' ' || c == '\t';
}

static bool ci_eq(const char *a, size_t n, const char *lit)
{
    size_t m = strlen(lit);
    if (n != m)
        return false;
    for (size_t i = 0; i < n; i++) {
        char x = a[i], y = lit[i];
        if (x >= 'A' && x <= 'Z')
            x = (char)(x - 'A' + 'a');
        if (x != y) /* lit is lower case */
            return false;
    }
    return true;
}

/* Does the comma-separated list v[0..n) hold tok? Elements are trimmed of optional whitespace;
 * ci: compare case-insensitively (tok in lower case). */
static bool list_has(const char *v, size_t n, const char *tok, bool ci)
{
    size_t i = 0;
    while (i <= n) {
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (s < e && is_ows(v[s]))
            s++;
        while (e > s && is_ows(v[e - 1]))
            e--;
        if (ci ? ci_eq(v + s, e - s, tok) : (e - s == strlen(tok) && memcmp(v + s, tok, e - s) == 0))
            return true;
        i++; /* past the comma (or past the end) */
    }
    return false;
}

static bool tchar(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

int kd_ws_upgrade_check(const char *head, size_t len, char accept[KD_WS_ACCEPT_LEN + 1], const char **reason)
{
    const char *end = head + len, *p = head;
    const char *key = NULL;
    size_t keylen = 0;
    unsigned nkey = 0;
    bool host = false, upgrade = false, connection = false, proto = false, version_seen = false,
         version_ok = true;
    const char *why = NULL;

    /* Request line: GET SP target SP HTTP/1.1 CRLF */
    const char *eol = memchr(p, '\r', (size_t)(end - p));
    if (eol == NULL || eol + 1 >= end || eol[1] != '\n') {
        *reason = "malformed request line";
        return 400;
    }
    const char *sp1 = memchr(p, ' ', (size_t)(eol - p));
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1)) : NULL;
    if (sp1 == NULL || sp2 == NULL || sp2 == sp1 + 1 || memchr(sp2 + 1, ' ', (size_t)(eol - sp2 - 1))) {
        *reason = "malformed request line";
        return 400;
    }
    if (sp1 - p != 3 || memcmp(p, "GET", 3) != 0) {
        *reason = "method must be GET";
        return 400;
    }
    if (eol - sp2 - 1 != 8 || memcmp(sp2 + 1, "HTTP/1.1", 8) != 0) {
        *reason = "protocol must be HTTP/1.1";
        return 400;
    }
    p = eol + 2;

    /* Header lines up to the empty line. */
    for (;;) {
        eol = memchr(p, '\r', (size_t)(end - p));
        if (eol == NULL || eol + 1 >= end || eol[1] != '\n') {
            *reason = "malformed header line";
            return 400;
        }
        if (eol == p)
            break; /* the empty line */
        for (const char *q = p; q < eol; q++)
            if (((unsigned char)*q < 0x20 && *q != '\t') || *q == 0x7f) {
                *reason = "control character in a header line";
                return 400;
            }
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon == NULL || colon == p) {
            *reason = is_ows(*p) ? "folded header lines are not accepted" : "malformed header line";
            return 400;
        }
        for (const char *q = p; q < colon; q++)
            if (!tchar(*q)) {
                *reason = "malformed header name";
                return 400;
            }
        const char *v = colon + 1, *ve = eol;
        while (v < ve && is_ows(*v))
            v++;
        while (ve > v && is_ows(ve[-1]))
            ve--;
        size_t nl = (size_t)(colon - p), vl = (size_t)(ve - v);
        if (ci_eq(p, nl, "host")) {
            host = true;
        } else if (ci_eq(p, nl, "upgrade")) {
            upgrade = upgrade || list_has(v, vl, "websocket", true);
        } else if (ci_eq(p, nl, "connection")) {
            connection = connection || list_has(v, vl, "upgrade", true);
        } else if (ci_eq(p, nl, "sec-websocket-version")) {
            version_seen = true;
            version_ok = version_ok && vl == 2 && memcmp(v, "13", 2) == 0;
        } else if (ci_eq(p, nl, "sec-websocket-key")) {
            nkey++;
            key = v;
            keylen = vl;
        } else if (ci_eq(p, nl, "sec-websocket-protocol")) {
            proto = proto || list_has(v, vl, KD_WS_PROTOCOL, false);
        }
        /* Sec-WebSocket-Extensions and everything else: ignored (nothing is negotiated). */
        p = eol + 2;
    }
    if (!host)
        why = "missing Host header";
    else if (!upgrade)
        why = "Upgrade header must list websocket";
    else if (!connection)
        why = "Connection header must list upgrade";
    if (why != NULL) {
        *reason = why;
        return 400;
    }
    if (!version_seen || !version_ok) {
        *reason = "Sec-WebSocket-Version must be 13";
        return 426;
    }
    if (nkey != 1 || !key_valid(key, keylen)) {
        *reason =
            nkey > 1 ? "more than one Sec-WebSocket-Key" : "Sec-WebSocket-Key must be base64 of 16 bytes";
        return 400;
    }
    if (!proto) {
        *reason = "Sec-WebSocket-Protocol must offer " KD_WS_PROTOCOL;
        return 400;
    }
    kd_ws_accept_key(key, keylen, accept);
    *reason = NULL;
    return 101;
}

struct kd_ws_handshake *kd_ws_handshake_new(size_t head_max)
{
    if (head_max == 0)
        head_max = KD_WS_HEAD_MAX;
    if (head_max > UINT32_MAX / 2)
        return NULL;
    struct kd_ws_handshake *h = calloc(1, sizeof(*h) + head_max);
    if (h != NULL)
        h->max = (uint32_t)head_max;
    return h;
}

void kd_ws_handshake_free(struct kd_ws_handshake *h)
{
    free(h);
}

static void answer(struct kd_ws_handshake *h, int status, const char *accept)
{
    int n;
    h->status = status;
    if (status == 101) {
        n = snprintf(h->resp, sizeof(h->resp),
                     "HTTP/1.1 101 Switching Protocols\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Accept: %s\r\n"
                     "Sec-WebSocket-Protocol: " KD_WS_PROTOCOL "\r\n"
                     "\r\n",
                     accept);
    } else {
        const char *text = status == 426   ? "Upgrade Required"
                           : status == 431 ? "Request Header Fields Too Large"
                                           : "Bad Request";
        n = snprintf(h->resp, sizeof(h->resp),
                     "HTTP/1.1 %d %s\r\n"
                     "Content-Type: text/plain; charset=utf-8\r\n"
                     "Content-Length: %zu\r\n"
                     "%s"
                     "Connection: close\r\n"
                     "\r\n"
                     "%s\n",
                     status, text, strlen(h->reason) + 1,
                     status == 426 ? "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" : "", h->reason);
    }
    /* Every reason is a short static text: the answer always fits. */
    h->resp_len = n > 0 && (size_t)n < sizeof(h->resp) ? (uint32_t)n : 0;
}

int kd_ws_handshake_feed(struct kd_ws_handshake *h, const uint8_t *data, size_t len, size_t *used)
{
    *used = 0;
    if (h->status != 0)
        return h->status;
    size_t take = len;
    if (take > h->max - h->len)
        take = h->max - h->len;
    memcpy(h->head + h->len, data, take);
    h->len += (uint32_t)take;
    /* Look for CRLF CRLF from where the last search stopped (3 bytes back: it may straddle). */
    size_t i = h->scan >= 3 ? h->scan - 3 : 0;
    for (; i + 4 <= h->len; i++) {
        if (h->head[i] == '\r' && memcmp(h->head + i, "\r\n\r\n", 4) == 0) {
            size_t head_len = i + 4;
            *used = head_len - (h->len - take); /* bytes of this call's data inside the head */
            char accept[KD_WS_ACCEPT_LEN + 1];
            int st = kd_ws_upgrade_check(h->head, head_len, accept, &h->reason);
            answer(h, st, accept);
            return st;
        }
    }
    h->scan = h->len;
    if (h->len >= h->max) {
        h->reason = "request head too large";
        *used = take;
        answer(h, 431, NULL);
        return 431;
    }
    *used = take;
    return 0;
}

/* ---- decoder ---- */

void kd_ws_decoder_init(struct kd_ws_decoder *d, uint64_t max_message)
{
    memset(d, 0, sizeof(*d));
    d->max_message = max_message ? max_message : KD_WS_MAX_MESSAGE;
    d->hdr_need = 2;
}

static int fail(struct kd_ws_decoder *d, uint16_t code, const char *why)
{
    d->done = true;
    d->close_code = code;
    d->close_why = why;
    return 1;
}

/* The first two bytes are in: check what they alone can tell, and size the rest of the header. */
static int header_start(struct kd_ws_decoder *d)
{
    uint8_t b0 = d->hdr[0], b1 = d->hdr[1];
    uint8_t op = b0 & 0x0f, len7 = b1 & 0x7f;
    d->fin = (b0 & 0x80) != 0;
    d->opcode = op;
    if (b0 & 0x70)
        return fail(d, KD_WS_CLOSE_PROTOCOL, "reserved bits set (no extension was negotiated)");
    if ((op > KD_WS_OP_BINARY && op < KD_WS_OP_CLOSE) || op > KD_WS_OP_PONG)
        return fail(d, KD_WS_CLOSE_PROTOCOL, "unknown opcode");
    if (!(b1 & 0x80))
        return fail(d, KD_WS_CLOSE_PROTOCOL, "client frame not masked");
    if (op & 0x8) {
        if (!d->fin)
            return fail(d, KD_WS_CLOSE_PROTOCOL, "fragmented control frame");
        if (len7 > 125)
            return fail(d, KD_WS_CLOSE_PROTOCOL, "control frame longer than 125 bytes");
    } else if (op == KD_WS_OP_TEXT) {
        return fail(d, KD_WS_CLOSE_UNSUPPORTED, "text messages are not accepted (binary only)");
    } else if (op == KD_WS_OP_BINARY && d->in_message) {
        return fail(d, KD_WS_CLOSE_PROTOCOL, "new message inside a fragmented message");
    } else if (op == KD_WS_OP_CONT && !d->in_message) {
        return fail(d, KD_WS_CLOSE_PROTOCOL, "continuation frame without a message");
    }
    d->hdr_need = (uint8_t)(2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + 4);
    return 0;
}

/* The whole header is in: take the length and the mask. */
static int header_done(struct kd_ws_decoder *d)
{
    uint8_t len7 = d->hdr[1] & 0x7f;
    uint64_t n = len7;
    size_t at = 2;
    if (len7 == 126) {
        n = (uint64_t)d->hdr[2] << 8 | d->hdr[3];
        at = 4;
    } else if (len7 == 127) {
        n = 0;
        for (size_t i = 0; i < 8; i++)
            n = n << 8 | d->hdr[2 + i];
        at = 10;
        if (n >> 63)
            return fail(d, KD_WS_CLOSE_PROTOCOL, "frame length has the most significant bit set");
    }
    memcpy(d->mask, d->hdr + at, 4);
    if (!(d->opcode & 0x8)) {
        if (n > d->max_message - d->message_len)
            return fail(d, KD_WS_CLOSE_TOO_BIG, "message larger than the limit");
        d->message_len += n;
    }
    d->remaining = n;
    d->frame_off = 0;
    d->ctl_len = 0;
    d->in_payload = true;
    return 0;
}

static bool close_code_valid(uint16_t c)
{
    /* RFC 6455 7.4: 1004-1006 and 1015 are never sent on the wire; 1000-2999 are the protocol's
     * (registered ones: up to 1014); 3000-4999 belong to libraries and applications. */
    return (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014) || (c >= 3000 && c <= 4999);
}

/* The current frame's payload is complete. */
static int frame_done(struct kd_ws_decoder *d, const struct kd_ws_events *ev, void *ud)
{
    d->in_payload = false;
    d->hdr_len = 0;
    d->hdr_need = 2;
    switch (d->opcode) {
    case KD_WS_OP_BINARY:
    case KD_WS_OP_CONT:
        d->in_message = !d->fin;
        if (d->fin)
            d->message_len = 0;
        return 0;
    case KD_WS_OP_PING:
        return ev->on_ping ? ev->on_ping(ud, d->ctl, d->ctl_len) : 0;
    case KD_WS_OP_PONG:
        return 0; /* we never ping at this layer (HTTP/2 has its own keepalive) */
    case KD_WS_OP_CLOSE:
        if (d->ctl_len == 1)
            return fail(d, KD_WS_CLOSE_PROTOCOL, "close frame with a 1-byte payload");
        if (d->ctl_len == 0) {
            d->peer_closed = true;
            return fail(d, 0, "peer closed the WebSocket (no status)");
        } else {
            uint16_t code = (uint16_t)(d->ctl[0] << 8 | d->ctl[1]);
            if (!close_code_valid(code))
                return fail(d, KD_WS_CLOSE_PROTOCOL, "invalid close code");
            d->peer_closed = true;
            return fail(d, code, "peer closed the WebSocket");
        }
    default:
        return fail(d, KD_WS_CLOSE_PROTOCOL, "unknown opcode"); /* header_start refused it already */
    }
}

int kd_ws_decode(struct kd_ws_decoder *d, const uint8_t *data, size_t len, const struct kd_ws_events *ev,
                 void *ud)
{
    size_t i = 0;
    int rc;
    if (d->done)
        return 1;
    while (i < len || (d->in_payload && d->remaining == 0)) {
        if (!d->in_payload) {
            size_t want = (size_t)(d->hdr_need - d->hdr_len);
            if (want > len - i)
                want = len - i;
            memcpy(d->hdr + d->hdr_len, data + i, want);
            d->hdr_len = (uint8_t)(d->hdr_len + want);
            i += want;
            if (d->hdr_len == 2 && d->hdr_need == 2 && (rc = header_start(d)) != 0)
                return rc;
            if (d->hdr_len == d->hdr_need && d->hdr_need > 2 && (rc = header_done(d)) != 0)
                return rc;
            continue;
        }
        if (d->remaining == 0) {
            if ((rc = frame_done(d, ev, ud)) != 0)
                return rc;
            continue;
        }
        size_t n = len - i;
        if (n > d->remaining)
            n = (size_t)d->remaining;
        if (d->opcode & 0x8) {
            /* control payloads are <= 125 bytes: gather them, unmasked */
            for (size_t k = 0; k < n; k++)
                d->ctl[d->ctl_len++] = data[i + k] ^ d->mask[(d->frame_off + k) & 3];
        } else {
            /* Unmask into a scratch buffer: the input is borrowed read-only (a receive buffer). */
            uint8_t scratch[4096];
            for (size_t done = 0; done < n;) {
                size_t m = n - done < sizeof(scratch) ? n - done : sizeof(scratch);
                size_t ph = (size_t)((d->frame_off + done) & 3);
                const uint8_t *src = data + i + done;
                for (size_t k = 0; k < m; k++)
                    scratch[k] = src[k] ^ d->mask[(ph + k) & 3];
                done += m;
                if (ev->on_data && (rc = ev->on_data(ud, scratch, m)) < 0) {
                    /* keep the state consistent with what was handed over */
                    d->frame_off += done;
                    d->remaining -= done;
                    return rc;
                }
            }
        }
        d->frame_off += n;
        d->remaining -= n;
        i += n;
    }
    return 0;
}

/* ---- encoder ---- */

size_t kd_ws_frame_header(uint8_t out[KD_WS_FRAME_HDR_MAX], enum kd_ws_opcode op, bool fin, uint64_t len)
{
    out[0] = (uint8_t)((fin ? 0x80 : 0) | (op & 0x0f));
    if (len < 126) {
        out[1] = (uint8_t)len;
        return 2;
    }
    if (len <= 0xffff) {
        out[1] = 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        return 4;
    }
    out[1] = 127;
    for (int i = 0; i < 8; i++)
        out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    return 10;
}

size_t kd_ws_close_frame(uint8_t out[KD_WS_CLOSE_FRAME_MAX], uint16_t code, const char *reason)
{
    if (code == 0 || code == KD_WS_CLOSE_NO_STATUS)
        return kd_ws_frame_header(out, KD_WS_OP_CLOSE, true, 0);
    size_t rl = reason ? strlen(reason) : 0;
    if (rl > 123)
        rl = 123;
    size_t h = kd_ws_frame_header(out, KD_WS_OP_CLOSE, true, 2 + rl);
    out[h] = (uint8_t)(code >> 8);
    out[h + 1] = (uint8_t)code;
    if (rl)
        memcpy(out + h + 2, reason, rl);
    return h + 2 + rl;
}

/* ws_fuzz.c — the WebSocket upgrade reader and frame decoder (core/ws.h) on arbitrary bytes, with
 * small limits, each run twice: in one call, and cut into pieces whose sizes come from the input.
 * Both runs must agree exactly (status, bytes taken, payload delivered, pings, how the stream
 * ended): any split of the input is allowed to change nothing.
 *
 * Input: byte 0 = flags (bit 7: frames only, no upgrade first), byte 1 = message limit / 8,
 * byte 2 = head limit / 16 + 32, byte 3 = seed of the piece sizes; the rest is the stream. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/ws.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct out {
    uint64_t hash, len;
    unsigned pings;
};

static void mix(struct out *o, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        o->hash = (o->hash ^ p[i]) * 0x100000001b3ull;
}

static int on_data(void *ud, const uint8_t *p, size_t n)
{
    struct out *o = ud;
    mix(o, p, n);
    o->len += n;
    return 0;
}

static int on_ping(void *ud, const uint8_t *p, size_t n)
{
    struct out *o = ud;
    if (n > 125)
        abort();
    o->pings++;
    mix(o, p, n);
    return 0;
}

static const struct kd_ws_events ev = {.on_data = on_data, .on_ping = on_ping};

struct result {
    int hs_status;
    size_t hs_used;
    int rc;
    uint16_t code;
    bool peer_closed;
    struct out o;
};

static size_t piece(uint32_t *rng, size_t left)
{
    *rng = *rng * 1103515245u + 12345u;
    size_t n = 1 + (*rng >> 16) % 23;
    return n < left ? n : left;
}

static void run(const uint8_t *s, size_t n, bool frames_only, uint64_t max_msg, size_t head_max,
                uint32_t seed, bool split, struct result *r)
{
    memset(r, 0, sizeof(*r));
    r->o.hash = 0xcbf29ce484222325ull;
    uint32_t rng = seed;
    size_t off = 0;
    if (!frames_only) {
        struct kd_ws_handshake *h = kd_ws_handshake_new(head_max);
        if (h == NULL)
            abort();
        while (off < n) {
            size_t len = split ? piece(&rng, n - off) : n - off, used;
            int st = kd_ws_handshake_feed(h, s + off, len, &used);
            if (used > len || h->len > h->max)
                abort();
            r->hs_used += used;
            off += used;
            if (st != 0) {
                r->hs_status = st;
                if (h->resp_len == 0 || h->resp_len >= sizeof(h->resp) || strlen(h->resp) != h->resp_len)
                    abort(); /* every answer is whole */
                break;
            }
            if (used != len)
                abort();
        }
        kd_ws_handshake_free(h);
        if (r->hs_status != 101)
            return;
    }
    struct kd_ws_decoder d;
    kd_ws_decoder_init(&d, max_msg);
    while (off < n && r->rc == 0) {
        size_t len = split ? piece(&rng, n - off) : n - off;
        r->rc = kd_ws_decode(&d, s + off, len, &ev, &r->o);
        off += len;
        if (d.ctl_len > 125 || d.message_len > d.max_message || d.hdr_len > sizeof(d.hdr))
            abort();
    }
    if (r->rc == 1) {
        r->code = d.close_code;
        r->peer_closed = d.peer_closed;
        if (d.close_why == NULL)
            abort();
        uint8_t f[KD_WS_CLOSE_FRAME_MAX];
        size_t fl = kd_ws_close_frame(f, d.close_code, d.close_why);
        if (fl > sizeof(f) || (f[1] & 0x7f) > 125)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 4)
        return 0;
    bool frames_only = (data[0] & 0x80) != 0;
    uint64_t max_msg = (uint64_t)data[1] * 8 + 1;
    size_t head_max = (size_t)data[2] * 16 + 32;
    uint32_t seed = data[3];
    struct result a, b;
    run(data + 4, size - 4, frames_only, max_msg, head_max, seed, false, &a);
    run(data + 4, size - 4, frames_only, max_msg, head_max, seed, true, &b);
    if (a.hs_status != b.hs_status || a.hs_used != b.hs_used || a.rc != b.rc || a.code != b.code ||
        a.peer_closed != b.peer_closed || a.o.hash != b.o.hash || a.o.len != b.o.len ||
        a.o.pings != b.o.pings)
        abort(); /* a split changed the result */
    return 0;
}

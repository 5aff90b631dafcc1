/* h2_client_fuzz.c — arbitrary server bytes into a client-side gRPC-over-HTTP/2 session (core/h2.c):
 * responses, trailers, trailers-only, compressed responses, GOAWAY, RST_STREAM, flow control.
 * Input: byte 0 picks the chunk size, byte 1 the set-up (calls started, send compression,
 * timeouts, half-close, a call started midway, abort or free at the end); the rest is what the
 * server sends (seeds begin with its SETTINGS). Handlers record headers, messages and trailers,
 * and cancel, refuse, send or hold input depending on message bytes. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/compress.h"
#include "core/grpc.h"
#include "core/h2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define SLOTS 8

struct slot {
    struct kd_h2_call *call;
    size_t seen; /* bytes of headers, messages and trailers looked at */
};

static struct slot slots[SLOTS];

static void touch(struct slot *s, const struct kd_h2_header *hd)
{
    /* Read every byte so ASan sees any out-of-bounds header storage. */
    for (size_t i = 0; i < hd->namelen; i++)
        s->seen += (uint8_t)hd->name[i];
    for (size_t i = 0; i < hd->valuelen; i++)
        s->seen += (uint8_t)hd->value[i];
}

static int on_headers(struct kd_h2_call *c)
{
    struct slot *s = kd_h2_call_user(c);
    struct kd_h2_header hd;
    for (size_t i = 0; kd_h2_call_header(c, i, &hd); i++)
        touch(s, &hd);
    size_t len = 0;
    const char *v = kd_h2_call_header_value(c, "x-fuzz", &len);
    if (v != NULL && len > 0 && v[0] == 'R')
        return -1; /* refuse the headers: the call is cancelled */
    if (v != NULL && len > 0 && v[0] == 'C') {
        kd_h2_call_cancel(c, KD_GRPC_CANCELLED, "fuzz cancel in headers");
        return 0;
    }
    return 0;
}

static int on_message(struct kd_h2_call *c, const uint8_t *msg, size_t len)
{
    struct slot *s = kd_h2_call_user(c);
    for (size_t i = 0; i < len; i++)
        s->seen += msg[i];
    if (len == 0)
        return 0;
    switch (msg[0]) {
    case 'C':
        kd_h2_call_cancel(c, KD_GRPC_CANCELLED, "fuzz cancel");
        return 0;
    case 'E':
        return -1;
    case 'H':
        kd_h2_call_hold_input(c, true);
        return 0;
    case 'R':
        kd_h2_call_hold_input(c, false);
        return 0;
    case 'S':
        kd_h2_call_send_message(c, msg, len);
        return 0;
    case 'X':
        kd_h2_call_close_send(c);
        return 0;
    default:
        return 0;
    }
}

static void on_writable(struct kd_h2_call *c)
{
}

static void on_done(struct kd_h2_call *c, int status, const char *message)
{
    struct slot *s = kd_h2_call_user(c);
    struct kd_h2_header hd;
    for (size_t i = 0; kd_h2_call_trailer(c, i, &hd); i++)
        touch(s, &hd);
    s->seen += strlen(message != NULL ? message : "") + (size_t)status;
    s->call = NULL;
}

static const struct kd_h2_handler handler = {
    .on_headers = on_headers, .on_message = on_message, .on_writable = on_writable, .on_done = on_done};

static void on_goaway(void *ud, uint32_t error_code)
{
}

static void on_abuse(void *ud, enum kd_h2_abuse reason, const char *detail)
{
}

static int sink(void *ud, const uint8_t *d, size_t n)
{
    size_t *total = ud;
    *total += n;
    return 0;
}

static void start(struct kd_h2 *h, size_t i, uint64_t now, bool timeout, bool close)
{
    static const struct kd_h2_header md[] = {
        {"authorization", 13, "Bearer x", 8},
        {"x-bin", 5, "AAEC", 4},
    };
    static const uint8_t req[] = "request";
    struct slot *s = &slots[i % SLOTS];
    if (s->call != NULL)
        return;
    s->call = kd_h2_call_start(h, i & 1 ? "/a.B/Stream" : "/a.B/Unary", "kas", md, i & 2 ? 2 : 0, now,
                               timeout ? 1000 + i * 500 : 0, &handler, s);
    if (s->call == NULL)
        return;
    kd_h2_call_send_message(s->call, req, i & 1 ? sizeof(req) - 1 : 0);
    if (close)
        kd_h2_call_close_send(s->call);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t chunk = (size_t)data[0] * 7 + 1;
    uint8_t setup = data[1];
    data += 2;
    size -= 2;
    memset(slots, 0, sizeof(slots));
    size_t ncalls = (setup & 3) + 1;
    bool timeout = setup & 8, close = setup & 16, midway = setup & 32;
    struct kd_h2_opts o = {.server = false,
                           .max_message = 65536,
                           .max_header_list = 8192,
                           .initial_window = 65535,
                           .send_compression = setup & 4 ? KD_COMPRESS_GZIP : KD_COMPRESS_IDENTITY,
                           .on_goaway = on_goaway,
                           .on_abuse = on_abuse};
    struct kd_h2 *h = kd_h2_new(&o);
    if (h == NULL)
        return 0;
    size_t out = 0;
    for (size_t i = 0; i < ncalls; i++)
        start(h, i, 0, timeout, close);
    kd_h2_send(h, sink, &out);
    uint64_t now = 0;
    bool started = false;
    for (size_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        const char *err;
        if (kd_h2_recv(h, data + off, n, &err) < 0)
            break;
        kd_h2_send(h, sink, &out);
        now += 400;
        kd_h2_expire(h, now);
        if (midway && !started && off * 2 >= size) {
            started = true;
            start(h, ncalls, now, timeout, close);
            kd_h2_ping(h);
        }
        kd_h2_send(h, sink, &out);
    }
    if (setup & 64)
        kd_h2_abort(h, KD_GRPC_UNAVAILABLE, "fuzz abort");
    else if (setup & 128)
        kd_h2_goaway(h, 0, "fuzz");
    kd_h2_send(h, sink, &out);
    kd_h2_free(h);
    for (size_t i = 0; i < SLOTS; i++)
        if (slots[i].call != NULL)
            __builtin_trap(); /* every call must have had on_done */
    return 0;
}

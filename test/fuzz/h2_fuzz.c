/* h2_fuzz.c — arbitrary bytes into a server-side gRPC-over-HTTP/2 session (core/h2.c): HTTP/2
 * framing and HPACK (nghttp2), gRPC headers, grpc-timeout, message framing, the call state machine.
 * Calls are served by an echo handler that also finishes, cancels and holds input depending on
 * message bytes, so every call path is reachable. The first byte picks the chunk size. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/grpc.h"
#include "core/h2.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int echo_message(struct kd_h2_call *c, const uint8_t *msg, size_t len)
{
    if (len > 0 && msg[0] == 'F')
        return kd_h2_call_finish(c, KD_GRPC_ABORTED, "fuzz finish", NULL, 0), 0;
    if (len > 0 && msg[0] == 'C') {
        kd_h2_call_cancel(c, KD_GRPC_CANCELLED, "fuzz cancel");
        return 0;
    }
    if (len > 0 && msg[0] == 'H')
        kd_h2_call_hold_input(c, true);
    if (len > 0 && msg[0] == 'R')
        kd_h2_call_hold_input(c, false);
    if (len > 0 && msg[0] == 'E')
        return -1;
    kd_h2_call_send_message(c, msg, len);
    return 0;
}

static void echo_half_close(struct kd_h2_call *c)
{
    kd_h2_call_finish(c, KD_GRPC_OK, NULL, NULL, 0);
}

static void echo_done(struct kd_h2_call *c, int status, const char *message)
{
}

static const struct kd_h2_handler echo = {
    .on_message = echo_message, .on_half_close = echo_half_close, .on_done = echo_done};

static int on_call(void *ud, struct kd_h2_call *c)
{
    const char *path = kd_h2_call_path(c);
    if (strcmp(path, "/x.Y/Reject") == 0)
        return KD_GRPC_PERMISSION_DENIED;
    kd_h2_call_set_handler(c, &echo, NULL);
    return 0;
}

static int sink(void *ud, const uint8_t *d, size_t n)
{
    size_t *total = ud;
    *total += n;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    size_t chunk = (size_t)data[0] * 7 + 1;
    data++;
    size--;
    struct kd_h2_opts o = {.server = true,
                           .max_message = 65536,
                           .max_concurrent_streams = 100,
                           .max_header_list = 8192,
                           .initial_window = 65535,
                           .ping_min_interval_ms = 20000,
                           .on_call = on_call};
    struct kd_h2 *h = kd_h2_new(&o);
    if (h == NULL)
        return 0;
    size_t out = 0;
    for (size_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        const char *err;
        if (kd_h2_recv(h, data + off, n, &err) < 0)
            break;
        kd_h2_send(h, sink, &out);
        kd_h2_expire(h, 0);
    }
    kd_h2_goaway(h, 0, "fuzz");
    kd_h2_send(h, sink, &out);
    kd_h2_free(h);
    return 0;
}

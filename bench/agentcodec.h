/* agentcodec.h — the agent's side of kasd's agent protocols, by hand on core/pb.h: the
 * ConnectRequest messages an agent sends on a reverse tunnel (shards/tunnel_codec.h only decodes
 * those, as kasd does), the ConnectResponse messages it receives, and RegisterRequest.
 * Concurrency: pure functions. Ownership: encoders write into caller buffers sized with the
 * *_size helpers; decoded fields point into the caller's buffer.
 *
 *   ConnectRequest  (agent -> kasd)   oneof: descriptor=1 header=2 message=3 trailer=4 error=5
 *   ConnectResponse (kasd -> agent)   oneof: request_info=1 message=2 close_send=3
 */
#ifndef KD_BENCH_AGENTCODEC_H
#define KD_BENCH_AGENTCODEC_H

#include <stddef.h>
#include <stdint.h>

/* ConnectRequest{descriptor{agent_descriptor{services: [{name: service, methods: [...]}]}}}.
 * Returns the length written, or -ENOSPC when cap is too small. */
long bench_tun_descriptor(uint8_t *out, size_t cap, const char *service, const char *const *methods,
                          size_t nmethods);

/* ConnectRequest{header{}} and ConnectRequest{trailer{}} (no metadata). */
extern const uint8_t bench_tun_header_empty[2];
extern const uint8_t bench_tun_trailer_empty[2];

/* ConnectRequest{message{data}}: size, and the writer. The prefix writer writes everything but
 * the n data bytes, which the caller writes at the returned pointer (no staging copy). */
size_t bench_tun_message_size(size_t n);
uint8_t *bench_tun_put_message(uint8_t *p, const uint8_t *data, size_t n);
uint8_t *bench_tun_put_message_prefix(uint8_t *p, size_t n);

/* ConnectRequest{error{status{code, message}}}. */
size_t bench_tun_error_size(size_t msglen);
uint8_t *bench_tun_put_error(uint8_t *p, int code, const char *msg, size_t msglen);

enum bench_tun_resp_kind {
    BENCH_TUN_REQUEST_INFO = 1,
    BENCH_TUN_MESSAGE = 2,
    BENCH_TUN_CLOSE_SEND = 3,
};

struct bench_tun_resp {
    enum bench_tun_resp_kind kind;
    const char *method; /* REQUEST_INFO: RequestInfo.method_name (not NUL-terminated) */
    size_t method_len;
    const uint8_t *meta; /* REQUEST_INFO: from the first meta entry to the end of the last (tags
                            of the entries included) */
    size_t meta_len;
    const uint8_t *data; /* MESSAGE: Message.data */
    size_t data_len;
};

/* Decode one ConnectResponse. 0, or -EBADMSG (malformed, or not exactly one member set). */
int bench_tun_decode_response(const uint8_t *p, size_t n, struct bench_tun_resp *out);

/* RegisterRequest{agent_meta{version, pod_namespace, pod_name}, pod_id}. Returns the length, or
 * -ENOSPC. */
long bench_register_request(uint8_t *out, size_t cap, const char *version, const char *pod_name,
                            int64_t pod_id);

#endif

/* agentcodec.c — see agentcodec.h. Field numbers are those of proto/gitlab/agent/reverse_tunnel/
 * rpc/rpc.proto, reverse_tunnel/info/info.proto and agent_registrar/rpc/rpc.proto. */
#include "bench/agentcodec.h"

#include <errno.h>
#include <string.h>

#include "core/pb.h"

const uint8_t bench_tun_header_empty[2] = {(2 << 3) | KD_PB_LEN, 0};
const uint8_t bench_tun_trailer_empty[2] = {(4 << 3) | KD_PB_LEN, 0};

long bench_tun_descriptor(uint8_t *out, size_t cap, const char *service, const char *const *methods,
                          size_t nmethods)
{
    /* sizes, innermost first: Method{1: name} -> Service{1: name, 2: Method*} -> AgentDescriptor{1:
     * Service} -> Descriptor{1: AgentDescriptor} -> ConnectRequest{1: Descriptor} */
    size_t svc = kd_pb_len_field_size(1, strlen(service));
    for (size_t i = 0; i < nmethods; i++)
        svc += kd_pb_len_field_size(2, kd_pb_len_field_size(1, strlen(methods[i])));
    size_t agent_desc = kd_pb_len_field_size(1, svc);
    size_t desc = kd_pb_len_field_size(1, agent_desc);
    size_t total = kd_pb_len_field_size(1, desc);
    if (total > cap)
        return -ENOSPC;
    uint8_t *p = out;
    p = kd_pb_put_len_header(p, 1, desc);       /* ConnectRequest.descriptor */
    p = kd_pb_put_len_header(p, 1, agent_desc); /* Descriptor.agent_descriptor */
    p = kd_pb_put_len_header(p, 1, svc);        /* AgentDescriptor.services */
    p = kd_pb_put_len_field(p, 1, service, strlen(service));
    for (size_t i = 0; i < nmethods; i++) {
        size_t ml = strlen(methods[i]);
        p = kd_pb_put_len_header(p, 2, kd_pb_len_field_size(1, ml)); /* Service.methods */
        p = kd_pb_put_len_field(p, 1, methods[i], ml);
    }
    return (long)(p - out);
}

size_t bench_tun_message_size(size_t n)
{
    return kd_pb_len_field_size(3, kd_pb_len_field_size(1, n));
}

uint8_t *bench_tun_put_message_prefix(uint8_t *p, size_t n)
{
    p = kd_pb_put_len_header(p, 3, kd_pb_len_field_size(1, n)); /* ConnectRequest.message */
    return kd_pb_put_len_header(p, 1, n);                       /* Message.data */
}

uint8_t *bench_tun_put_message(uint8_t *p, const uint8_t *data, size_t n)
{
    p = bench_tun_put_message_prefix(p, n);
    if (n)
        memcpy(p, data, n);
    return p + n;
}

static size_t status_size(int code, size_t msglen)
{
    return (code ? kd_pb_varint_field_size(1, (uint64_t)code) : 0) +
           (msglen ? kd_pb_len_field_size(2, msglen) : 0);
}

size_t bench_tun_error_size(size_t msglen)
{
    /* code is at most 16: one byte of varint, sized for the largest */
    return kd_pb_len_field_size(5, kd_pb_len_field_size(1, status_size(16, msglen)));
}

uint8_t *bench_tun_put_error(uint8_t *p, int code, const char *msg, size_t msglen)
{
    size_t st = status_size(code, msglen);
    p = kd_pb_put_len_header(p, 5, kd_pb_len_field_size(1, st)); /* ConnectRequest.error */
    p = kd_pb_put_len_header(p, 1, st);                          /* Error.status */
    if (code)
        p = kd_pb_put_varint_field(p, 1, (uint64_t)code);
    if (msglen)
        p = kd_pb_put_len_field(p, 2, msg, msglen);
    return p;
}

int bench_tun_decode_response(const uint8_t *p, size_t n, struct bench_tun_resp *out)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc, members = 0;
    memset(out, 0, sizeof(*out));
    kd_pb_reader_init(&r, p, n);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.wt != KD_PB_LEN || f.num < 1 || f.num > 3)
            continue; /* unknown fields are skipped, as protobuf does */
        members++;
        out->kind = (enum bench_tun_resp_kind)f.num;
        struct kd_pb_reader in;
        struct kd_pb_field g;
        kd_pb_reader_init(&in, f.data, f.len);
        int rc2;
        while ((rc2 = kd_pb_next(&in, &g)) > 0) {
            if (g.wt != KD_PB_LEN)
                continue;
            if (f.num == 1 && g.num == 1) {
                out->method = (const char *)g.data;
                out->method_len = g.len;
            } else if (f.num == 1 && g.num == 2) {
                if (out->meta == NULL)
                    out->meta = g.data;
                out->meta_len = (size_t)(g.data + g.len - out->meta);
            } else if (f.num == 2 && g.num == 1) {
                out->data = g.data;
                out->data_len = g.len;
            }
        }
        if (rc2 < 0)
            return -EBADMSG;
    }
    if (rc < 0 || members != 1)
        return -EBADMSG;
    if (out->kind == BENCH_TUN_MESSAGE && out->data == NULL)
        out->data = (const uint8_t *)""; /* Message{} carries zero bytes */
    return 0;
}

long bench_register_request(uint8_t *out, size_t cap, const char *version, const char *pod_name,
                            int64_t pod_id)
{
    /* AgentMeta{1: version, 3: pod_namespace, 4: pod_name} */
    static const char ns[] = "bench";
    size_t meta = kd_pb_len_field_size(1, strlen(version)) + kd_pb_len_field_size(3, sizeof(ns) - 1) +
                  kd_pb_len_field_size(4, strlen(pod_name));
    size_t total = kd_pb_len_field_size(1, meta) + kd_pb_varint_field_size(2, (uint64_t)pod_id);
    if (total > cap)
        return -ENOSPC;
    uint8_t *p = kd_pb_put_len_header(out, 1, meta);
    p = kd_pb_put_len_field(p, 1, version, strlen(version));
    p = kd_pb_put_len_field(p, 3, ns, sizeof(ns) - 1);
    p = kd_pb_put_len_field(p, 4, pod_name, strlen(pod_name));
    p = kd_pb_put_varint_field(p, 2, (uint64_t)pod_id);
    return (long)(p - out);
}

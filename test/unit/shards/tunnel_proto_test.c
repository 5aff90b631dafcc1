/* tunnel_proto_test.c — the hand-written tunnel codec against protobuf-c code generated from our
 * .proto files: what one writes, the other reads, field for field. This pins the hot-path codec
 * to the definitions in proto/ (and so to wire.md). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gitlab/agent/reverse_tunnel/rpc/rpc.pb-c.h"
#include "shards/tunnel_codec.h"

Test(tunnel_proto, request_info_read_by_protobuf_c)
{
    uint8_t blob[256], *p = blob;
    const uint8_t *v1[] = {(const uint8_t *)"a", (const uint8_t *)"bc"};
    size_t l1[] = {1, 2};
    p = kd_tun_blob_put_entry(p, "x-key", 5, v1, l1, 2);
    size_t bl = (size_t)(p - blob);
    size_t n = kd_tun_request_info_size(13, blob, bl);
    uint8_t *out = malloc(n);
    kd_tun_put_request_info(out, "/pkg.Svc/Meth", 13, blob, bl);
    Gitlab__Agent__ReverseTunnel__Rpc__ConnectResponse *r =
        gitlab__agent__reverse_tunnel__rpc__connect_response__unpack(NULL, n, out);
    cr_assert_not_null(r);
    cr_assert_eq(r->msg_case, GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_RESPONSE__MSG_REQUEST_INFO);
    cr_assert_str_eq(r->request_info->method_name, "/pkg.Svc/Meth");
    cr_assert_eq(r->request_info->n_meta, 1);
    cr_assert_str_eq(r->request_info->meta[0]->key, "x-key");
    cr_assert_eq(r->request_info->meta[0]->value->n_value, 2);
    cr_assert_str_eq(r->request_info->meta[0]->value->value[1], "bc");
    gitlab__agent__reverse_tunnel__rpc__connect_response__free_unpacked(r, NULL);
    free(out);
}

Test(tunnel_proto, message_and_close_send_read_by_protobuf_c)
{
    uint8_t buf[64];
    size_t n = (size_t)(kd_tun_put_message(buf, (const uint8_t *)"data!", 5) - buf);
    Gitlab__Agent__ReverseTunnel__Rpc__ConnectResponse *r =
        gitlab__agent__reverse_tunnel__rpc__connect_response__unpack(NULL, n, buf);
    cr_assert_not_null(r);
    cr_assert_eq(r->msg_case, GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_RESPONSE__MSG_MESSAGE);
    cr_assert_eq(r->message->data.len, 5);
    cr_assert_eq(memcmp(r->message->data.data, "data!", 5), 0);
    gitlab__agent__reverse_tunnel__rpc__connect_response__free_unpacked(r, NULL);
    n = (size_t)(kd_tun_put_close_send(buf) - buf);
    r = gitlab__agent__reverse_tunnel__rpc__connect_response__unpack(NULL, n, buf);
    cr_assert_not_null(r);
    cr_assert_eq(r->msg_case, GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_RESPONSE__MSG_CLOSE_SEND);
    gitlab__agent__reverse_tunnel__rpc__connect_response__free_unpacked(r, NULL);
}

static int join_methods(void *ud, const char *svc, size_t sl, const char *m, size_t ml)
{
    char *out = ud;
    size_t n = strlen(out);
    snprintf(out + n, 256 - n, "/%.*s/%.*s ", (int)sl, svc, (int)ml, m);
    return 0;
}

static size_t pack(Gitlab__Agent__ReverseTunnel__Rpc__ConnectRequest *req, uint8_t **out)
{
    size_t n = gitlab__agent__reverse_tunnel__rpc__connect_request__get_packed_size(req);
    *out = malloc(n + 1);
    gitlab__agent__reverse_tunnel__rpc__connect_request__pack(req, *out);
    return n;
}

Test(tunnel_proto, requests_written_by_protobuf_c)
{
    /* Message */
    Gitlab__Agent__ReverseTunnel__Rpc__ConnectRequest req =
        GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_REQUEST__INIT;
    Gitlab__Agent__ReverseTunnel__Rpc__Message msg = GITLAB__AGENT__REVERSE_TUNNEL__RPC__MESSAGE__INIT;
    msg.data.data = (uint8_t *)"payload";
    msg.data.len = 7;
    req.msg_case = GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_REQUEST__MSG_MESSAGE;
    req.message = &msg;
    uint8_t *buf;
    size_t n = pack(&req, &buf);
    struct kd_tun_msg t;
    cr_assert_eq(kd_tun_decode_request(buf, n, &t), 0);
    cr_assert_eq(t.kind, KD_TUN_MESSAGE);
    cr_assert_eq(t.data_len, 7);
    free(buf);

    /* Error */
    Gitlab__Agent__ReverseTunnel__Rpc__Error err = GITLAB__AGENT__REVERSE_TUNNEL__RPC__ERROR__INIT;
    Google__Rpc__Status st = GOOGLE__RPC__STATUS__INIT;
    st.code = 5;
    st.message = "not here";
    err.status = &st;
    req.msg_case = GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_REQUEST__MSG_ERROR;
    req.error = &err;
    n = pack(&req, &buf);
    cr_assert_eq(kd_tun_decode_request(buf, n, &t), 0);
    cr_assert_eq(t.kind, KD_TUN_ERROR);
    cr_assert_eq(t.code, 5);
    cr_assert_eq(t.text_len, 8);
    free(buf);

    /* Descriptor with two services */
    Gitlab__Agent__ReverseTunnel__Info__Method m1 = GITLAB__AGENT__REVERSE_TUNNEL__INFO__METHOD__INIT,
                                               m2 = GITLAB__AGENT__REVERSE_TUNNEL__INFO__METHOD__INIT;
    m1.name = "MakeRequest";
    m2.name = "Check";
    Gitlab__Agent__ReverseTunnel__Info__Method *ms1[] = {&m1}, *ms2[] = {&m2};
    Gitlab__Agent__ReverseTunnel__Info__Service s1 = GITLAB__AGENT__REVERSE_TUNNEL__INFO__SERVICE__INIT,
                                                s2 = GITLAB__AGENT__REVERSE_TUNNEL__INFO__SERVICE__INIT;
    s1.name = "gitlab.agent.kubernetes_api.rpc.KubernetesApi";
    s1.n_methods = 1;
    s1.methods = ms1;
    s2.name = "grpc.health.v1.Health";
    s2.n_methods = 1;
    s2.methods = ms2;
    Gitlab__Agent__ReverseTunnel__Info__Service *svcs[] = {&s1, &s2};
    Gitlab__Agent__ReverseTunnel__Info__AgentDescriptor ad =
        GITLAB__AGENT__REVERSE_TUNNEL__INFO__AGENT_DESCRIPTOR__INIT;
    ad.n_services = 2;
    ad.services = svcs;
    Gitlab__Agent__ReverseTunnel__Rpc__Descriptor d = GITLAB__AGENT__REVERSE_TUNNEL__RPC__DESCRIPTOR__INIT;
    d.agent_descriptor = &ad;
    req.msg_case = GITLAB__AGENT__REVERSE_TUNNEL__RPC__CONNECT_REQUEST__MSG_DESCRIPTOR;
    req.descriptor = &d;
    n = pack(&req, &buf);
    cr_assert_eq(kd_tun_decode_request(buf, n, &t), 0);
    cr_assert_eq(t.kind, KD_TUN_DESCRIPTOR);
    char seen[256] = "";
    cr_assert_eq(kd_tun_descriptor_each(t.body, t.len, join_methods, seen), 2);
    cr_assert_str_eq(seen, "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest "
                           "/grpc.health.v1.Health/Check ");
    free(buf);
}

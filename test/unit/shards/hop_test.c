/* hop_test.c — the routing metadata of api and kas-to-kas calls (kd_kas_parse_hop, shards/route.c),
 * call metadata through an md blob and back (kd_kas_request_md_blob, kd_kas_md_headers) and peer
 * addresses (kd_fleet_parse_address, shards/fleet.c). */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <string.h>

#include "core/chunkpool.h"
#include "shards/fleet.h"
#include "shards/kas.h"

struct hl {
    const char *const *kv; /* name, value, name, value, ..., NULL */
};

static bool get(void *ud, size_t i, struct kd_h2_header *out)
{
    struct hl *l = ud;
    for (size_t j = 0; j <= i; j++)
        if (l->kv[2 * j] == NULL)
            return false;
    *out = (struct kd_h2_header){l->kv[2 * i], strlen(l->kv[2 * i]), l->kv[2 * i + 1], strlen(l->kv[2 * i + 1])};
    return true;
}

static int parse(bool gw, struct kd_kas_hop *hop, const char **why, const char *const *kv)
{
    struct hl l = {kv};
    return kd_kas_parse_hop(get, &l, gw, hop, why);
}

Test(hop, api_agent_id)
{
    struct kd_kas_hop hop;
    const char *why;
    cr_assert_eq(parse(false, &hop, &why, (const char *[]){"kas-hop-routing-agent-id", "42", NULL}), 0);
    cr_assert_eq(hop.agent_id, 42);
    cr_assert_eq(parse(false, &hop, &why, (const char *[]){"x", "1", NULL}), KD_GRPC_INVALID_ARGUMENT);
    cr_assert(strstr(why, "missing") != NULL);
    cr_assert_eq(parse(false, &hop, &why,
                       (const char *[]){"kas-hop-routing-agent-id", "1", "kas-hop-routing-agent-id", "2", NULL}),
                 KD_GRPC_INVALID_ARGUMENT);
    cr_assert(strstr(why, "repeated") != NULL);
    cr_assert_eq(parse(false, &hop, &why, (const char *[]){"kas-hop-routing-agent-id", "0", NULL}),
                 KD_GRPC_INVALID_ARGUMENT);
    cr_assert_eq(parse(false, &hop, &why, (const char *[]){"kas-hop-routing-agent-id", "12a", NULL}),
                 KD_GRPC_INVALID_ARGUMENT);
    cr_assert_eq(parse(false, &hop, &why, (const char *[]){"kas-hop-routing-agent-id", "1234567890123456789", NULL}),
                 KD_GRPC_INVALID_ARGUMENT);
    /* the api listener ignores the gateway's keys */
    cr_assert_eq(parse(false, &hop, &why, (const char *[]){"kas-hop-routing-agent-id", "7", "kas-hop-method", "x", NULL}),
                 0);
}

Test(hop, gateway)
{
    struct kd_kas_hop hop;
    const char *why;
    const char *ok[] = {"kas-hop-routing-agent-id", "7", "kas-hop-method", "/a.B/C", "kas-hop-instance",
                        "0123456789abcdef", NULL};
    cr_assert_eq(parse(true, &hop, &why, ok), 0);
    cr_assert_eq(hop.agent_id, 7);
    cr_assert_eq(hop.method_len, 6);
    cr_assert(memcmp(hop.method, "/a.B/C", 6) == 0);
    cr_assert(memcmp(hop.instance, "0123456789abcdef", 16) == 0);
    const char *nomethod[] = {"kas-hop-routing-agent-id", "7", "kas-hop-instance", "0123456789abcdef", NULL};
    cr_assert_eq(parse(true, &hop, &why, nomethod), KD_GRPC_INVALID_ARGUMENT);
    cr_assert(strstr(why, "kas-hop-method") != NULL);
    const char *badmethod[] = {"kas-hop-routing-agent-id", "7", "kas-hop-method", "/a B/C", "kas-hop-instance",
                               "0123456789abcdef", NULL};
    cr_assert_eq(parse(true, &hop, &why, badmethod), KD_GRPC_INVALID_ARGUMENT);
    const char *badinst[] = {"kas-hop-routing-agent-id", "7", "kas-hop-method", "/a.B/C", "kas-hop-instance",
                             "0123456789ABCDEF", NULL};
    cr_assert_eq(parse(true, &hop, &why, badinst), KD_GRPC_INVALID_ARGUMENT);
    cr_assert(strstr(why, "kas-hop-instance") != NULL);
    const char *twoinst[] = {"kas-hop-routing-agent-id", "7", "kas-hop-method", "/a.B/C", "kas-hop-instance",
                             "0123456789abcdef", "kas-hop-instance", "0123456789abcdef", NULL};
    cr_assert_eq(parse(true, &hop, &why, twoinst), KD_GRPC_INVALID_ARGUMENT);
}

Test(md, round_trip_long_key_many_values)
{
    /* A blob holds a key once per entry; the headers made from it carry the key once per value.
     * The arena (twice the blob) overflowed when the key was copied per value, and values were
     * dropped: of these 22 headers, 8 came back. */
    static const char key[] = "x-a-rather-long-metadata-key";
    const char *kv[2 * 24 + 1];
    static const char vals[20][2] = {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j",
                                     "k", "l", "m", "n", "o", "p", "q", "r", "s", "t"};
    size_t n = 0;
    kv[n++] = ":path", kv[n++] = "/a.B/C";
    kv[n++] = "authorization", kv[n++] = "Bearer x";
    for (size_t i = 0; i < 20; i++)
        kv[n++] = key, kv[n++] = vals[i];
    kv[n++] = "x-bin", kv[n++] = "AAH/"; /* 00 01 ff */
    kv[n++] = "x-bin", kv[n++] = "AAE";  /* 00 01, unpadded */
    kv[n] = NULL;
    struct hl l = {kv};
    size_t blen = 0;
    uint8_t *blob = kd_kas_request_md_blob(get, &l, &blen);
    cr_assert_not_null(blob);
    struct kd_h2_header h[64];
    char *arena = NULL;
    size_t nh = kd_kas_md_headers(blob, blen, h, 64, &arena);
    cr_assert_eq(nh, 22, "got %zu", nh);
    for (size_t i = 0; i < 20; i++) {
        cr_assert_eq(h[i].namelen, strlen(key));
        cr_assert(memcmp(h[i].name, key, strlen(key)) == 0);
        cr_assert_eq(h[i].valuelen, 1);
        cr_assert_eq(h[i].value[0], vals[i][0]);
    }
    cr_assert(h[20].namelen == 5 && memcmp(h[20].name, "x-bin", 5) == 0);
    cr_assert(h[20].valuelen == 4 && memcmp(h[20].value, "AAH/", 4) == 0);
    cr_assert(h[21].valuelen == 3 && memcmp(h[21].value, "AAE", 3) == 0);
    kd_chunkpool_free(arena);
    kd_chunkpool_free(blob);
}

Test(fleet, parse_address)
{
    struct sockaddr_storage ss;
    socklen_t sl;
    cr_assert_eq(kd_fleet_parse_address("127.0.0.1:8155", &ss, &sl), 0);
    cr_assert_eq(ss.ss_family, AF_INET);
    cr_assert_eq(ntohs(((struct sockaddr_in *)&ss)->sin_port), 8155);
    cr_assert_eq(kd_fleet_parse_address("[::1]:9", &ss, &sl), 0);
    cr_assert_eq(ss.ss_family, AF_INET6);
    cr_assert_eq(ntohs(((struct sockaddr_in6 *)&ss)->sin6_port), 9);
    const char *bad[] = {"", "127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "localhost:80",
                         "::1:80", "[127.0.0.1]:80", "[::1]80", "1.2.3.4:80x", "[::1]:-1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        cr_assert_eq(kd_fleet_parse_address(bad[i], &ss, &sl), -EINVAL, "%s", bad[i]);
}

/* hop_test.c — the routing metadata of api and kas-to-kas calls (kd_kas_parse_hop, shards/route.c)
 * and peer addresses (kd_fleet_parse_address, shards/fleet.c). */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <string.h>

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

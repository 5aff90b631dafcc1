/* hop_fuzz.c — what the private API (and the api listener) reads from untrusted metadata:
 * kd_kas_parse_hop (kas-hop-routing-agent-id, kas-hop-method, kas-hop-instance; shards/route.c),
 * kd_kas_md_headers (an md blob back to HTTP/2 headers, as a gateway's caller metadata and an
 * agent's header metadata are turned into headers) and kd_fleet_parse_address (a peer's advertised
 * address from Redis). Input: first byte selects nothing; the rest is split into headers at '\n',
 * name and value at the first ':'; the whole input is also tried as an md blob and an address.
 * Checks: accepted values lie inside the input and satisfy the documented rules; headers made from
 * a blob carry valid keys and no byte HTTP/2 forbids; an accepted address has a port in 1..65535. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/chunkpool.h"
#include "core/grpc.h"
#include "shards/fleet.h"
#include "shards/kas.h"
#include "test/fuzz/fuzz.h"
#include "test/fuzz/hlist.h"

static bool inside(const void *p, size_t n, const uint8_t *data, size_t size)
{
    const uint8_t *q = p;
    return q >= data && n <= size && q + n <= data + size;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fuzz_hlist l = {.n = 0};
    const char *p = (const char *)data, *end = p + size;
    while (p < end && l.n < FUZZ_HLIST_MAX) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = nl ? nl : end;
        const char *colon = memchr(p, ':', (size_t)(line_end - p));
        if (colon != NULL)
            l.h[l.n++] = (struct kd_h2_header){p, (size_t)(colon - p), colon + 1, (size_t)(line_end - colon - 1)};
        p = nl ? nl + 1 : end;
    }
    for (int gw = 0; gw < 2; gw++) {
        struct kd_kas_hop hop;
        const char *why = NULL;
        int st = kd_kas_parse_hop(fuzz_hlist_get, &l, gw, &hop, &why);
        if (st != 0) {
            CHECK(why != NULL && st > 0 && st <= 16);
            continue;
        }
        CHECK(hop.agent_id > 0);
        if (gw) {
            CHECK(inside(hop.method, hop.method_len, data, size) && hop.method[0] == '/');
            CHECK(hop.method_len >= 3 && hop.method_len <= 1024);
            for (size_t i = 0; i < hop.method_len; i++)
                CHECK(hop.method[i] > 0x20 && hop.method[i] < 0x7f);
            CHECK(inside(hop.instance, hop.instance_len, data, size) && hop.instance_len == 16);
        }
    }

    struct kd_h2_header h[64];
    char *arena = NULL;
    size_t n = kd_kas_md_headers(data, size, h, 64, &arena);
    CHECK(n <= 64);
    for (size_t i = 0; i < n; i++) {
        CHECK(kd_grpc_metadata_key_valid(h[i].name, h[i].namelen));
        for (size_t j = 0; j < h[i].valuelen; j++)
            CHECK((unsigned char)h[i].value[j] >= 0x20 && (unsigned char)h[i].value[j] <= 0x7e);
    }
    kd_chunkpool_free(arena);

    char addr[128];
    size_t al = size < sizeof(addr) - 1 ? size : sizeof(addr) - 1;
    memcpy(addr, data, al);
    addr[al] = '\0';
    struct sockaddr_storage ss;
    socklen_t sl;
    if (kd_fleet_parse_address(addr, &ss, &sl) == 0)
        CHECK((ss.ss_family == AF_INET || ss.ss_family == AF_INET6) && sl > 0);
    return 0;
}

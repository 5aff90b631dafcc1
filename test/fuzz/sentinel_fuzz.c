/* sentinel_fuzz.c — a Sentinel's answer to SENTINEL get-master-addr-by-name (untrusted bytes: a
 * sentinel, or whatever answers on its address) as shards/redis.c reads it: the bytes go through the
 * RESP reader, and every complete reply through kd_redis_sentinel_master.
 * Checks: an accepted address is NUL-terminated within the buffer, "host:port" or "[v6]:port",
 * made of the reply's own host bytes and a port in 1..65535; never a truncated address (a small
 * buffer is tried too). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/resp.h"
#include "shards/redis.h"
#include "test/fuzz/fuzz.h"

static void check(const struct kd_resp *o)
{
    char out[160], small[16];
    if (kd_redis_sentinel_master(o, out, sizeof(out)) == 0) {
        size_t n = strnlen(out, sizeof(out));
        CHECK(n < sizeof(out));
        const struct kd_resp *host = o->elem[0];
        const char *colon = strrchr(out, ':');
        CHECK(colon != NULL);
        long port = strtol(colon + 1, NULL, 10);
        CHECK(port >= 1 && port <= 65535);
        if (out[0] == '[') {
            CHECK((size_t)(colon - out) == host->len + 2 && colon[-1] == ']');
            CHECK(memcmp(out + 1, host->str, host->len) == 0);
        } else {
            CHECK((size_t)(colon - out) == host->len && memcmp(out, host->str, host->len) == 0);
            CHECK(memchr(host->str, ':', host->len) == NULL);
        }
        if (kd_redis_sentinel_master(o, small, sizeof(small)) == 0)
            CHECK(strcmp(small, out) == 0);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kd_resp_reader *r = kd_resp_reader_new(1 << 16);
    if (r == NULL)
        return 0;
    if (kd_resp_reader_feed(r, data, size) == 0) {
        struct kd_resp *o;
        while (kd_resp_reader_next(r, &o) > 0 && o != NULL) {
            check(o);
            kd_resp_free(o);
        }
    }
    kd_resp_reader_free(r);
    return 0;
}

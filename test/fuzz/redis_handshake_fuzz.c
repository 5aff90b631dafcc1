/* redis_handshake_fuzz.c — what shards/redis.c makes of the replies to its handshake (untrusted
 * bytes: a Redis server, a sentinel, or whatever answers on their addresses): the input goes through
 * the RESP reader as redis.c feeds it, and every complete reply is given to
 * kd_redis_handshake_reply as the answer to each step (AUTH, SELECT, PING, ROLE, CLIENT SETNAME,
 * SENTINEL get-master-addr-by-name), with large and with small output buffers. (The RESP reader
 * itself is resp_fuzz's.)
 * Checks: the verdict follows redis.h (an error fails AUTH, SELECT and PING and nothing else does;
 * ROLE goes on only for an array led by "master"; SETNAME always goes on; SENTINEL never merely
 * goes on); a master's address is NUL-terminated within the buffer, "host:port" or "[v6]:port",
 * made of the reply's own host bytes and a port in 1..65535, never a truncated address; a
 * failure's reason is a NUL-terminated line of bounded length that quotes the error reply's start
 * (an empty error is named as such); NOAUTH and WRONGPASS read as authentication failures; small
 * buffers give the same verdict (bar an address that no longer fits) and a prefix of the same
 * reason. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/resp.h"
#include "shards/redis.h"
#include "test/fuzz/fuzz.h"

#define DATABASE 4294967295u
/* Longer than the 100 bytes a reason quotes of it. */
static const char master_name[] = "a-sentinel-master-name-that-is-longer-than-what-a-reason-quotes-of-it-"
                                  "0123456789012345678901234567890123456789012345678901234567890123456789";

static bool starts(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* A master's address as the sentinel reported it: ["host", "port"]. */
static void check_address(const struct kd_resp *o, const char *out, size_t cap)
{
    size_t n = strnlen(out, cap);
    CHECK(n < cap);
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
}

static void check(enum kd_redis_hs_step step, const struct kd_resp *o)
{
    char why[1024], master[160], addr[160];
    memset(why, 0x55, sizeof(why));
    int v =
        kd_redis_handshake_reply(step, o, DATABASE, master_name, master, sizeof(master), why, sizeof(why));
    const char *err = o->type == KD_RESP_ERROR ? o->str : NULL;
    CHECK(v == KD_REDIS_HS_NEXT || v == KD_REDIS_HS_FAIL || v == KD_REDIS_HS_MASTER);
    switch (step) {
    case KD_REDIS_HS_AUTH:
    case KD_REDIS_HS_SELECT:
    case KD_REDIS_HS_PING:
        CHECK(v == (err != NULL ? KD_REDIS_HS_FAIL : KD_REDIS_HS_NEXT));
        break;
    case KD_REDIS_HS_ROLE: {
        const struct kd_resp *e = o->type == KD_RESP_ARRAY && o->n > 0 ? o->elem[0] : NULL;
        bool is_master = e != NULL && (e->type == KD_RESP_STRING || e->type == KD_RESP_STATUS) &&
                         e->len == 6 && strncasecmp(e->str, "master", 6) == 0;
        CHECK(v == (is_master ? KD_REDIS_HS_NEXT : KD_REDIS_HS_FAIL));
        break;
    }
    case KD_REDIS_HS_SETNAME:
        CHECK(v == KD_REDIS_HS_NEXT);
        break;
    case KD_REDIS_HS_SENTINEL:
        CHECK(v != KD_REDIS_HS_NEXT);
        if (v == KD_REDIS_HS_MASTER) {
            CHECK(kd_redis_sentinel_master(o, addr, sizeof(addr)) == 0 && strcmp(addr, master) == 0);
            CHECK(err == NULL);
            check_address(o, master, sizeof(master));
        }
        break;
    }
    if (v == KD_REDIS_HS_FAIL) {
        size_t n = strnlen(why, sizeof(why));
        CHECK(n > 0 && n < 256); /* bounded: a log line's reason, whatever the reply */
        if (err != NULL) {
            /* The reason quotes the error reply's first bytes (up to 200, and its first NUL). */
            size_t q = strnlen(err, 200);
            CHECK(memmem(why, n, err, q) != NULL || (step == KD_REDIS_HS_ROLE && q > 40));
            if (step == KD_REDIS_HS_SENTINEL && q == 0) /* the error is the whole reason: never empty */
                CHECK(strcmp(why, "empty error reply") == 0);
            if (starts(err, "NOAUTH") || starts(err, "WRONGPASS") || step == KD_REDIS_HS_AUTH)
                CHECK(step == KD_REDIS_HS_SELECT || step == KD_REDIS_HS_SENTINEL ||
                      starts(why, "authentication failed: "));
        }
        if (step == KD_REDIS_HS_SENTINEL && err == NULL)
            CHECK(memmem(why, n, master_name, 100) != NULL && memmem(why, n, master_name, 101) == NULL);
    }

    /* Small buffers: the same verdict (an address may no longer fit), a prefix of the same reason. */
    char small_why[24], small_master[16];
    int sv = kd_redis_handshake_reply(step, o, DATABASE, master_name, small_master, sizeof(small_master),
                                      small_why, sizeof(small_why));
    if (v == KD_REDIS_HS_MASTER && strlen(master) >= sizeof(small_master)) {
        CHECK(sv == KD_REDIS_HS_FAIL);
    } else {
        CHECK(sv == v);
        if (v == KD_REDIS_HS_FAIL) {
            CHECK(memchr(small_why, '\0', sizeof(small_why)) != NULL);
            CHECK(strncmp(small_why, why, strlen(small_why)) == 0);
        }
        if (v == KD_REDIS_HS_MASTER)
            CHECK(strcmp(small_master, master) == 0);
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
            for (int step = KD_REDIS_HS_AUTH; step <= KD_REDIS_HS_SENTINEL; step++)
                check((enum kd_redis_hs_step)step, o);
            kd_resp_free(o);
        }
    }
    kd_resp_reader_free(r);
    return 0;
}

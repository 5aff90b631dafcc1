/* presence_fuzz.c — what a shard's presence layer reads from Redis (untrusted bytes; shards/presence.c):
 * a pub-sub message ("+<16 hex>" / "-<16 hex>", kd_presence_parse_event), the channel it came on
 * ("<prefix>:{a:<id>}:presence", kd_presence_parse_channel) and an instance record's "address"
 * (JSON written by a peer's tracker, kd_presence_parse_record). The whole input is tried as each.
 * Checks: an accepted event names 16 lower-case hex digits and is the input's own; an accepted
 * channel is canonical (formatting the id back gives the input: no leading zeros, no sign, > 0);
 * an accepted address is the bytes after "address":" up to the next quote, printable, no spaces. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shards/presence.h"
#include "test/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    char id[17];
    int up = kd_presence_parse_event(s, size, id);
    if (up >= 0) {
        CHECK(size == 17 && (s[0] == '+') == (up == 1) && (s[0] == '+' || s[0] == '-'));
        CHECK(strlen(id) == 16 && memcmp(id, s + 1, 16) == 0);
        for (int i = 0; i < 16; i++)
            CHECK((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f'));
    }

    static const char *const prefixes[] = {"gitlab-kas", "", "p"};
    for (size_t k = 0; k < 3; k++) {
        int64_t a = kd_presence_parse_channel(prefixes[k], s, size);
        CHECK(a >= -1);
        if (a >= 0) {
            char buf[160];
            int n = snprintf(buf, sizeof(buf), "%s:{a:%" PRId64 "}:presence", prefixes[k], a);
            CHECK(a > 0 && n > 0 && (size_t)n == size && memcmp(buf, s, size) == 0);
        }
    }

    char addr[96];
    memset(addr, 'X', sizeof(addr));
    if (kd_presence_parse_record(s, size, addr, sizeof(addr)) == 0) {
        size_t al = strnlen(addr, sizeof(addr));
        CHECK(al > 0 && al < sizeof(addr));
        for (size_t i = 0; i < al; i++)
            CHECK(addr[i] > 0x20 && addr[i] < 0x7f && addr[i] != '"' && addr[i] != '\\');
        const char *key = memmem(s, size, "\"address\":\"", 11);
        CHECK(key != NULL && (size_t)(key - s) + 11 + al < size && memcmp(key + 11, addr, al) == 0 &&
              key[11 + al] == '"');
    }
    return 0;
}

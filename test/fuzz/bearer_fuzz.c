/* bearer_fuzz.c — the authorization metadata as kd_kas_bearer (shards/service.c) reads it: the input is
 * the value of an authorization header in a request the driver frames itself (HPACK literals) and
 * feeds to a server session (core/h2.c), so the value arrives as the session stores it. Checks: a
 * token is returned only for a "Bearer " value (case-insensitive), lies inside the value, is not
 * empty and does not start with a space. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/grpc.h"
#include "core/h2.h"
#include "shards/kas.h"
#include "test/fuzz/fuzz.h"

static int calls;

static int on_call(void *ud, struct kd_h2_call *c)
{
    size_t vlen = 0, tlen = 0;
    const char *v = kd_h2_call_header_value(c, "authorization", &vlen);
    const char *tok = kd_kas_bearer(c, &tlen);
    calls++;
    if (tok != NULL) {
        CHECK(v != NULL && vlen >= 8 && strncasecmp(v, "bearer ", 7) == 0);
        CHECK(tok >= v + 7 && tlen > 0 && tok + tlen == v + vlen && tok[0] != ' ');
        for (const char *p = v + 7; p < tok; p++)
            CHECK(*p == ' ');
    } else if (v != NULL && vlen >= 8 && strncasecmp(v, "bearer ", 7) == 0) {
        for (size_t i = 7; i < vlen; i++)
            CHECK(v[i] == ' ');
    }
    return KD_GRPC_UNAUTHENTICATED;
}

static int sink(void *ud, const uint8_t *d, size_t n)
{
    return 0;
}

static uint8_t *lit(uint8_t *p, const char *name, const uint8_t *value, size_t vlen)
{
    size_t nlen = strlen(name);
    *p++ = 0x00; /* literal without indexing, new name */
    *p++ = (uint8_t)nlen;
    memcpy(p, name, nlen);
    p += nlen;
    /* HPACK 7-bit prefix integer, no Huffman */
    if (vlen < 127) {
        *p++ = (uint8_t)vlen;
    } else {
        *p++ = 127;
        size_t rest = vlen - 127;
        while (rest >= 128) {
            *p++ = (uint8_t)(rest & 127) | 128;
            rest >>= 7;
        }
        *p++ = (uint8_t)rest;
    }
    memcpy(p, value, vlen);
    return p + vlen;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4000)
        return 0;
    static uint8_t buf[8192];
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    uint8_t *p = buf;
    memcpy(p, preface, sizeof(preface) - 1);
    p += sizeof(preface) - 1;
    static const uint8_t settings[] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
    memcpy(p, settings, sizeof(settings));
    p += sizeof(settings);
    uint8_t *hd = p;
    p += 9;
    uint8_t *blk = p;
    p = lit(p, ":method", (const uint8_t *)"POST", 4);
    p = lit(p, ":scheme", (const uint8_t *)"http", 4);
    p = lit(p, ":path", (const uint8_t *)"/a.B/C", 6);
    p = lit(p, ":authority", (const uint8_t *)"kas", 3);
    p = lit(p, "content-type", (const uint8_t *)"application/grpc", 16);
    p = lit(p, "authorization", data, size);
    size_t blen = (size_t)(p - blk);
    uint8_t h9[9] = {(uint8_t)(blen >> 16), (uint8_t)(blen >> 8), (uint8_t)blen, 1, 5, 0, 0, 0, 1};
    memcpy(hd, h9, 9);

    struct kd_h2_opts o = {.server = true,
                           .max_message = 65536,
                           .max_concurrent_streams = 100,
                           .max_header_list = 8192,
                           .initial_window = 65535,
                           .on_call = on_call};
    struct kd_h2 *h = kd_h2_new(&o);
    if (h == NULL)
        return 0;
    const char *err;
    calls = 0;
    kd_h2_recv(h, buf, (size_t)(p - buf), &err);
    kd_h2_send(h, sink, NULL);
    kd_h2_free(h);
    return 0;
}

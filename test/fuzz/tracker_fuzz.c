/* tracker_fuzz.c — what the fleet tracker reads back from Redis, as shards/tracker.c uses it:
 * arbitrary bytes through the RESP reader; every string of every reply (SMEMBERS and SRANDMEMBER
 * answers are arrays of index members) goes through kd_tracker_parse_member, which must classify
 * it and, when it accepts it, parse the member it would write for those values back to the same
 * values. The input also drives kd_tracker_encode_info (the ConnectedAgentInfo kasd stores),
 * whose bytes must decode field by field to what went in. */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/pb.h"
#include "core/resp.h"
#include "shards/tracker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void member(const char *s, size_t n)
{
    uint64_t key = 0;
    int64_t agent = 0, project = 0;
    int kind = kd_tracker_parse_member(s, n, &key, &agent, &project);
    if (kind != 'c' && kind != 't' && kind != -1)
        abort();
    if (kind < 0)
        return;
    char again[96];
    int len = kind == 'c'
                  ? snprintf(again, sizeof(again), "c:%" PRIx64 ":%" PRId64 ":%" PRId64, key, agent, project)
                  : snprintf(again, sizeof(again), "t:%" PRId64, agent);
    uint64_t key2 = 0;
    int64_t agent2 = 0, project2 = 0;
    if (kd_tracker_parse_member(again, (size_t)len, &key2, &agent2, &project2) != kind || agent2 != agent ||
        (kind == 'c' && (key2 != key || project2 != project)))
        abort();
}

static void walk(const struct kd_resp *o)
{
    if (o->type == KD_RESP_STRING || o->type == KD_RESP_STATUS)
        member(o->str, o->len);
    else if (o->type == KD_RESP_ARRAY)
        for (size_t i = 0; i < o->n; i++)
            walk(o->elem[i]);
}

static int64_t i64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return (int64_t)v;
}

static void info(const uint8_t *data, size_t size)
{
    if (size < 32)
        return;
    int64_t pod = i64(data), agent = i64(data + 8), project = i64(data + 16);
    uint64_t at = (uint64_t)i64(data + 24) >> 8;
    const uint8_t *meta = data + 32;
    size_t mlen = size - 32;
    size_t n = kd_tracker_encode_info(NULL, meta, mlen, at, pod, agent, project);
    uint8_t *buf = malloc(n ? n : 1);
    if (buf == NULL || kd_tracker_encode_info(buf, meta, mlen, at, pod, agent, project) != n)
        abort();
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc, seen_meta = 0;
    int64_t got[6] = {0};
    kd_pb_reader_init(&r, buf, n);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num == 1 && f.wt == KD_PB_LEN) {
            if (f.len != mlen || (mlen && memcmp(f.data, meta, mlen) != 0))
                abort();
            seen_meta = 1;
        } else if (f.num >= 3 && f.num <= 5 && f.wt == KD_PB_VARINT) {
            got[f.num] = (int64_t)f.v;
        } else if (f.num != 2 || f.wt != KD_PB_LEN) {
            abort();
        }
    }
    if (rc < 0 || !seen_meta || got[3] != pod || got[4] != agent || got[5] != project)
        abort();
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    info(data, size);
    struct kd_resp_reader *rd = kd_resp_reader_new(1u << 20);
    if (rd == NULL)
        return 0;
    if (kd_resp_reader_feed(rd, data, size) == 0) {
        struct kd_resp *o;
        while (kd_resp_reader_next(rd, &o) == 1) {
            walk(o);
            kd_resp_free(o);
        }
    }
    kd_resp_reader_free(rd);
    return 0;
}

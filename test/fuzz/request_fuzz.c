/* request_fuzz.c — the request messages agents and GitLab send, as kasd decodes them:
 * RegisterRequest, GetConnectedAgentsRequest and ConfigurationRequest through the decoders the
 * services call (shards/requests.c, field loops over kd_pb_next); HealthCheckRequest has its own reader, kd_grpc_health_service
 * (shards/grpc.c). Checks: every field kd_pb_next returns lies inside the input and the reader only
 * moves forward; whatever it accepts re-encodes with the kd_pb writers (sizes as the kd_pb_size
 * helpers say) and parses back to the same fields; the health reader accepts whatever kd_pb_next
 * accepts and finds the same service name. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/pb.h"
#include "shards/grpc.h"
#include "shards/requests.h"
#include "test/fuzz/fuzz.h"

#define MAX_FIELDS 512

static struct kd_pb_field fields[MAX_FIELDS], again[MAX_FIELDS];

/* All fields of msg (at most max); -1 when malformed. */
static int parse(const uint8_t *msg, size_t len, struct kd_pb_field *out, size_t max, size_t *n)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc;
    *n = 0;
    kd_pb_reader_init(&r, msg, len);
    const uint8_t *prev = r.p;
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        CHECK(r.p > prev && r.p <= msg + len);
        prev = r.p;
        CHECK(f.num > 0 && f.wt <= KD_PB_I32);
        if (f.wt == KD_PB_LEN)
            CHECK(f.data >= msg && f.len <= (size_t)(msg + len - f.data) && f.data + f.len <= r.p);
        else
            CHECK(f.data == NULL && f.len == 0);
        if (*n < max)
            out[(*n)++] = f;
    }
    CHECK(rc == 0 || rc < 0);
    return rc < 0 ? -1 : 0;
}

static void roundtrip(const struct kd_pb_field *in, size_t n)
{
    size_t need = 0;
    for (size_t i = 0; i < n; i++) {
        const struct kd_pb_field *f = &in[i];
        switch (f->wt) {
        case KD_PB_VARINT:
            need += kd_pb_varint_field_size(f->num, f->v);
            break;
        case KD_PB_LEN:
            need += kd_pb_len_field_size(f->num, f->len);
            break;
        case KD_PB_I64:
            need += kd_pb_tag_size(f->num) + 8;
            break;
        default:
            need += kd_pb_tag_size(f->num) + 4;
            break;
        }
    }
    uint8_t *buf = malloc(need ? need : 1), *p = buf;
    CHECK(buf != NULL);
    for (size_t i = 0; i < n; i++) {
        const struct kd_pb_field *f = &in[i];
        switch (f->wt) {
        case KD_PB_VARINT:
            p = kd_pb_put_varint_field(p, f->num, f->v);
            break;
        case KD_PB_LEN:
            p = kd_pb_put_len_field(p, f->num, f->data, f->len);
            break;
        case KD_PB_I64:
            p = kd_pb_put_tag(p, f->num, KD_PB_I64);
            memcpy(p, &f->v, 8);
            p += 8;
            break;
        default: {
            uint32_t v32 = (uint32_t)f->v;
            p = kd_pb_put_tag(p, f->num, KD_PB_I32);
            memcpy(p, &v32, 4);
            p += 4;
            break;
        }
        }
    }
    CHECK((size_t)(p - buf) == need);
    size_t m;
    CHECK(parse(buf, need, again, MAX_FIELDS, &m) == 0 && m == n);
    for (size_t i = 0; i < n; i++) {
        CHECK(again[i].num == in[i].num && again[i].wt == in[i].wt && again[i].v == in[i].v);
        CHECK(again[i].len == in[i].len &&
              (in[i].len == 0 || memcmp(again[i].data, in[i].data, in[i].len) == 0));
    }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* A private copy of exactly size bytes, so ASan catches reads one past the message. */
    uint8_t *msg = malloc(size ? size : 1);
    CHECK(msg != NULL);
    memcpy(msg, data, size);
    size_t n;
    int ok = parse(msg, size, fields, MAX_FIELDS, &n);
    if (ok == 0 && n < MAX_FIELDS)
        roundtrip(fields, n);

    struct kd_register_req reg;
    struct kd_connected_agents_req ca;
    struct kd_configuration_req cr;
    CHECK((kd_req_register(msg, size, &reg) < 0) == (ok < 0));
    CHECK(reg.meta == NULL || (reg.meta >= msg && reg.meta + reg.meta_len <= msg + size));
    CHECK((kd_req_connected_agents(msg, size, &ca) < 0) == (ok < 0));
    CHECK(ca.which == 0 || ca.which == 1 || ca.which == 2);
    CHECK((kd_req_configuration(msg, size, &cr) < 0) == (ok < 0));
    CHECK(cr.commit == NULL || (cr.commit >= msg && cr.commit + cr.commit_len <= msg + size));
    CHECK(cr.meta == NULL || (cr.meta >= msg && cr.meta + cr.meta_len <= msg + size));
    if (ok == 0 && n < MAX_FIELDS) {
        /* the decoders keep the last field of each number and wire type they read */
        int64_t want_pod = 0;
        for (size_t i = 0; i < n; i++)
            if (fields[i].num == 2 && fields[i].wt == KD_PB_VARINT)
                want_pod = (int64_t)fields[i].v;
        CHECK(reg.pod_id == want_pod);
    }

    size_t slen;
    const uint8_t *svc = kd_grpc_health_service(msg, size, &slen);
    if (svc != NULL && slen > 0)
        CHECK(svc >= msg && svc + slen <= msg + size);
    if (ok == 0) {
        /* The health reader is laxer than kd_pb_next (field 0, long tags), never stricter. */
        CHECK(svc != NULL);
        const uint8_t *last = NULL;
        size_t last_len = 0;
        for (size_t i = 0; i < n; i++)
            if (fields[i].num == 1 && fields[i].wt == KD_PB_LEN) {
                last = fields[i].data;
                last_len = fields[i].len;
            }
        if (n < MAX_FIELDS)
            CHECK(last_len == slen && (last == NULL ? slen == 0 : last == svc));
    }
    free(msg);
    return 0;
}

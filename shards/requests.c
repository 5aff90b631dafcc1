/* requests.c — see requests.h. */
#include "shards/requests.h"

#include <string.h>

#include "core/pb.h"

int kd_req_register(const uint8_t *msg, size_t len, struct kd_register_req *out)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc;
    memset(out, 0, sizeof(*out));
    kd_pb_reader_init(&r, msg, len);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num == 1 && f.wt == KD_PB_LEN) {
            out->meta = f.data;
            out->meta_len = f.len;
        } else if (f.num == 2 && f.wt == KD_PB_VARINT) {
            out->pod_id = (int64_t)f.v;
        }
    }
    return rc < 0 ? -1 : 0;
}

int kd_req_connected_agents(const uint8_t *msg, size_t len, struct kd_connected_agents_req *out)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc;
    memset(out, 0, sizeof(*out));
    kd_pb_reader_init(&r, msg, len);
    while ((rc = kd_pb_next(&r, &f)) > 0)
        if ((f.num == 1 || f.num == 2) && f.wt == KD_PB_VARINT) {
            out->which = (int)f.num;
            out->id = (int64_t)f.v;
        }
    return rc < 0 ? -1 : 0;
}

int kd_req_configuration(const uint8_t *msg, size_t len, struct kd_configuration_req *out)
{
    struct kd_pb_reader r;
    struct kd_pb_field f;
    int rc;
    memset(out, 0, sizeof(*out));
    kd_pb_reader_init(&r, msg, len);
    while ((rc = kd_pb_next(&r, &f)) > 0) {
        if (f.num == 1 && f.wt == KD_PB_LEN) {
            out->commit = f.data;
            out->commit_len = f.len;
        } else if (f.num == 2 && f.wt == KD_PB_LEN) {
            out->meta = f.data;
            out->meta_len = f.len;
        } else if (f.num == 3 && f.wt == KD_PB_VARINT) {
            out->skip_register = f.v != 0;
        }
    }
    return rc < 0 ? -1 : 0;
}

/* requests.h — the request messages agents and GitLab send, as kasd decodes them (untrusted bytes):
 * RegisterRequest (shards/register.c), GetConnectedAgentsRequest (shards/tracker.c) and
 * ConfigurationRequest (shards/agentconfig.c), field loops over kd_pb_next (core/pb.c). Unknown
 * fields and fields of another wire type are skipped, as protobuf does; a field repeated keeps its
 * last value. Exported for test/fuzz/request_fuzz.c, which drives these very functions.
 * Concurrency: pure functions. Ownership: the pointers returned point into msg. */
#ifndef KD_SHARDS_REQUESTS_H
#define KD_SHARDS_REQUESTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* RegisterRequest { gitlab.agent.entity.AgentMeta agent_meta = 1; int64 pod_id = 2; } */
struct kd_register_req {
    const uint8_t *meta; /* NULL: absent */
    size_t meta_len;
    int64_t pod_id;
};
/* GetConnectedAgentsRequest { oneof request { int64 project_id = 1; int64 agent_id = 2; } } */
struct kd_connected_agents_req {
    int which; /* 0: neither set; 1: project_id; 2: agent_id (the last one set wins) */
    int64_t id;
};
/* ConfigurationRequest { string commit_id = 1; AgentMeta agent_meta = 2; bool skip_register = 3; } */
struct kd_configuration_req {
    const uint8_t *commit, *meta; /* NULL: absent */
    size_t commit_len, meta_len;
    bool skip_register;
};

/* 0, or -1 when msg is not a well-formed protobuf message (the caller answers INVALID_ARGUMENT). */
int kd_req_register(const uint8_t *msg, size_t len, struct kd_register_req *out);
int kd_req_connected_agents(const uint8_t *msg, size_t len, struct kd_connected_agents_req *out);
int kd_req_configuration(const uint8_t *msg, size_t len, struct kd_configuration_req *out);

#endif

/* agentconfig.c — AgentConfiguration/GetConfiguration streams (see agentconfig.h).
 *
 * A stream record is on its shard's list iff its request arrived and its call has not ended.
 * commit_sent is the commit_id the agent has now (the one in its request, or the last one sent):
 * a response goes out exactly when the current commit_id differs from it.
 */
#include "shards/agentconfig.h"
#include "shards/requests.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "core/agentcfg.h"
#include "core/clock.h"
#include "core/list.h"
#include "core/log.h"
#include "core/pb.h"
#include "core/tokens.h"
#include "shards/conn.h"
#include "shards/kas.h"
#include "shards/shard.h"
#include "shards/tracker.h"

struct kd_agentconfig_shard {
    struct kd_shard *s;
    struct kd_kas *kas;
    struct kd_list streams;
    size_t nstreams;
    uint64_t generation; /* of the configuration set the streams were last brought up to date with */
    bool stop_seen;
};

struct stream {
    struct kd_list link;
    struct kd_agentconfig_shard *as;
    kd_grpc_call *call;
    int64_t agent_id, project_id;
    char name[KD_TOKENS_NAME_MAX + 1]; /* copied: the token table may be swapped after this turn */
    char commit_sent[KD_AGENTCFG_COMMIT_LEN + 1];
    struct kd_tracker_conn *tracked; /* skip_register false: the agent's meta in Redis */
    bool requested;
};

/* Field numbers (verified against GitLab's agent protos, docs/agents.md; the request's are
 * shards/requests.c's). */
enum {
    RESP_CONFIGURATION = 1,
    RESP_COMMIT_ID = 2,
    CFG_AGENT_ID = 4,
    CFG_GITLAB_EXTERNAL_URL = 11,
};

/* AgentConfiguration of agent_id into buf (NULL: size only). */
static size_t encode_config(uint8_t *buf, int64_t agent_id, const char *url)
{
    size_t ul = strlen(url);
    size_t n = kd_pb_varint_field_size(CFG_AGENT_ID, (uint64_t)agent_id) +
               (ul ? kd_pb_len_field_size(CFG_GITLAB_EXTERNAL_URL, ul) : 0);
    if (buf != NULL) {
        uint8_t *p = kd_pb_put_varint_field(buf, CFG_AGENT_ID, (uint64_t)agent_id);
        if (ul)
            kd_pb_put_len_field(p, CFG_GITLAB_EXTERNAL_URL, url, ul);
    }
    return n;
}

static const char *external_url(const struct kd_agentconfig_shard *as)
{
    return as->kas->gitlab_external_url != NULL ? as->kas->gitlab_external_url : "";
}

/* The agent's current commit_id: its file's (by name, then by decimal id), or that of the empty
 * configuration, which is the hash of its encoding (stable while agent_id and the URL are). */
static void current_commit(struct kd_agentconfig_shard *as, const struct stream *st,
                           char out[KD_AGENTCFG_COMMIT_LEN + 1])
{
    const struct kd_agentcfg_set *set =
        as->kas->agentcfg != NULL ? kd_agentcfg_handle_get(as->kas->agentcfg) : NULL;
    const struct kd_agentcfg_entry *e = kd_agentcfg_find(set, st->name, strlen(st->name));
    if (e == NULL) {
        char id[24];
        int n = snprintf(id, sizeof(id), "%" PRId64, st->agent_id);
        e = kd_agentcfg_find(set, id, (size_t)n);
    }
    if (e != NULL) {
        memcpy(out, e->commit_id, KD_AGENTCFG_COMMIT_LEN + 1);
        return;
    }
    uint8_t buf[32 + 4096];
    const char *url = external_url(as);
    size_t n = encode_config(NULL, st->agent_id, url);
    uint8_t *p = n <= sizeof(buf) ? buf : malloc(n);
    if (p == NULL) { /* cannot happen for sane URLs; hash the id alone rather than fail */
        kd_agentcfg_commit_id(&st->agent_id, sizeof(st->agent_id), out);
        return;
    }
    encode_config(p, st->agent_id, url);
    kd_agentcfg_commit_id(p, n, out);
    if (p != buf)
        free(p);
}

/* Send the current configuration if the agent does not have it. */
static void refresh(struct stream *st)
{
    char commit[KD_AGENTCFG_COMMIT_LEN + 1];
    current_commit(st->as, st, commit);
    if (strcmp(commit, st->commit_sent) == 0)
        return;
    const char *url = external_url(st->as);
    size_t cl = encode_config(NULL, st->agent_id, url);
    size_t n = kd_pb_len_field_size(RESP_CONFIGURATION, cl) +
               kd_pb_len_field_size(RESP_COMMIT_ID, KD_AGENTCFG_COMMIT_LEN);
    uint8_t *buf = malloc(n);
    if (buf == NULL) {
        kd_grpc_finish(st->call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return;
    }
    uint8_t *p = kd_pb_put_len_header(buf, RESP_CONFIGURATION, cl);
    encode_config(p, st->agent_id, url);
    p += cl;
    kd_pb_put_len_field(p, RESP_COMMIT_ID, commit, KD_AGENTCFG_COMMIT_LEN);
    int rc = kd_grpc_send_message(st->call, buf, n);
    free(buf);
    if (rc < 0) {
        kd_grpc_finish(st->call, KD_GRPC_INTERNAL, "cannot send the configuration", NULL, 0);
        return;
    }
    memcpy(st->commit_sent, commit, sizeof(commit));
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_DEBUG, "agent_configuration_sent");
    kd_log_int(&l, "agent_id", st->agent_id);
    kd_log_str(&l, "commit_id", commit);
    kd_log_end(&l);
}

static int stream_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct stream *st = kd_h2_call_user(call);
    if (st->requested) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "GetConfiguration takes one ConfigurationRequest",
                       NULL, 0);
        return 0;
    }
    struct kd_configuration_req req;
    if (kd_req_configuration(msg, len, &req) < 0) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "malformed ConfigurationRequest", NULL, 0);
        return 0;
    }
    const uint8_t *commit = req.commit, *meta = req.meta;
    size_t commit_len = req.commit_len, meta_len = req.meta_len;
    bool skip_register = req.skip_register;
    /* Older agentk registers its meta through this stream: the same bound as Register's. */
    uint32_t meta_max = st->as->kas->agent_meta_max ? st->as->kas->agent_meta_max : 16384;
    if (!skip_register && meta_len > meta_max) {
        char m[160];
        snprintf(m, sizeof(m), "agent_meta too large (%zu bytes; limits.agent_meta_max_size is %u)", meta_len,
                 meta_max);
        kd_kas_count_meta_refused(st->as->s);
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, m, NULL, 0);
        return 0;
    }
    /* A commit_id of another length can never equal one of ours: remember "none". */
    if (commit != NULL && commit_len == KD_AGENTCFG_COMMIT_LEN)
        memcpy(st->commit_sent, commit, commit_len);
    st->commit_sent[commit != NULL && commit_len == KD_AGENTCFG_COMMIT_LEN ? KD_AGENTCFG_COMMIT_LEN : 0] =
        '\0';
    st->requested = true;
    /* Idle between pushes: after a max-age or shutdown GOAWAY it ends with OK at once, so agentk
     * reopens it on its new connection instead of waiting out the grace period. */
    kd_grpc_call_set_end_on_goaway(call, true);
    kd_list_push_back(&st->as->streams, &st->link);
    st->as->nstreams++;
    struct kd_tracker *tr = kd_kas_tracker(st->as->s);
    if (!skip_register && tr != NULL) {
        /* Older agentk registers through this stream: one connection entry for its life, under a
         * random id (agentk sends no pod id here). */
        uint64_t id = 0;
        if (getrandom(&id, sizeof(id), 0) != (ssize_t)sizeof(id))
            id = kd_clock_ns() ^ (uintptr_t)st;
        id &= INT64_MAX;
        st->tracked = kd_tracker_conn_up(tr, NULL, st->agent_id, st->project_id, (int64_t)(id ? id : 1),
                                         kd_clock_wall_us(), meta, meta_len);
    }
    kd_grpc_send_headers(call, NULL, 0);
    refresh(st);
    return 0;
}

static void stream_half_close(kd_grpc_call *call)
{
    struct stream *st = kd_h2_call_user(call);
    if (!st->requested)
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "missing ConfigurationRequest", NULL, 0);
    /* Otherwise the normal case for a server stream: keep it open. */
}

static void stream_done(kd_grpc_call *call, int status, const char *message)
{
    struct stream *st = kd_h2_call_user(call);
    if (st->requested) {
        kd_list_unlink(&st->link);
        st->as->nstreams--;
        if (st->tracked != NULL) {
            struct kd_tracker *tr = kd_kas_tracker(st->as->s);
            if (tr != NULL)
                kd_tracker_conn_down(tr, st->tracked);
        }
    }
    free(st);
}

static const struct kd_h2_handler stream_handler = {
    .on_message = stream_message,
    .on_half_close = stream_half_close,
    .on_done = stream_done,
};

static int stream_start(kd_grpc_call *call, void *ud)
{
    struct kd_agent_ident ident;
    if (kd_kas_agent_call_gate(call, &ident) != 0)
        return 0; /* moved to the owner shard, or answered */
    struct kd_shard *s = kd_conn_shard(kd_grpc_call_conn(call));
    struct kd_agentconfig_shard *as = kd_kas_agentconfig(s);
    struct stream *st = as != NULL ? calloc(1, sizeof(*st)) : NULL;
    if (st == NULL) {
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return 0;
    }
    st->as = as;
    st->call = call;
    st->agent_id = ident.agent_id;
    st->project_id = ident.project_id;
    snprintf(st->name, sizeof(st->name), "%s", ident.agent_name != NULL ? ident.agent_name : "");
    kd_list_node_init(&st->link);
    kd_grpc_accept(call, &stream_handler, st);
    return 0;
}

const struct kd_grpc_method kd_agentconfig_method = {
    .path = "/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration",
    .start = stream_start,
};

struct kd_agentconfig_shard *kd_agentconfig_shard_new(struct kd_shard *s)
{
    struct kd_agentconfig_shard *as = calloc(1, sizeof(*as));
    if (as == NULL)
        return NULL;
    as->s = s;
    as->kas = kd_server_user(s->srv);
    kd_list_init(&as->streams);
    return as;
}

void kd_agentconfig_shard_free(struct kd_agentconfig_shard *as)
{
    /* Every connection is closed by now, so every stream's on_done has run. */
    free(as);
}

/* Finish every open stream with OK (the shard is stopping). The next record is taken before a
 * finish, whose on_done (possibly synchronous) frees only the finished record. */
static void end_streams(struct kd_agentconfig_shard *as)
{
    struct kd_list *it = as->streams.next;
    while (it != &as->streams) {
        struct kd_list *next = it->next;
        kd_grpc_finish(KD_CONTAINER_OF(it, struct stream, link)->call, KD_GRPC_OK, NULL, NULL, 0);
        it = next;
    }
}

void kd_agentconfig_on_turn(struct kd_agentconfig_shard *as)
{
    if (as == NULL)
        return;
    if (as->s->stopping && !as->stop_seen) {
        /* Nothing more will be pushed from here: let agentk reconnect to a live instance now
         * rather than at the end of the grace period. */
        as->stop_seen = true;
        end_streams(as);
        return;
    }
    if (as->kas->agentcfg == NULL || as->nstreams == 0)
        return;
    uint64_t gen = kd_agentcfg_generation(kd_agentcfg_handle_get(as->kas->agentcfg));
    if (gen == as->generation)
        return;
    as->generation = gen;
    struct kd_list *it = as->streams.next;
    while (it != &as->streams) {
        struct kd_list *next = it->next; /* refresh() may finish (and free) the stream */
        refresh(KD_CONTAINER_OF(it, struct stream, link));
        it = next;
    }
}

size_t kd_agentconfig_streams(struct kd_shard *s)
{
    struct kd_agentconfig_shard *as = kd_kas_agentconfig(s);
    return as != NULL ? as->nstreams : 0;
}

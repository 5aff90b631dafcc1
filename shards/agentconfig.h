/* agentconfig.h — AgentConfiguration/GetConfiguration on the agent listener: one long-lived server
 * stream per agentk, which gets the agent's configuration at once (unless it already has that
 * commit_id) and again whenever it changes; with skip_register false the stream also registers the
 * agent's meta with the tracker for as long as it is open.
 * Concurrency: shard-local, no locks. The configuration set is read through kd_kas.agentcfg (an
 *   atomic handle swapped by the reloading thread; nothing of it is kept past the turn); a change is
 *   noticed in kd_agentconfig_on_turn() by its generation number.
 * Ownership: a kd_agentconfig_shard owns its streams' records; a record lives from the request
 *   message until the call's on_done, and is unlinked there.
 *
 *   agentk ── GetConfiguration(req) ──> gate (token, owner shard) ──> record on the shard's list
 *          <── ConfigurationResponse ── at once if req.commit_id differs, then on every change
 *   on_turn: generation changed? → recompute each stream's commit_id, send where it differs
 *   max-age or shutdown GOAWAY (kd_grpc_call_set_end_on_goaway), shard stopping: finish with OK
 *   (agentk simply reconnects)
 */
#ifndef KD_SHARDS_AGENTCONFIG_H
#define KD_SHARDS_AGENTCONFIG_H

#include <stddef.h>

#include "shards/grpc.h"

struct kd_shard;
struct kd_conn;
struct kd_agentconfig_shard;

/* The method of the agent listener (ud unused). */
extern const struct kd_grpc_method kd_agentconfig_method;

/* Per-shard state (called by service.c's shard hooks on the shard's thread). new: NULL on
 * allocation failure. free: after every connection of the shard has closed. */
struct kd_agentconfig_shard *kd_agentconfig_shard_new(struct kd_shard *s);
void kd_agentconfig_shard_free(struct kd_agentconfig_shard *as);
/* Once per loop turn: push changed configurations; finish every stream once the shard stops. */
void kd_agentconfig_on_turn(struct kd_agentconfig_shard *as);

/* Open streams on this shard (tests, stats). */
size_t kd_agentconfig_streams(struct kd_shard *s);

#endif

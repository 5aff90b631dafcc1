/* fleet.h — one shard's connections to peer kasd instances: one HTTP/2 channel per peer (private
 * API, h2c), opened on demand, multiplexing every forwarded call of the shard to that peer, replaced
 * when it fails or gets GOAWAY, closed when idle; and the start of a forwarded call
 * (/kasd.fleet.v1.Gateway/Tunnel) with its hop metadata and a fresh private JWT.
 * Concurrency: shard-local, no locks. Ownership: the table owns its channels; calls are the
 * caller's (forward.c), who tells kd_fleet_call_end() when one is over.
 *
 *   forward.c ──kd_fleet_call(peer, agent, method, md)──> channel[peer] ──> peer's private listener
 *            <── handler (on_headers: kas-hop-gateway ready | trailers: no-tunnel) ──
 */
#ifndef KD_SHARDS_FLEET_H
#define KD_SHARDS_FLEET_H

#include <stddef.h>
#include <stdint.h>

#include "shards/grpc.h"

struct kd_shard;
struct kd_kas;
struct kd_fleet;
struct kd_fleet_chan;
struct kd_presence_peer;

#define KD_FLEET_GATEWAY_PATH "/kasd.fleet.v1.Gateway/Tunnel"

struct kd_fleet *kd_fleet_new(struct kd_shard *s, const struct kd_kas *kas);
/* Shard stop: every channel closed (their calls end with UNAVAILABLE). */
void kd_fleet_free(struct kd_fleet *f);

/* Start a forwarded call to `peer` for the agent (method and md blob as the caller sent them).
 * NULL when it cannot start (bad address, no connection slot, JWT too large): try another peer. */
kd_grpc_call *kd_fleet_call(struct kd_fleet *f, const struct kd_presence_peer *peer, int64_t agent_id,
                            const char *method, size_t method_len, const uint8_t *md, size_t md_len,
                            uint64_t timeout_us, const struct kd_h2_handler *h, void *user,
                            struct kd_fleet_chan **chan);
/* A call started by kd_fleet_call ended (its on_done ran; chan as kd_fleet_call set it). */
void kd_fleet_call_end(struct kd_fleet *f, struct kd_fleet_chan *chan);
/* Forget the peer's channel (it answered as another instance, or failed): the next call dials
 * again. */
void kd_fleet_peer_reset(struct kd_fleet *f, const char *peer_id);

/* "ip:port" or "[v6]:port" (numeric) into a socket address: 0, or -EINVAL. */
int kd_fleet_parse_address(const char *a, struct sockaddr_storage *ss, socklen_t *len);

/* Channels open now (metrics). */
unsigned kd_fleet_channels(const struct kd_fleet *f);

#endif

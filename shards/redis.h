/* redis.h — a Redis connection owned by one shard: RESP2 (core/resp.h) over a kd_conn on the
 * shard's io_uring, never blocking. Pipelining, MULTI/EXEC, Lua scripts (EVALSHA with a transparent
 * fallback on NOSCRIPT), a pub-sub flavour, TLS (core/tls.h), Sentinel, reconnect with capped
 * exponential backoff and jitter.
 * Concurrency: shard-local, no locks: every function runs on the owning shard's thread. Only the
 * counters in struct kd_redis_stats are read from elsewhere (core/stat.h: relaxed).
 * Ownership: option strings are copied by kd_redis_new; hooks and their arg, tls ctx and scripts
 * are borrowed (kept alive by the caller while the connection lives, scripts until their callbacks
 * ran). Replies handed to callbacks are borrowed for the call only.
 *
 * Life of a connection (one kd_conn at a time):
 *
 *   DOWN ──timer (backoff)──> [SENTINEL: ask each sentinel for the master] ──> CONNECTING
 *   CONNECTING ──TCP (+TLS) up──> HANDSHAKE: AUTH, SELECT, ROLE (Sentinel), SUBSCRIBE... pipelined
 *   HANDSHAKE ──all answered──> UP (on_up) ──lost / timeout / protocol error──> DOWN (on_down)
 *
 * Commands are accepted only when UP; otherwise they fail at once through their callback with
 * "redis ADDR: not connected (CAUSE)". Callers re-publish what they own from on_up, which runs
 * after every (re)connect. A lost connection fails every command in flight (err "redis ADDR:
 * connection lost (CAUSE)"); kasd never replays a command whose fate is unknown.
 *
 * Addresses: "unix:/path", a literal IPv4/[IPv6] "host:port", or a DNS name. A shard never blocks
 * on DNS: names are resolved ONCE, on the main thread before shards start, with
 * kd_redis_resolve() (kasd does this at start, for the server and every sentinel address). A name
 * reaching kd_redis_new unresolved makes every dial fail with a message saying so. Addresses
 * Sentinel reports are IPs (Sentinel's default, announce-hostnames no); a host name there is
 * refused the same way.
 */
#ifndef KD_SHARDS_REDIS_H
#define KD_SHARDS_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/resp.h"
#include "core/stat.h"

struct kd_shard;
struct kd_tls_ctx;
struct kd_redis;

/* Per connection; single writer (the shard), any reader (metrics). */
struct kd_redis_stats {
    kd_stat commands;   /* commands issued (accepted for sending) */
    kd_stat errors;     /* commands that did not complete (err) or got an error reply */
    kd_stat reconnects; /* dial attempts after a failure or a loss */
    kd_stat up;         /* 1 while UP, else 0 */
    kd_stat configured; /* 1 once a connection uses these stats (so metrics can skip unused ones) */
};

struct kd_redis_opts {
    const char *address;             /* "host:port" (literal or resolved, see above) or "unix:/path" */
    const char *username, *password; /* NULL when unset */
    unsigned database;
    uint32_t dial_timeout_ms, read_timeout_ms, write_timeout_ms; /* 0: 5000 each */
    struct kd_tls_ctx *tls;
    const char *server_name;     /* TLS: name verified in the certificate; NULL: the host part of address */
    const char *sentinel_master; /* NULL: no sentinel */
    const char *const *sentinel_addrs;
    unsigned n_sentinel_addrs;
    const char *sentinel_password;
    bool subscriber; /* a dedicated pub-sub connection */
    /* additions */
    struct kd_redis_stats *stats; /* NULL: the connection's own */
    size_t max_reply_bytes;       /* 0: KD_RESP_DEFAULT_MAX (64 MiB) */
    const char *name;             /* for logs ("shard", "test", ...); NULL: "redis" */
    const char *client_name;      /* CLIENT SETNAME on every connect, no spaces (NULL: none) */
};

struct kd_redis_hooks {
    void (*on_up)(void *arg); /* connected + AUTH + SELECT done (every (re)connect) */
    void (*on_down)(void *arg,
                    const char *reason); /* lost after having been up; reason names address+cause */
    void (*on_message)(void *arg, const char *channel, size_t chlen, const char *msg,
                       size_t msglen); /* subscriber only */
    /* Subscriber only: the server confirmed a SUBSCRIBE of the channel (also each re-subscribe
     * after a reconnect): messages published from now on reach on_message. */
    void (*on_subscribed)(void *arg, const char *channel, size_t chlen);
};

/* Start connecting at once (on the shard's ring). NULL on allocation failure or bad options. */
struct kd_redis *kd_redis_new(struct kd_shard *s, const struct kd_redis_opts *o,
                              const struct kd_redis_hooks *h, void *arg);
/* Pending callbacks get err "redis ADDR: shutting down" first. May be called from a callback. */
void kd_redis_free(struct kd_redis *r);
/* Replace the hooks (e.g. a service taking over the shard's connection created by the shard layer).
 * If the connection is already up, on_up is NOT called again: check kd_redis_up(). */
void kd_redis_set_hooks(struct kd_redis *r, const struct kd_redis_hooks *h, void *arg);
bool kd_redis_up(const struct kd_redis *r);
/* The last failure's text ("" if none yet), e.g. "redis 127.0.0.1:6390: connection refused". */
const char *kd_redis_last_error(const struct kd_redis *r);
/* The address currently dialled (the master's, with Sentinel). */
const char *kd_redis_address(const struct kd_redis *r);
struct kd_redis_stats *kd_redis_stats(struct kd_redis *r);

/* reply==NULL and err!=NULL when the command could not complete (not connected, connection lost,
 * timeout). A Redis error reply is reply->type==KD_RESP_ERROR with err==NULL. reply is freed after
 * the callback returns. cb may be NULL (fire and forget). */
typedef void (*kd_redis_cb)(void *arg, const struct kd_resp *reply, const char *err);

/* Queue a command; it leaves with everything else queued this loop turn, in one write. Returns 0
 * (cb will be called exactly once, maybe already now: not connected), -EINVAL (argc < 1, or a
 * subscriber connection), -ENOMEM. */
int kd_redis_cmd(struct kd_redis *r, kd_redis_cb cb, void *arg, int argc, const char *const *argv,
                 const size_t *argvlen);

/* A Lua script: EVALSHA, on NOSCRIPT fall back to EVAL (which also loads it) transparently. The
 * fallback's reply arrives after replies to commands issued after the EVALSHA: scripts are not
 * ordered against other commands when a fallback happens. */
struct kd_redis_script {
    const char *source;
    char sha1[41];
};
void kd_redis_script_init(struct kd_redis_script *sc, const char *source);
int kd_redis_eval(struct kd_redis *r, const struct kd_redis_script *sc, kd_redis_cb cb, void *arg, int nkeys,
                  int argc, const char *const *argv, const size_t *argvlen);

/* MULTI/EXEC: MULTI, the commands and EXEC queued together (one write); cb gets the EXEC reply
 * (an array of the commands' replies, or an EXECABORT error if one of them was refused). */
struct kd_redis_cmdv {
    int argc;
    const char *const *argv;
    const size_t *argvlen;
};
int kd_redis_multi(struct kd_redis *r, kd_redis_cb cb, void *arg, int ncmds,
                   const struct kd_redis_cmdv *cmds);

/* Subscriber connections only (-EINVAL otherwise). The channel set is kept and subscribed again
 * after every reconnect, before on_up. 0 also when not connected (it is subscribed on connect). */
int kd_redis_subscribe(struct kd_redis *r, const char *channel, size_t len);
int kd_redis_unsubscribe(struct kd_redis *r, const char *channel, size_t len);

/* Shard stop: finish what is in flight, then close and stay closed (no reconnect). Called by the
 * shard loop once nothing else is left on the shard; harmless to repeat. */
void kd_redis_stop(struct kd_redis *r);
/* true once stopped and closed (the shard may leave its loop). */
bool kd_redis_stopped(const struct kd_redis *r);
/* Connections of this kd_redis currently open on the shard (0 or 1). */
unsigned kd_redis_nconns(const struct kd_redis *r);

/* Main thread, before shards start (blocking getaddrinfo): turn "name:port" into "ip:port" (IPv4
 * preferred, "[v6]:port" otherwise). Literals and "unix:" paths are copied as they are. 0, or
 * -EINVAL/-ENOENT with err naming the address and the resolver's reason. */
int kd_redis_resolve(const char *address, char *out, size_t outlen, char *err, size_t errlen);

/* The master's address from a SENTINEL get-master-addr-by-name reply (untrusted bytes): ["host",
 * "port"] with a host of letters, digits and . - : _ % only and a port in 1..65535, written as
 * "host:port" or "[v6]:port" into out[cap]. 0, or -1 (also when it would not fit). Exported for
 * test/fuzz/redis_handshake_fuzz.c. */
struct kd_resp;
int kd_redis_sentinel_master(const struct kd_resp *o, char *out, size_t cap);

/* What a reply to a handshake step means (untrusted bytes: the server's or a sentinel's answer):
 *   AUTH, SELECT, PING: an error reply fails; ROLE: anything but an array led by "master" fails;
 *   CLIENT SETNAME: always NEXT (some proxies refuse it); SENTINEL get-master-addr-by-name: MASTER
 *   with the address in master[mastercap] (kd_redis_sentinel_master), else FAIL (error, unknown
 *   master, unusable address).
 * FAIL writes a one-line reason into why[whylen] (error texts cut at 200 bytes; NOAUTH and
 * WRONGPASS read "authentication failed: ..."); database and sentinel_master only name things in
 * it. Pure. Exported for test/fuzz/redis_handshake_fuzz.c. */
enum kd_redis_hs_step {
    KD_REDIS_HS_AUTH,
    KD_REDIS_HS_SELECT,
    KD_REDIS_HS_PING,
    KD_REDIS_HS_ROLE,
    KD_REDIS_HS_SETNAME,
    KD_REDIS_HS_SENTINEL,
};
enum kd_redis_hs_verdict { KD_REDIS_HS_NEXT, KD_REDIS_HS_FAIL, KD_REDIS_HS_MASTER };
int kd_redis_handshake_reply(enum kd_redis_hs_step step, const struct kd_resp *o, unsigned database,
                             const char *sentinel_master, char *master, size_t mastercap, char *why,
                             size_t whylen);

#endif

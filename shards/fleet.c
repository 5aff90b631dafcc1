/* fleet.c — one shard's channels to peer kasd instances (see fleet.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/chunkpool.h"
#include "core/jwt.h"
#include "core/log.h"
#include "core/timerwheel.h"
#include "shards/fleet.h"
#include "shards/kas.h"
#include "shards/presence.h"
#include "shards/shard.h"

#define MAX_PEERS 64 /* channels per shard; an idle one is replaced when a new peer needs a slot */

/* A connection to a peer. Retired (replaced after a failure, GOAWAY or an address change) it stays
 * until its last call ends: a peer that drains lets in-flight calls finish on the old connection. */
struct kd_fleet_chan {
    struct kd_grpc_channel *ch;
    unsigned calls;             /* live calls on ch */
    uint64_t last_ms;           /* last call started or ended */
    struct kd_fleet_chan *next; /* the retired list */
};

struct peer {
    char id[17];
    char address[96];
    struct kd_fleet_chan *cur; /* NULL: not connected */
};

struct kd_fleet {
    struct kd_shard *s;
    const struct kd_kas *kas;
    struct peer peers[MAX_PEERS];
    unsigned npeers;
    struct kd_fleet_chan *retired;
    uint32_t idle_ms;
    struct kd_timer sweep;
};

int kd_fleet_parse_address(const char *a, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[64];
    const char *colon;
    memset(ss, 0, sizeof(*ss));
    if (a[0] == '[') {
        const char *end = strchr(a, ']');
        if (end == NULL || end[1] != ':' || (size_t)(end - a - 1) >= sizeof(host))
            return -EINVAL;
        memcpy(host, a + 1, (size_t)(end - a - 1));
        host[end - a - 1] = '\0';
        colon = end + 1;
    } else {
        colon = strrchr(a, ':');
        if (colon == NULL || (size_t)(colon - a) >= sizeof(host))
            return -EINVAL;
        memcpy(host, a, (size_t)(colon - a));
        host[colon - a] = '\0';
    }
    char *endp;
    long port = strtol(colon + 1, &endp, 10);
    if (colon[1] == '\0' || *endp != '\0' || port <= 0 || port > 65535)
        return -EINVAL;
    struct sockaddr_in *v4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)ss;
    if (a[0] != '[' && inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof(*v4);
        return 0;
    }
    if (a[0] == '[' && inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*v6);
        return 0;
    }
    return -EINVAL;
}

static void chan_free(struct kd_fleet_chan *c)
{
    kd_grpc_channel_close(c->ch);
    free(c);
}

/* The peer's connection stops taking new calls. */
static void peer_retire(struct kd_fleet *f, struct peer *p)
{
    struct kd_fleet_chan *c = p->cur;
    p->cur = NULL;
    if (c == NULL)
        return;
    c->next = f->retired;
    f->retired = c;
    /* freed by the sweep, outside any callback of its own connection */
    kd_timerwheel_add(kd_shard_timers(f->s), &f->sweep, kd_shard_now_ms(f->s));
}

static void arm_sweep(struct kd_fleet *f)
{
    struct kd_timer *t = &f->sweep;
    uint64_t at = kd_shard_now_ms(f->s) + f->idle_ms / 2 + 1;
    if (!kd_list_is_linked(&t->link) || t->expire_ms > at)
        kd_timerwheel_add(kd_shard_timers(f->s), t, at);
}

/* Retire connections nobody used for idle_ms or that failed; free retired ones without calls. */
static void sweep_cb(struct kd_timer *t)
{
    struct kd_fleet *f = KD_CONTAINER_OF(t, struct kd_fleet, sweep);
    uint64_t now = kd_shard_now_ms(f->s);
    for (unsigned i = 0; i < f->npeers; i++) {
        struct peer *p = &f->peers[i];
        if (p->cur != NULL && p->cur->calls == 0 &&
            (now - p->cur->last_ms >= f->idle_ms || !kd_grpc_channel_usable(p->cur->ch)))
            peer_retire(f, p);
    }
    bool any = false;
    for (struct kd_fleet_chan **pp = &f->retired; *pp != NULL;) {
        struct kd_fleet_chan *c = *pp;
        if (c->calls == 0) {
            *pp = c->next;
            chan_free(c);
        } else {
            pp = &c->next;
            any = true;
        }
    }
    for (unsigned i = 0; i < f->npeers && !any; i++)
        any = f->peers[i].cur != NULL;
    if (any)
        kd_timerwheel_add(kd_shard_timers(f->s), &f->sweep, now + f->idle_ms / 2 + 1);
}

struct kd_fleet *kd_fleet_new(struct kd_shard *s, const struct kd_kas *kas)
{
    struct kd_fleet *f = calloc(1, sizeof(*f));
    if (f == NULL)
        return NULL;
    f->s = s;
    f->kas = kas;
    f->idle_ms = kas->presence != NULL && kas->presence->peer_idle_ms ? kas->presence->peer_idle_ms : 60000;
    kd_timer_init(&f->sweep, sweep_cb);
    return f;
}

void kd_fleet_free(struct kd_fleet *f)
{
    if (f == NULL)
        return;
    kd_timerwheel_cancel(kd_shard_timers(f->s), &f->sweep);
    for (unsigned i = 0; i < f->npeers; i++)
        if (f->peers[i].cur != NULL)
            chan_free(f->peers[i].cur);
    while (f->retired != NULL) {
        struct kd_fleet_chan *c = f->retired;
        f->retired = c->next;
        chan_free(c);
    }
    free(f);
}

unsigned kd_fleet_channels(const struct kd_fleet *f)
{
    unsigned n = 0;
    for (unsigned i = 0; f != NULL && i < f->npeers; i++)
        n += f->peers[i].cur != NULL;
    for (const struct kd_fleet_chan *c = f != NULL ? f->retired : NULL; c != NULL; c = c->next)
        n++;
    return n;
}

static struct peer *peer_find(struct kd_fleet *f, const char *id)
{
    for (unsigned i = 0; i < f->npeers; i++)
        if (strcmp(f->peers[i].id, id) == 0)
            return &f->peers[i];
    return NULL;
}

static struct peer *peer_slot(struct kd_fleet *f, const struct kd_presence_peer *pp)
{
    struct peer *p = peer_find(f, pp->id);
    if (p == NULL) {
        if (f->npeers < MAX_PEERS) {
            p = &f->peers[f->npeers++];
        } else {
            /* the least recently used peer whose connection carries no call gives its slot up */
            for (unsigned i = 0; i < f->npeers; i++) {
                struct kd_fleet_chan *c = f->peers[i].cur;
                if (c == NULL || c->calls == 0)
                    if (p == NULL || (c == NULL ? 0 : c->last_ms) < (p->cur == NULL ? 0 : p->cur->last_ms))
                        p = &f->peers[i];
            }
            if (p == NULL)
                return NULL;
            peer_retire(f, p);
        }
        memset(p, 0, sizeof(*p));
        snprintf(p->id, sizeof(p->id), "%s", pp->id);
    }
    if (strcmp(p->address, pp->address) != 0) {
        peer_retire(f, p); /* the instance's record changed */
        snprintf(p->address, sizeof(p->address), "%s", pp->address);
    }
    return p;
}

/* A fresh private JWT (wire.md: a short-lived token per call). */
static int mint(const struct kd_kas *kas, char *out, size_t outlen)
{
    char payload[160];
    int64_t now = (int64_t)time(NULL);
    snprintf(payload, sizeof(payload),
             "{\"iss\":\"gitlab-kas\",\"aud\":\"gitlab-kas\",\"iat\":%" PRId64 ",\"exp\":%" PRId64 "}", now,
             now + 60);
    return kd_jwt_sign(KD_JWT_HS256, kas->private_secret, kas->private_secret_len, payload, out, outlen);
}

kd_grpc_call *kd_fleet_call(struct kd_fleet *f, const struct kd_presence_peer *pp, int64_t agent_id,
                            const char *method, size_t method_len, const uint8_t *md, size_t md_len,
                            uint64_t timeout_us, const struct kd_h2_handler *h, void *user,
                            struct kd_fleet_chan **chan)
{
    if (f->kas->private_secret_len == 0 || f->kas->tracker == NULL)
        return NULL;
    struct peer *p = peer_slot(f, pp);
    if (p == NULL)
        return NULL;
    if (p->cur != NULL && !kd_grpc_channel_usable(p->cur->ch))
        peer_retire(f, p); /* failed or GOAWAY: its calls finish there, new ones go to a new one */
    uint32_t max_calls =
        f->kas->presence != NULL && f->kas->presence->peer_max_calls ? f->kas->presence->peer_max_calls : 450;
    /* full (the peer's stream limit): its calls finish there, new ones go to a new connection */
    if (p->cur != NULL && p->cur->calls >= max_calls)
        peer_retire(f, p);
    if (p->cur == NULL) {
        struct sockaddr_storage ss;
        socklen_t sl;
        if (kd_fleet_parse_address(p->address, &ss, &sl) < 0) {
            kd_log_msg(KD_LOG_WARN, "fleet_bad_peer_address", "instance %s advertises \"%s\": not ip:port",
                       p->id, p->address);
            return NULL;
        }
        /* TLS: the name verified is the configured one, or the IP literal peers advertise (their
         * certificates then carry it as an IP SAN). */
        char host[64] = "";
        const char *a = p->address, *e = a[0] == '[' ? strchr(a, ']') : strrchr(a, ':');
        if (e != NULL) {
            size_t hl = (size_t)(e - a) - (a[0] == '[');
            if (hl < sizeof(host)) {
                memcpy(host, a + (a[0] == '['), hl);
                host[hl] = '\0';
            }
        }
        struct kd_grpc_channel_opts o = {
            .addr = (const struct sockaddr *)&ss,
            .addrlen = sl,
            .authority = p->address,
            .tls = f->kas->peer_tls,
            .server_name = f->kas->peer_server_name != NULL ? f->kas->peer_server_name : host,
            .max_message = f->kas->max_message ? f->kas->max_message + 4096 : 0,
            /* A blackholed peer (host down, link cut, packets dropped) fails its calls at once
             * instead of when TCP gives up: the routing instance then tries the next candidate. */
            .connect_timeout_ms = f->kas->presence != NULL && f->kas->presence->peer_connect_ms
                                      ? f->kas->presence->peer_connect_ms
                                      : 5000,
            .keepalive_ms = f->kas->presence != NULL ? f->kas->presence->peer_keepalive_ms : 0,
            .keepalive_timeout_ms =
                f->kas->presence != NULL ? f->kas->presence->peer_keepalive_timeout_ms : 0,
        };
        struct kd_fleet_chan *c = calloc(1, sizeof(*c));
        if (c == NULL || (c->ch = kd_grpc_channel_open(f->s, &o)) == NULL) {
            free(c);
            return NULL;
        }
        c->last_ms = kd_shard_now_ms(f->s);
        p->cur = c;
        arm_sweep(f);
    }
    char jwt[512], auth[520], idbuf[24];
    if (mint(f->kas, jwt, sizeof(jwt)) < 0)
        return NULL;
    int al = snprintf(auth, sizeof(auth), "Bearer %s", jwt);
    int il = snprintf(idbuf, sizeof(idbuf), "%" PRId64, agent_id);
    struct kd_h2_header hd[64];
    size_t n = 0;
    hd[n++] = (struct kd_h2_header){"authorization", 13, auth, (size_t)al};
    hd[n++] = (struct kd_h2_header){"kas-hop-routing-agent-id", 24, idbuf, (size_t)il};
    hd[n++] = (struct kd_h2_header){"kas-hop-method", 14, method, method_len};
    hd[n++] = (struct kd_h2_header){"kas-hop-instance", 16, p->id, strlen(p->id)};
    hd[n++] = (struct kd_h2_header){"kas-hop-from", 12, f->kas->tracker->instance_id, 16};
    char *arena = NULL;
    n += kd_kas_md_headers(md, md_len, hd + n, 64 - n, &arena);
    kd_grpc_call *call = kd_grpc_channel_call(p->cur->ch, KD_FLEET_GATEWAY_PATH, hd, n, timeout_us, h, user);
    kd_chunkpool_free(arena);
    if (call == NULL)
        return NULL;
    p->cur->calls++;
    p->cur->last_ms = kd_shard_now_ms(f->s);
    *chan = p->cur;
    return call;
}

void kd_fleet_call_end(struct kd_fleet *f, struct kd_fleet_chan *c)
{
    if (c == NULL)
        return;
    if (c->calls > 0)
        c->calls--;
    c->last_ms = kd_shard_now_ms(f->s);
    if (c->calls == 0)
        arm_sweep(f);
}

void kd_fleet_peer_reset(struct kd_fleet *f, const char *peer_id)
{
    struct peer *p = peer_find(f, peer_id);
    if (p != NULL)
        peer_retire(f, p);
}

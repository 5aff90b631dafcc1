/* presence.c — where agents' tunnels are in the fleet, as seen by one shard (see presence.h).
 *
 * Per agent of interest one record (struct pagent, in a chained hash table):
 *   watch      calls of this shard waiting for / routing to the agent (kd_presence_watch)
 *   cached     a route is cached (ids of the peers holding tunnels; LRU-bounded)
 *   sub        NONE -> PENDING (SUBSCRIBE sent) -> CONFIRMED (the server said so)
 *   waiting    lookups parked until the subscription is confirmed
 *   rd         the Redis read in flight (lookups joining it are in rd->lookups)
 * A record lives while watched, cached, or busy (subscription confirmation or read pending).
 *
 * Peer addresses come from the instance records (P:{fleet}:instances, field = id, JSON with
 * "address") and are kept per peer, not per route: a cached route is a few 8-byte ids.
 */
#include "shards/presence.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "core/log.h"
#include "core/timerwheel.h"
#include "shards/redis.h"
#include "shards/shard.h"
#include "shards/tracker.h"

#define MAX_IDS 64     /* instance ids read per lookup (a fleet larger than this is sampled) */
#define MAX_PEERS 256  /* peer address records kept */
#define PARK_MS 1000u  /* longest a lookup waits for its SUBSCRIBE to be confirmed */

enum sub_state { SUB_NONE, SUB_PENDING, SUB_CONFIRMED };

struct pagent;

/* An asynchronous Redis step of ours. p == NULL once the presence layer was freed: the
 * callback then only frees it. */
struct op {
    struct kd_list link; /* p->ops */
    struct kd_presence *p;
    int64_t agent_id;
    struct kd_list lookups; /* read: the lookups waiting for its answer */
    uint64_t ids[MAX_IDS];
    size_t nids;
    uint64_t asked;    /* read: bit i set when ids[i] was asked in the HMGET */
    uint64_t event_id; /* address fetch for an event */
    bool superseded;   /* that event: a later "-" event of the same instance arrived meanwhile */
};

struct pagent {
    struct pagent *hnext;
    int64_t agent_id;
    uint32_t watch;
    enum sub_state sub;
    bool cached;
    struct kd_list lru; /* p->lru while cached */
    uint64_t fresh_ms;  /* when the cached route was last known right (0: must be read again) */
    bool missed;        /* the subscriber went down since fresh_ms: events may have been missed */
    uint64_t used_ms;   /* a call last asked for the route (kd_presence_cached) */
    uint64_t parked_ms; /* the first lookup in waiting parked for the confirmation, then */
    uint64_t *ids;
    uint32_t nids, capids;
    struct kd_list waiting; /* lookups parked until the subscription is confirmed */
    struct op *rd;          /* the read in flight */
};

struct peer_rec {
    uint64_t id;
    char address[96];
};

struct kd_presence {
    struct kd_shard *s;
    const struct kd_presence_cfg *cfg;
    struct kd_redis *cmd, *sub;
    kd_presence_event_cb on_event;
    void *arg;
    uint64_t self;
    struct pagent **buckets;
    size_t nbuckets, nagents;
    struct kd_list lru; /* most recently used first */
    size_t ncached;
    struct peer_rec peers[MAX_PEERS];
    size_t npeers, peer_next;
    struct kd_list ops;
    struct kd_timer sweep;
    struct kd_timer park; /* lookups parked too long for a SUBSCRIBE confirmation read anyway */
    /* Agents whose record went while its SUBSCRIBE was unconfirmed (UNSUBSCRIBE sent after it):
     * that SUBSCRIBE's confirmation must not confirm a newer SUBSCRIBE of the same channel, whose
     * server-side effect may still be pending while the lookup's SMEMBERS runs. */
    int64_t stale_conf[64];
    unsigned nstale;
    bool unconfirmed_logged;
    uint64_t rng;
    struct kd_presence_stats st;
    char chbuf[192];
};

/* ---- small helpers ---- */

static uint64_t rnd(struct kd_presence *p)
{
    uint64_t x = p->rng; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    p->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1; /* instance ids are written in lower case: anything else is not one */
}

/* 16 hex digits, exactly. */
static bool parse_id(const char *s, size_t n, uint64_t *out)
{
    if (n != 16)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < 16; i++) {
        int h = hexval(s[i]);
        if (h < 0)
            return false;
        v = v << 4 | (uint64_t)h;
    }
    *out = v;
    return true;
}

static void id_str(uint64_t id, char out[17])
{
    snprintf(out, 17, "%016" PRIx64, id);
}

int kd_presence_parse_event(const char *msg, size_t len, char id[17])
{
    uint64_t v;
    if (msg == NULL || len != 17 || (msg[0] != '+' && msg[0] != '-') || !parse_id(msg + 1, 16, &v))
        return -1;
    memcpy(id, msg + 1, 16);
    id[16] = '\0';
    return msg[0] == '+';
}

int64_t kd_presence_parse_channel(const char *prefix, const char *ch, size_t len)
{
    size_t pl = strlen(prefix);
    static const char tail[] = "}:presence";
    size_t tl = sizeof(tail) - 1;
    if (ch == NULL || len < pl + 4 + 1 + tl || memcmp(ch, prefix, pl) != 0 || memcmp(ch + pl, ":{a:", 4) != 0 ||
        memcmp(ch + len - tl, tail, tl) != 0)
        return -1;
    const char *d = ch + pl + 4, *end = ch + len - tl;
    if (end - d > 19 || end == d || *d == '0')
        return -1; /* canonical decimal only: what a tracker publishes (ids are > 0) */
    int64_t v = 0;
    for (; d < end; d++) {
        if (*d < '0' || *d > '9')
            return -1;
        if (v > (INT64_MAX - (*d - '0')) / 10)
            return -1;
        v = v * 10 + (*d - '0');
    }
    return v;
}

int kd_presence_parse_record(const char *rec, size_t len, char *addr, size_t cap)
{
    static const char key[] = "\"address\":\"";
    size_t kl = sizeof(key) - 1;
    if (rec == NULL || cap == 0)
        return -1;
    for (size_t i = 0; i + kl <= len; i++) {
        if (memcmp(rec + i, key, kl) != 0)
            continue;
        size_t s = i + kl, e = s;
        while (e < len && rec[e] != '"' && rec[e] != '\\')
            e++;
        if (e >= len || rec[e] != '"' || e == s || e - s >= cap)
            return -1;
        for (size_t k = s; k < e; k++)
            if ((unsigned char)rec[k] < 0x21 || (unsigned char)rec[k] > 0x7e)
                return -1;
        memcpy(addr, rec + s, e - s);
        addr[e - s] = '\0';
        return 0;
    }
    return -1;
}

static size_t channel(struct kd_presence *p, int64_t agent_id)
{
    int n = snprintf(p->chbuf, sizeof(p->chbuf), "%s:{a:%" PRId64 "}:presence", p->cfg->tracker->prefix, agent_id);
    return n > 0 && (size_t)n < sizeof(p->chbuf) ? (size_t)n : 0;
}

static uint64_t ttl_ms(const struct kd_presence *p)
{
    return p->cfg->tracker->ttl_ms ? p->cfg->tracker->ttl_ms : 30000;
}

static size_t cache_cap(const struct kd_presence *p)
{
    return p->cfg->route_cache_size ? p->cfg->route_cache_size : 10000;
}

/* ---- peers ---- */

static struct peer_rec *peer_find(struct kd_presence *p, uint64_t id)
{
    for (size_t i = 0; i < p->npeers; i++)
        if (p->peers[i].id == id)
            return &p->peers[i];
    return NULL;
}

static void peer_set(struct kd_presence *p, uint64_t id, const char *address)
{
    struct peer_rec *r = peer_find(p, id);
    if (r == NULL) {
        if (p->npeers < MAX_PEERS)
            r = &p->peers[p->npeers++];
        else
            r = &p->peers[p->peer_next++ % MAX_PEERS]; /* a fleet this large: recycle */
    }
    r->id = id;
    snprintf(r->address, sizeof(r->address), "%s", address);
}

static void peer_out(const struct peer_rec *r, struct kd_presence_peer *out)
{
    id_str(r->id, out->id);
    snprintf(out->address, sizeof(out->address), "%s", r->address);
}

/* ---- agents ---- */

static size_t bucket(const struct kd_presence *p, int64_t agent_id)
{
    uint64_t h = (uint64_t)agent_id * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 20) & (p->nbuckets - 1);
}

static struct pagent *agent_find(struct kd_presence *p, int64_t agent_id)
{
    for (struct pagent *a = p->buckets[bucket(p, agent_id)]; a != NULL; a = a->hnext)
        if (a->agent_id == agent_id)
            return a;
    return NULL;
}

static void grow(struct kd_presence *p)
{
    size_t nb = p->nbuckets * 2;
    struct pagent **b = calloc(nb, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    struct pagent **old = p->buckets;
    size_t ob = p->nbuckets;
    p->buckets = b;
    p->nbuckets = nb;
    for (size_t i = 0; i < ob; i++)
        for (struct pagent *a = old[i], *next; a != NULL; a = next) {
            next = a->hnext;
            size_t k = bucket(p, a->agent_id);
            a->hnext = b[k];
            b[k] = a;
        }
    free(old);
}

static struct pagent *agent_get(struct kd_presence *p, int64_t agent_id)
{
    struct pagent *a = agent_find(p, agent_id);
    if (a != NULL)
        return a;
    if (p->nagents >= p->nbuckets)
        grow(p);
    a = calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    a->agent_id = agent_id;
    kd_list_node_init(&a->lru);
    kd_list_init(&a->waiting);
    size_t k = bucket(p, agent_id);
    a->hnext = p->buckets[k];
    p->buckets[k] = a;
    p->nagents++;
    return a;
}

static bool events(const struct kd_presence *p)
{
    return !p->cfg->poll;
}

static void uncache(struct kd_presence *p, struct pagent *a)
{
    if (!a->cached)
        return;
    a->cached = false;
    kd_list_unlink(&a->lru);
    p->ncached--;
    a->nids = 0;
}

/* Free the record if nothing holds it any more (unsubscribing). */
static void agent_release(struct kd_presence *p, struct pagent *a)
{
    if (a->watch > 0 || a->cached || a->rd != NULL || !kd_list_is_empty(&a->waiting))
        return;
    if (a->sub != SUB_NONE) {
        size_t n = channel(p, a->agent_id);
        if (n > 0)
            kd_redis_unsubscribe(p->sub, p->chbuf, n);
        p->st.subscriptions--;
        if (a->sub == SUB_PENDING && kd_redis_up(p->sub)) {
            if (p->nstale == 64) { /* full: forget the oldest (at worst one early confirmation) */
                memmove(p->stale_conf, p->stale_conf + 1, 63 * sizeof(p->stale_conf[0]));
                p->nstale--;
            }
            p->stale_conf[p->nstale++] = a->agent_id;
        }
    }
    for (struct pagent **pp = &p->buckets[bucket(p, a->agent_id)]; *pp != NULL; pp = &(*pp)->hnext)
        if (*pp == a) {
            *pp = a->hnext;
            break;
        }
    p->nagents--;
    free(a->ids);
    free(a);
}

static void subscribe(struct kd_presence *p, struct pagent *a)
{
    if (!events(p) || a->sub != SUB_NONE)
        return;
    size_t n = channel(p, a->agent_id);
    if (n == 0 || kd_redis_subscribe(p->sub, p->chbuf, n) != 0)
        return; /* no events for this agent: the re-check finds it */
    a->sub = SUB_PENDING;
    p->st.subscriptions++;
}

static bool ids_has(const struct pagent *a, uint64_t id)
{
    for (uint32_t i = 0; i < a->nids; i++)
        if (a->ids[i] == id)
            return true;
    return false;
}

static void ids_add(struct pagent *a, uint64_t id)
{
    if (ids_has(a, id))
        return;
    if (a->nids == a->capids) {
        uint32_t nc = a->capids ? a->capids * 2 : 4;
        if (nc > MAX_IDS)
            return;
        uint64_t *n = realloc(a->ids, nc * sizeof(*n));
        if (n == NULL)
            return;
        a->ids = n;
        a->capids = nc;
    }
    a->ids[a->nids++] = id;
}

static void ids_del(struct pagent *a, uint64_t id)
{
    for (uint32_t i = 0; i < a->nids; i++)
        if (a->ids[i] == id) {
            a->ids[i] = a->ids[--a->nids];
            return;
        }
}

static void lru_touch(struct kd_presence *p, struct pagent *a)
{
    kd_list_unlink(&a->lru);
    kd_list_insert_before(p->lru.next, &a->lru);
}

/* Keep the cache within its size: the least recently used routes go (and their subscriptions
 * with them, unless calls still watch the agent). */
static void cache_bound(struct kd_presence *p)
{
    while (p->ncached > cache_cap(p)) {
        struct pagent *a = KD_CONTAINER_OF(p->lru.prev, struct pagent, lru);
        uncache(p, a);
        p->st.cache_evictions++;
        agent_release(p, a);
    }
}

static void arm_sweep(struct kd_presence *p)
{
    if (!kd_timer_is_armed(&p->sweep))
        kd_timerwheel_add(kd_shard_timers(p->s), &p->sweep, kd_shard_now_ms(p->s) + ttl_ms(p));
}

/* Routes unused and unconfirmed for a TTL cost a subscription for nothing: drop them. */
static void sweep_cb(struct kd_timer *t)
{
    struct kd_presence *p = KD_CONTAINER_OF(t, struct kd_presence, sweep);
    uint64_t now = kd_shard_now_ms(p->s);
    for (struct kd_list *n = p->lru.prev, *prev; n != &p->lru; n = prev) {
        prev = n->prev;
        struct pagent *a = KD_CONTAINER_OF(n, struct pagent, lru);
        /* Stale and unused for a TTL: gone (and its channel unsubscribed). Stale but in use: kept,
         * subscribed; the next call reads it again (kd_presence_cached says -1), so an agent called
         * all the time costs one read per TTL and no unsubscribe/subscribe churn. */
        if (a->watch == 0 && now - a->fresh_ms >= ttl_ms(p) && now - a->used_ms >= ttl_ms(p)) {
            uncache(p, a);
            agent_release(p, a);
        }
    }
    if (p->ncached > 0)
        arm_sweep(p);
}

/* ---- reads ---- */

static struct op *op_new(struct kd_presence *p, int64_t agent_id)
{
    struct op *o = calloc(1, sizeof(*o));
    if (o == NULL)
        return NULL;
    o->p = p;
    o->agent_id = agent_id;
    kd_list_init(&o->lookups);
    kd_list_push_back(&p->ops, &o->link);
    return o;
}

static void op_free(struct op *o)
{
    if (kd_list_is_linked(&o->link))
        kd_list_unlink(&o->link);
    free(o);
}

/* Run the callbacks of every lookup of the read (random order of the peers for each). */
static void read_finish(struct op *o, const char *err)
{
    struct kd_presence *p = o->p;
    struct pagent *a = agent_find(p, o->agent_id);
    struct kd_presence_peer peers[KD_PRESENCE_MAX_PEERS];
    size_t n = 0;
    if (err != NULL) {
        p->st.lookup_failures++;
    } else if (a != NULL) {
        if (!a->cached) {
            a->cached = true;
            kd_list_insert_before(p->lru.next, &a->lru);
            p->ncached++;
            arm_sweep(p);
        } else {
            lru_touch(p, a);
        }
        a->nids = 0;
        for (size_t i = 0; i < o->nids; i++)
            ids_add(a, o->ids[i]);
        a->fresh_ms = kd_shard_now_ms(p->s);
        a->missed = false;
    }
    for (size_t i = 0; err == NULL && i < o->nids && n < KD_PRESENCE_MAX_PEERS; i++) {
        struct peer_rec *r = peer_find(p, o->ids[i]);
        if (r != NULL)
            peer_out(r, &peers[n++]);
    }
    /* a->rd stays set during the callbacks: it keeps the record alive (a callback may unwatch),
     * and a lookup started by a callback joins this answer, which is as fresh as any */
    while (!kd_list_is_empty(&o->lookups)) {
        struct kd_presence_lookup *lk =
            KD_CONTAINER_OF(kd_list_pop_front(&o->lookups), struct kd_presence_lookup, link);
        lk->pending = false;
        for (size_t i = n; i > 1; i--) { /* shuffle per caller: no hot instance */
            size_t j = (size_t)(rnd(p) % i);
            struct kd_presence_peer t = peers[i - 1];
            peers[i - 1] = peers[j];
            peers[j] = t;
        }
        lk->cb(lk, err ? NULL : peers, err ? 0 : n, err);
    }
    op_free(o);
    if (a != NULL) {
        if (a->rd == o)
            a->rd = NULL;
        agent_release(p, a); /* frees it only if not cached (a failed read) */
    }
    cache_bound(p);
}

static void read_addrs(void *arg, const struct kd_resp *reply, const char *err)
{
    struct op *o = arg;
    if (o->p == NULL)
        {
            op_free(o);
            return;
        }
    struct kd_presence *p = o->p;
    if (err != NULL || reply->type != KD_RESP_ARRAY)
        {
            read_finish(o, err ? err : "redis: unexpected reply to HMGET of the instance records");
            return;
        }
    /* o->ids[] holds the alive ids; the HMGET asked for those without an address, in order */
    size_t k = 0;
    for (size_t i = 0; i < o->nids; i++) {
        if (!(o->asked >> i & 1))
            continue;
        if (k >= reply->n)
            break;
        const struct kd_resp *v = reply->elem[k++];
        char addr[96];
        if (v->type == KD_RESP_STRING && kd_presence_parse_record(v->str, v->len, addr, sizeof(addr)) == 0)
            peer_set(p, o->ids[i], addr);
        else {
            char id[17];
            id_str(o->ids[i], id);
            kd_log_msg(KD_LOG_WARN, "fleet_peer_no_address",
                       "instance %s holds tunnels of agent %" PRId64 " but its record has no usable address",
                       id, o->agent_id);
        }
    }
    size_t keep = 0;
    for (size_t i = 0; i < o->nids; i++)
        if (peer_find(p, o->ids[i]) != NULL)
            o->ids[keep++] = o->ids[i];
    o->nids = keep;
    read_finish(o, NULL);
}

static void read_alive(void *arg, const struct kd_resp *reply, const char *err)
{
    struct op *o = arg;
    if (o->p == NULL)
        {
            op_free(o);
            return;
        }
    struct kd_presence *p = o->p;
    if (err != NULL || reply->type != KD_RESP_ARRAY || reply->n != o->nids)
        {
            read_finish(o, err ? err : "redis: unexpected reply to MGET of the alive keys");
            return;
        }
    size_t keep = 0;
    for (size_t i = 0; i < o->nids; i++)
        if (reply->elem[i]->type != KD_RESP_NIL)
            o->ids[keep++] = o->ids[i]; /* a peer whose heartbeat lapsed is never tried */
    o->nids = keep;
    const char *argv[2 + MAX_IDS];
    size_t lens[2 + MAX_IDS];
    char key[160], ids[MAX_IDS][17];
    int argc = 0;
    snprintf(key, sizeof(key), "%s:{fleet}:instances", p->cfg->tracker->prefix);
    argv[argc] = "HMGET";
    lens[argc++] = 5;
    argv[argc] = key;
    lens[argc++] = strlen(key);
    for (size_t i = 0; i < o->nids; i++)
        if (peer_find(p, o->ids[i]) == NULL) {
            o->asked |= 1ULL << i;
            id_str(o->ids[i], ids[i]);
            argv[argc] = ids[i];
            lens[argc++] = 16;
        }
    if (argc == 2)
        {
            read_finish(o, NULL);
            return;
        }
    if (kd_redis_cmd(p->cmd, read_addrs, o, argc, argv, lens) != 0)
        {
            read_finish(o, "out of memory");
            return;
        }
}

static void read_members(void *arg, const struct kd_resp *reply, const char *err)
{
    struct op *o = arg;
    if (o->p == NULL)
        {
            op_free(o);
            return;
        }
    struct kd_presence *p = o->p;
    if (err != NULL || reply->type != KD_RESP_ARRAY)
        {
            read_finish(o, err ? err : "redis: unexpected reply to SMEMBERS of the tunnels set");
            return;
        }
    o->nids = 0;
    for (size_t i = 0; i < reply->n && o->nids < MAX_IDS; i++) {
        uint64_t id;
        const struct kd_resp *m = reply->elem[i];
        if (m->type == KD_RESP_STRING && parse_id(m->str, m->len, &id) && id != p->self)
            o->ids[o->nids++] = id;
    }
    if (o->nids == 0)
        {
            read_finish(o, NULL);
            return;
        }
    const char *argv[1 + MAX_IDS];
    size_t lens[1 + MAX_IDS];
    char keys[MAX_IDS][160];
    argv[0] = "MGET";
    lens[0] = 4;
    for (size_t i = 0; i < o->nids; i++) {
        char id[17];
        id_str(o->ids[i], id);
        int n = snprintf(keys[i], sizeof(keys[i]), "%s:{fleet}:alive:%s", p->cfg->tracker->prefix, id);
        argv[1 + i] = keys[i];
        lens[1 + i] = (size_t)n;
    }
    if (kd_redis_cmd(p->cmd, read_alive, o, (int)(1 + o->nids), argv, lens) != 0)
        {
            read_finish(o, "out of memory");
            return;
        }
}

/* Start (or join) the read of the agent's tunnels set for the lookups parked in a->waiting. */
static void read_start(struct kd_presence *p, struct pagent *a)
{
    if (kd_list_is_empty(&a->waiting))
        return;
    if (a->rd != NULL) {
        kd_list_splice_back(&a->rd->lookups, &a->waiting);
        return;
    }
    struct op *o = op_new(p, a->agent_id);
    if (o == NULL) {
        /* fail them: their callers wait for events and re-check */
        while (!kd_list_is_empty(&a->waiting)) {
            struct kd_presence_lookup *lk =
                KD_CONTAINER_OF(kd_list_pop_front(&a->waiting), struct kd_presence_lookup, link);
            lk->pending = false;
            p->st.lookup_failures++;
            lk->cb(lk, NULL, 0, "out of memory");
        }
        return;
    }
    a->rd = o;
    kd_list_splice_back(&o->lookups, &a->waiting);
    char key[160];
    int n = snprintf(key, sizeof(key), "%s:{a:%" PRId64 "}:tunnels", p->cfg->tracker->prefix, a->agent_id);
    const char *argv[] = {"SMEMBERS", key};
    size_t lens[] = {8, (size_t)n};
    p->st.lookups++;
    if (kd_redis_cmd(p->cmd, read_members, o, 2, argv, lens) != 0)
        read_finish(o, "out of memory");
}

/* ---- subscriber hooks ---- */

/* A SUBSCRIBE the server never confirms (refused: an ACL without channel rights answers NOPERM,
 * which kd_redis only logs) must not hold lookups forever: after PARK_MS they read without it,
 * and the events of that agent are not relied on (the safety re-check covers them). */
static void park_cb(struct kd_timer *t)
{
    struct kd_presence *p = KD_CONTAINER_OF(t, struct kd_presence, park);
    uint64_t now = kd_shard_now_ms(p->s);
    bool more = false;
again:
    for (size_t i = 0; i < p->nbuckets; i++)
        for (struct pagent *a = p->buckets[i]; a != NULL; a = a->hnext) {
            if (kd_list_is_empty(&a->waiting) || a->sub != SUB_PENDING)
                continue;
            if (now - a->parked_ms < PARK_MS) {
                more = true;
                continue;
            }
            p->st.sub_unconfirmed++;
            if (!p->unconfirmed_logged) {
                p->unconfirmed_logged = true;
                kd_log_msg(KD_LOG_WARN, "presence_subscribe_unconfirmed",
                           "Redis did not confirm SUBSCRIBE %s:{a:%" PRId64 "}:presence within %u ms (an ACL "
                           "without channel rights?): routes are read without waiting for presence events",
                           p->cfg->tracker->prefix, a->agent_id, PARK_MS);
            }
            read_start(p, a); /* its callbacks may change the table: look again from the start */
            goto again;
        }
    if (more)
        kd_timerwheel_add(kd_shard_timers(p->s), &p->park, now + PARK_MS / 4);
}

static void sub_subscribed(void *arg, const char *ch, size_t len)
{
    struct kd_presence *p = arg;
    int64_t agent_id = kd_presence_parse_channel(p->cfg->tracker->prefix, ch, len);
    for (unsigned i = 0; i < p->nstale; i++)
        if (p->stale_conf[i] == agent_id) { /* the confirmation of a SUBSCRIBE withdrawn since */
            memmove(p->stale_conf + i, p->stale_conf + i + 1, (p->nstale - i - 1) * sizeof(p->stale_conf[0]));
            p->nstale--;
            return;
        }
    struct pagent *a = agent_id >= 0 ? agent_find(p, agent_id) : NULL;
    if (a == NULL || a->sub == SUB_NONE)
        return; /* unsubscribed meanwhile */
    a->sub = SUB_CONFIRMED;
    read_start(p, a);
}

static void deliver(struct kd_presence *p, int64_t agent_id, uint64_t id, bool up)
{
    struct pagent *a = agent_find(p, agent_id);
    if (a == NULL)
        return;
    struct kd_presence_peer peer = {.address = ""};
    id_str(id, peer.id);
    struct peer_rec *r = peer_find(p, id);
    if (r != NULL)
        peer_out(r, &peer);
    if (a->cached) {
        if (up && r != NULL)
            ids_add(a, id);
        else if (up)
            a->fresh_ms = 0; /* a peer we cannot name: read the route again when asked */
        else
            ids_del(a, id);
    }
    if (a->watch > 0 && (!up || r != NULL))
        p->on_event(p->arg, agent_id, &peer, up);
}

static void event_addr(void *arg, const struct kd_resp *reply, const char *err)
{
    struct op *o = arg;
    if (o->p == NULL)
        {
            op_free(o);
            return;
        }
    struct kd_presence *p = o->p;
    char addr[96];
    if (err == NULL && reply->type == KD_RESP_STRING &&
        kd_presence_parse_record(reply->str, reply->len, addr, sizeof(addr)) == 0)
        peer_set(p, o->event_id, addr);
    int64_t agent_id = o->agent_id;
    uint64_t id = o->event_id;
    bool superseded = o->superseded;
    op_free(o);
    if (!superseded) /* a "-" that arrived while this "+" waited for the address wins: events apply in order */
        deliver(p, agent_id, id, true); /* no address: cached routes are marked for a re-read */
}

static void sub_message(void *arg, const char *ch, size_t chlen, const char *msg, size_t len)
{
    struct kd_presence *p = arg;
    int64_t agent_id = kd_presence_parse_channel(p->cfg->tracker->prefix, ch, chlen);
    char idbuf[17];
    int up = kd_presence_parse_event(msg, len, idbuf);
    uint64_t id;
    if (agent_id < 0 || up < 0 || !parse_id(idbuf, 16, &id))
        return;
    p->st.events_received++;
    if (id == p->self || agent_find(p, agent_id) == NULL)
        return;
    if (!up) /* a "+" of the same instance still waiting for its address is older than this */
        for (struct kd_list *n = p->ops.next; n != &p->ops; n = n->next) {
            struct op *o = KD_CONTAINER_OF(n, struct op, link);
            if (o->event_id == id && o->agent_id == agent_id)
                o->superseded = true;
        }
    if (up && peer_find(p, id) == NULL) {
        struct op *o = op_new(p, agent_id);
        if (o != NULL) {
            o->event_id = id;
            char key[160];
            int n = snprintf(key, sizeof(key), "%s:{fleet}:instances", p->cfg->tracker->prefix);
            const char *argv[] = {"HGET", key, idbuf};
            size_t lens[] = {4, (size_t)n, 16};
            if (kd_redis_cmd(p->cmd, event_addr, o, 3, argv, lens) == 0)
                return;
            op_free(o);
        }
    }
    deliver(p, agent_id, id, up != 0);
}

static void sub_up(void *arg)
{
    (void)arg; /* every channel was re-subscribed before this: confirmations follow */
}

static void sub_down(void *arg, const char *reason)
{
    struct kd_presence *p = arg;
    (void)reason;
    /* Events may be lost from now on: a cached route is read again as soon as Redis answers, and
     * used as it is only while Redis cannot be read (kd_presence_cached); lookups parked for a
     * confirmation read now (their callers re-check). */
    p->nstale = 0; /* confirmations still owed died with the connection */
    for (size_t i = 0; i < p->nbuckets; i++)
        for (struct pagent *a = p->buckets[i]; a != NULL; a = a->hnext) {
            a->missed = true;
            if (a->sub == SUB_CONFIRMED)
                a->sub = SUB_PENDING;
        }
    /* A failed read runs callbacks, which may free records: rescan after each start. */
again:
    for (size_t i = 0; i < p->nbuckets; i++)
        for (struct pagent *a = p->buckets[i]; a != NULL; a = a->hnext)
            if (!kd_list_is_empty(&a->waiting)) {
                read_start(p, a);
                goto again;
            }
}

static const struct kd_redis_hooks sub_hooks = {
    .on_up = sub_up, .on_down = sub_down, .on_message = sub_message, .on_subscribed = sub_subscribed};

/* ---- API ---- */

struct kd_presence *kd_presence_new(struct kd_shard *s, const struct kd_presence_cfg *cfg, struct kd_redis *cmd,
                                    kd_presence_event_cb on_event, void *arg)
{
    struct kd_presence *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->s = s;
    p->cfg = cfg;
    p->cmd = cmd;
    p->on_event = on_event;
    p->arg = arg;
    parse_id(cfg->tracker->instance_id, 16, &p->self);
    p->nbuckets = 64;
    p->buckets = calloc(p->nbuckets, sizeof(*p->buckets));
    kd_list_init(&p->lru);
    kd_list_init(&p->ops);
    kd_timer_init(&p->sweep, sweep_cb);
    kd_timer_init(&p->park, park_cb);
    if (getrandom(&p->rng, sizeof(p->rng), 0) != sizeof(p->rng) || p->rng == 0)
        p->rng = 0x9E3779B97F4A7C15ULL ^ (uint64_t)(uintptr_t)p;
    if (p->buckets == NULL) {
        free(p);
        return NULL;
    }
    if (events(p)) {
        struct kd_redis_opts o = *cfg->redis;
        o.subscriber = true;
        o.name = "presence";
        o.stats = NULL;
        o.client_name = NULL;
        p->sub = kd_redis_new(s, &o, &sub_hooks, p);
        if (p->sub == NULL) {
            free(p->buckets);
            free(p);
            return NULL;
        }
    }
    return p;
}

void kd_presence_stop(struct kd_presence *p)
{
    if (p != NULL && p->sub != NULL)
        kd_redis_stop(p->sub);
}

void kd_presence_free(struct kd_presence *p)
{
    if (p == NULL)
        return;
    kd_timerwheel_cancel(kd_shard_timers(p->s), &p->sweep);
    kd_timerwheel_cancel(kd_shard_timers(p->s), &p->park);
    if (p->sub != NULL)
        kd_redis_free(p->sub);
    /* Reads still in flight on the shard's connection free themselves when answered. */
    while (!kd_list_is_empty(&p->ops)) {
        struct op *o = KD_CONTAINER_OF(kd_list_pop_front(&p->ops), struct op, link);
        while (!kd_list_is_empty(&o->lookups))
            KD_CONTAINER_OF(kd_list_pop_front(&o->lookups), struct kd_presence_lookup, link)->pending = false;
        o->p = NULL;
    }
    for (size_t i = 0; i < p->nbuckets; i++)
        for (struct pagent *a = p->buckets[i], *next; a != NULL; a = next) {
            next = a->hnext;
            while (!kd_list_is_empty(&a->waiting))
                KD_CONTAINER_OF(kd_list_pop_front(&a->waiting), struct kd_presence_lookup, link)->pending = false;
            free(a->ids);
            free(a);
        }
    free(p->buckets);
    free(p);
}

void kd_presence_watch(struct kd_presence *p, int64_t agent_id)
{
    struct pagent *a = agent_get(p, agent_id);
    if (a == NULL)
        return; /* no events for it: the caller's re-check still finds the agent */
    a->watch++;
    subscribe(p, a);
}

void kd_presence_unwatch(struct kd_presence *p, int64_t agent_id)
{
    struct pagent *a = agent_find(p, agent_id);
    if (a == NULL || a->watch == 0)
        return;
    a->watch--;
    agent_release(p, a);
}

int kd_presence_cached(struct kd_presence *p, int64_t agent_id, struct kd_presence_peer *out, size_t max)
{
    struct pagent *a = agent_find(p, agent_id);
    if (a != NULL)
        a->used_ms = kd_shard_now_ms(p->s);
    if (a == NULL || !a->cached || a->fresh_ms == 0 || kd_shard_now_ms(p->s) - a->fresh_ms >= ttl_ms(p))
        return -1;
    if (events(p) && (a->missed || a->sub != SUB_CONFIRMED || !kd_redis_up(p->sub))) {
        /* Events may have been missed: read Redis again if it answers. Redis down: the cached
         * route is all there is until it expires (a peer that lost the agent meanwhile answers
         * "no tunnel", and the call waits). */
        if (kd_redis_up(p->cmd) || a->fresh_ms == 0)
            return -1;
        p->st.cache_stale_hits++;
    }
    size_t n = 0;
    for (uint32_t i = 0; i < a->nids && n < max; i++) {
        struct peer_rec *r = peer_find(p, a->ids[i]);
        if (r == NULL)
            return -1; /* forgotten (peer_bad): read it again */
        peer_out(r, &out[n++]);
    }
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(rnd(p) % i);
        struct kd_presence_peer t = out[i - 1];
        out[i - 1] = out[j];
        out[j] = t;
    }
    p->st.cache_hits++;
    lru_touch(p, a);
    return (int)n;
}

void kd_presence_lookup_init(struct kd_presence_lookup *lk, kd_presence_lookup_cb cb)
{
    memset(lk, 0, sizeof(*lk));
    kd_list_node_init(&lk->link);
    lk->cb = cb;
}

void kd_presence_lookup(struct kd_presence *p, struct kd_presence_lookup *lk, int64_t agent_id, bool fresh)
{
    (void)fresh; /* a lookup always reads Redis; the cache is asked with kd_presence_cached */
    kd_presence_lookup_cancel(p, lk);
    lk->agent_id = agent_id;
    if (!kd_redis_up(p->cmd)) {
        p->st.lookup_failures++;
        lk->cb(lk, NULL, 0, kd_redis_last_error(p->cmd)[0] ? kd_redis_last_error(p->cmd) : "redis: not connected");
        return;
    }
    struct pagent *a = agent_get(p, agent_id);
    if (a == NULL) {
        p->st.lookup_failures++;
        lk->cb(lk, NULL, 0, "out of memory");
        return;
    }
    lk->pending = true;
    subscribe(p, a);
    bool first = kd_list_is_empty(&a->waiting);
    kd_list_push_back(&a->waiting, &lk->link);
    if (events(p) && a->sub == SUB_PENDING && kd_redis_up(p->sub)) {
        /* subscribe before the lookup: read once the server confirmed (or PARK_MS from now) */
        if (first)
            a->parked_ms = kd_shard_now_ms(p->s);
        if (!kd_timer_is_armed(&p->park))
            kd_timerwheel_add(kd_shard_timers(p->s), &p->park, kd_shard_now_ms(p->s) + PARK_MS);
        return;
    }
    read_start(p, a);
}

void kd_presence_lookup_cancel(struct kd_presence *p, struct kd_presence_lookup *lk)
{
    (void)p;
    if (!lk->pending)
        return;
    lk->pending = false;
    if (kd_list_is_linked(&lk->link))
        kd_list_unlink(&lk->link);
    /* the record (and a read in flight) stay: a read's answer still fills the cache */
    struct pagent *a = agent_find(p, lk->agent_id);
    if (a != NULL)
        agent_release(p, a);
}

void kd_presence_peer_bad(struct kd_presence *p, const char *instance_id)
{
    uint64_t id;
    if (!parse_id(instance_id, strlen(instance_id), &id))
        return;
    for (size_t i = 0; i < p->npeers; i++)
        if (p->peers[i].id == id) {
            p->peers[i] = p->peers[--p->npeers];
            break;
        }
    for (struct kd_list *n = p->lru.next; n != &p->lru; n = n->next)
        ids_del(KD_CONTAINER_OF(n, struct pagent, lru), id);
}

bool kd_presence_up(const struct kd_presence *p)
{
    return p->sub != NULL ? kd_redis_up(p->sub) : kd_redis_up(p->cmd);
}

void kd_presence_stats(const struct kd_presence *p, struct kd_presence_stats *out)
{
    *out = p->st;
    out->cache_entries = p->ncached;
}

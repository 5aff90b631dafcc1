/* tracker.c — the fleet state in Redis, one shard's share (see tracker.h, docs/redis.md).
 *
 * Desired state lives here, in memory: every connection entry (in `all`) and every tunnel flag
 * (in `tuns`). Changes are put on the dirty list and written as one pipelined batch per loop turn
 * while Redis is up. While it is down nothing is queued (deleted entries are freed at once, the
 * rest stays in `all`); the re-sync that follows every (re)connect reads the shard's index,
 * deletes what is no longer wanted and rewrites everything that is.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "core/hash.h"
#include "core/list.h"
#include "core/log.h"
#include "core/pb.h"
#include "core/resp.h"
#include "core/timerwheel.h"
#include "shards/kas.h"
#include "shards/redis.h"
#include "shards/shard.h"
#include "shards/tracker.h"
#include "shards/requests.h"

enum { E_CLEAN, E_UPSERT, E_DELETE };

struct kd_tracker_conn {
    struct kd_list link;  /* `all` while wanted */
    struct kd_list dlink; /* `dirty` while a write (UPSERT) or a delete (DELETE) is pending */
    uint64_t key;         /* C: unique within the instance */
    int64_t agent_id, project_id;
    uint8_t *info;
    size_t info_len;
    uint8_t state;
};

struct tun {
    struct tun *hnext;
    struct kd_list dlink; /* `dirty` while its state differs from what Redis has */
    int64_t agent_id;
    bool want;      /* this instance holds ≥ 1 tunnel */
    bool published; /* what the last write said */
};

struct sweep; /* a dead instance being swept (shard 0) */

struct kd_tracker {
    struct kd_shard *s;
    const struct kd_tracker_cfg *cfg;
    struct kd_redis *r;
    unsigned shard;
    uint64_t next_key;
    struct kd_list all;    /* wanted connection entries */
    struct kd_list dirty;  /* connection entries to write or delete */
    struct kd_list tdirty; /* tunnel flags to write */
    struct tun **tbuckets; /* tunnel flags by agent id */
    size_t ntbuckets, ntuns;
    size_t nconns;
    bool up;
    bool was_up;              /* up at least once: the next up is a reconnect */
    bool alive_seen;          /* shard 0: a heartbeat since the last registration found the key set */
    bool plain_heartbeat;     /* Redis < 6.2: SET without GET */
    uint64_t resync_again_ms; /* shard 0: a second resync_all_shards is due then (0: none) */
    unsigned resync_backoff;  /* ticks to wait before retrying a re-sync after failures (doubles) */
    unsigned resync_wait;
    bool resync_needed; /* a write failed, or the connection came back: re-sync at the next chance */
    bool resync_running;
    bool synced;          /* counted out of cfg->unsynced: a re-sync on this connection was applied */
    unsigned conn_gen;    /* bumped when the connection drops: a PING sent before proves nothing */
    unsigned applied_gen; /* conn_gen when the re-sync's PING went out */
    bool stopping;
    struct kd_timer tick; /* heartbeat / resync retry / sweeper */
    unsigned ticks;
    struct sweep *sweep;
    struct kd_tracker_stats st;
};

static void drop_pending(struct kd_tracker *t);

static char *idx_key(const struct kd_tracker *t, const char *iid, unsigned shard, char *buf, size_t n)
{
    snprintf(buf, n, "%s:{i:%s}:idx:%u", t->cfg->prefix, iid, shard);
    return buf;
}

/* ---- small helpers around kd_redis_cmd ---- */

struct argv {
    int n;
    const char *v[8];
    size_t l[8];
};

static void av_add(struct argv *a, const char *s, size_t len)
{
    a->v[a->n] = s;
    a->l[a->n] = len;
    a->n++;
}
static void av_str(struct argv *a, const char *s)
{
    av_add(a, s, strlen(s));
}

static void write_done(void *arg, const struct kd_resp *reply, const char *err)
{
    struct kd_tracker *t = arg;
    if (err == NULL && reply->type != KD_RESP_ERROR)
        return;
    t->st.write_failures++;
    if (!t->resync_needed) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_WARN, "redis_write_failed");
        kd_log_uint(&l, "shard", t->shard);
        kd_log_strn(&l, "reason", err ? err : reply->str, err ? strlen(err) : reply->len);
        kd_log_end(&l);
    }
    t->resync_needed = true; /* the next re-sync repairs whatever this write meant to do */
}

/* Every command the tracker sends goes through here (counted for kasd_tracker_redis_*). <0: it
 * could not even be queued (cb is not called). */
static int issue(struct kd_tracker *t, kd_redis_cb cb, void *arg, int argc, const char *const *v,
                 const size_t *l)
{
    t->st.writes++;
    int rc = kd_redis_cmd(t->r, cb, arg, argc, v, l);
    if (rc < 0)
        t->st.write_failures++;
    return rc;
}

/* A write whose failure is repaired by the next re-sync. */
static void cmd(struct kd_tracker *t, const struct argv *a, kd_redis_cb cb, void *arg)
{
    if (issue(t, cb ? cb : write_done, cb ? arg : t, a->n, a->v, a->l) < 0)
        t->resync_needed = true;
}

/* A variadic command with one fixed head (e.g. SADD key) and many members, chunked. */
struct multi {
    struct kd_tracker *t;
    const char *head[3];
    int nhead;
    const char **v;
    size_t *l;
    int n, cap;
    char *strs; /* member storage */
    size_t slen, scap;
    size_t *soff;
};

static void multi_init(struct multi *m, struct kd_tracker *t, const char *h0, const char *h1, const char *h2)
{
    memset(m, 0, sizeof(*m));
    m->t = t;
    m->head[m->nhead++] = h0;
    m->head[m->nhead++] = h1;
    if (h2 != NULL)
        m->head[m->nhead++] = h2;
}

static void multi_flush(struct multi *m)
{
    if (m->n == 0)
        return;
    int argc = m->nhead + m->n;
    const char **v = malloc(sizeof(*v) * (size_t)argc);
    size_t *l = malloc(sizeof(*l) * (size_t)argc);
    if (v == NULL || l == NULL) {
        free(v);
        free(l);
        m->t->resync_needed = true;
        m->n = 0;
        m->slen = 0;
        return;
    }
    for (int i = 0; i < m->nhead; i++) {
        v[i] = m->head[i];
        l[i] = strlen(m->head[i]);
    }
    for (int i = 0; i < m->n; i++) {
        v[m->nhead + i] = m->strs + m->soff[i];
        l[m->nhead + i] = m->l[i];
    }
    if (issue(m->t, write_done, m->t, argc, v, l) < 0)
        m->t->resync_needed = true;
    free(v);
    free(l);
    m->n = 0;
    m->slen = 0;
}

#define MULTI_CHUNK 1000

static void multi_add(struct multi *m, const char *s, size_t len)
{
    if (m->n == m->cap) {
        int cap = m->cap ? m->cap * 2 : 64;
        size_t *l = realloc(m->l, sizeof(*l) * (size_t)cap);
        if (l != NULL)
            m->l = l;
        size_t *o = realloc(m->soff, sizeof(*o) * (size_t)cap);
        if (o != NULL)
            m->soff = o;
        if (l == NULL || o == NULL) {
            m->t->resync_needed = true;
            return;
        }
        m->cap = cap;
    }
    if (m->slen + len > m->scap) {
        size_t cap = m->scap ? m->scap * 2 : 4096;
        while (cap < m->slen + len)
            cap *= 2;
        char *p = realloc(m->strs, cap);
        if (p == NULL) {
            m->t->resync_needed = true;
            return;
        }
        m->strs = p;
        m->scap = cap;
    }
    memcpy(m->strs + m->slen, s, len);
    m->soff[m->n] = m->slen;
    m->l[m->n] = len;
    m->slen += len;
    m->n++;
    if (m->n >= MULTI_CHUNK)
        multi_flush(m);
}

static void multi_done(struct multi *m)
{
    multi_flush(m);
    free(m->l);
    free(m->soff);
    free(m->strs);
}

/* ---- names ---- */

static size_t conn_member(const struct kd_tracker_conn *c, char *buf, size_t n)
{
    return (size_t)snprintf(buf, n, "c:%" PRIx64 ":%" PRId64 ":%" PRId64, c->key, c->agent_id, c->project_id);
}

static size_t field_name(const struct kd_tracker *t, uint64_t key, char *buf, size_t n)
{
    return (size_t)snprintf(buf, n, "%s:%" PRIx64, t->cfg->instance_id, key);
}

static void write_conn(struct kd_tracker *t, const struct kd_tracker_conn *c)
{
    char ak[160], pk[160], f[64];
    snprintf(ak, sizeof(ak), "%s:{a:%" PRId64 "}:conns", t->cfg->prefix, c->agent_id);
    snprintf(pk, sizeof(pk), "%s:{p:%" PRId64 "}:conns", t->cfg->prefix, c->project_id);
    size_t fl = field_name(t, c->key, f, sizeof(f));
    struct argv a = {0};
    av_str(&a, "HSET");
    av_str(&a, ak);
    av_add(&a, f, fl);
    av_add(&a, (const char *)c->info, c->info_len);
    cmd(t, &a, NULL, NULL);
    a.v[1] = pk;
    a.l[1] = strlen(pk);
    cmd(t, &a, NULL, NULL);
}

/* HDEL of both hashes for connection key `key` of instance iid. */
static void delete_conn(struct kd_tracker *t, const char *iid, uint64_t key, int64_t agent_id,
                        int64_t project_id)
{
    char ak[160], pk[160], f[64];
    snprintf(ak, sizeof(ak), "%s:{a:%" PRId64 "}:conns", t->cfg->prefix, agent_id);
    snprintf(pk, sizeof(pk), "%s:{p:%" PRId64 "}:conns", t->cfg->prefix, project_id);
    size_t fl = (size_t)snprintf(f, sizeof(f), "%s:%" PRIx64, iid, key);
    struct argv a = {0};
    av_str(&a, "HDEL");
    av_str(&a, ak);
    av_add(&a, f, fl);
    cmd(t, &a, NULL, NULL);
    a.v[1] = pk;
    a.l[1] = strlen(pk);
    cmd(t, &a, NULL, NULL);
}

static void write_tun(struct kd_tracker *t, const char *iid, int64_t agent_id, bool present)
{
    char k[160];
    snprintf(k, sizeof(k), "%s:{a:%" PRId64 "}:tunnels", t->cfg->prefix, agent_id);
    struct argv a = {0};
    av_str(&a, present ? "SADD" : "SREM");
    av_str(&a, k);
    av_str(&a, iid);
    cmd(t, &a, NULL, NULL);
    /* The presence event, after the set is written (a peer woken by it reads the set and finds
     * the instance): "+I" / "-I" on the agent's channel, same hash tag. */
    char ch[160], ev[18];
    snprintf(ch, sizeof(ch), "%s:{a:%" PRId64 "}:presence", t->cfg->prefix, agent_id);
    snprintf(ev, sizeof(ev), "%c%s", present ? '+' : '-', iid);
    struct argv b = {0};
    av_str(&b, "PUBLISH");
    av_str(&b, ch);
    av_str(&b, ev);
    cmd(t, &b, NULL, NULL);
}

/* Parse an index member: 'c' (conn: key, agent, project) or 't' (tunnel: agent). */
int kd_tracker_parse_member(const char *s, size_t n, uint64_t *key, int64_t *agent, int64_t *project)
{
    char buf[96];
    if (n < 3 || n >= sizeof(buf) || s[1] != ':')
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    char *end;
    if (buf[0] == 'c') {
        *key = strtoull(buf + 2, &end, 16);
        if (*end != ':')
            return -1;
        *agent = strtoll(end + 1, &end, 10);
        if (*end != ':')
            return -1;
        *project = strtoll(end + 1, &end, 10);
        return *end == '\0' ? 'c' : -1;
    }
    if (buf[0] == 't') {
        *agent = strtoll(buf + 2, &end, 10);
        return *end == '\0' ? 't' : -1;
    }
    return -1;
}

/* ---- tunnel flags ---- */

static struct tun **tun_slot(struct kd_tracker *t, int64_t agent_id)
{
    struct tun **pp = &t->tbuckets[kd_hash_u64((uint64_t)agent_id) & (t->ntbuckets - 1)];
    while (*pp != NULL && (*pp)->agent_id != agent_id)
        pp = &(*pp)->hnext;
    return pp;
}

static void tun_grow(struct kd_tracker *t)
{
    size_t n = t->ntbuckets * 2;
    struct tun **b = calloc(n, sizeof(*b));
    if (b == NULL)
        return; /* longer chains, still correct */
    for (size_t i = 0; i < t->ntbuckets; i++) {
        struct tun *e = t->tbuckets[i];
        while (e != NULL) {
            struct tun *next = e->hnext;
            size_t j = kd_hash_u64((uint64_t)e->agent_id) & (n - 1);
            e->hnext = b[j];
            b[j] = e;
            e = next;
        }
    }
    free(t->tbuckets);
    t->tbuckets = b;
    t->ntbuckets = n;
}

static void tun_remove(struct kd_tracker *t, struct tun *e)
{
    struct tun **pp = tun_slot(t, e->agent_id);
    *pp = e->hnext;
    if (kd_list_is_linked(&e->dlink))
        kd_list_unlink(&e->dlink);
    free(e);
    t->ntuns--;
}

void kd_tracker_tunnels(struct kd_tracker *t, int64_t agent_id, bool present)
{
    struct tun **pp = tun_slot(t, agent_id);
    struct tun *e = *pp;
    if (e == NULL) {
        if (!present)
            return;
        e = calloc(1, sizeof(*e));
        if (e == NULL) {
            t->resync_needed = true;
            return;
        }
        e->agent_id = agent_id;
        kd_list_node_init(&e->dlink);
        *pp = e;
        t->ntuns++;
        if (t->ntuns > t->ntbuckets)
            tun_grow(t);
    }
    e->want = present;
    if (!t->up) {
        if (!present)
            tun_remove(t, e); /* the re-sync removes it from Redis if it is there */
        return;
    }
    if (e->want != e->published) {
        if (!kd_list_is_linked(&e->dlink))
            kd_list_push_back(&t->tdirty, &e->dlink);
    } else if (kd_list_is_linked(&e->dlink)) {
        kd_list_unlink(&e->dlink); /* changed and changed back within a turn */
        if (!present)
            tun_remove(t, e);
    }
}

/* ---- connection entries ---- */

struct kd_tracker_conn *kd_tracker_conn_up(struct kd_tracker *t, struct kd_tracker_conn *c, int64_t agent_id,
                                           int64_t project_id, int64_t pod_id, uint64_t connected_at_us,
                                           const uint8_t *meta, size_t meta_len)
{
    size_t len = kd_tracker_encode_info(NULL, meta, meta_len, connected_at_us, pod_id, agent_id, project_id);
    uint8_t *copy = malloc(len ? len : 1);
    if (copy == NULL)
        return c;
    kd_tracker_encode_info(copy, meta, meta_len, connected_at_us, pod_id, agent_id, project_id);
    if (c != NULL && c->info_len == len && memcmp(c->info, copy, len) == 0) {
        free(copy);
        return c; /* agentk re-registered with the same meta: nothing to write */
    }
    if (c == NULL) {
        c = calloc(1, sizeof(*c));
        if (c == NULL) {
            free(copy);
            return NULL;
        }
        c->key = ((uint64_t)t->shard << 48) | ++t->next_key;
        c->agent_id = agent_id;
        c->project_id = project_id;
        kd_list_node_init(&c->dlink);
        kd_list_push_back(&t->all, &c->link);
        t->nconns++;
    }
    free(c->info);
    c->info = copy;
    c->info_len = len;
    if (t->up && !kd_list_is_linked(&c->dlink)) {
        c->state = E_UPSERT;
        kd_list_push_back(&t->dirty, &c->dlink);
    }
    return c;
}

static void conn_free(struct kd_tracker_conn *c)
{
    free(c->info);
    free(c);
}

void kd_tracker_conn_down(struct kd_tracker *t, struct kd_tracker_conn *c)
{
    if (c == NULL)
        return;
    kd_list_unlink(&c->link);
    t->nconns--;
    if (kd_list_is_linked(&c->dlink))
        kd_list_unlink(&c->dlink);
    if (!t->up) {
        conn_free(c); /* the re-sync deletes it from Redis if it is there */
        return;
    }
    c->state = E_DELETE;
    kd_list_push_back(&t->dirty, &c->dlink);
}

void kd_tracker_flush(struct kd_tracker *t)
{
    if (t->stopping) {
        /* kd_tracker_stop removed everything: nothing is advertised again on the way out */
        drop_pending(t);
        return;
    }
    if (!t->up || (kd_list_is_empty(&t->dirty) && kd_list_is_empty(&t->tdirty)))
        return;
    char idx[160], m[96];
    idx_key(t, t->cfg->instance_id, t->shard, idx, sizeof(idx));
    /* 1. index members first, so an entry is never in Redis without one */
    struct multi add;
    multi_init(&add, t, "SADD", idx, NULL);
    for (struct kd_list *n = t->dirty.next; n != &t->dirty; n = n->next) {
        struct kd_tracker_conn *c = KD_CONTAINER_OF(n, struct kd_tracker_conn, dlink);
        if (c->state == E_UPSERT)
            multi_add(&add, m, conn_member(c, m, sizeof(m)));
    }
    for (struct kd_list *n = t->tdirty.next; n != &t->tdirty; n = n->next) {
        struct tun *e = KD_CONTAINER_OF(n, struct tun, dlink);
        if (e->want)
            multi_add(&add, m, (size_t)snprintf(m, sizeof(m), "t:%" PRId64, e->agent_id));
    }
    multi_done(&add);
    /* 2. the entries */
    struct multi rem;
    multi_init(&rem, t, "SREM", idx, NULL);
    while (!kd_list_is_empty(&t->dirty)) {
        struct kd_tracker_conn *c =
            KD_CONTAINER_OF(kd_list_pop_front(&t->dirty), struct kd_tracker_conn, dlink);
        if (c->state == E_UPSERT) {
            write_conn(t, c);
            c->state = E_CLEAN;
        } else {
            delete_conn(t, t->cfg->instance_id, c->key, c->agent_id, c->project_id);
            multi_add(&rem, m, conn_member(c, m, sizeof(m)));
            conn_free(c);
        }
    }
    while (!kd_list_is_empty(&t->tdirty)) {
        struct tun *e = KD_CONTAINER_OF(kd_list_pop_front(&t->tdirty), struct tun, dlink);
        write_tun(t, t->cfg->instance_id, e->agent_id, e->want);
        e->published = e->want;
        if (!e->want) {
            multi_add(&rem, m, (size_t)snprintf(m, sizeof(m), "t:%" PRId64, e->agent_id));
            tun_remove(t, e);
        }
    }
    /* 3. index members of what was deleted, last */
    multi_done(&rem);
}

/* ---- re-sync ---- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void rewrite_all(struct kd_tracker *t)
{
    char idx[160], m[96];
    idx_key(t, t->cfg->instance_id, t->shard, idx, sizeof(idx));
    struct multi add;
    multi_init(&add, t, "SADD", idx, NULL);
    for (struct kd_list *n = t->all.next; n != &t->all; n = n->next)
        multi_add(&add, m, conn_member(KD_CONTAINER_OF(n, struct kd_tracker_conn, link), m, sizeof(m)));
    for (size_t i = 0; i < t->ntbuckets; i++)
        for (struct tun *e = t->tbuckets[i]; e != NULL; e = e->hnext)
            if (e->want)
                multi_add(&add, m, (size_t)snprintf(m, sizeof(m), "t:%" PRId64, e->agent_id));
    multi_done(&add);
    /* Pending upserts are covered by the rewrite. Pending deletes stay queued for this turn's
     * flush: the diff only saw members that were in Redis when SMEMBERS ran, not those a flush
     * wrote since (deletes are idempotent, so a second one is harmless). */
    for (struct kd_list *n = t->dirty.next, *next; n != &t->dirty; n = next) {
        next = n->next;
        struct kd_tracker_conn *c = KD_CONTAINER_OF(n, struct kd_tracker_conn, dlink);
        if (c->state == E_UPSERT) {
            kd_list_unlink(&c->dlink);
            c->state = E_CLEAN;
        }
    }
    for (struct kd_list *n = t->all.next; n != &t->all; n = n->next)
        write_conn(t, KD_CONTAINER_OF(n, struct kd_tracker_conn, link));
    for (size_t i = 0; i < t->ntbuckets; i++) {
        struct tun **pp = &t->tbuckets[i];
        while (*pp != NULL) {
            struct tun *e = *pp;
            if (!e->want && !kd_list_is_linked(&e->dlink)) {
                *pp = e->hnext; /* never published, or already removed: forget it */
                free(e);
                t->ntuns--;
                continue;
            }
            if (e->want) {
                write_tun(t, t->cfg->instance_id, e->agent_id, true);
                e->published = true;
                if (kd_list_is_linked(&e->dlink))
                    kd_list_unlink(&e->dlink);
            } else {
                /* An SREM is queued for this turn's flush (and the diff may have sent one already):
                 * Redis no longer has the flag, whatever happens next in this turn. */
                e->published = false;
            }
            pp = &e->hnext;
        }
    }
}

struct wanted {
    const uint64_t *keys; /* sorted */
    size_t n;
};

static bool still_wanted(struct kd_tracker *t, int kind, uint64_t key, int64_t agent, void *ud)
{
    const struct wanted *w = ud;
    if (kind == 'c')
        return bsearch(&key, w->keys, w->n, sizeof(*w->keys), cmp_u64) != NULL;
    const struct tun *e = *tun_slot(t, agent);
    return e != NULL && e->want;
}

/* For each member of index (iid, shard) in `reply` that keep() does not want kept (keep NULL: none):
 * delete the entries it names, then remove it from the index. Members kasd does not write are
 * removed too. Returns how many were removed. */
static size_t remove_members(struct kd_tracker *t, const char *iid, unsigned shard,
                             const struct kd_resp *reply,
                             bool (*keep)(struct kd_tracker *, int, uint64_t, int64_t, void *), void *ud)
{
    char idx[160];
    idx_key(t, iid, shard, idx, sizeof(idx));
    struct multi rem;
    multi_init(&rem, t, "SREM", idx, NULL);
    size_t removed = 0;
    for (size_t i = 0; i < reply->n; i++) {
        const struct kd_resp *e = reply->elem[i];
        uint64_t key = 0;
        int64_t agent = 0, project = 0;
        if (e->type != KD_RESP_STRING)
            continue;
        int kind = kd_tracker_parse_member(e->str, e->len, &key, &agent, &project);
        if (kind > 0 && keep != NULL && keep(t, kind, key, agent, ud))
            continue;
        if (kind == 'c')
            delete_conn(t, iid, key, agent, project);
        else if (kind == 't')
            write_tun(t, iid, agent, false);
        multi_add(&rem, e->str, e->len);
        removed++;
    }
    multi_done(&rem);
    return removed;
}

static void set_synced(struct kd_tracker *t, bool synced)
{
    if (t->synced == synced)
        return;
    t->synced = synced;
    if (t->cfg->unsynced != NULL) {
        if (synced)
            atomic_fetch_sub(t->cfg->unsynced, 1);
        else
            atomic_fetch_add(t->cfg->unsynced, 1);
    }
}

/* The PING after a re-sync's writes: Redis answers a connection's commands in order, so once it
 * answers, everything the re-sync wrote is in Redis and lookups on any connection see it. */
static void resync_applied(void *arg, const struct kd_resp *reply, const char *err)
{
    struct kd_tracker *t = arg;
    if (err != NULL || reply->type == KD_RESP_ERROR || !t->up || t->stopping || t->applied_gen != t->conn_gen)
        return;
    set_synced(t, true);
}

static void resync_members(void *arg, const struct kd_resp *reply, const char *err)
{
    struct kd_tracker *t = arg;
    t->resync_running = false;
    if (t->stopping)
        return; /* kd_tracker_stop removed everything: re-advertising now would outlive the instance */
    if (err != NULL || reply->type != KD_RESP_ARRAY || !t->up) {
        t->st.write_failures++;
        t->resync_needed = true;
        return;
    }
    /* What is wanted now: connection keys (sorted) and tunnel flags (hash). */
    size_t n = 0;
    uint64_t *keys = malloc(sizeof(*keys) * (t->nconns ? t->nconns : 1));
    if (keys == NULL) {
        t->resync_needed = true;
        return;
    }
    for (struct kd_list *p = t->all.next; p != &t->all; p = p->next)
        keys[n++] = KD_CONTAINER_OF(p, struct kd_tracker_conn, link)->key;
    qsort(keys, n, sizeof(*keys), cmp_u64);
    struct wanted w = {keys, n};
    size_t stale = remove_members(t, t->cfg->instance_id, t->shard, reply, still_wanted, &w);
    free(keys);
    rewrite_all(t);
    if (!t->synced) {
        struct argv ping = {0};
        av_str(&ping, "PING");
        t->applied_gen = t->conn_gen;
        if (issue(t, resync_applied, t, ping.n, ping.v, ping.l) < 0)
            t->resync_needed = true; /* the next re-sync tries again */
    }
    t->st.resyncs++;
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "redis_resync");
    kd_log_uint(&l, "shard", t->shard);
    kd_log_uint(&l, "connections", t->nconns);
    kd_log_uint(&l, "tunnel_flags", t->ntuns);
    kd_log_uint(&l, "stale_removed", stale);
    kd_log_end(&l);
}

static void resync(struct kd_tracker *t)
{
    if (t->resync_running || !t->up || t->stopping)
        return;
    char idx[160];
    struct argv a = {0};
    av_str(&a, "SMEMBERS");
    av_str(&a, idx_key(t, t->cfg->instance_id, t->shard, idx, sizeof(idx)));
    t->resync_needed = false;
    t->resync_running = true;
    if (issue(t, resync_members, t, a.n, a.v, a.l) < 0) {
        t->resync_running = false;
        t->resync_needed = true;
    }
}

/* ---- the instance (shard 0): record, heartbeat, sweeper ---- */

static void register_instance(struct kd_tracker *t);
static void resync_all_shards(struct kd_tracker *t);
static void heartbeat(struct kd_tracker *t);

/* The heartbeat's reply is the key's previous value: nil after a heartbeat of ours had been
 * answered means the key expired in between, i.e. this process stalled (or its connection was
 * slow) for longer than the TTL, and peers may have swept the instance while its Redis connections
 * stayed up, so nothing else would notice: register again and have every shard re-sync. */
static void heartbeat_done(void *arg, const struct kd_resp *reply, const char *err)
{
    struct kd_tracker *t = arg;
    if (err == NULL && reply->type == KD_RESP_ERROR && !t->plain_heartbeat &&
        strstr(reply->str, "syntax") != NULL) {
        /* Redis before 6.2 has no SET ... GET: plain heartbeats from now on (a stall longer than
         * the TTL is then only repaired by the next reconnect). */
        t->plain_heartbeat = true;
        kd_log_msg(KD_LOG_WARN, "redis_heartbeat_plain",
                   "SET ... GET refused (%s): Redis older than 6.2; a lapsed heartbeat will not be detected",
                   reply->str);
        heartbeat(t); /* now, not at the next tick: without it the instance reads as dead meanwhile */
        return;
    }
    if (err != NULL || reply->type == KD_RESP_ERROR) {
        write_done(arg, reply, err);
        return;
    }
    bool expired = reply->type == KD_RESP_NIL && t->alive_seen;
    t->alive_seen = true;
    if (expired && !t->stopping) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_WARN, "redis_heartbeat_lapsed");
        kd_log_str(&l, "instance", t->cfg->instance_id);
        kd_log_uint(&l, "ttl_ms", t->cfg->ttl_ms);
        kd_log_end(&l);
        register_instance(t);
        resync_all_shards(t);
    }
}

static void heartbeat(struct kd_tracker *t)
{
    char k[160], ttl[24];
    snprintf(k, sizeof(k), "%s:{fleet}:alive:%s", t->cfg->prefix, t->cfg->instance_id);
    snprintf(ttl, sizeof(ttl), "%u", t->cfg->ttl_ms);
    struct argv a = {0};
    av_str(&a, "SET");
    av_str(&a, k);
    av_str(&a, "1");
    av_str(&a, "PX");
    av_str(&a, ttl);
    if (!t->plain_heartbeat)
        av_str(&a, "GET"); /* Redis >= 6.2: the old value comes back */
    cmd(t, &a, heartbeat_done, t);
}

static void register_instance(struct kd_tracker *t)
{
    char k[160], rec[512];
    snprintf(k, sizeof(k), "%s:{fleet}:instances", t->cfg->prefix);
    snprintf(rec, sizeof(rec), "{\"address\":\"%s\",\"version\":\"%s\",\"shards\":%u,\"started\":%lld}",
             t->cfg->private_addr ? t->cfg->private_addr : "", t->cfg->version, t->cfg->nshards,
             (long long)time(NULL));
    struct argv a = {0};
    av_str(&a, "HSET");
    av_str(&a, k);
    av_str(&a, t->cfg->instance_id);
    av_str(&a, rec);
    cmd(t, &a, NULL, NULL);
    heartbeat(t);
}

/* How long a sweeper holds its lease on a dead instance: twice the TTL (60 s by default), far
 * longer than a sweep takes. */
static uint64_t lease_ms(const struct kd_tracker *t)
{
    return 2ull * t->cfg->ttl_ms;
}

struct sweep {
    struct kd_tracker *t;
    char iid[17];
    unsigned nshards, shard;
    unsigned batches; /* bounded per pass: a Redis that answers reads but refuses writes must not
                       * keep the sweeper spinning */
    unsigned long removed;
};

static void sweep_next(struct sweep *w);

/* KEYS: the alive key, the instances hash; ARGV: the instance id. */
static struct kd_redis_script hdel_if_dead;
static pthread_once_t scripts_once = PTHREAD_ONCE_INIT;
static void scripts_init(void)
{
    kd_redis_script_init(
        &hdel_if_dead,
        "if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('HDEL', KEYS[2], ARGV[1]) end "
        "return 0");
}

static void sweep_finish(struct sweep *w, bool ok)
{
    struct kd_tracker *t = w->t;
    if (ok) {
        /* The record goes only if the instance is still dead: one that came back meanwhile keeps
         * it (both keys share the {fleet} tag, so one script sees both). */
        char k[160], alive[160];
        snprintf(k, sizeof(k), "%s:{fleet}:instances", t->cfg->prefix);
        snprintf(alive, sizeof(alive), "%s:{fleet}:alive:%s", t->cfg->prefix, w->iid);
        const char *argv[] = {alive, k, w->iid};
        size_t lens[] = {strlen(alive), strlen(k), strlen(w->iid)};
        t->st.writes++;
        if (kd_redis_eval(t->r, &hdel_if_dead, write_done, t, 2, 3, argv, lens) < 0)
            t->st.write_failures++; /* the record stays: the next pass retries */
        struct argv a = {0};
        snprintf(k, sizeof(k), "%s:{fleet}:sweep:%s", t->cfg->prefix, w->iid);
        a.n = 0;
        av_str(&a, "DEL");
        av_str(&a, k);
        cmd(t, &a, NULL, NULL);
        t->st.swept_instances++;
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "redis_instance_swept");
        kd_log_str(&l, "instance", w->iid);
        kd_log_uint(&l, "entries", w->removed);
        kd_log_end(&l);
    }
    t->sweep = NULL;
    free(w);
}

static void sweep_batch(void *arg, const struct kd_resp *reply, const char *err)
{
    struct sweep *w = arg;
    struct kd_tracker *t = w->t;
    if (err != NULL || reply->type != KD_RESP_ARRAY || t->stopping) {
        sweep_finish(w, false); /* the lease expires; a later pass starts again */
        return;
    }
    if (reply->n == 0) {
        w->shard++;
        sweep_next(w);
        return;
    }
    w->removed += remove_members(t, w->iid, w->shard, reply, NULL, NULL);
    sweep_next(w); /* the same index again, until empty */
}

static void sweep_checked(void *arg, const struct kd_resp *reply, const char *err)
{
    struct sweep *w = arg;
    struct kd_tracker *t = w->t;
    if (err != NULL || reply->type != KD_RESP_INTEGER || t->stopping) {
        sweep_finish(w, false); /* the lease expires; a later pass starts again */
        return;
    }
    if (reply->integer != 0) {
        /* It came back (its heartbeat is there again): it re-publishes everything itself. */
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "redis_instance_back");
        kd_log_str(&l, "instance", w->iid);
        kd_log_uint(&l, "entries_swept", w->removed);
        kd_log_end(&l);
        sweep_finish(w, false);
        return;
    }
    char idx[160];
    struct argv a = {0};
    av_str(&a, "SRANDMEMBER");
    av_str(&a, idx_key(t, w->iid, w->shard, idx, sizeof(idx)));
    av_str(&a, "512");
    if (issue(t, sweep_batch, w, a.n, a.v, a.l) < 0)
        sweep_finish(w, false);
}

static void sweep_next(struct sweep *w)
{
    struct kd_tracker *t = w->t;
    if (w->shard >= w->nshards) {
        sweep_finish(w, true);
        return;
    }
    if (++w->batches > 4096) {
        sweep_finish(w, false); /* the lease expires; the next pass goes on */
        return;
    }
    /* Before every batch: is it still dead? (An instance whose Redis connection was only away for
     * a while comes back and must not lose what it re-publishes.) */
    char k[160];
    snprintf(k, sizeof(k), "%s:{fleet}:alive:%s", t->cfg->prefix, w->iid);
    struct argv a = {0};
    av_str(&a, "EXISTS");
    av_str(&a, k);
    if (issue(t, sweep_checked, w, a.n, a.v, a.l) < 0)
        sweep_finish(w, false);
}

static void sweep_lease(void *arg, const struct kd_resp *reply, const char *err)
{
    struct sweep *w = arg;
    if (err != NULL || reply->type != KD_RESP_STATUS || w->t->stopping) {
        w->t->sweep = NULL;
        free(w); /* another instance is sweeping it (nil reply), or Redis is away */
        return;
    }
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "redis_instance_dead");
    kd_log_str(&l, "instance", w->iid);
    kd_log_uint(&l, "shards", w->nshards);
    kd_log_end(&l);
    sweep_next(w);
}

struct sweep_scan {
    struct kd_tracker *t;
    size_t n;
    char (*ids)[17];
    unsigned *shards;
};

static void sweep_alive(void *arg, const struct kd_resp *reply, const char *err)
{
    struct sweep_scan *sc = arg;
    struct kd_tracker *t = sc->t;
    if (err == NULL && reply->type == KD_RESP_ARRAY && reply->n == sc->n && t->sweep == NULL &&
        !t->stopping) {
        for (size_t i = 0; i < reply->n; i++) {
            if (reply->elem[i]->type != KD_RESP_NIL)
                continue;
            /* Dead: take the lease, then sweep (one dead instance at a time per sweeper). */
            struct sweep *w = calloc(1, sizeof(*w));
            if (w == NULL)
                break;
            w->t = t;
            memcpy(w->iid, sc->ids[i], sizeof(w->iid));
            w->nshards = sc->shards[i];
            char k[160];
            snprintf(k, sizeof(k), "%s:{fleet}:sweep:%s", t->cfg->prefix, w->iid);
            struct argv a = {0};
            av_str(&a, "SET");
            av_str(&a, k);
            av_str(&a, t->cfg->instance_id);
            char lease[24];
            snprintf(lease, sizeof(lease), "%llu", (unsigned long long)lease_ms(t));
            av_str(&a, "NX");
            av_str(&a, "PX");
            av_str(&a, lease);
            t->sweep = w;
            if (issue(t, sweep_lease, w, a.n, a.v, a.l) < 0) {
                t->sweep = NULL;
                free(w);
            }
            break;
        }
    }
    free(sc->ids);
    free(sc->shards);
    free(sc);
}

static unsigned record_shards(const struct kd_resp *v)
{
    /* {"address":...,"shards":N,...}: written by register_instance */
    char buf[512];
    size_t n = v->len < sizeof(buf) - 1 ? v->len : sizeof(buf) - 1;
    memcpy(buf, v->str, n);
    buf[n] = '\0';
    const char *p = strstr(buf, "\"shards\":");
    long s = p ? strtol(p + 9, NULL, 10) : 0;
    return s > 0 && s < 4096 ? (unsigned)s : 256; /* unreadable: sweep generously */
}

static void sweep_instances(void *arg, const struct kd_resp *reply, const char *err)
{
    struct kd_tracker *t = arg;
    if (err != NULL || reply->type != KD_RESP_ARRAY || reply->n < 2 || t->stopping)
        return;
    size_t pairs = reply->n / 2;
    struct sweep_scan *sc = calloc(1, sizeof(*sc));
    const char **v = malloc(sizeof(*v) * (pairs + 1));
    size_t *l = malloc(sizeof(*l) * (pairs + 1));
    char(*keys)[160] = malloc(sizeof(*keys) * pairs);
    if (sc != NULL) {
        sc->ids = malloc(sizeof(*sc->ids) * pairs);
        sc->shards = malloc(sizeof(*sc->shards) * pairs);
    }
    if (sc == NULL || sc->ids == NULL || sc->shards == NULL || v == NULL || l == NULL || keys == NULL) {
        if (sc != NULL) {
            free(sc->ids);
            free(sc->shards);
        }
        free(sc);
        free(v);
        free(l);
        free(keys);
        return;
    }
    sc->t = t;
    v[0] = "MGET";
    l[0] = 4;
    for (size_t i = 0; i < pairs; i++) {
        const struct kd_resp *id = reply->elem[2 * i], *rec = reply->elem[2 * i + 1];
        if (id->type != KD_RESP_STRING || id->len != 16 || memcmp(id->str, t->cfg->instance_id, 16) == 0)
            continue;
        memcpy(sc->ids[sc->n], id->str, 16);
        sc->ids[sc->n][16] = '\0';
        sc->shards[sc->n] = rec->type == KD_RESP_STRING ? record_shards(rec) : 256;
        snprintf(keys[sc->n], sizeof(keys[0]), "%s:{fleet}:alive:%s", t->cfg->prefix, sc->ids[sc->n]);
        v[1 + sc->n] = keys[sc->n];
        l[1 + sc->n] = strlen(keys[sc->n]);
        sc->n++;
    }
    int rc = -1;
    if (sc->n > 0) {
        rc = issue(t, sweep_alive, sc, (int)(1 + sc->n), v, l);
    }
    if (rc < 0) {
        free(sc->ids);
        free(sc->shards);
        free(sc);
    }
    free(v);
    free(l);
    free(keys);
}

static void sweep_pass(struct kd_tracker *t)
{
    if (t->sweep != NULL)
        return;
    char k[160];
    snprintf(k, sizeof(k), "%s:{fleet}:instances", t->cfg->prefix);
    struct argv a = {0};
    av_str(&a, "HGETALL");
    av_str(&a, k);
    issue(t, sweep_instances, t, a.n, a.v, a.l);
}

static void tick(struct kd_timer *tm)
{
    struct kd_tracker *t = KD_CONTAINER_OF(tm, struct kd_tracker, tick);
    t->ticks++;
    if (t->up && !t->stopping) {
        /* Failed writes are repaired by a re-sync, retried with backoff (1, 2, 4 ... 32 ticks): a
         * Redis that refuses writes (OOM, read-only) must not get a full rewrite every tick. */
        if (t->resync_needed && t->resync_wait > 0) {
            t->resync_wait--;
        } else if (t->resync_needed) {
            resync(t);
            t->resync_wait = t->resync_backoff;
            t->resync_backoff = t->resync_backoff == 0    ? 1
                                : t->resync_backoff >= 32 ? 32
                                                          : 2 * t->resync_backoff;
        } else {
            t->resync_backoff = 0; /* a whole tick without a failure */
            t->resync_wait = 0;
        }
        if (t->shard == 0 && t->resync_again_ms != 0 && kd_shard_now_ms(t->s) >= t->resync_again_ms) {
            t->resync_again_ms = UINT64_MAX; /* the second one: no third */
            resync_all_shards(t);
            t->resync_again_ms = 0;
        }
        if (t->shard == 0) {
            heartbeat(t);
            if ((uint64_t)t->ticks * t->cfg->heartbeat_ms >= (uint64_t)t->cfg->sweep_ms) {
                t->ticks = 0;
                sweep_pass(t);
            }
        }
    }
    if (!t->stopping)
        kd_timerwheel_add(kd_shard_timers(t->s), &t->tick, kd_shard_now_ms(t->s) + t->cfg->heartbeat_ms);
}

/* ---- life ---- */

void kd_tracker_cfg_init(struct kd_tracker_cfg *cfg)
{
    uint64_t id = 0;
    if (getrandom(&id, sizeof(id), 0) != sizeof(id))
        id = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid();
    snprintf(cfg->instance_id, sizeof(cfg->instance_id), "%016" PRIx64, id);
    if (cfg->heartbeat_ms == 0)
        cfg->heartbeat_ms = 10000;
    if (cfg->ttl_ms == 0)
        cfg->ttl_ms = 30000;
    if (cfg->sweep_ms == 0)
        cfg->sweep_ms = 30000;
}

struct kd_tracker *kd_tracker_new(struct kd_shard *s, const struct kd_tracker_cfg *cfg, struct kd_redis *r)
{
    pthread_once(&scripts_once, scripts_init);
    struct kd_tracker *t = calloc(1, sizeof(*t));
    if (t == NULL)
        return NULL;
    t->ntbuckets = 64;
    t->tbuckets = calloc(t->ntbuckets, sizeof(*t->tbuckets));
    if (t->tbuckets == NULL) {
        free(t);
        return NULL;
    }
    t->s = s;
    t->cfg = cfg;
    t->r = r;
    t->shard = kd_shard_id(s);
    kd_list_init(&t->all);
    kd_list_init(&t->dirty);
    kd_list_init(&t->tdirty);
    kd_timer_init(&t->tick, tick);
    kd_timerwheel_add(kd_shard_timers(s), &t->tick, kd_shard_now_ms(s) + cfg->heartbeat_ms);
    return t;
}

void kd_tracker_free(struct kd_tracker *t)
{
    if (t == NULL)
        return;
    kd_timerwheel_cancel(kd_shard_timers(t->s), &t->tick);
    while (!kd_list_is_empty(&t->dirty)) {
        struct kd_tracker_conn *c =
            KD_CONTAINER_OF(kd_list_pop_front(&t->dirty), struct kd_tracker_conn, dlink);
        if (c->state == E_DELETE)
            conn_free(c);
    }
    while (!kd_list_is_empty(&t->all))
        conn_free(KD_CONTAINER_OF(kd_list_pop_front(&t->all), struct kd_tracker_conn, link));
    for (size_t i = 0; i < t->ntbuckets; i++)
        while (t->tbuckets[i] != NULL) {
            struct tun *e = t->tbuckets[i];
            t->tbuckets[i] = e->hnext;
            free(e);
        }
    free(t->tbuckets);
    free(t->sweep);
    free(t);
}

void kd_tracker_redis_up(struct kd_tracker *t)
{
    t->up = true;
    if (t->stopping)
        return;
    bool again = t->was_up;
    t->was_up = true;
    t->resync_wait = t->resync_backoff = 0;
    if (t->shard == 0) {
        t->alive_seen = false; /* this registration's own heartbeat finds no key: not a lapse */
        register_instance(t);
        if (again) {
            /* The heartbeat was missing while this connection was down: if that lasted longer
             * than the TTL, peers took the instance for dead and may have swept every shard's
             * entries. The other shards' connections never noticed: tell them to re-sync. */
            resync_all_shards(t);
            return;
        }
    }
    resync(t);
}

/* Every shard (this one included) re-syncs its whole state; shard 0 does it again once a peer's
 * sweep lease (2 × TTL) has surely run out, since a sweep in progress when the instance came back
 * may still have deleted entries after the first re-sync rewrote them. */
static void resync_all_shards(struct kd_tracker *t)
{
    if (t->resync_again_ms == 0)
        t->resync_again_ms = kd_shard_now_ms(t->s) + lease_ms(t) + t->cfg->heartbeat_ms;
    for (unsigned i = 0; i < t->cfg->nshards; i++) {
        if (i == t->shard)
            continue;
        struct kd_msg m = {.type = KD_RT_TRACKER_RESYNC};
        kd_shard_post(t->s, i, &m);
    }
    kd_tracker_request_resync(t);
}

void kd_tracker_request_resync(struct kd_tracker *t)
{
    if (t->stopping)
        return;
    t->resync_needed = true;
    resync(t); /* no-op while down or while one is running (resync_needed stays set then) */
}

void kd_tracker_redis_down(struct kd_tracker *t)
{
    t->up = false;
    t->conn_gen++;
    set_synced(t, false); /* Redis may come back empty (or from an old dump): re-sync first */
    t->resync_needed = true;
    drop_pending(t);
}

/* Nothing is written now: pending deletes are dropped (a re-sync finds them), upserts stay
 * wanted (a re-sync writes them). */
static void drop_pending(struct kd_tracker *t)
{
    while (!kd_list_is_empty(&t->dirty)) {
        struct kd_tracker_conn *c =
            KD_CONTAINER_OF(kd_list_pop_front(&t->dirty), struct kd_tracker_conn, dlink);
        if (c->state == E_DELETE)
            conn_free(c);
        else
            c->state = E_CLEAN;
    }
    while (!kd_list_is_empty(&t->tdirty)) {
        struct tun *e = KD_CONTAINER_OF(kd_list_pop_front(&t->tdirty), struct tun, dlink);
        if (!e->want)
            tun_remove(t, e);
    }
}

void kd_tracker_stop(struct kd_tracker *t)
{
    kd_tracker_flush(t); /* pending deletes first */
    t->stopping = true;
    kd_timerwheel_cancel(kd_shard_timers(t->s), &t->tick);
    if (!t->up)
        return; /* the alive key expires; a peer's sweeper removes the rest */
    char idx[160], m[96];
    /* Shard 0 first: without its alive key the instance reads as dead at once (readers drop its
     * entries even before they are deleted), and a peer's sweeper removes what this stop cannot:
     * the entries of a shard whose connection is down right now, what an earlier failed write
     * left, and finally the instance's record (which is why it is not deleted here). */
    if (t->shard == 0) {
        char k[160];
        snprintf(k, sizeof(k), "%s:{fleet}:alive:%s", t->cfg->prefix, t->cfg->instance_id);
        struct argv b = {0};
        av_str(&b, "DEL");
        av_str(&b, k);
        cmd(t, &b, NULL, NULL);
    }
    /* Every entry this shard holds, then exactly those index members: members of entries a
     * failed write may have left stay in the index for the sweeper. */
    idx_key(t, t->cfg->instance_id, t->shard, idx, sizeof(idx));
    struct multi rem;
    multi_init(&rem, t, "SREM", idx, NULL);
    for (struct kd_list *n = t->all.next; n != &t->all; n = n->next) {
        const struct kd_tracker_conn *c = KD_CONTAINER_OF(n, struct kd_tracker_conn, link);
        delete_conn(t, t->cfg->instance_id, c->key, c->agent_id, c->project_id);
        multi_add(&rem, m, conn_member(c, m, sizeof(m)));
    }
    for (size_t i = 0; i < t->ntbuckets; i++)
        for (struct tun *e = t->tbuckets[i]; e != NULL; e = e->hnext)
            if (e->published) {
                write_tun(t, t->cfg->instance_id, e->agent_id, false);
                multi_add(&rem, m, (size_t)snprintf(m, sizeof(m), "t:%" PRId64, e->agent_id));
            }
    multi_done(&rem);
}

void kd_tracker_stats(const struct kd_tracker *t, struct kd_tracker_stats *out)
{
    *out = t->st;
    out->conns = t->nconns;
    out->tunnels_flags = t->ntuns;
}

size_t kd_tracker_encode_info(uint8_t *buf, const uint8_t *meta, size_t meta_len, uint64_t connected_at_us,
                              int64_t pod_id, int64_t agent_id, int64_t project_id)
{
    /* google.protobuf.Timestamp { int64 seconds = 1; int32 nanos = 2; } */
    uint64_t secs = connected_at_us / 1000000u, nanos = (connected_at_us % 1000000u) * 1000u;
    size_t ts =
        (secs ? kd_pb_varint_field_size(1, secs) : 0) + (nanos ? kd_pb_varint_field_size(2, nanos) : 0);
    size_t n = kd_pb_len_field_size(1, meta_len) + kd_pb_len_field_size(2, ts) +
               (pod_id ? kd_pb_varint_field_size(3, (uint64_t)pod_id) : 0) +
               (agent_id ? kd_pb_varint_field_size(4, (uint64_t)agent_id) : 0) +
               (project_id ? kd_pb_varint_field_size(5, (uint64_t)project_id) : 0);
    if (buf == NULL)
        return n;
    uint8_t *p = kd_pb_put_len_field(buf, 1, meta, meta_len);
    p = kd_pb_put_len_header(p, 2, ts);
    if (secs)
        p = kd_pb_put_varint_field(p, 1, secs);
    if (nanos)
        p = kd_pb_put_varint_field(p, 2, nanos);
    if (pod_id)
        p = kd_pb_put_varint_field(p, 3, (uint64_t)pod_id);
    if (agent_id)
        p = kd_pb_put_varint_field(p, 4, (uint64_t)agent_id);
    if (project_id)
        p = kd_pb_put_varint_field(p, 5, (uint64_t)project_id);
    return (size_t)(p - buf);
}

/* ---- AgentTracker/GetConnectedAgents ---- */

struct lookup {
    kd_grpc_call *call; /* NULL once the call ended (the client went away) */
    struct kd_tracker *t;
    uint8_t *req;
    size_t req_len;
    bool have_req;
    /* after HGETALL: the values to answer with, and for each the index of its instance in dids
     * (the distinct instance ids found, this instance's first) */
    size_t n, nd;
    uint8_t **vals;
    size_t *lens;
    size_t *inst;
    char (*dids)[17];
    unsigned pending; /* Redis callbacks still to come */
};

static void lookup_free(struct lookup *lk)
{
    for (size_t i = 0; i < lk->n; i++)
        free(lk->vals[i]);
    free(lk->vals);
    free(lk->lens);
    free(lk->inst);
    free(lk->dids);
    free(lk->req);
    free(lk);
}

/* The call or the Redis work finished; the lookup goes when both have. */
static void lookup_release(struct lookup *lk)
{
    if (lk->call == NULL && lk->pending == 0)
        lookup_free(lk);
}

/* Why a command could not be queued: the connection's last error, or a full output queue. */
static const char *redis_error(struct kd_tracker *t)
{
    const char *e = kd_redis_last_error(t->r);
    return e != NULL && e[0] != '\0' ? e : "redis: output queue full, try again";
}

static void lookup_unref(struct lookup *lk)
{
    lk->pending--;
    lookup_release(lk);
}

static void lookup_fail(struct lookup *lk, int status, const char *why)
{
    lk->t->st.lookup_failures++;
    if (lk->call != NULL)
        kd_grpc_finish(lk->call, status, why, NULL, 0);
}

static void lookup_answer(struct lookup *lk, const struct kd_resp *alive)
{
    /* alive: the MGET reply for dids[1..nd-1] (dids[0] is this instance), NULL when nd == 1 */
    size_t total = 0;
    for (size_t i = 0; i < lk->n; i++) {
        size_t d = lk->inst[i];
        bool live = d == 0 || (alive != NULL && d - 1 < alive->n && alive->elem[d - 1]->type != KD_RESP_NIL);
        if (!live) {
            free(lk->vals[i]);
            lk->vals[i] = NULL;
            continue;
        }
        total += kd_pb_len_field_size(1, lk->lens[i]);
    }
    /* An answer over what callers receive (GitLab keeps gRPC's 4 MiB default) would fail there as
     * a whole: answer the entries that fit, OK, with the trailer kasd-truncated: true (a Rails
     * client takes any non-OK as an error, so the partial list is more use than a failure). */
    size_t max = lk->t->cfg->max_response ? lk->t->cfg->max_response : (4u << 20) - (64u << 10);
    size_t dropped = 0, all = 0;
    if (total > max) {
        total = 0;
        for (size_t i = 0; i < lk->n; i++) {
            if (lk->vals[i] == NULL)
                continue;
            all++;
            size_t sz = kd_pb_len_field_size(1, lk->lens[i]);
            if (total + sz > max) {
                free(lk->vals[i]);
                lk->vals[i] = NULL;
                dropped++;
                continue;
            }
            total += sz;
        }
    }
    uint8_t *out = malloc(total ? total : 1), *p = out;
    if (out == NULL) {
        lookup_fail(lk, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    for (size_t i = 0; i < lk->n; i++)
        if (lk->vals[i] != NULL)
            p = kd_pb_put_len_field(p, 1, lk->vals[i], lk->lens[i]);
    if (dropped > 0) {
        lk->t->st.lookups_truncated++;
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_WARN, "get_connected_agents_truncated");
        kd_log_int(&l, "entries", (int64_t)all);
        kd_log_int(&l, "answered", (int64_t)(all - dropped));
        kd_log_int(&l, "max_bytes", (int64_t)max);
        kd_log_end(&l);
    }
    if (lk->call != NULL) {
        static const struct kd_h2_header truncated = {"kasd-truncated", 14, "true", 4};
        kd_grpc_send_message(lk->call, out, total);
        kd_grpc_finish(lk->call, KD_GRPC_OK, NULL, dropped > 0 ? &truncated : NULL, dropped > 0 ? 1 : 0);
    }
    free(out);
}

static void lookup_alive(void *arg, const struct kd_resp *reply, const char *err)
{
    struct lookup *lk = arg;
    /* lk->pending still counts this callback: finishing the call cannot free lk under us */
    if (err != NULL)
        lookup_fail(lk, KD_GRPC_UNAVAILABLE, err);
    else if (reply->type != KD_RESP_ARRAY)
        lookup_fail(lk, KD_GRPC_UNAVAILABLE,
                    reply->type == KD_RESP_ERROR ? reply->str : "unexpected redis reply");
    else
        lookup_answer(lk, reply);
    lk->pending--;
    lookup_release(lk);
}

static void lookup_entries(void *arg, const struct kd_resp *reply, const char *err)
{
    struct lookup *lk = arg;
    struct kd_tracker *t = lk->t;
    /* lk->pending still counts this callback until the end (see lookup_alive) */
    if (err != NULL || reply->type != KD_RESP_ARRAY) {
        lookup_fail(lk, KD_GRPC_UNAVAILABLE,
                    err                            ? err
                    : reply->type == KD_RESP_ERROR ? reply->str
                                                   : "unexpected redis reply");
        lookup_unref(lk);
        return;
    }
    size_t pairs = reply->n / 2, cap = pairs + 1;
    lk->vals = calloc(cap, sizeof(*lk->vals));
    lk->lens = calloc(cap, sizeof(*lk->lens));
    lk->inst = calloc(cap, sizeof(*lk->inst));
    lk->dids = calloc(cap, sizeof(*lk->dids));
    if (lk->vals == NULL || lk->lens == NULL || lk->inst == NULL || lk->dids == NULL) {
        lookup_fail(lk, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory");
        lookup_unref(lk);
        return;
    }
    memcpy(lk->dids[0], t->cfg->instance_id, 17);
    lk->nd = 1;
    for (size_t i = 0; i < pairs; i++) {
        const struct kd_resp *f = reply->elem[2 * i], *v = reply->elem[2 * i + 1];
        if (f->type != KD_RESP_STRING || v->type != KD_RESP_STRING || f->len < 17 || f->str[16] != ':')
            continue; /* not an entry kasd writes */
        size_t d = 0;
        while (d < lk->nd && memcmp(lk->dids[d], f->str, 16) != 0)
            d++;
        if (d == lk->nd) {
            memcpy(lk->dids[d], f->str, 16);
            lk->dids[d][16] = '\0';
            lk->nd++;
        }
        uint8_t *copy = malloc(v->len ? v->len : 1);
        if (copy == NULL)
            continue;
        memcpy(copy, v->str, v->len);
        lk->vals[lk->n] = copy;
        lk->lens[lk->n] = v->len;
        lk->inst[lk->n] = d;
        lk->n++;
    }
    if (lk->nd == 1) {
        lookup_answer(lk, NULL);
        lookup_unref(lk);
        return;
    }
    /* One MGET of the alive keys of the other instances found. */
    const char **v = malloc(sizeof(*v) * lk->nd);
    size_t *l = malloc(sizeof(*l) * lk->nd);
    char(*keys)[160] = malloc(sizeof(*keys) * lk->nd);
    if (v == NULL || l == NULL || keys == NULL) {
        free(v);
        free(l);
        free(keys);
        lookup_fail(lk, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory");
        lookup_unref(lk);
        return;
    }
    v[0] = "MGET";
    l[0] = 4;
    for (size_t d = 1; d < lk->nd; d++) {
        snprintf(keys[d], sizeof(keys[0]), "%s:{fleet}:alive:%s", t->cfg->prefix, lk->dids[d]);
        v[d] = keys[d];
        l[d] = strlen(keys[d]);
    }
    lk->pending++;
    if (issue(t, lookup_alive, lk, (int)lk->nd, v, l) < 0) {
        lk->pending--;
        lookup_fail(lk, KD_GRPC_UNAVAILABLE, redis_error(t));
    }
    free(v);
    free(l);
    free(keys);
    lookup_unref(lk);
}

static int lookup_message(kd_grpc_call *call, const uint8_t *msg, size_t len)
{
    struct lookup *lk = kd_h2_call_user(call);
    if (lk->have_req) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "more than one GetConnectedAgentsRequest", NULL, 0);
        return 0;
    }
    lk->req = malloc(len ? len : 1);
    if (lk->req == NULL)
        return -1;
    memcpy(lk->req, msg, len);
    lk->req_len = len;
    lk->have_req = true;
    return 0;
}

static void lookup_half_close(kd_grpc_call *call)
{
    struct lookup *lk = kd_h2_call_user(call);
    struct kd_tracker *t = lk->t;
    if (!lk->have_req) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "missing GetConnectedAgentsRequest", NULL, 0);
        return;
    }
    /* oneof request { int64 project_id = 1; int64 agent_id = 2; } — the last one set wins */
    struct kd_connected_agents_req req;
    if (kd_req_connected_agents(lk->req, lk->req_len, &req) < 0) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "malformed GetConnectedAgentsRequest", NULL, 0);
        return;
    }
    if (req.which == 0) {
        kd_grpc_finish(call, KD_GRPC_INVALID_ARGUMENT, "neither project_id nor agent_id is set", NULL, 0);
        return;
    }
    t->st.lookups++;
    if (t->up && t->cfg->unsynced != NULL && atomic_load(t->cfg->unsynced) != 0) {
        /* Some shard of this instance has not re-published its agents since Redis came back: an
         * answer now could lack them, and GitLab would take them for gone. */
        lookup_fail(lk, KD_GRPC_UNAVAILABLE, "kasd is re-syncing its agents with Redis; try again");
        return;
    }
    char k[160];
    snprintf(k, sizeof(k), "%s:{%c:%" PRId64 "}:conns", t->cfg->prefix, req.which == 1 ? 'p' : 'a', req.id);
    struct argv a = {0};
    av_str(&a, "HGETALL");
    av_str(&a, k);
    lk->pending++;
    if (issue(t, lookup_entries, lk, a.n, a.v, a.l) < 0) {
        lk->pending--;
        lookup_fail(lk, KD_GRPC_UNAVAILABLE, redis_error(t));
    }
}

static void lookup_done(kd_grpc_call *call, int status, const char *message)
{
    struct lookup *lk = kd_h2_call_user(call);
    (void)status;
    (void)message;
    lk->call = NULL;
    lookup_release(lk);
}

static const struct kd_h2_handler lookup_handler = {
    .on_message = lookup_message,
    .on_half_close = lookup_half_close,
    .on_done = lookup_done,
};

static int lookup_start(kd_grpc_call *call, void *ud)
{
    (void)ud;
    if (kd_kas_api_authenticate(call) != 0)
        return 0; /* answered UNAUTHENTICATED */
    struct kd_tracker *t = kd_kas_tracker(kd_conn_shard(kd_grpc_call_conn(call)));
    if (t == NULL) {
        kd_grpc_finish(call, KD_GRPC_UNAVAILABLE, "redis is not configured", NULL, 0);
        return 0;
    }
    struct lookup *lk = calloc(1, sizeof(*lk));
    if (lk == NULL) {
        kd_grpc_finish(call, KD_GRPC_RESOURCE_EXHAUSTED, "out of memory", NULL, 0);
        return 0;
    }
    lk->call = call;
    lk->t = t;
    kd_grpc_accept(call, &lookup_handler, lk);
    return 0;
}

const struct kd_grpc_method kd_tracker_get_connected_agents_method = {
    .path = "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgents",
    .start = lookup_start,
};

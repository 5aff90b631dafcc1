/* pool.c — see pool.h. */
#include "shards/pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"

static size_t bucket(const struct kd_pool *p, int64_t id)
{
    return kd_hash_u64((uint64_t)id) & (p->nbuckets - 1);
}

int kd_pool_init(struct kd_pool *p)
{
    p->nbuckets = 256;
    p->nagents = 0;
    p->buckets = calloc(p->nbuckets, sizeof(*p->buckets));
    return p->buckets ? 0 : -ENOMEM;
}

void kd_pool_fini(struct kd_pool *p, void (*drop)(struct kd_pool_wait *w))
{
    for (size_t i = 0; i < p->nbuckets; i++) {
        struct kd_pool_agent *a = p->buckets[i];
        while (a != NULL) {
            struct kd_pool_agent *next = a->hnext;
            struct kd_list *n;
            while ((n = kd_list_pop_front(&a->waiting)) != NULL) {
                struct kd_pool_wait *w = KD_CONTAINER_OF(n, struct kd_pool_wait, link);
                w->agent = NULL;
                if (drop)
                    drop(w);
            }
            free(a);
            a = next;
        }
    }
    free(p->buckets);
    p->buckets = NULL;
    p->nbuckets = p->nagents = 0;
}

struct kd_pool_agent *kd_pool_agent_find(struct kd_pool *p, int64_t id)
{
    struct kd_pool_agent *a = p->buckets[bucket(p, id)];
    while (a != NULL && a->id != id)
        a = a->hnext;
    return a;
}

static void grow(struct kd_pool *p)
{
    size_t n = p->nbuckets * 2;
    struct kd_pool_agent **nb = calloc(n, sizeof(*nb));
    if (nb == NULL)
        return; /* longer chains: slower, still correct */
    for (size_t i = 0; i < p->nbuckets; i++) {
        struct kd_pool_agent *a = p->buckets[i];
        while (a != NULL) {
            struct kd_pool_agent *next = a->hnext;
            size_t b = kd_hash_u64((uint64_t)a->id) & (n - 1);
            a->hnext = nb[b];
            nb[b] = a;
            a = next;
        }
    }
    free(p->buckets);
    p->buckets = nb;
    p->nbuckets = n;
}

struct kd_pool_agent *kd_pool_agent_get(struct kd_pool *p, int64_t id)
{
    struct kd_pool_agent *a = kd_pool_agent_find(p, id);
    if (a != NULL)
        return a;
    a = calloc(1, sizeof(*a));
    if (a == NULL)
        return NULL;
    a->id = id;
    kd_list_init(&a->idle);
    kd_list_init(&a->waiting);
    kd_list_init(&a->pods);
    if (p->nagents >= p->nbuckets)
        grow(p);
    size_t b = bucket(p, id);
    a->hnext = p->buckets[b];
    p->buckets[b] = a;
    p->nagents++;
    return a;
}

void kd_pool_agent_release(struct kd_pool *p, struct kd_pool_agent *a)
{
    if (a->ntunnels > 0 || !kd_list_is_empty(&a->waiting) || !kd_list_is_empty(&a->pods) ||
        (a->holders_ready | a->holders_idle) != 0)
        return;
    struct kd_pool_agent **pp = &p->buckets[bucket(p, a->id)];
    while (*pp != a)
        pp = &(*pp)->hnext;
    *pp = a->hnext;
    p->nagents--;
    free(a);
}

bool kd_pool_tunnel_serves(const struct kd_pool_tunnel *t, const char *method, size_t len)
{
    const char *s = t->methods, *end = t->methods ? t->methods + t->methods_len : NULL;
    while (s != NULL && s < end) {
        size_t n = strlen(s);
        if (n == len && memcmp(s, method, len) == 0)
            return true;
        s += n + 1;
    }
    return false;
}

void kd_pool_tunnel_attach(struct kd_pool *p, struct kd_pool_agent *a, struct kd_pool_tunnel *t)
{
    (void)p;
    t->agent = a;
    t->idle = false;
    kd_list_node_init(&t->link);
    a->ntunnels++;
}

struct kd_pool_wait *kd_pool_tunnel_ready(struct kd_pool *p, struct kd_pool_tunnel *t)
{
    (void)p;
    struct kd_pool_agent *a = t->agent;
    for (struct kd_list *n = a->waiting.next; n != &a->waiting; n = n->next) {
        struct kd_pool_wait *w = KD_CONTAINER_OF(n, struct kd_pool_wait, link);
        if (kd_pool_tunnel_serves(t, w->method, w->method_len)) {
            kd_list_unlink(&w->link);
            return w; /* the agent stays: the tunnel refers to it */
        }
    }
    t->idle = true;
    kd_list_push_back(&a->idle, &t->link);
    return NULL;
}

void kd_pool_tunnel_detach(struct kd_pool *p, struct kd_pool_tunnel *t)
{
    struct kd_pool_agent *a = t->agent;
    if (t->idle) {
        kd_list_unlink(&t->link);
        t->idle = false;
    }
    t->agent = NULL;
    a->ntunnels--;
    kd_pool_agent_release(p, a);
}

struct kd_pool_tunnel *kd_pool_wait_start(struct kd_pool *p, struct kd_pool_agent *a, struct kd_pool_wait *w)
{
    (void)p;
    w->agent = a;
    for (struct kd_list *n = a->idle.next; n != &a->idle; n = n->next) {
        struct kd_pool_tunnel *t = KD_CONTAINER_OF(n, struct kd_pool_tunnel, link);
        if (kd_pool_tunnel_serves(t, w->method, w->method_len)) {
            kd_list_unlink(&t->link);
            t->idle = false;
            kd_list_node_init(&w->link);
            return t;
        }
    }
    kd_list_push_back(&a->waiting, &w->link);
    return NULL;
}

void kd_pool_wait_cancel(struct kd_pool *p, struct kd_pool_wait *w)
{
    struct kd_pool_agent *a = w->agent;
    if (kd_list_is_linked(&w->link))
        kd_list_unlink(&w->link);
    w->agent = NULL;
    if (a != NULL)
        kd_pool_agent_release(p, a);
}

struct kd_pool_wait *kd_pool_wait_find(struct kd_pool *p, int64_t id,
                                       bool (*match)(struct kd_pool_wait *w, void *ud), void *ud)
{
    struct kd_pool_agent *a = kd_pool_agent_find(p, id);
    if (a == NULL)
        return NULL;
    for (struct kd_list *n = a->waiting.next; n != &a->waiting; n = n->next) {
        struct kd_pool_wait *w = KD_CONTAINER_OF(n, struct kd_pool_wait, link);
        if (match(w, ud))
            return w;
    }
    return NULL;
}

int kd_pool_validate(const struct kd_pool *p)
{
    size_t agents = 0;
    for (size_t i = 0; i < p->nbuckets; i++) {
        for (const struct kd_pool_agent *a = p->buckets[i]; a != NULL; a = a->hnext) {
            if ((kd_hash_u64((uint64_t)a->id) & (p->nbuckets - 1)) != i)
                return -EINVAL;
            if (++agents > p->nagents)
                return -EINVAL;
            unsigned idle = 0;
            for (const struct kd_list *n = a->idle.next; n != &a->idle; n = n->next) {
                const struct kd_pool_tunnel *t = KD_CONTAINER_OF(n, struct kd_pool_tunnel, link);
                if (!t->idle || t->agent != a || ++idle > a->ntunnels)
                    return -EINVAL;
                for (const struct kd_list *m = a->waiting.next; m != &a->waiting; m = m->next) {
                    const struct kd_pool_wait *w = KD_CONTAINER_OF(m, struct kd_pool_wait, link);
                    if (kd_pool_tunnel_serves(t, w->method, w->method_len))
                        return -EINVAL; /* a match left untaken */
                }
            }
            for (const struct kd_list *m = a->waiting.next; m != &a->waiting; m = m->next) {
                const struct kd_pool_wait *w = KD_CONTAINER_OF(m, struct kd_pool_wait, link);
                if (w->agent != a)
                    return -EINVAL;
            }
            if (a->ntunnels == 0 && kd_list_is_empty(&a->waiting) && kd_list_is_empty(&a->pods) &&
                (a->holders_ready | a->holders_idle) == 0)
                return -EINVAL; /* should have been freed */
        }
    }
    return agents == p->nagents ? 0 : -EINVAL;
}

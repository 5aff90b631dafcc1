/* pool_test.c — the per-agent tunnel pool and wait list: matching by method, FIFO order on both
 * sides, removal of ended tunnels, agents freed when nothing refers to them, and a randomized run
 * against a simple model with kd_pool_validate() after every step. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "shards/pool.h"

static const char M_AB[] = "/s/A\0/s/B"; /* serves /s/A and /s/B */
static const char M_C[] = "/s/C";

static void tunnel(struct kd_pool_tunnel *t, const char *methods, size_t len)
{
    memset(t, 0, sizeof(*t));
    t->methods = methods;
    t->methods_len = len;
}

static void waiter(struct kd_pool_wait *w, const char *method)
{
    memset(w, 0, sizeof(*w));
    w->method = method;
    w->method_len = strlen(method);
}

Test(pool, idle_tunnel_serves_matching_call_only)
{
    struct kd_pool p;
    cr_assert_eq(kd_pool_init(&p), 0);
    struct kd_pool_agent *a = kd_pool_agent_get(&p, 42);
    struct kd_pool_tunnel t;
    tunnel(&t, M_AB, sizeof(M_AB));
    kd_pool_tunnel_attach(&p, a, &t);
    cr_assert_null(kd_pool_tunnel_ready(&p, &t), "nobody waits: the tunnel goes idle");
    cr_assert(t.idle);
    cr_assert_eq(kd_pool_validate(&p), 0);

    struct kd_pool_wait wc, wb;
    waiter(&wc, "/s/C");
    cr_assert_null(kd_pool_wait_start(&p, a, &wc), "the idle tunnel does not serve /s/C");
    cr_assert_eq(kd_pool_validate(&p), 0);
    waiter(&wb, "/s/B");
    cr_assert_eq(kd_pool_wait_start(&p, a, &wb), &t, "/s/B takes the idle tunnel");
    cr_assert_not(t.idle);
    cr_assert_eq(kd_pool_validate(&p), 0);
    /* prefix of a method name is not a match */
    struct kd_pool_tunnel t2;
    tunnel(&t2, M_C, sizeof(M_C));
    struct kd_pool_wait wpre;
    waiter(&wpre, "/s/");
    kd_pool_tunnel_attach(&p, a, &t2);
    cr_assert_eq(kd_pool_tunnel_ready(&p, &t2), &wc, "the waiting /s/C call gets the new tunnel");
    cr_assert_null(kd_pool_wait_start(&p, a, &wpre));
    kd_pool_wait_cancel(&p, &wpre);
    cr_assert_eq(kd_pool_validate(&p), 0);
    kd_pool_tunnel_detach(&p, &t);
    kd_pool_tunnel_detach(&p, &t2);
    cr_assert_null(kd_pool_agent_find(&p, 42), "nothing refers to the agent: freed");
    cr_assert_eq(kd_pool_validate(&p), 0);
    kd_pool_fini(&p, NULL);
}

Test(pool, fifo_on_both_sides)
{
    struct kd_pool p;
    kd_pool_init(&p);
    struct kd_pool_agent *a = kd_pool_agent_get(&p, 1);
    struct kd_pool_wait w[3];
    for (int i = 0; i < 3; i++) {
        waiter(&w[i], "/s/A");
        cr_assert_null(kd_pool_wait_start(&p, a, &w[i]));
    }
    struct kd_pool_tunnel t[5];
    for (int i = 0; i < 3; i++) {
        tunnel(&t[i], M_AB, sizeof(M_AB));
        kd_pool_tunnel_attach(&p, a, &t[i]);
        cr_assert_eq(kd_pool_tunnel_ready(&p, &t[i]), &w[i], "the oldest waiting call goes first");
    }
    for (int i = 3; i < 5; i++) {
        tunnel(&t[i], M_AB, sizeof(M_AB));
        kd_pool_tunnel_attach(&p, a, &t[i]);
        cr_assert_null(kd_pool_tunnel_ready(&p, &t[i]));
    }
    struct kd_pool_wait x;
    waiter(&x, "/s/B");
    cr_assert_eq(kd_pool_wait_start(&p, a, &x), &t[3], "the oldest idle tunnel goes first");
    cr_assert_eq(kd_pool_validate(&p), 0);
    for (int i = 0; i < 5; i++)
        kd_pool_tunnel_detach(&p, &t[i]);
    cr_assert_eq(p.nagents, 0);
    kd_pool_fini(&p, NULL);
}

Test(pool, ended_idle_tunnel_is_never_picked)
{
    struct kd_pool p;
    kd_pool_init(&p);
    struct kd_pool_agent *a = kd_pool_agent_get(&p, 7);
    struct kd_pool_tunnel t1, t2;
    tunnel(&t1, M_AB, sizeof(M_AB));
    tunnel(&t2, M_AB, sizeof(M_AB));
    kd_pool_tunnel_attach(&p, a, &t1);
    kd_pool_tunnel_attach(&p, a, &t2);
    kd_pool_tunnel_ready(&p, &t1);
    kd_pool_tunnel_ready(&p, &t2);
    kd_pool_tunnel_detach(&p, &t1); /* its stream ended */
    struct kd_pool_wait w;
    waiter(&w, "/s/A");
    cr_assert_eq(kd_pool_wait_start(&p, a, &w), &t2);
    cr_assert_eq(kd_pool_validate(&p), 0);
    kd_pool_tunnel_detach(&p, &t2);
    kd_pool_fini(&p, NULL);
}

static int dropped;

static void drop(struct kd_pool_wait *w)
{
    cr_assert_null(w->agent);
    dropped++;
}

Test(pool, fini_hands_back_waiting_calls)
{
    struct kd_pool p;
    kd_pool_init(&p);
    struct kd_pool_wait w[4];
    for (int i = 0; i < 4; i++) {
        waiter(&w[i], "/s/A");
        kd_pool_wait_start(&p, kd_pool_agent_get(&p, i % 2), &w[i]);
    }
    dropped = 0;
    kd_pool_fini(&p, drop);
    cr_assert_eq(dropped, 4);
}

/* Random operations against a model: per agent, arrays of idle tunnels and waiting calls in FIFO
 * order, with three methods and tunnels serving random subsets. */
enum { AGENTS = 5, TUNNELS = 64, WAITS = 64 };
static const char *const METHODS[] = {"/m/0", "/m/1", "/m/2"};
static const char MSETS[8][16] = {"",     "/m/0",       "/m/1",       "/m/0\0/m/1",
                                  "/m/2", "/m/0\0/m/2", "/m/1\0/m/2", "/m/0\0/m/1\0/m/2"};
static const size_t MSETLEN[8] = {0, 5, 5, 10, 5, 10, 10, 15};

struct mt {
    struct kd_pool_tunnel t;
    int agent, set, state; /* 0 unused, 1 attached (busy), 2 idle */
    long order;
};
struct mw {
    struct kd_pool_wait w;
    int agent, method, state; /* 0 unused, 1 waiting */
    long order;
};

static bool serves(int set, int method)
{
    return (set >> method) & 1;
}

Test(pool, random_against_model)
{
    static struct mt T[TUNNELS];
    static struct mw W[WAITS];
    struct kd_pool p;
    kd_pool_init(&p);
    unsigned seed = 99;
    long clock = 0;
    for (int step = 0; step < 200000; step++) {
        seed = seed * 1103515245u + 12345u;
        unsigned r = seed >> 8;
        int op = (int)(r % 5);
        if (op == 0) { /* a tunnel becomes ready */
            int i = (int)((r >> 3) % TUNNELS);
            if (T[i].state != 0)
                continue;
            T[i].agent = (int)((r >> 10) % AGENTS);
            T[i].set = (int)((r >> 13) % 8);
            tunnel(&T[i].t, MSETS[T[i].set], MSETLEN[T[i].set]);
            kd_pool_tunnel_attach(&p, kd_pool_agent_get(&p, T[i].agent), &T[i].t);
            /* model: the oldest waiting call of that agent with a method the tunnel serves */
            int best = -1;
            for (int j = 0; j < WAITS; j++)
                if (W[j].state == 1 && W[j].agent == T[i].agent && serves(T[i].set, W[j].method) &&
                    (best < 0 || W[j].order < W[best].order))
                    best = j;
            struct kd_pool_wait *got = kd_pool_tunnel_ready(&p, &T[i].t);
            if (best < 0) {
                cr_assert_null(got);
                T[i].state = 2;
                T[i].order = clock++;
            } else {
                cr_assert_eq(got, &W[best].w, "step %d: wrong waiting call", step);
                W[best].state = 0;
                T[i].state = 1;
            }
        } else if (op == 1) { /* a call arrives */
            int j = (int)((r >> 3) % WAITS);
            if (W[j].state != 0)
                continue;
            W[j].agent = (int)((r >> 10) % AGENTS);
            W[j].method = (int)((r >> 13) % 3);
            waiter(&W[j].w, METHODS[W[j].method]);
            int best = -1;
            for (int i = 0; i < TUNNELS; i++)
                if (T[i].state == 2 && T[i].agent == W[j].agent && serves(T[i].set, W[j].method) &&
                    (best < 0 || T[i].order < T[best].order))
                    best = i;
            struct kd_pool_tunnel *got = kd_pool_wait_start(&p, kd_pool_agent_get(&p, W[j].agent), &W[j].w);
            if (best < 0) {
                cr_assert_null(got);
                W[j].state = 1;
                W[j].order = clock++;
            } else {
                cr_assert_eq(got, &T[best].t, "step %d: wrong idle tunnel", step);
                T[best].state = 1;
            }
        } else if (op == 2 || op == 3) { /* a tunnel ends */
            int i = (int)((r >> 3) % TUNNELS);
            if (T[i].state == 0)
                continue;
            kd_pool_tunnel_detach(&p, &T[i].t);
            T[i].state = 0;
        } else { /* a waiting call gives up */
            int j = (int)((r >> 3) % WAITS);
            if (W[j].state != 1)
                continue;
            kd_pool_wait_cancel(&p, &W[j].w);
            W[j].state = 0;
        }
        if (step % 64 == 0)
            cr_assert_eq(kd_pool_validate(&p), 0, "step %d", step);
        /* an agent exists iff something refers to it */
        if (step % 512 == 0)
            for (int a = 0; a < AGENTS; a++) {
                bool used = false;
                for (int i = 0; i < TUNNELS; i++)
                    used |= T[i].state != 0 && T[i].agent == a;
                for (int j = 0; j < WAITS; j++)
                    used |= W[j].state == 1 && W[j].agent == a;
                cr_assert_eq(kd_pool_agent_find(&p, a) != NULL, used, "agent %d at step %d", a, step);
            }
    }
    cr_assert_eq(kd_pool_validate(&p), 0);
    kd_pool_fini(&p, NULL);
}

/* timerwheel_test.c — unit tests for core/timerwheel: fixed scenarios for each promise of the
 * header, then a randomized run against a reference model (an array of armed timers and their
 * expiries) that checks order, exactness of next() and kd_timerwheel_validate() after every step.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/timerwheel.h"

/* Range of the wheel: 64^LEVELS ms. */
#define RANGE (UINT64_C(1) << (6 * KD_TIMERWHEEL_LEVELS))

/* A broken cascade tends to make run() spin rather than crash: bound every test. */
TestSuite(timerwheel, .timeout = 20);

/* ---- Fixed scenarios: timers that log their firing ------------------------------------------- */

#define MAX_LOG 65536

struct rec {
    struct kd_timer t;
    int id;
    /* What the callback does besides logging, per test. */
    void (*action)(struct rec *r);
    uint64_t arg;
    struct rec *other;
};

static struct kd_timerwheel W;
static int log_id[MAX_LOG];
static uint64_t log_exp[MAX_LOG];
static size_t nlog;

static void rec_cb(struct kd_timer *t)
{
    struct rec *r = KD_CONTAINER_OF(t, struct rec, t);
    cr_assert(!kd_timer_is_armed(t), "a timer is disarmed before its callback runs");
    cr_assert_lt(nlog, MAX_LOG);
    log_id[nlog] = r->id;
    log_exp[nlog] = t->expire_ms;
    nlog++;
    cr_assert_eq(kd_timerwheel_validate(&W), 0, "the wheel is consistent inside a callback");
    if (r->action != NULL)
        r->action(r);
}

static void rec_init(struct rec *r, int id)
{
    memset(r, 0, sizeof(*r));
    kd_timer_init(&r->t, rec_cb);
    r->id = id;
}

static void setup(uint64_t now)
{
    kd_timerwheel_init(&W, now);
    nlog = 0;
}

static void assert_log_sorted(void)
{
    for (size_t i = 1; i < nlog; i++)
        cr_assert_leq(log_exp[i - 1], log_exp[i], "fired out of order at %zu", i);
}

Test(timerwheel, empty)
{
    setup(12345);
    cr_assert_eq(kd_timerwheel_next(&W), UINT64_MAX);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_run(&W, 99999, 0), 0);
    cr_assert_eq(W.last_run, 99999);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, add_fire_cancel)
{
    struct rec a, b;
    setup(1000);
    rec_init(&a, 1);
    rec_init(&b, 2);
    cr_assert(!kd_timer_is_armed(&a.t));

    kd_timerwheel_add(&W, &a.t, 1010);
    kd_timerwheel_add(&W, &b.t, 1020);
    cr_assert(kd_timer_is_armed(&a.t));
    cr_assert_eq(W.count, 2);
    cr_assert_eq(kd_timerwheel_next(&W), 1010);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);

    cr_assert_eq(kd_timerwheel_run(&W, 1009, 0), 0);
    cr_assert_eq(kd_timerwheel_run(&W, 1010, 0), 1);
    cr_assert_eq(log_id[0], 1);
    cr_assert(!kd_timer_is_armed(&a.t));

    kd_timerwheel_cancel(&W, &b.t);
    cr_assert(!kd_timer_is_armed(&b.t));
    kd_timerwheel_cancel(&W, &b.t); /* twice: harmless */
    kd_timerwheel_cancel(&W, &a.t); /* never re-armed: harmless */
    cr_assert_eq(W.count, 0);
    cr_assert_eq(kd_timerwheel_next(&W), UINT64_MAX);
    cr_assert_eq(kd_timerwheel_run(&W, 5000, 0), 0);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, rearm)
{
    struct rec a;
    setup(0);
    rec_init(&a, 1);
    kd_timerwheel_add(&W, &a.t, 10);
    kd_timerwheel_add(&W, &a.t, 5000); /* moves it to another level */
    cr_assert_eq(W.count, 1);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_next(&W), 5000);
    cr_assert_eq(kd_timerwheel_run(&W, 10, 0), 0);
    kd_timerwheel_add(&W, &a.t, 20); /* and back, earlier */
    cr_assert_eq(kd_timerwheel_next(&W), 20);
    cr_assert_eq(kd_timerwheel_run(&W, 5000, 0), 1);
    cr_assert_eq(log_exp[0], 20);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, past_expiry_fires_next_run_in_order)
{
    struct rec r[4];
    setup(100000);
    uint64_t exp[4] = {99990, 100000, 50, 99990};
    for (int i = 0; i < 4; i++) {
        rec_init(&r[i], i);
        kd_timerwheel_add(&W, &r[i].t, exp[i]);
    }
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_next(&W), 50);
    cr_assert_eq(kd_timerwheel_run(&W, 100000, 0), 4);
    assert_log_sorted();
    cr_assert_eq(log_id[0], 2);
}

Test(timerwheel, fires_in_order_across_levels)
{
    enum { N = 2000 };
    static struct rec r[N];
    setup(777777);
    srand(1);
    for (int i = 0; i < N; i++) {
        rec_init(&r[i], i);
        uint64_t span = UINT64_C(1) << (6 * (i % 6)); /* every level, and beyond the range */
        kd_timerwheel_add(&W, &r[i].t, 777777 + (uint64_t)rand() % (span * 2) + (i % 7 == 0 ? 0 : 1));
    }
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_run(&W, 777777 + RANGE * 4, 0), N);
    assert_log_sorted();
    cr_assert_eq(W.count, 0);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, budget)
{
    enum { N = 10 };
    struct rec r[N];
    setup(0);
    for (int i = 0; i < N; i++) {
        rec_init(&r[i], i);
        kd_timerwheel_add(&W, &r[i].t, (uint64_t)(N - i) * 100); /* armed in reverse */
    }
    cr_assert_eq(kd_timerwheel_run(&W, 10000, 3), 3);
    cr_assert_eq(log_exp[0], 100);
    cr_assert_eq(log_exp[2], 300);
    cr_assert_eq(kd_timerwheel_next(&W), 400, "the rest is still due, earliest first");
    cr_assert_eq(kd_timerwheel_validate(&W), 0);

    /* A timer armed between runs for an expiry inside the unfinished span keeps its place. */
    struct rec x;
    rec_init(&x, 99);
    kd_timerwheel_add(&W, &x.t, 450);
    cr_assert_eq(kd_timerwheel_run(&W, 10000, 1), 1);
    cr_assert_eq(kd_timerwheel_run(&W, 10000, 0), N - 4 + 1);
    assert_log_sorted();
    cr_assert_eq(log_id[4], 99);
    cr_assert_eq(W.last_run, 10000);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

static void act_periodic(struct rec *r)
{
    kd_timerwheel_add(&W, &r->t, r->t.expire_ms + r->arg);
}

Test(timerwheel, callback_rearms_itself)
{
    struct rec p;
    setup(0);
    rec_init(&p, 1);
    p.action = act_periodic;
    p.arg = 10;
    kd_timerwheel_add(&W, &p.t, 10);
    /* Each re-arm is <= now, so all of them fire in this run, in order. */
    cr_assert_eq(kd_timerwheel_run(&W, 100, 0), 10);
    assert_log_sorted();
    cr_assert_eq(log_exp[9], 100);
    cr_assert(kd_timer_is_armed(&p.t));
    cr_assert_eq(kd_timerwheel_next(&W), 110);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

static void act_cancel_other(struct rec *r)
{
    kd_timerwheel_cancel(&W, &r->other->t);
}

Test(timerwheel, callback_cancels_others_in_same_slot)
{
    struct rec a, b, c;
    setup(0);
    rec_init(&a, 1);
    rec_init(&b, 2);
    rec_init(&c, 3);
    a.action = b.action = act_cancel_other;
    a.other = &b;
    b.other = &a;
    kd_timerwheel_add(&W, &a.t, 70);
    kd_timerwheel_add(&W, &b.t, 70);
    kd_timerwheel_add(&W, &c.t, 70);
    /* Whichever of a and b fires first cancels the other, its neighbour in the slot list. */
    cr_assert_eq(kd_timerwheel_run(&W, 70, 0), 2);
    cr_assert(!kd_timer_is_armed(&a.t) && !kd_timer_is_armed(&b.t));
    cr_assert(log_id[0] == 3 || log_id[1] == 3);
    cr_assert_eq(W.count, 0);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

static void act_arm_other(struct rec *r)
{
    kd_timerwheel_add(&W, &r->other->t, r->arg);
}

Test(timerwheel, callback_adds_others)
{
    struct rec a, due, later, earlier;
    setup(1000);
    rec_init(&a, 1);
    rec_init(&due, 2);
    rec_init(&later, 3);
    rec_init(&earlier, 4);

    /* a (at 1100) arms `due` for 1500 <= now: it fires in the same run. */
    a.action = act_arm_other;
    a.other = &due;
    a.arg = 1500;
    /* due arms `later` for 9000 > now: it stays armed. */
    due.action = act_arm_other;
    due.other = &later;
    due.arg = 9000;
    kd_timerwheel_add(&W, &a.t, 1100);
    cr_assert_eq(kd_timerwheel_run(&W, 2000, 0), 2);
    cr_assert_eq(log_id[1], 2);
    cr_assert(kd_timer_is_armed(&later.t));
    cr_assert_eq(kd_timerwheel_next(&W), 9000);

    /* The documented exception: armed from a callback for an expiry earlier than the one firing,
     * a timer fires right after it, still in the same run. */
    nlog = 0;
    later.action = act_arm_other;
    later.other = &earlier;
    later.arg = 8000;
    cr_assert_eq(kd_timerwheel_run(&W, 9000, 0), 2);
    cr_assert_eq(log_id[0], 3);
    cr_assert_eq(log_id[1], 4);
    cr_assert_eq(log_exp[1], 8000);
    cr_assert_eq(W.count, 0);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

static void act_rearm_then_cancel_self(struct rec *r)
{
    kd_timerwheel_add(&W, &r->t, r->t.expire_ms); /* would fire again in this run... */
    kd_timerwheel_cancel(&W, &r->t);              /* ...but is withdrawn */
    kd_timerwheel_cancel(&W, &r->other->t);
}

Test(timerwheel, callback_cancels_itself)
{
    struct rec a, b;
    setup(0);
    rec_init(&a, 1);
    rec_init(&b, 2);
    a.action = act_rearm_then_cancel_self;
    a.other = &b;
    kd_timerwheel_add(&W, &a.t, 5);
    kd_timerwheel_add(&W, &b.t, 5000);
    cr_assert_eq(kd_timerwheel_run(&W, 10000, 0), 1);
    cr_assert(!kd_timer_is_armed(&a.t));
    cr_assert(!kd_timer_is_armed(&b.t));
    cr_assert_eq(kd_timerwheel_next(&W), UINT64_MAX);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, far_future_beyond_range)
{
    struct rec a, b, c;
    setup(5);
    rec_init(&a, 1);
    rec_init(&b, 2);
    rec_init(&c, 3);
    kd_timerwheel_add(&W, &b.t, 5 + (UINT64_C(1) << 40));
    kd_timerwheel_add(&W, &a.t, 5 + RANGE + 12345);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_next(&W), 5 + RANGE + 12345, "exact, even when parked");
    kd_timerwheel_add(&W, &c.t, 5 + RANGE - 1); /* earlier still, in the same parked slot */
    cr_assert_eq(kd_timerwheel_next(&W), 5 + RANGE - 1);

    cr_assert_eq(kd_timerwheel_run(&W, 5 + RANGE - 2, 0), 0);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_run(&W, 5 + RANGE + 12344, 0), 1);
    cr_assert_eq(log_id[0], 3);
    cr_assert_eq(kd_timerwheel_next(&W), 5 + RANGE + 12345);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_run(&W, 5 + RANGE + 12345, 0), 1);
    cr_assert_eq(kd_timerwheel_next(&W), 5 + (UINT64_C(1) << 40));
    cr_assert_eq(kd_timerwheel_run(&W, UINT64_C(1) << 41, 0), 1);
    cr_assert_eq(W.count, 0);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, window_boundary)
{
    /* last_run just below a range-aligned boundary: a timer 1 ms ahead is beyond the current
     * window and parked, yet next() is exact and it fires on time. */
    struct rec a, b;
    setup(RANGE - 1);
    rec_init(&a, 1);
    rec_init(&b, 2);
    kd_timerwheel_add(&W, &a.t, RANGE);
    kd_timerwheel_add(&W, &b.t, RANGE + 64);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_next(&W), RANGE);
    cr_assert_eq(kd_timerwheel_run(&W, RANGE, 0), 1);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_next(&W), RANGE + 64);
    cr_assert_eq(kd_timerwheel_run(&W, RANGE + 63, 0), 0);
    cr_assert_eq(kd_timerwheel_run(&W, RANGE + 64, 0), 1);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, time_jumps)
{
    enum { N = 20000 };
    static struct rec r[N];
    const uint64_t hour = 3600 * 1000;
    setup(424242);
    srand(7);
    for (int i = 0; i < N; i++) {
        rec_init(&r[i], i);
        kd_timerwheel_add(&W, &r[i].t, 424242 + (uint64_t)rand() % hour);
    }
    /* The loop slept for an hour: one run fires everything, in order, without ticking through
     * 3.6 million milliseconds one by one. */
    cr_assert_eq(kd_timerwheel_run(&W, 424242 + hour, 0), N);
    assert_log_sorted();
    cr_assert_eq(kd_timerwheel_validate(&W), 0);

    /* Huge idle jumps, with a parked timer along: each is O(1) plus one cascade. */
    struct rec far;
    rec_init(&far, 1);
    uint64_t now = W.last_run;
    kd_timerwheel_add(&W, &far.t, UINT64_C(1) << 60);
    for (int i = 0; i < 100000; i++) {
        now += UINT64_C(1) << 40;
        cr_assert_eq(kd_timerwheel_run(&W, now, 0), 0);
    }
    cr_assert_eq(kd_timerwheel_next(&W), UINT64_C(1) << 60);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_run(&W, UINT64_C(1) << 60, 0), 1);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

Test(timerwheel, next_is_exact)
{
    struct rec r[6];
    const uint64_t b = 1000003; /* deliberately not aligned to any slot width */
    setup(b);
    uint64_t off[6] = {300000, 4100, 5000, 70, 65, 64 * 64 * 64 + 1};
    for (int i = 0; i < 6; i++) {
        rec_init(&r[i], i);
        kd_timerwheel_add(&W, &r[i].t, b + off[i]);
    }
    /* Cancel the earliest one at a time; next() must track the true minimum each time, including
     * minima hidden inside coarse slots shared with later timers. */
    uint64_t order[6] = {65, 70, 4100, 5000, 64 * 64 * 64 + 1, 300000};
    for (int k = 0; k < 6; k++) {
        cr_assert_eq(kd_timerwheel_next(&W), b + order[k], "step %d", k);
        for (int i = 0; i < 6; i++)
            if (off[i] == order[k])
                kd_timerwheel_cancel(&W, &r[i].t);
        cr_assert_eq(kd_timerwheel_validate(&W), 0);
    }
    cr_assert_eq(kd_timerwheel_next(&W), UINT64_MAX);

    /* Same again, reaching each one by running instead of cancelling. */
    for (int i = 0; i < 6; i++)
        kd_timerwheel_add(&W, &r[i].t, b + off[i]);
    for (int k = 0; k < 6; k++) {
        uint64_t n = kd_timerwheel_next(&W);
        cr_assert_eq(n, b + order[k]);
        cr_assert_eq(kd_timerwheel_run(&W, n - 1, 0), 0);
        cr_assert_eq(kd_timerwheel_next(&W), n);
        cr_assert_eq(kd_timerwheel_run(&W, n, 0), 1);
        cr_assert_eq(kd_timerwheel_validate(&W), 0);
    }
}

Test(timerwheel, now_before_last_run)
{
    struct rec a, b;
    setup(1000);
    rec_init(&a, 1);
    rec_init(&b, 2);
    kd_timerwheel_add(&W, &a.t, 500);
    kd_timerwheel_add(&W, &b.t, 900);
    /* A caller's clock reading older than last_run fires only what is due by it. */
    cr_assert_eq(kd_timerwheel_run(&W, 600, 0), 1);
    cr_assert_eq(log_id[0], 1);
    cr_assert_eq(W.last_run, 1000, "last_run never moves backwards");
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
    cr_assert_eq(kd_timerwheel_run(&W, 1000, 0), 1);
}

Test(timerwheel, validate_detects_corruption)
{
    struct rec a, b, c;
    setup(100000);
    rec_init(&a, 1);
    rec_init(&b, 2);
    rec_init(&c, 3);
    kd_timerwheel_add(&W, &a.t, 100000 + 5000);
    kd_timerwheel_add(&W, &b.t, 10);
    kd_timerwheel_add(&W, &c.t, 20);
    cr_assert_eq(kd_timerwheel_validate(&W), 0);

    W.count++;
    cr_assert_eq(kd_timerwheel_validate(&W), -EINVAL, "count");
    W.count--;

    W.occupied[3] ^= 1; /* an empty slot marked occupied */
    cr_assert_eq(kd_timerwheel_validate(&W), -EINVAL, "bitmap");
    W.occupied[3] ^= 1;

    a.t.expire_ms += 64 * 64 * 64; /* now belongs to another level */
    cr_assert_eq(kd_timerwheel_validate(&W), -EINVAL, "placement");
    a.t.expire_ms -= 64 * 64 * 64;

    b.t.expire_ms = 30; /* due slot no longer sorted */
    cr_assert_eq(kd_timerwheel_validate(&W), -EINVAL, "due order");
    b.t.expire_ms = 10;
    cr_assert_eq(kd_timerwheel_validate(&W), 0);
}

/* ---- Randomized test against a reference model ---------------------------------------------- */

#define NT 96

struct mtimer {
    struct kd_timer t;
    int id;
};

static struct {
    struct kd_timerwheel w;
    struct mtimer timers[NT];
    bool armed[NT];
    uint64_t exp[NT];
    uint64_t now;        /* the last now_ms given to run() */
    uint64_t last_fired; /* expiry of the last timer fired in the current run */
    size_t fired;        /* timers fired in the current run */
    size_t actions;      /* callback actions in the current run, capped to end chains */
    uint64_t rng;
} M;

/* splitmix64: tiny, seedable, good enough to pick operations. */
static uint64_t rnd(void)
{
    uint64_t z = (M.rng += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static uint64_t below(uint64_t n)
{
    return n == 0 ? 0 : rnd() % n;
}

static uint64_t model_min(void)
{
    uint64_t min = UINT64_MAX;
    for (int i = 0; i < NT; i++)
        if (M.armed[i] && M.exp[i] < min)
            min = M.exp[i];
    return min;
}

/* An expiry at or after `base`, from every level of the wheel and beyond its range, with some
 * ties to existing timers. */
static uint64_t future_expiry(uint64_t base)
{
    switch (below(9)) {
    case 0:
        return base;
    case 1:
        return base + below(64);
    case 2:
        return base + below(4096);
    case 3:
        return base + below(UINT64_C(1) << 18);
    case 4:
        return base + below(UINT64_C(1) << 24);
    case 5:
        return base + below(RANGE);
    case 6:
        return base + RANGE + below(UINT64_C(1) << 36);
    case 7: {
        int j = (int)below(NT);
        return M.armed[j] && M.exp[j] >= base ? M.exp[j] : base + below(100);
    }
    default:
        return base + below(200);
    }
}

static void model_add(int i, uint64_t e)
{
    kd_timerwheel_add(&M.w, &M.timers[i].t, e);
    M.armed[i] = true;
    M.exp[i] = e;
}

static void model_cancel(int i)
{
    kd_timerwheel_cancel(&M.w, &M.timers[i].t);
    M.armed[i] = false;
}

static void model_check(void)
{
    cr_assert_eq(kd_timerwheel_validate(&M.w), 0);
    cr_assert_eq(kd_timerwheel_next(&M.w), model_min());
    size_t n = 0;
    for (int i = 0; i < NT; i++) {
        cr_assert_eq(kd_timer_is_armed(&M.timers[i].t), M.armed[i]);
        n += M.armed[i];
    }
    cr_assert_eq(M.w.count, n);
}

static void model_cb(struct kd_timer *t)
{
    int id = KD_CONTAINER_OF(t, struct mtimer, t)->id;
    uint64_t e = t->expire_ms;

    /* The wheel fires exactly the model's earliest armed timer: this gives order, exactness and
     * (with the check after run()) that the fired set is the model's expired set. */
    cr_assert(M.armed[id], "fired a timer the model has not armed (%d)", id);
    cr_assert_eq(e, M.exp[id]);
    cr_assert_leq(e, M.now, "fired early");
    cr_assert_eq(e, model_min(), "did not fire the earliest timer");
    cr_assert_geq(e, M.last_fired, "fired out of order");
    M.armed[id] = false;
    M.last_fired = e;
    M.fired++;
    model_check();

    /* Callbacks add and cancel timers, themselves included, with expiries >= e so that the order
     * promise applies (an earlier one is the documented exception tested above). The cap ends
     * chains of callbacks re-arming one another at the same instant. */
    if (M.actions > 200 || below(3) != 0)
        return;
    M.actions++;
    int j = (int)below(NT);
    switch (below(4)) {
    case 0:
        model_add(id, future_expiry(e));
        break;
    case 1:
        model_add(j, future_expiry(e));
        break;
    case 2:
        model_cancel(j);
        break;
    default:
        model_add(id, future_expiry(e));
        model_cancel(j); /* may be itself */
        break;
    }
    model_check();
}

static uint64_t next_now(void)
{
    uint64_t min = model_min();
    switch (below(10)) {
    case 0:
        return M.now;
    case 1:
        return M.now + below(64);
    case 2:
        return M.now + below(5000);
    case 3:
        return M.now + below(UINT64_C(1) << 20);
    case 4:
        return M.now + below(UINT64_C(1) << 33); /* days asleep */
    case 5:
        return min != UINT64_MAX && min > M.now ? min : M.now + 1;
    case 6:
        return min != UINT64_MAX && min > M.now ? min - 1 : M.now + 7;
    case 7:
        return M.now - below(100); /* a stale clock reading */
    default:
        return M.now + below(300);
    }
}

/* Runs that the budget stopped with timers still due: the test must produce some, or the budget
 * branch of model_run would go unchecked. */
static size_t budget_stops;

static void model_run(uint64_t seed, int ops)
{
    /* Start points that exercise the range-aligned boundaries and large absolute times. */
    static const uint64_t starts[] = {100000, RANGE - 3000, 5 * RANGE - 10, UINT64_C(1) << 50,
                                      (UINT64_C(1) << 40) + 123456789};
    memset(&M, 0, sizeof(M));
    M.rng = seed;
    M.now = starts[seed % (sizeof(starts) / sizeof(starts[0]))] + below(1000);
    kd_timerwheel_init(&M.w, M.now);
    for (int i = 0; i < NT; i++) {
        M.timers[i].id = i;
        kd_timer_init(&M.timers[i].t, model_cb);
    }

    size_t total = 0;
    for (int op = 0; op < ops; op++) {
        int i = (int)below(NT);
        uint64_t r = below(100);
        if (r < 40) {
            /* Between runs an expiry may also be in the past. */
            uint64_t e = below(8) == 0 ? M.now - below(3000) : future_expiry(M.now);
            model_add(i, e);
        } else if (r < 55) {
            model_cancel(i);
        } else {
            size_t budget = below(10) < 7 ? 0 : (size_t)(1 + below(5));
            M.now = next_now();
            M.fired = 0;
            M.actions = 0;
            M.last_fired = 0;
            size_t n = kd_timerwheel_run(&M.w, M.now, budget);
            cr_assert_eq(n, M.fired);
            total += n;
            cr_assert(budget == 0 || n <= budget, "fired %zu with a budget of %zu", n, budget);
            if (budget == 0 || n < budget) {
                cr_assert_gt(model_min(), M.now, "a due timer was left armed");
            } else {
                /* Stopped by the budget: whatever is still due comes after what fired, so the next
                 * run goes on in order. */
                cr_assert_geq(model_min(), M.last_fired, "an earlier timer was skipped");
                if (model_min() <= M.now)
                    budget_stops++;
            }
        }
        model_check();
    }
    /* Drain: everything armed eventually fires, beyond-range ones included. */
    M.now = UINT64_MAX - 1;
    M.fired = 0;
    M.actions = 1000; /* no more actions */
    M.last_fired = 0;
    size_t armed = M.w.count;
    cr_assert_eq(kd_timerwheel_run(&M.w, M.now, 0), armed);
    cr_assert_eq(M.w.count, 0);
    model_check();
    cr_assert_gt(total, (size_t)ops / 10, "the test should fire plenty of timers (seed %llu)",
                 (unsigned long long)seed);
}

Test(timerwheel, randomized_vs_model)
{
    budget_stops = 0;
    model_run(0x5eed, 5000);
    for (uint64_t seed = 1; seed <= 12; seed++)
        model_run(seed * 7919, 3000);
    cr_assert_gt(budget_stops, 10, "only %zu runs were stopped by their budget", budget_stops);
}

/* timerwheel.c — hierarchical timer wheel, millisecond ticks (contract in timerwheel.h).
 *
 * Placement. Let b = last_run and e = a timer's expire_ms. A timer's slot is a pure function of
 * (e, b), computed by slot_of():
 *
 *   e <= b                        -> level 0, slot b & 63            (the "due" slot, see below)
 *   e >  b, x = e ^ b, h = msb(x)  -> level h / 6, slot (e >> 6*level) & 63
 *   ... and level >= LEVELS       -> level LEVELS-1, slot 63        (parked: beyond the range)
 *
 *        level 4        level 3        level 2       level 1      level 0        (64 slots each)
 *   [.. 2^24 ms ..] [.. 2^18 ms ..] [.. 4096 ms ..] [.. 64 ms ..] [.. 1 ms ..]   width of one slot
 *
 * Splitting on the highest bit where e and b differ (the h2o scheme) means a timer on level L
 * agrees with b on every bit above level L's 6 bits and has a larger level-L digit than b. So:
 *
 *  - within a level, occupied slots lie strictly above b's digit for that level (level 0: at or
 *    above, the slot at b's digit being the due slot), hence the lowest set bitmap bit is the
 *    earliest slot of the level;
 *  - every timer on level L expires before every timer on level L+1, and parked timers after all
 *    of them, hence the earliest timer lives in the lowest non-empty level's lowest occupied slot;
 *  - a level-0 slot other than the due slot holds timers of one single expiry.
 *
 * The range is therefore "up to the end of b's current 2^(6*LEVELS)-aligned window" rather than a
 * sliding 64^LEVELS ms: a timer just across that boundary is parked too. Parking is only a cost
 * (the parked slot is scanned by next() and re-filed once per window), never a correctness issue.
 *
 * The due slot. Timers with e <= b all share level 0 slot (b & 63); they arrive there by being
 * added with a past expiry, by a budget-limited run leaving them behind, or by a cascade that
 * brings the timers of exactly e == b down. Extra invariant (checked by validate): the due slot
 * is sorted by expire_ms, non-decreasing. Insertions keep it sorted by scanning from the tail,
 * which is O(1) for the common cases (cascades all carry e == b, the largest possible value).
 * Keeping it sorted is what lets run() fire past-due timers in order and next() read the minimum
 * at the front, without a heap.
 *
 * Advancing. run() moves b forward only to the expiry of the earliest timer (or to now_ms when
 * none is due), so when b moves from b0 to b1 no timer expires before b1, and the only slot whose
 * placement changes is the one at level H = msb(b0 ^ b1) / 6, digit H of b1 (or the parked slot
 * when H >= LEVELS): lower levels and the lower slots of level H would hold timers earlier than
 * b1, and higher slots and levels still agree with b1 on the bits that decide their place. That
 * one slot is re-filed ("cascaded"). A jump of an hour or a year is thus one XOR plus one
 * cascade, never a walk over the skipped milliseconds.
 *
 * Cost: add/cancel O(1) except adding a past-due timer (O(due timers) worst case); next() O(1)
 * plus a scan of one slot at level >= 1; each timer is cascaded at most LEVELS times per window,
 * and run()'s scan of a slot is always followed by cascading that same slot, so it is amortised.
 */
#include "core/timerwheel.h"

#include <errno.h>

#define SLOT_BITS 6
#define SLOT_MASK (KD_TIMERWHEEL_SLOTS - 1)
#define TOP_LEVEL (KD_TIMERWHEEL_LEVELS - 1)
#define PARK_SLOT (KD_TIMERWHEEL_SLOTS - 1)

_Static_assert(KD_TIMERWHEEL_SLOTS == 1 << SLOT_BITS, "one bitmap word per level: 64 slots");
_Static_assert(KD_TIMERWHEEL_LEVELS *SLOT_BITS < 64, "the wheel's range must fit in uint64_t");

static struct kd_timer *timer_of(struct kd_list *node)
{
    return KD_CONTAINER_OF(node, struct kd_timer, link);
}

static const struct kd_timer *ctimer_of(const struct kd_list *node)
{
    return KD_CONTAINER_OF(node, const struct kd_timer, link);
}

static unsigned digit(uint64_t t, unsigned level)
{
    return (unsigned)(t >> (level * SLOT_BITS)) & SLOT_MASK;
}

/* Level (possibly >= KD_TIMERWHEEL_LEVELS) of the highest set bit of x != 0. */
static unsigned level_of(uint64_t x)
{
    return (unsigned)(63 - __builtin_clzll(x)) / SLOT_BITS;
}

/* Where a timer expiring at `e` belongs while the wheel stands at `b` (see the top comment). */
static void slot_of(uint64_t e, uint64_t b, unsigned *level, unsigned *slot)
{
    if (e <= b) {
        *level = 0;
        *slot = digit(b, 0);
        return;
    }
    unsigned l = level_of(e ^ b);
    if (l >= KD_TIMERWHEEL_LEVELS) {
        *level = TOP_LEVEL;
        *slot = PARK_SLOT;
        return;
    }
    *level = l;
    *slot = digit(e, l);
}

static bool is_due_slot(const struct kd_timerwheel *w, unsigned level, unsigned slot)
{
    return level == 0 && slot == digit(w->last_run, 0);
}

/* Link `t` where slot_of() says, keeping the due slot sorted. Does not touch `count`: cascades
 * move timers without changing how many are armed. */
static void file(struct kd_timerwheel *w, struct kd_timer *t)
{
    unsigned level, slot;
    slot_of(t->expire_ms, w->last_run, &level, &slot);
    struct kd_list *head = &w->slots[level][slot];

    if (is_due_slot(w, level, slot)) {
        /* Walk back over the later ones only: ties go after existing equals, so the common case
         * (an expiry at or after everything already due) is an O(1) append. */
        struct kd_list *pos = head->prev;
        while (pos != head && timer_of(pos)->expire_ms > t->expire_ms)
            pos = pos->prev;
        kd_list_insert_before(pos->next, &t->link);
    } else {
        kd_list_push_back(head, &t->link);
    }
    w->occupied[level] |= UINT64_C(1) << slot;
}

/* Unlink an armed `t`; its slot is found from the placement invariant rather than stored. */
static void unlink_timer(struct kd_timerwheel *w, struct kd_timer *t)
{
    unsigned level, slot;
    slot_of(t->expire_ms, w->last_run, &level, &slot);
    kd_list_unlink(&t->link);
    if (kd_list_is_empty(&w->slots[level][slot]))
        w->occupied[level] &= ~(UINT64_C(1) << slot);
    w->count--;
}

/* Re-file every timer of one slot after last_run moved. The slot is emptied first (spliced onto a
 * local list) because some of its timers may land in the very same slot again (parked ones, or
 * level-4 digit-63 ones next to them). */
static void cascade(struct kd_timerwheel *w, unsigned level, unsigned slot)
{
    struct kd_list pending;
    kd_list_init(&pending);
    kd_list_splice_back(&pending, &w->slots[level][slot]);
    w->occupied[level] &= ~(UINT64_C(1) << slot);

    struct kd_list *node;
    while ((node = kd_list_pop_front(&pending)) != NULL)
        file(w, timer_of(node));
}

/* Move last_run forward to `nb`. Precondition: the due slot is empty and no armed timer expires
 * before `nb`; then exactly one slot needs re-filing (see "Advancing" at the top). */
static void advance(struct kd_timerwheel *w, uint64_t nb)
{
    uint64_t x = w->last_run ^ nb;
    w->last_run = nb;
    /* Same 64 ms block: the level-0 slot at nb's digit holds exactly the timers expiring at nb,
     * which is what the due slot must hold, and nothing else moved. */
    if (x <= SLOT_MASK)
        return;
    unsigned h = level_of(x);
    if (h >= KD_TIMERWHEEL_LEVELS)
        cascade(w, TOP_LEVEL, PARK_SLOT);
    else
        cascade(w, h, digit(nb, h));
}

void kd_timerwheel_init(struct kd_timerwheel *w, uint64_t now_ms)
{
    w->last_run = now_ms;
    w->count = 0;
    for (unsigned l = 0; l < KD_TIMERWHEEL_LEVELS; l++) {
        w->occupied[l] = 0;
        for (unsigned s = 0; s < KD_TIMERWHEEL_SLOTS; s++)
            kd_list_init(&w->slots[l][s]);
    }
}

void kd_timer_init(struct kd_timer *t, kd_timer_cb cb)
{
    kd_list_node_init(&t->link);
    t->expire_ms = 0;
    t->cb = cb;
}

/* Note: expire_ms must not be written while the timer is armed; unlink_timer() relies on it to
 * find the timer's slot. */
void kd_timerwheel_add(struct kd_timerwheel *w, struct kd_timer *t, uint64_t expire_ms)
{
    if (kd_timer_is_armed(t))
        unlink_timer(w, t);
    t->expire_ms = expire_ms;
    file(w, t);
    w->count++;
}

void kd_timerwheel_cancel(struct kd_timerwheel *w, struct kd_timer *t)
{
    if (kd_timer_is_armed(t))
        unlink_timer(w, t);
}

uint64_t kd_timerwheel_next(const struct kd_timerwheel *w)
{
    for (unsigned l = 0; l < KD_TIMERWHEEL_LEVELS; l++) {
        if (w->occupied[l] == 0)
            continue;
        const struct kd_list *head = &w->slots[l][__builtin_ctzll(w->occupied[l])];
        /* Level 0: the due slot is sorted, any other slot has a single expiry. */
        if (l == 0)
            return ctimer_of(head->next)->expire_ms;
        /* Coarser slots are unordered; a scan is the price of O(1) add. run() cascades the slot
         * right after scanning it, so this does not repeat for the same timers. */
        uint64_t min = UINT64_MAX;
        for (const struct kd_list *n = head->next; n != head; n = n->next)
            if (ctimer_of(n)->expire_ms < min)
                min = ctimer_of(n)->expire_ms;
        return min;
    }
    return UINT64_MAX;
}

/* Timers fire one at a time off the front of the due slot, re-reading the front after each
 * callback: a callback may cancel any timer (including the next one) or add timers, and a timer
 * it adds with an expiry <= last_run is sorted into the due slot and so fires in this pass. The
 * fired timer is unlinked (and counted out) before its callback, so it may re-arm itself and the
 * wheel validates from inside a callback.
 *
 * Order: non-decreasing expire_ms, with one unavoidable exception: a timer that a callback arms
 * for an expiry earlier than the one being fired can only fire after it (next, in fact).
 *
 * When `budget` stops the run early, last_run stays at the expiry reached so far rather than
 * jumping to now_ms, so the timers left behind stay in order for the next run (a due slot holding
 * everything <= now_ms would have to be sorted). last_run never moves backwards: a now_ms below
 * it fires only the due timers <= now_ms. */
size_t kd_timerwheel_run(struct kd_timerwheel *w, uint64_t now_ms, size_t budget)
{
    size_t fired = 0;

    for (;;) {
        struct kd_list *due = &w->slots[0][digit(w->last_run, 0)];
        while (!kd_list_is_empty(due)) {
            struct kd_timer *t = timer_of(due->next);
            if (t->expire_ms > now_ms) /* only when now_ms < last_run */
                return fired;
            if (budget != 0 && fired == budget)
                return fired;
            unlink_timer(w, t);
            fired++;
            t->cb(t);
        }
        if (w->last_run >= now_ms)
            return fired;
        /* Nothing <= last_run is left: step to the earliest timer if it is due, else to now_ms. */
        uint64_t next = kd_timerwheel_next(w);
        if (next > now_ms) {
            advance(w, now_ms);
            return fired;
        }
        advance(w, next);
    }
}

int kd_timerwheel_validate(const struct kd_timerwheel *w)
{
    size_t seen = 0;

    for (unsigned l = 0; l < KD_TIMERWHEEL_LEVELS; l++) {
        for (unsigned s = 0; s < KD_TIMERWHEEL_SLOTS; s++) {
            const struct kd_list *head = &w->slots[l][s];
            bool bit = (w->occupied[l] >> s) & 1;
            if (bit != !kd_list_is_empty(head))
                return -EINVAL;

            bool due = is_due_slot(w, l, s);
            uint64_t prev = 0;
            for (const struct kd_list *n = head->next; n != head; n = n->next) {
                /* Bound the walk so a corrupted (cyclic) list fails instead of hanging. */
                if (++seen > w->count || n->next == NULL || n->next->prev != n)
                    return -EINVAL;
                unsigned want_l, want_s;
                uint64_t e = ctimer_of(n)->expire_ms;
                slot_of(e, w->last_run, &want_l, &want_s);
                if (want_l != l || want_s != s)
                    return -EINVAL;
                if (due && e < prev)
                    return -EINVAL;
                prev = e;
            }
        }
    }
    return seen == w->count ? 0 : -EINVAL;
}

/* timerwheel.h — hierarchical timer wheel with intrusive entries, millisecond ticks.
 * Concurrency: shard-local, no locks; a wheel and its timers belong to one thread.
 * Ownership: the wheel never allocates; a kd_timer is embedded in its owner, which must cancel it
 * before freeing it.
 *
 * Shape: KD_TIMERWHEEL_LEVELS levels of 64 slots. Level L slot width is 64^L ms, so the wheel covers
 * 64^LEVELS ms (~194 days with 5 levels) ahead of `last_run`; a timer further out is parked in the
 * last slot of the top level and re-filed when the wheel reaches it. Each level keeps a 64-bit
 * occupancy bitmap so kd_timerwheel_next() finds the earliest slot without scanning empty ones.
 *
 * Invariants (checked by kd_timerwheel_validate()):
 *  - every linked timer sits in the slot computed from (its expire_ms, the wheel's last_run);
 *  - a slot's bit in its level's bitmap is set iff the slot list is non-empty;
 *  - the wheel's timer count equals the number of linked timers.
 */
#ifndef KD_CORE_TIMERWHEEL_H
#define KD_CORE_TIMERWHEEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/list.h"

#define KD_TIMERWHEEL_LEVELS 5
#define KD_TIMERWHEEL_SLOTS  64

struct kd_timer;
typedef void (*kd_timer_cb)(struct kd_timer *timer);

struct kd_timer {
    struct kd_list link; /* in a wheel slot; unlinked when inactive */
    uint64_t expire_ms;  /* absolute, same clock as the `now_ms` given to the wheel */
    kd_timer_cb cb;
};

struct kd_timerwheel {
    uint64_t last_run; /* the `now_ms` of the last kd_timerwheel_run() (or init) */
    size_t count;      /* linked timers */
    uint64_t occupied[KD_TIMERWHEEL_LEVELS];
    struct kd_list slots[KD_TIMERWHEEL_LEVELS][KD_TIMERWHEEL_SLOTS];
};

void kd_timerwheel_init(struct kd_timerwheel *w, uint64_t now_ms);

/* Initialise a timer (unlinked). Must be called once before any other use. */
void kd_timer_init(struct kd_timer *t, kd_timer_cb cb);

/* Arm `t` to fire at `expire_ms` (absolute). Re-arms it if it was armed. An expiry at or before
 * last_run fires on the next kd_timerwheel_run(). */
void kd_timerwheel_add(struct kd_timerwheel *w, struct kd_timer *t, uint64_t expire_ms);

/* Disarm `t`; harmless if it is not armed. */
void kd_timerwheel_cancel(struct kd_timerwheel *w, struct kd_timer *t);

static inline bool kd_timer_is_armed(const struct kd_timer *t)
{
    return kd_list_is_linked(&t->link);
}

/* Fire every timer with expire_ms <= now_ms, in non-decreasing expire_ms order, at most `budget`
 * of them (0 = no limit). A callback may add or cancel any timer, including itself; a timer added
 * by a callback for an expiry <= now_ms fires in the same run. Returns the number fired. */
size_t kd_timerwheel_run(struct kd_timerwheel *w, uint64_t now_ms, size_t budget);

/* The earliest expire_ms of any armed timer, exactly, or UINT64_MAX when none is armed. */
uint64_t kd_timerwheel_next(const struct kd_timerwheel *w);

/* Check every invariant above; 0 when all hold, -EINVAL otherwise. For tests. */
int kd_timerwheel_validate(const struct kd_timerwheel *w);

#endif

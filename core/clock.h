/* clock.h — monotonic time in the units the loop uses.
 * Concurrency: any thread. Ownership: none.
 */
#ifndef KD_CORE_CLOCK_H
#define KD_CORE_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t kd_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t kd_clock_ms(void)
{
    return kd_clock_ns() / 1000000u;
}

/* Wall clock, for log timestamps and protocol fields that carry real time. */
static inline uint64_t kd_clock_wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

#endif

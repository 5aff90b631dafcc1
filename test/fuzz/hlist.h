/* hlist.h — a list of HTTP/2 headers behind a kd_kas_header_fn (shards/kas.h), for the drivers that
 * feed route.c's header readers: hop_fuzz.c and md_fuzz.c. Header-only (each driver is one
 * translation unit). The headers point into the fuzz input. */
#ifndef KD_TEST_FUZZ_HLIST_H
#define KD_TEST_FUZZ_HLIST_H

#include <stdbool.h>
#include <stddef.h>

#include "core/h2.h"

#define FUZZ_HLIST_MAX 256

struct fuzz_hlist {
    struct kd_h2_header h[FUZZ_HLIST_MAX];
    size_t n;
};

static inline bool fuzz_hlist_get(void *ud, size_t i, struct kd_h2_header *out)
{
    struct fuzz_hlist *l = ud;
    if (i >= l->n)
        return false;
    *out = l->h[i];
    return true;
}

#endif

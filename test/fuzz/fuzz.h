/* fuzz.h — what every libFuzzer driver in test/fuzz/ shares: the entry point's prototype (kept here
 * so -Wmissing-prototypes is satisfied) and CHECK, which aborts (a crash libFuzzer reports, with the
 * input saved) when a property the driver checks does not hold. Never compiled out. */
#ifndef KD_TEST_FUZZ_H
#define KD_TEST_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x)                                                                                             \
    do {                                                                                                     \
        if (!(x))                                                                                            \
            abort();                                                                                         \
    } while (0)

#endif

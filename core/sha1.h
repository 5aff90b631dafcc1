/* sha1.h — SHA-1 (FIPS 180-4), only for naming Lua scripts the way Redis does (EVALSHA takes the
 * hex SHA-1 of the script's source). Not for anything that needs collision resistance.
 * Concurrency: pure functions; a context belongs to one caller.
 * Ownership: inputs are borrowed for the call, outputs written to caller memory.
 */
#ifndef KD_CORE_SHA1_H
#define KD_CORE_SHA1_H

#include <stddef.h>
#include <stdint.h>

#define KD_SHA1_LEN 20

struct kd_sha1 {
    uint32_t h[5];
    uint64_t total; /* bytes hashed so far */
    uint8_t block[64];
    size_t used; /* bytes in block */
};

void kd_sha1_init(struct kd_sha1 *c);
void kd_sha1_update(struct kd_sha1 *c, const void *data, size_t len);
void kd_sha1_final(struct kd_sha1 *c, uint8_t out[KD_SHA1_LEN]);
/* One call: the 40 lowercase hex digits of SHA-1(data) and a NUL into hex. */
void kd_sha1_hex(const void *data, size_t len, char hex[2 * KD_SHA1_LEN + 1]);

#endif

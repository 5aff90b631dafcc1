/* base64.h — standard base64 (RFC 4648 alphabet, '=' padding) encoding.
 * Concurrency: pure function. Ownership: the caller owns both buffers.
 */
#ifndef KD_CORE_BASE64_H
#define KD_CORE_BASE64_H

#include <stddef.h>
#include <stdint.h>

/* Length of the encoding of n bytes, without the NUL. */
#define KD_BASE64_LEN(n) ((((n) + 2) / 3) * 4)

extern const char kd_base64_alphabet[65];

/* Encode n bytes into out (room for KD_BASE64_LEN(n) + 1 bytes), NUL-terminated; returns the
 * length written. */
size_t kd_base64_encode(const uint8_t *in, size_t n, char *out);

#endif

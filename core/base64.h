/* base64.h — the one base64 of kasd (RFC 4648): the standard and the URL alphabet, with or without
 * '=' padding, and decoders strict enough for credentials (one accepted encoding per byte string)
 * or as lenient as gRPC peers are for "-bin" metadata.
 * Users: JWTs (URL alphabet, no padding, strict), secret files (standard, padding optional,
 * strict), gRPC binary metadata (standard, padding optional, stray bits ignored, as grpc-go reads
 * it), the WebSocket accept key and generated secrets (standard, padded).
 * Concurrency: pure functions. Ownership: the caller owns every buffer.
 */
#ifndef KD_CORE_BASE64_H
#define KD_CORE_BASE64_H

#include <stddef.h>
#include <stdint.h>

/* Length of the padded encoding of n bytes, without the NUL. */
#define KD_BASE64_LEN(n) ((((n) + 2) / 3) * 4)

extern const char kd_base64_alphabet[65]; /* the standard alphabet, "A..Za..z0..9+/" */

enum {
    KD_B64_URL = 1u << 0,    /* '-' and '_' for 62 and 63 (RFC 4648 section 5); else '+' and '/' */
    KD_B64_NOPAD = 1u << 1,  /* encode: no '=' padding. decode: padding refused */
    KD_B64_STRICT = 1u << 2, /* decode: the unused low bits of the last symbol must be zero */
};

/* Encode n bytes into out (room for KD_BASE64_LEN(n) + 1 bytes), NUL-terminated, standard
 * alphabet, padded; returns the length written. */
size_t kd_base64_encode(const uint8_t *in, size_t n, char *out);

/* The length of the encoding of n bytes with these flags (KD_B64_URL, KD_B64_NOPAD). */
size_t kd_base64_encoded_len(size_t n, unsigned flags);
/* Encode with these flags into out (kd_base64_encoded_len(n, flags) bytes, no NUL written);
 * returns the length written. */
size_t kd_base64_encode_ex(const uint8_t *in, size_t n, char *out, unsigned flags);

/* Decode len symbols into out[cap]. Padding ('=' to a multiple of 4) is optional unless
 * KD_B64_NOPAD refuses it; when present it must be exact. A length that leaves one symbol over (4k
 * + 1) is refused. Returns the decoded length, -EINVAL (a symbol outside the alphabet, a bad
 * length or padding, stray bits under KD_B64_STRICT) or -ENOSPC (more than cap bytes). */
long kd_base64_decode(const char *in, size_t len, uint8_t *out, size_t cap, unsigned flags);

#endif

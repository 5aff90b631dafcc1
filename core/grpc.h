/* grpc.h — the parts of gRPC-over-HTTP/2 that are pure byte work: message framing, status codes,
 * grpc-timeout, percent-encoded grpc-message. No I/O, no HTTP/2 library.
 * Concurrency: pure functions; a kd_grpc_deframer belongs to one stream.
 * Ownership: the deframer owns its partial-message buffer; completed messages are borrowed by the
 * callback for the duration of the call.
 *
 * Length-prefixed message:  | flag (1) | length (4, big-endian) | message (length) |
 * flag bit 0 = compressed (with the call's grpc-encoding): the deframer only reports it, the
 * HTTP/2 layer inflates (core/compress.h) or refuses. max_len bounds the wire (compressed) size.
 */
#ifndef KD_CORE_GRPC_H
#define KD_CORE_GRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kd_grpc_status {
    KD_GRPC_OK = 0,
    KD_GRPC_CANCELLED = 1,
    KD_GRPC_UNKNOWN = 2,
    KD_GRPC_INVALID_ARGUMENT = 3,
    KD_GRPC_DEADLINE_EXCEEDED = 4,
    KD_GRPC_NOT_FOUND = 5,
    KD_GRPC_ALREADY_EXISTS = 6,
    KD_GRPC_PERMISSION_DENIED = 7,
    KD_GRPC_RESOURCE_EXHAUSTED = 8,
    KD_GRPC_FAILED_PRECONDITION = 9,
    KD_GRPC_ABORTED = 10,
    KD_GRPC_OUT_OF_RANGE = 11,
    KD_GRPC_UNIMPLEMENTED = 12,
    KD_GRPC_INTERNAL = 13,
    KD_GRPC_UNAVAILABLE = 14,
    KD_GRPC_DATA_LOSS = 15,
    KD_GRPC_UNAUTHENTICATED = 16,
};

const char *kd_grpc_status_name(int code);

#define KD_GRPC_PREFIX 5

/* Incremental deframer: feed DATA frame payloads in any split, get whole messages back. */
struct kd_grpc_deframer {
    uint32_t max_len; /* messages longer than this are refused (RESOURCE_EXHAUSTED) */
    uint8_t hdr[KD_GRPC_PREFIX];
    uint8_t hdr_len;  /* bytes of hdr collected */
    uint32_t msg_len; /* length of the current message (valid when hdr_len == 5) */
    uint32_t have;    /* bytes of the current message collected */
    uint8_t *buf;     /* current message (malloc'd when it does not arrive in one piece) */
    uint32_t cap;
};

/* compressed: the message's flag bit 0; msg is then still compressed. */
typedef int (*kd_grpc_msg_cb)(void *ud, const uint8_t *msg, size_t len, bool compressed);

void kd_grpc_deframer_init(struct kd_grpc_deframer *d, uint32_t max_len);
void kd_grpc_deframer_free(struct kd_grpc_deframer *d);
/* Feed bytes; cb runs for each complete message (zero-copy when it lies whole in `data`).
 * Returns 0, the callback's negative return, -EMSGSIZE (message over max_len), -EPROTO
 * (reserved flag bits set), or -ENOMEM. */
int kd_grpc_deframer_feed(struct kd_grpc_deframer *d, const uint8_t *data, size_t len, kd_grpc_msg_cb cb,
                          void *ud);
/* true when no partial message is pending (a half-close here is clean). */
bool kd_grpc_deframer_idle(const struct kd_grpc_deframer *d);

/* Write the 5-byte prefix for an uncompressed message of len bytes. */
void kd_grpc_frame_prefix(uint8_t out[KD_GRPC_PREFIX], uint32_t len);
/* The same with the compressed flag as given (len is then the compressed size). */
void kd_grpc_frame_prefix_flag(uint8_t out[KD_GRPC_PREFIX], uint32_t len, bool compressed);

/* grpc-timeout: 1-8 ASCII digits and a unit H M S m u n. Result in microseconds (saturating).
 * 0 or -EINVAL. */
int kd_grpc_timeout_parse(const char *s, size_t len, uint64_t *us);
/* Format a timeout of `us` microseconds with the finest unit that fits in 8 digits. */
void kd_grpc_timeout_format(uint64_t us, char out[16]);

/* Percent-encode a grpc-message (bytes outside 0x20-0x7e and '%' become %XX). Returns the length
 * written (cut to fit, never in the middle of an escape); out is NUL-terminated. */
size_t kd_grpc_message_encode(const char *in, size_t len, char *out, size_t cap);
/* Decode percent-encoding leniently (invalid escapes pass through as is, as gRPC requires). */
size_t kd_grpc_message_decode(const char *in, size_t len, char *out, size_t cap);

/* Is this a valid metadata key (lower-case token chars: 0-9 a-z _ - .)? */
bool kd_grpc_metadata_key_valid(const char *key, size_t len);

#endif

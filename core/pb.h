/* pb.h — the protobuf wire format, by hand: a bounds-checked field reader and a size-first writer.
 * Used on hot paths (tunnel messages) where generated code would allocate per message; the
 * .proto files in proto/ remain the definition of record.
 * Concurrency: pure. Ownership: the reader borrows its input (returned byte ranges point into it);
 * the writer writes into a caller buffer whose size the caller computed with the kd_pb_size_*
 * helpers, so encoding never allocates and never fails halfway.
 */
#ifndef KD_CORE_PB_H
#define KD_CORE_PB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum { KD_PB_VARINT = 0, KD_PB_I64 = 1, KD_PB_LEN = 2, KD_PB_I32 = 5 };

struct kd_pb_reader {
    const uint8_t *p, *end;
};

struct kd_pb_field {
    uint32_t num;
    uint32_t wt;
    uint64_t v;          /* VARINT, I64, I32 */
    const uint8_t *data; /* LEN */
    size_t len;          /* LEN */
};

static inline void kd_pb_reader_init(struct kd_pb_reader *r, const uint8_t *p, size_t len)
{
    r->p = p;
    r->end = p + len;
}

/* Next field: 1, 0 at the end, -EBADMSG on malformed input (truncated, bad wire type, field 0,
 * varint over 10 bytes, length past the end). Groups (wire types 3/4) are refused. */
int kd_pb_next(struct kd_pb_reader *r, struct kd_pb_field *f);

size_t kd_pb_varint_size(uint64_t v);
static inline size_t kd_pb_tag_size(uint32_t num)
{
    return kd_pb_varint_size((uint64_t)num << 3);
}
/* Bytes of a LEN field holding n bytes. */
static inline size_t kd_pb_len_field_size(uint32_t num, size_t n)
{
    return kd_pb_tag_size(num) + kd_pb_varint_size(n) + n;
}
static inline size_t kd_pb_varint_field_size(uint32_t num, uint64_t v)
{
    return kd_pb_tag_size(num) + kd_pb_varint_size(v);
}

/* Writers return the advanced pointer; the caller guarantees room (sizes above). */
uint8_t *kd_pb_put_varint(uint8_t *p, uint64_t v);
uint8_t *kd_pb_put_tag(uint8_t *p, uint32_t num, uint32_t wt);
uint8_t *kd_pb_put_len_field(uint8_t *p, uint32_t num, const void *data, size_t n);
/* Tag and length of a LEN field whose n bytes the caller writes next. */
uint8_t *kd_pb_put_len_header(uint8_t *p, uint32_t num, size_t n);
uint8_t *kd_pb_put_varint_field(uint8_t *p, uint32_t num, uint64_t v);

#endif

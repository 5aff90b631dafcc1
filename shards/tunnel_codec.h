/* tunnel_codec.h — the reverse tunnel's messages (wire.md: ReverseTunnel/Connect) by hand, and the
 * order automaton of the agent's side of a tunnel stream.
 * Concurrency: pure functions; an automaton belongs to one tunnel. Ownership: decoded fields point
 * into the caller's buffer (zero-copy); encoders write into a buffer sized with the *_size helpers.
 *
 * Metadata travels inside kasd as an "md blob": the map<string, Values> entries of the wire
 * format, each entry as [varint length][entry message]. A blob is spliced into any map field
 * (RequestInfo.meta = 2, Header.meta = 1, Trailer.meta = 1) by prefixing each entry with the
 * field's tag, so metadata is never decoded and re-encoded on its way through.
 *
 *   ConnectRequest  (agent -> kasd)   oneof: descriptor=1 header=2 message=3 trailer=4 error=5
 *   ConnectResponse (kasd -> agent)   oneof: request_info=1 message=2 close_send=3
 */
#ifndef KD_SHARDS_TUNNEL_CODEC_H
#define KD_SHARDS_TUNNEL_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kd_tun_kind {
    KD_TUN_DESCRIPTOR = 1,
    KD_TUN_HEADER = 2,
    KD_TUN_MESSAGE = 3,
    KD_TUN_TRAILER = 4,
    KD_TUN_ERROR = 5,
};

struct kd_tun_msg {
    enum kd_tun_kind kind;
    const uint8_t *body; /* the oneof member's bytes (Descriptor, Header, Message, Trailer, Error) */
    size_t len;
    const uint8_t *data; /* MESSAGE: Message.data */
    size_t data_len;
    int32_t code;        /* ERROR: Status.code */
    const uint8_t *text; /* ERROR: Status.message */
    size_t text_len;
};

/* Decode one ConnectRequest. 0, or -EBADMSG (malformed, no member set, or several set). */
int kd_tun_decode_request(const uint8_t *p, size_t n, struct kd_tun_msg *out);

/* Walk a Descriptor's services and methods: cb for each (service, method) pair. Names must be
 * non-empty printable ASCII without '/' (a full method is "/service/method"). Returns the number of
 * methods, or -EBADMSG / -EINVAL (a bad name) / the callback's negative return. */
typedef int (*kd_tun_method_cb)(void *ud, const char *svc, size_t svclen, const char *method, size_t mlen);
int kd_tun_descriptor_each(const uint8_t *desc, size_t n, kd_tun_method_cb cb, void *ud);

/* Metadata of a Header or Trailer message as an md blob: the blob is written to out (capacity
 * cap = n is always enough). Returns the blob length, or -EBADMSG. */
long kd_tun_meta_to_blob(const uint8_t *hdr_msg, size_t n, uint8_t *out, size_t cap);

/* Iterate an md blob: cb(key, value) for every value of every key. 0, -EBADMSG, or cb's error. */
typedef int (*kd_tun_md_cb)(void *ud, const char *key, size_t klen, const uint8_t *val, size_t vlen);
int kd_tun_blob_each(const uint8_t *blob, size_t n, kd_tun_md_cb cb, void *ud);

/* Build an md blob entry for key with one value appended to out; returns bytes written. Size with
 * kd_tun_blob_entry_size. Several values of one key may be separate entries (a map may repeat
 * keys on the wire; the last wins in a map, so callers group values of one key in one entry with
 * kd_tun_blob_entry_multi). */
size_t kd_tun_blob_entry_size(size_t klen, const size_t *vlens, size_t nvals);
uint8_t *kd_tun_blob_put_entry(uint8_t *out, const char *key, size_t klen, const uint8_t *const *vals,
                               const size_t *vlens, size_t nvals);

/* The most a tunnel Message adds around a gRPC message of up to 4 GiB, either way:
 * ConnectRequest.message (tag 3) or ConnectResponse.message (tag 2) as tag + varint length, holding
 * Message.data (tag 1) as tag + varint length: 2 * (1 + 5) bytes. */
#define KD_TUN_WRAP_OVERHEAD 12u

/* ConnectResponse encoders. */
size_t kd_tun_request_info_size(size_t method_len, const uint8_t *blob, size_t blob_len);
uint8_t *kd_tun_put_request_info(uint8_t *p, const char *method, size_t method_len, const uint8_t *blob,
                                 size_t blob_len);
size_t kd_tun_message_size(size_t data_len);
uint8_t *kd_tun_put_message(uint8_t *p, const uint8_t *data, size_t len);
size_t kd_tun_close_send_size(void);
uint8_t *kd_tun_put_close_send(uint8_t *p);

/* The agent side of one tunnel stream, as wire.md orders it:
 *   WAIT_DESCRIPTOR --descriptor--> IDLE --(kasd binds a call)--> BOUND
 *   BOUND --header--> RESPONDING --message*--> --trailer--> DONE
 *   any state after the descriptor --error--> DONE
 * Anything else is a protocol violation that ends the stream. */
enum kd_tun_state {
    KD_TUN_WAIT_DESCRIPTOR = 0,
    KD_TUN_IDLE,
    KD_TUN_BOUND,
    KD_TUN_RESPONDING,
    KD_TUN_DONE,
};

/* Apply an agent message; returns the new state, or -EPROTO with *why set to a short reason. */
int kd_tun_step(enum kd_tun_state s, enum kd_tun_kind k, const char **why);

#endif

/* tokens.h — the embedded agent token resolver: a token file (YAML or JSON) loaded into an immutable
 * table that maps an agent token to {agent_id, project_id, agent_name}; plus the two pieces a SIGHUP
 * reload needs without locking readers: an atomic table handle and a quiescent-state epoch.
 * Concurrency: a loaded kd_tokens is immutable, so any number of threads may look up in it at once.
 *   kd_tokens_handle: get() from any thread (shards), swap() from one reloading thread at a time.
 *   kd_epoch: quiescent()/online()/offline() only by the thread that owns the slot (one per shard);
 *   synchronize() from a non-reader thread (it sleeps).
 * Ownership: kd_tokens_load_*() return a table owned by the caller (kd_tokens_free()). A handle does
 *   not own its table: swap() hands the previous one back, to be freed after a grace period. A
 *   kd_agent_ident borrows agent_name from the table it came from.
 *
 * File format (docs/tokens.md):
 *   agents:
 *     - token: "glagent-..."      # 16..1024 bytes of printable ASCII, no spaces; unique in the file
 *       agent_id: 42              # integer > 0; may repeat with several tokens (rotation), but then
 *       project_id: 7             #   project_id and agent_name must be the same in every entry
 *       agent_name: my-agent      # 1..255 bytes, no control characters
 * JSON is read by the same (YAML) parser. Unknown keys, duplicate keys, anchors, aliases and tags are
 * errors. An error is one line "FILE:LINE:COL: agents[3].agent_id: must be a positive integer, got
 * "x"" (entries count from 0). No message ever contains a token: token values are never echoed, and
 * any other input of 16 bytes or more (which could be a misplaced token) is described by its length,
 * not shown; only ids that parsed as integers are shown in full.
 *
 * Lookup timing: the table is an open-addressing hash keyed by SipHash-2-4 under a random 128-bit key
 * chosen at each load, so the probe sequence says nothing an attacker can use; a candidate whose hash
 * matches is compared with the stored token in constant time (whole length, no early exit).
 * Token bytes are wiped (explicit_bzero) when a table is freed. Nothing here logs.
 */
#ifndef KD_CORE_TOKENS_H
#define KD_CORE_TOKENS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define KD_TOKENS_MIN_LEN      16
#define KD_TOKENS_MAX_LEN      1024
#define KD_TOKENS_NAME_MAX     255
#define KD_TOKENS_MAX_ENTRIES  1000000
#define KD_TOKENS_MAX_FILESIZE (16u * 1024 * 1024)

struct kd_tokens; /* opaque, immutable once loaded */

struct kd_agent_ident {
    int64_t agent_id;
    int64_t project_id;
    const char *agent_name; /* NUL-terminated, borrowed from the table: valid while the table is */
};

/* Load a token file (at most KD_TOKENS_MAX_FILESIZE bytes). On success *out is a new table. On error
 * *out is untouched, one line (FILE:LINE:COL: path: message) is written into err, and the return is
 * -EINVAL (content), -EFBIG (too large), -ENOMEM, or -errno (open/read, getrandom). */
int kd_tokens_load_file(const char *path, struct kd_tokens **out, char *err, size_t errlen);
/* The same from memory; name is used in messages. buf is only read (the caller wipes its copy). */
int kd_tokens_load_string(const char *name, const char *buf, size_t len, struct kd_tokens **out, char *err,
                          size_t errlen);

/* Wipe the token bytes and the hash key, then free. NULL is a no-op. */
void kd_tokens_free(struct kd_tokens *t);

/* Entries (tokens) and distinct agents in the table. */
size_t kd_tokens_count(const struct kd_tokens *t);
size_t kd_tokens_agents(const struct kd_tokens *t);

/* Resolve token[0..len) (not NUL-terminated; NULL with len 0 is fine). 0 with *out filled, or -ENOENT
 * (also for t == NULL). Run time depends on len and on the secret-keyed hash, never on how much of
 * any stored token the candidate matches. */
int kd_tokens_lookup(const struct kd_tokens *t, const char *token, size_t len, struct kd_agent_ident *out);

/* SipHash-2-4 (Aumasson & Bernstein, 2012) of data[0..len) under key, the 64-bit output as the
 * little-endian reading of the reference implementation's 8 output bytes. Exposed for tests. */
uint64_t kd_siphash24(const uint8_t key[16], const void *data, size_t len);

/* ---------------------------------------------------------------------------------------------- */
/* Reload without reader locks.
 *
 * The current table lives behind an atomic pointer. A reader (shard) does
 *     const struct kd_tokens *t = kd_tokens_handle_get(h);   ... kd_tokens_lookup(t, ...) ...
 * and must not keep t (nor an agent_name borrowed from it) past its next kd_epoch_quiescent(). The
 * reloading thread loads a new table, swaps it in, waits for a grace period, then frees the old one:
 *     old = kd_tokens_handle_swap(h, fresh);
 *     if (kd_epoch_synchronize(e, wake_shard, srv, 5000) == 0) kd_tokens_free(old);
 *     else  ... keep old (leak it, or retry synchronize later): a reader may still hold it ...
 * Memory ordering: swap() is an acq_rel exchange, so a reader whose acquire load in get() returns
 * the new table also sees everything written into it by the loader. The epoch makes the free safe;
 * see kd_epoch below. */
struct kd_tokens_handle {
    _Atomic(struct kd_tokens *) cur;
};

/* Set the first table (may be NULL) before readers start. */
void kd_tokens_handle_init(struct kd_tokens_handle *h, struct kd_tokens *t);
/* Acquire load of the current table (NULL if none). Never blocks. */
const struct kd_tokens *kd_tokens_handle_get(const struct kd_tokens_handle *h);
/* Install t (may be NULL) and return the previous table, which readers may still be using. */
struct kd_tokens *kd_tokens_handle_swap(struct kd_tokens_handle *h, struct kd_tokens *t);

/* ---------------------------------------------------------------------------------------------- */
/* Quiescent-state based reclamation (QSBR), one slot per reader thread.
 *
 *   global: 1, 2, 3, ...  bumped by every synchronize()
 *   slot[i]: the global value reader i saw at its last quiescent point, on its own cache line;
 *            0 = online, no quiescent point passed yet (the initial state); UINT64_MAX = offline.
 *
 * A quiescent point is a place in the reader's loop where it holds no pointer obtained from
 * kd_tokens_handle_get() (once per loop turn, e.g. before it sleeps). synchronize() bumps global to
 * target and waits until every slot is >= target (offline counts). A reader that stored a value >=
 * target did so after target existed, hence after the swap that preceded it, and after it was done
 * with anything it had read before; so the old table has no readers left.
 *
 * Memory ordering:
 *  - quiescent(): acquire load of global, release store into the slot. The release orders the
 *    reader's earlier reads of the old table before the store; synchronize() reads the slot with
 *    acquire, so those reads happen before the caller's free. The acquire on global pairs with the
 *    release in synchronize()'s increment (which follows the swap), so a reader that stored target
 *    reads the new table from then on.
 *  - offline(): release store of UINT64_MAX (same reasoning: earlier reads happen before a free).
 *  - online(): store of the current global, then a seq_cst fence, before the reader may call
 *    get(). synchronize() has a seq_cst fence between its increment and its reads of the slots.
 *    The two fences make the Dekker pattern safe: either synchronize() sees the slot online (and
 *    waits for it), or the reader's later get() sees the swapped-in table.
 * Slots start online: a slot whose reader never runs must be set offline, or synchronize() times
 * out (which is safe: the caller then keeps the old table). */
struct kd_epoch; /* opaque */

/* nslots readers (1..4096). 0, -EINVAL or -ENOMEM. */
int kd_epoch_create(unsigned nslots, struct kd_epoch **out);
void kd_epoch_destroy(struct kd_epoch *e);

/* In the three calls below, slot < nslots and only slot's own thread calls them.
 * Reader `slot` holds no table pointer now. Called by the slot's thread once per loop turn; cheap (a
 * load and a store on the thread's own cache line). */
void kd_epoch_quiescent(struct kd_epoch *e, unsigned slot);
/* Reader `slot` stops reading (thread exits or blocks for long): synchronize() stops waiting for it. */
void kd_epoch_offline(struct kd_epoch *e, unsigned slot);
/* Reader `slot` starts reading again; call before its next kd_tokens_handle_get(). */
void kd_epoch_online(struct kd_epoch *e, unsigned slot);

/* Called by synchronize() once for each slot that lags, so that a sleeping reader wakes, runs a loop
 * turn and passes a quiescent point. Runs on the synchronizing thread. */
typedef void (*kd_epoch_wake_fn)(void *ud, unsigned slot);

/* Grace period: return 0 once every reader has passed a quiescent point (or gone offline) after
 * this call began, -ETIMEDOUT after timeout_ms (then the caller must not free what it retired).
 * wake may be NULL. Sleeps in short steps (10 us growing to 1 ms); never call it from a reader. */
int kd_epoch_synchronize(struct kd_epoch *e, kd_epoch_wake_fn wake, void *ud, uint32_t timeout_ms);

#endif

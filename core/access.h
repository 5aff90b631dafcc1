/* access.h — the Kubernetes API access-token file: a static list of user tokens (YAML or JSON)
 * loaded into an immutable table that answers "may this token reach this agent, and as whom?" for
 * `Authorization: Bearer pat:<agent_id>:<token>` (or ci:...) when kasd runs without GitLab.
 * Concurrency: a loaded kd_access is immutable; any number of threads may call kd_access_check() on
 *   it at once. Swapping tables on reload is the caller's business (the same handle-and-epoch scheme
 *   as core/tokens.h fits).
 * Ownership: kd_access_load_*() return a table owned by the caller (kd_access_free()). A
 *   kd_access_grant borrows its strings (and the groups array) from the table it came from.
 *
 * File format (docs/tokens.md, "Kubernetes API access tokens"):
 *   users:
 *     - token: "k8s-0123456789abcdef"   # 16..1024 bytes of printable ASCII, no spaces; unique in the file
 *       agents: [1, 42]                  # non-empty list of agent ids (integers > 0), no duplicates
 *       impersonate:                     # optional; absent: requests go as the agent's own service account
 *         username: alice                # required here; 1..255 bytes, no control characters
 *         groups: [devs, ops]            # optional; at most 64, each 1..255 bytes, no duplicates
 *         uid: "1234"                    # optional; 1..255 bytes
 * JSON is read by the same (YAML) parser. Unknown keys, duplicate keys, anchors, aliases, tags and
 * more than one document are errors; so are an empty file and a file without `users`. An error is one
 * line "FILE:LINE:COL: users[3].agents[1]: must be a positive integer, got "x"" (lists count from 0).
 * No message ever contains a token: token values are never echoed, and any other input of 16 bytes or
 * more (which could be a misplaced token) is described by its length, not shown.
 *
 * Lookup timing: an open-addressing table keyed by SipHash-2-4 (kd_siphash24) under a random 128-bit
 * key chosen at each load; a candidate whose 64-bit hash matches is compared with the stored token in
 * constant time (whole length, no early exit). Token bytes are wiped when a table is freed. Nothing
 * here logs.
 */
#ifndef KD_CORE_ACCESS_H
#define KD_CORE_ACCESS_H

#include <stddef.h>
#include <stdint.h>

#define KD_ACCESS_MIN_LEN      16
#define KD_ACCESS_MAX_LEN      1024
#define KD_ACCESS_NAME_MAX     255 /* username, uid, each group */
#define KD_ACCESS_MAX_GROUPS   64
#define KD_ACCESS_MAX_USERS    1000000
#define KD_ACCESS_MAX_FILESIZE (16u * 1024 * 1024)

struct kd_access; /* opaque, immutable once loaded; any thread may read */

struct kd_access_grant {
    const char *username;      /* NULL: no impersonation (then groups is NULL, ngroups 0, uid NULL) */
    const char *const *groups; /* ngroups NUL-terminated names; NULL when ngroups is 0 */
    size_t ngroups;
    const char *uid; /* NULL if unset */
};

/* Load an access-token file (at most KD_ACCESS_MAX_FILESIZE bytes). On success *out is a new table.
 * On error *out is untouched, one line (FILE:LINE:COL: path: message) is written into err, and the
 * return is -EINVAL (content), -EFBIG (too large), -ENOMEM, or -errno (open/read, getrandom). */
int kd_access_load_file(const char *path, struct kd_access **out, char *err, size_t errlen);
/* The same from memory; name is used in messages. buf is only read (the caller wipes its copy). */
int kd_access_load_string(const char *name, const char *buf, size_t len, struct kd_access **out, char *err,
                          size_t errlen);

/* Wipe the token bytes, names and the hash key, then free. NULL is a no-op. */
void kd_access_free(struct kd_access *t);

/* Users (tokens) in the table; 0 for NULL. */
size_t kd_access_count(const struct kd_access *t);

/* Check token[0..len) (not NUL-terminated; NULL with len 0 is fine) for agent_id.
 * 0: token known and agent_id in its list; *out filled, its strings borrowed from t.
 * -ENOENT: unknown token (also t == NULL, or len outside 16..1024). -EPERM: token known, agent_id not
 * in its list. *out is untouched unless 0. Run time depends on len and on the secret-keyed hash, never
 * on how much of any stored token the candidate matches. */
int kd_access_check(const struct kd_access *t, const char *token, size_t len, int64_t agent_id,
                    struct kd_access_grant *out);

#endif

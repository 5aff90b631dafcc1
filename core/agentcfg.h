/* agentcfg.h — the embedded agent configuration source: a directory of per-agent YAML files
 * (<agent name or id>.yaml) read into an immutable set {file stem -> commit id}, the atomic handle
 * shards read the current set through, and a cheap fingerprint to notice that the directory changed.
 * Concurrency: a loaded set is immutable: any number of threads may read it. The handle follows
 *   kd_tokens_handle (core/tokens.h): get() from any thread (shards), swap() from the one reloading
 *   thread, and the previous set is freed only after a kd_epoch grace period. load/fingerprint do
 *   file I/O and are for that reloading thread only (never a shard).
 * Ownership: kd_agentcfg_load() returns a set owned by the caller (kd_agentcfg_free()); it only
 *   reads `prev`. An entry found in a set is borrowed from it: copy what you keep past a quiescent
 *   point.
 *
 * Rules of a load (docs/agents.md):
 *  - every regular file NAME.yaml directly in the directory is read (at most KD_AGENTCFG_MAX_FILES
 *    files, each at most KD_CONFIG_YAML_DOC_MAX bytes, stems of 1..KD_AGENTCFG_STEM_MAX bytes);
 *  - a file that is valid (kd_config_yaml_check) gets commit_id = hex SHA-256 of its bytes;
 *  - a file that is not valid, too large or unreadable is logged once per load ("FILE:LINE:COL:
 *    ..." for YAML errors) and keeps the entry it had in `prev`, if any; otherwise it has none;
 *  - a file that is gone has no entry: its agent gets the empty configuration.
 */
#ifndef KD_CORE_AGENTCFG_H
#define KD_CORE_AGENTCFG_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define KD_AGENTCFG_MAX_FILES  100000
#define KD_AGENTCFG_STEM_MAX   255
#define KD_AGENTCFG_COMMIT_LEN 64 /* hex SHA-256 */

struct kd_agentcfg_entry {
    const char *stem;                           /* file name without ".yaml", NUL-terminated */
    char commit_id[KD_AGENTCFG_COMMIT_LEN + 1]; /* hex SHA-256 of the file bytes */
};

struct kd_agentcfg_set; /* opaque, immutable once loaded */

/* Load dir (see the rules above). On success *out is a new set (generation = prev's + 1, or 1);
 * messages about single files are logged, never returned. -errno only when the directory itself
 * cannot be read (then *out is untouched and the caller keeps prev). -ENOMEM on allocation failure. */
int kd_agentcfg_load(const char *dir, const struct kd_agentcfg_set *prev, struct kd_agentcfg_set **out);
void kd_agentcfg_free(struct kd_agentcfg_set *s);

/* The entry for stem[0..len), or NULL. s may be NULL. */
const struct kd_agentcfg_entry *kd_agentcfg_find(const struct kd_agentcfg_set *s, const char *stem,
                                                 size_t len);
size_t kd_agentcfg_count(const struct kd_agentcfg_set *s);
/* Bumped by every load: a reader compares it with the one it last acted on (pointers may be reused). */
uint64_t kd_agentcfg_generation(const struct kd_agentcfg_set *s);

/* A digest of the names, sizes, inode numbers and modification times of the directory's *.yaml
 * files (order independent). An edit that keeps a file's size and modification time (a tool that
 * restores mtime) goes unnoticed: that is what SIGHUP is for. 0 when the
 * directory cannot be read. Costs one readdir and one fstatat per file. */
uint64_t kd_agentcfg_fingerprint(const char *dir);

/* Hex SHA-256 of data[0..len) into out (KD_AGENTCFG_COMMIT_LEN + 1 bytes, NUL-terminated). */
void kd_agentcfg_commit_id(const void *data, size_t len, char out[KD_AGENTCFG_COMMIT_LEN + 1]);

/* The current set, read without locks (same contract as kd_tokens_handle). */
struct kd_agentcfg_handle {
    _Atomic(struct kd_agentcfg_set *) cur;
};
void kd_agentcfg_handle_init(struct kd_agentcfg_handle *h, struct kd_agentcfg_set *s);
const struct kd_agentcfg_set *kd_agentcfg_handle_get(const struct kd_agentcfg_handle *h);
struct kd_agentcfg_set *kd_agentcfg_handle_swap(struct kd_agentcfg_handle *h, struct kd_agentcfg_set *s);

#endif

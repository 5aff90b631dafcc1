/* dev.h — the embedded default: a development state directory (token file, JWT secrets) and a
 * local redis-server that kasd starts itself when no Redis is configured; and the secret files of a
 * first install (`kasd gen-secret`).
 * Concurrency: main thread only, before shards start and after they stop.
 * Ownership: paths are written into the config (heap strings it owns); the redis child is ours to stop.
 */
#ifndef KD_CMD_DEV_H
#define KD_CMD_DEV_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "core/config.h"

/* Create (or reuse) dir with agent-tokens.yaml, api-secret and private-api-secret, and point the
 * config's empty token_file / authentication_secret_file keys at them. Prints a summary to stdout. */
int kd_dev_prepare(struct kd_config *cfg, const char *dir, char *err, size_t errlen);

/* Write a new secret file at path: 32 random bytes, base64-encoded, and a newline, mode 0600 (the
 * form of GitLab's kas secret; `kasd gen-secret` and kd_dev_prepare). An existing file is left as
 * it is (*created false, returns 0) unless force, which replaces it atomically. */
int kd_dev_secret_write(const char *path, bool force, bool *created, char *err, size_t errlen);

struct kd_embedded_redis {
    pid_t pid;
    int port;
    char dir[256];
    char logfile[300];
    int own_dir; /* we made dir: remove it at stop */
};

/* Start redis-server on 127.0.0.1 at a free port and wait until it answers PING. workdir NULL: a
 * fresh directory under $TMPDIR. Sets cfg->redis.address. */
int kd_redis_embedded_start(struct kd_embedded_redis *r, struct kd_config *cfg, const char *workdir,
                            char *err, size_t errlen);
void kd_redis_embedded_stop(struct kd_embedded_redis *r);

#endif

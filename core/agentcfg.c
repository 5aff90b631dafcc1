/* agentcfg.c — per-agent configuration files into an immutable, sorted set (see agentcfg.h).
 *
 * A set is one allocation of entries sorted by stem (binary search) plus one block holding every
 * stem, so a load costs two allocations and a free is two frees. Only hashes are kept: the file
 * bytes are read, checked, hashed and dropped, so memory is O(files), not O(bytes).
 */
#include "core/agentcfg.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/config.h"
#include "core/log.h"
#include "core/sha2.h"

struct kd_agentcfg_set {
    uint64_t generation;
    size_t n;
    struct kd_agentcfg_entry *e; /* sorted by stem (strcmp) */
    char *stems;
};

static const char SUFFIX[] = ".yaml";
#define SUFFIX_LEN (sizeof(SUFFIX) - 1)

/* The stem of a directory entry that names an agent configuration file, or 0. */
static size_t stem_len(const char *name)
{
    size_t n = strlen(name);
    if (n <= SUFFIX_LEN || n - SUFFIX_LEN > KD_AGENTCFG_STEM_MAX || name[0] == '.' ||
        strcmp(name + n - SUFFIX_LEN, SUFFIX) != 0)
        return 0;
    return n - SUFFIX_LEN;
}

void kd_agentcfg_commit_id(const void *data, size_t len, char out[KD_AGENTCFG_COMMIT_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    uint8_t d[KD_SHA256_LEN];
    kd_sha256(data, len, d);
    for (size_t i = 0; i < KD_SHA256_LEN; i++) {
        out[2 * i] = hex[d[i] >> 4];
        out[2 * i + 1] = hex[d[i] & 15];
    }
    out[KD_AGENTCFG_COMMIT_LEN] = '\0';
}

/* Read a regular file of at most KD_CONFIG_YAML_DOC_MAX bytes: 0, -EFBIG, -EINVAL (not a regular
 * file) or -errno. O_NOFOLLOW is not used: a symlinked file, as Kubernetes ConfigMap volumes make, is fine).
 */
static int read_small(int dfd, const char *name, char **out, size_t *outlen)
{
    int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct stat st;
    int r = 0;
    char *buf = NULL;
    size_t len = 0;
    if (fstat(fd, &st) < 0) {
        r = -errno;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        r = -EINVAL;
        goto out;
    }
    if ((uint64_t)st.st_size > KD_CONFIG_YAML_DOC_MAX) {
        r = -EFBIG;
        goto out;
    }
    /* One byte more than allowed, to notice a file that grew between fstat and read. */
    size_t cap = (size_t)st.st_size + 4096;
    if (cap > KD_CONFIG_YAML_DOC_MAX + 1)
        cap = KD_CONFIG_YAML_DOC_MAX + 1;
    buf = malloc(cap);
    if (buf == NULL) {
        r = -ENOMEM;
        goto out;
    }
    for (;;) {
        ssize_t k = read(fd, buf + len, cap - len);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            r = -errno;
            break;
        }
        if (k == 0)
            break;
        len += (size_t)k;
        if (len > KD_CONFIG_YAML_DOC_MAX) {
            r = -EFBIG;
            break;
        }
        if (len == cap) {
            /* The file grew past what fstat said: take one more bounded step. */
            size_t ncap = cap * 2 > KD_CONFIG_YAML_DOC_MAX + 1 ? KD_CONFIG_YAML_DOC_MAX + 1 : cap * 2;
            char *nb = ncap > cap ? realloc(buf, ncap) : NULL;
            if (nb == NULL) {
                r = ncap > cap ? -ENOMEM : -EFBIG;
                break;
            }
            buf = nb;
            cap = ncap;
        }
    }
out:
    close(fd);
    if (r < 0) {
        free(buf);
        return r;
    }
    *out = buf;
    *outlen = len;
    return 0;
}

struct tmp_entry {
    char *stem;
    char commit_id[KD_AGENTCFG_COMMIT_LEN + 1];
};

static int cmp_tmp(const void *a, const void *b)
{
    return strcmp(((const struct tmp_entry *)a)->stem, ((const struct tmp_entry *)b)->stem);
}

int kd_agentcfg_load(const char *dir, const struct kd_agentcfg_set *prev, struct kd_agentcfg_set **out)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -errno;
    DIR *d = fdopendir(dfd);
    if (d == NULL) {
        int r = -errno;
        close(dfd);
        return r;
    }
    struct tmp_entry *t = NULL;
    size_t n = 0, cap = 0, bytes = 0;
    bool capped = false;
    int r = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t sl = stem_len(de->d_name);
        if (sl == 0)
            continue;
        if (n == KD_AGENTCFG_MAX_FILES) {
            capped = true;
            break;
        }
        char *buf = NULL;
        size_t len = 0;
        char err[512];
        const struct kd_agentcfg_entry *keep = NULL;
        int fr = read_small(dirfd(d), de->d_name, &buf, &len);
        if (fr == -ENOENT) /* removed while we looked: as if absent */
            continue;
        if (fr == 0) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
            fr = kd_config_yaml_check(path, buf, len, err, sizeof(err));
        } else if (fr == -EFBIG) {
            snprintf(err, sizeof(err), "%s/%s: larger than %u bytes", dir, de->d_name,
                     KD_CONFIG_YAML_DOC_MAX);
        } else {
            snprintf(err, sizeof(err), "%s/%s: cannot read: %s", dir, de->d_name, strerror(-fr));
        }
        if (fr < 0) {
            keep = kd_agentcfg_find(prev, de->d_name, sl);
            kd_log_msg(KD_LOG_ERROR, "agent_configuration_invalid", "%s (%s)", err,
                       keep != NULL ? "the agent keeps its previous configuration"
                                    : "the agent gets the empty configuration");
            if (keep == NULL) {
                free(buf);
                continue;
            }
        }
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            struct tmp_entry *nt = realloc(t, ncap * sizeof(*t));
            if (nt == NULL) {
                free(buf);
                r = -ENOMEM;
                break;
            }
            t = nt;
            cap = ncap;
        }
        t[n].stem = strndup(de->d_name, sl);
        if (t[n].stem == NULL) {
            free(buf);
            r = -ENOMEM;
            break;
        }
        if (keep != NULL)
            memcpy(t[n].commit_id, keep->commit_id, sizeof(t[n].commit_id));
        else
            kd_agentcfg_commit_id(buf, len, t[n].commit_id);
        free(buf);
        bytes += sl + 1;
        n++;
    }
    closedir(d);
    if (capped)
        kd_log_msg(KD_LOG_WARN, "agent_configuration_limit",
                   "%s: more than %u configuration files; the rest are ignored", dir, KD_AGENTCFG_MAX_FILES);
    struct kd_agentcfg_set *s = NULL;
    if (r == 0) {
        s = calloc(1, sizeof(*s));
        if (s != NULL) {
            s->e = calloc(n ? n : 1, sizeof(*s->e));
            s->stems = malloc(bytes ? bytes : 1);
        }
        if (s == NULL || s->e == NULL || s->stems == NULL) {
            kd_agentcfg_free(s);
            s = NULL;
            r = -ENOMEM;
        }
    }
    if (r == 0) {
        qsort(t, n, sizeof(*t), cmp_tmp);
        char *p = s->stems;
        for (size_t i = 0; i < n; i++) {
            size_t l = strlen(t[i].stem) + 1;
            memcpy(p, t[i].stem, l);
            s->e[i].stem = p;
            memcpy(s->e[i].commit_id, t[i].commit_id, sizeof(s->e[i].commit_id));
            p += l;
        }
        s->n = n;
        s->generation = prev != NULL ? prev->generation + 1 : 1;
        *out = s;
    }
    for (size_t i = 0; i < n; i++)
        free(t[i].stem);
    free(t);
    return r;
}

void kd_agentcfg_free(struct kd_agentcfg_set *s)
{
    if (s == NULL)
        return;
    free(s->e);
    free(s->stems);
    free(s);
}

const struct kd_agentcfg_entry *kd_agentcfg_find(const struct kd_agentcfg_set *s, const char *stem,
                                                 size_t len)
{
    if (s == NULL)
        return NULL;
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const char *m = s->e[mid].stem;
        int c = strncmp(m, stem, len);
        if (c == 0 && m[len] != '\0')
            c = 1; /* m is longer: it sorts after stem */
        if (c == 0)
            return &s->e[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

size_t kd_agentcfg_count(const struct kd_agentcfg_set *s)
{
    return s != NULL ? s->n : 0;
}

uint64_t kd_agentcfg_generation(const struct kd_agentcfg_set *s)
{
    return s != NULL ? s->generation : 0;
}

/* splitmix64 finaliser: spreads each entry's fields before they are summed. */
static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

uint64_t kd_agentcfg_fingerprint(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return 0;
    uint64_t sum = 1, count = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (stem_len(de->d_name) == 0)
            continue;
        struct stat st;
        /* stat follows symlinks: a ConfigMap-style swap of the link target is a change too. */
        if (fstatat(dirfd(d), de->d_name, &st, 0) < 0)
            continue;
        uint64_t h = 14695981039346656037ull; /* FNV-1a of the name */
        for (const char *c = de->d_name; *c; c++)
            h = (h ^ (uint8_t)*c) * 1099511628211ull;
        h = mix(h ^ mix((uint64_t)st.st_size) ^ mix((uint64_t)st.st_ino * 3) ^
                mix((uint64_t)st.st_mtim.tv_sec * 1000000000ull + (uint64_t)st.st_mtim.tv_nsec));
        sum += h;
        count++;
    }
    closedir(d);
    return mix(sum ^ count) | 1; /* never 0: 0 means "unreadable" */
}

void kd_agentcfg_handle_init(struct kd_agentcfg_handle *h, struct kd_agentcfg_set *s)
{
    atomic_init(&h->cur, s);
}

const struct kd_agentcfg_set *kd_agentcfg_handle_get(const struct kd_agentcfg_handle *h)
{
    return atomic_load_explicit(&((struct kd_agentcfg_handle *)h)->cur, memory_order_acquire);
}

struct kd_agentcfg_set *kd_agentcfg_handle_swap(struct kd_agentcfg_handle *h, struct kd_agentcfg_set *s)
{
    return atomic_exchange_explicit(&h->cur, s, memory_order_acq_rel);
}

/* config_fuzz.c — libFuzzer driver for the YAML config loader.
 * Feeds the bytes to kd_config_load_string() over fresh defaults, then checks what the contract
 * promises: an error is one NUL-terminated line naming the source; a success leaves a config whose
 * validated fields are in range. The same bytes also go through the host:port and duration parsers,
 * which are reachable from YAML only after libyaml's own filtering. */
#include "core/config.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_loaded(const struct kd_config *c)
{
    /* The loader validated these; anything else is a loader bug. */
    if (c->shards > 1024 || !c->source || strcmp(c->source, "fuzz.yaml") != 0)
        abort();
    if (c->limits.recv_buffers < 16 || c->limits.recv_buffers > 32768 ||
        (c->limits.recv_buffers & (c->limits.recv_buffers - 1)) != 0)
        abort();
    if (c->limits.router_ring_size < 64 || c->limits.router_ring_size > 1048576 ||
        (c->limits.router_ring_size & (c->limits.router_ring_size - 1)) != 0)
        abort();
    if (c->limits.connections_per_shard < 1 || c->limits.connections_per_shard > 16777216)
        abort();
    if (c->limits.recv_buffer_size < 1024 || c->limits.recv_buffer_size > 1048576)
        abort();
    if (c->redis.dial_timeout_ms == 0 || c->log.level > KD_LOG_ERROR)
        abort();
    if (c->redis.configured && !c->redis.address)
        abort();
    if (!c->agent.listen.address || !c->api.listen.address || !c->private_api.listen.address ||
        !c->observability.listen.address || !c->redis.key_prefix || !c->redis.key_prefix[0])
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kd_config c;
    char err[512];
    char *s;
    int r;

    if (kd_config_defaults(&c) < 0)
        return 0;
    memset(err, 'Z', sizeof(err));
    r = kd_config_load_string(&c, "fuzz.yaml", (const char *)data, size, err, sizeof(err));
    if (r == 0) {
        check_loaded(&c);
    } else {
        /* One line, terminated, starting with the source name; and a config left at its defaults. */
        if (r != -EINVAL && r != -ENOMEM)
            abort();
        if (!memchr(err, '\0', sizeof(err)) || strchr(err, '\n') || strncmp(err, "fuzz.yaml", 9) != 0)
            abort();
        if (strcmp(c.source, "<defaults>") != 0)
            abort();
    }
    kd_config_free(&c);

    /* The scalar parsers take C strings: give them the input up to its first NUL. */
    s = malloc(size + 1);
    if (s) {
        struct sockaddr_storage ss;
        socklen_t len;
        uint64_t ms;

        memcpy(s, data, size);
        s[size] = '\0';
        kd_config_parse_hostport(s, &ss, &len);
        kd_config_parse_duration(s, &ms);
        free(s);
    }
    return 0;
}

/* yaml_check_fuzz.c — libFuzzer driver for kd_config_yaml_check(), which checks the agent
 * configuration files (operator-written, but read by the server and reported back with positions).
 * Contract checked: the result is 0 or one of the documented errors, an error message is one
 * NUL-terminated line starting with the source name, and the answer does not depend on the
 * size of the error buffer. */
#include "core/config.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512], small[8];
    int r = kd_config_yaml_check("fuzz.yaml", (const char *)data, size, err, sizeof(err));
    if (r != 0 && r != -EINVAL && r != -EFBIG && r != -ENOMEM)
        abort();
    if (r != 0 && (strncmp(err, "fuzz.yaml", 9) != 0 || strchr(err, '\n') != NULL))
        abort();
    if (r == 0 && err[0] != '\0')
        abort();
    if (kd_config_yaml_check("fuzz.yaml", (const char *)data, size, small, sizeof(small)) != r)
        abort();
    return 0;
}

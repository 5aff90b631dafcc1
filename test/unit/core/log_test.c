/* log_test.c — structured log lines: JSON escaping, fields, levels, the logger thread. */
#include <criterion/criterion.h>

#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/log.h"

static char *read_all(int fd)
{
    size_t cap = 1 << 20, len = 0;
    char *buf = malloc(cap);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    for (;;) {
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len + 1 == cap)
            buf = realloc(buf, cap *= 2);
    }
    buf[len] = '\0';
    return buf;
}

Test(log, escape)
{
    char out[64];
    kd_log_escape(out, sizeof(out), "a\"b\\c\nd\x01", 8);
    cr_assert_str_eq(out, "a\\\"b\\\\c\\nd\\u0001");
    /* never overflows the destination, never splits an escape */
    kd_log_escape(out, 5, "\"\"\"\"", 4);
    cr_assert_str_eq(out, "\\\"\\\"");
}

Test(log, sync_line_has_fields_and_level_filter)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    kd_log_configure(KD_LOG_INFO, p[1]);
    kd_log_set_shard(3);
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_WARN, "listening");
    kd_log_str(&l, "listener", "agent");
    kd_log_int(&l, "n", -5);
    kd_log_uint(&l, "u", 7);
    kd_log_bool(&l, "b", true);
    kd_log_errno(&l, -2);
    kd_log_end(&l);
    kd_log_begin(&l, KD_LOG_DEBUG, "hidden");
    kd_log_str(&l, "x", "y");
    kd_log_end(&l);
    kd_log_set_shard(-1);
    kd_log_msg(KD_LOG_ERROR, "boom", "value %d \"quoted\"", 42);
    char *out = read_all(p[0]);
    cr_assert(strstr(out,
                     "\"level\":\"warn\",\"shard\":3,\"event\":\"listening\",\"listener\":\"agent\","
                     "\"n\":-5,\"u\":7,\"b\":true,\"error\":\"No such file or directory\",\"errno\":2}\n") !=
                  NULL,
              "%s", out);
    cr_assert(strstr(out, "hidden") == NULL, "debug lines are filtered at info");
    cr_assert(strstr(out, "\"event\":\"boom\",\"msg\":\"value 42 \\\"quoted\\\"\"}\n") != NULL, "%s", out);
    free(out);
    close(p[0]);
    close(p[1]);
    kd_log_configure(KD_LOG_INFO, 2);
}

Test(log, long_values_are_truncated_and_marked)
{
    int p[2];
    cr_assert_eq(pipe(p), 0);
    kd_log_configure(KD_LOG_INFO, p[1]);
    char *big = malloc(10000);
    memset(big, 'x', 9999);
    big[9999] = '\0';
    struct kd_logline l;
    kd_log_begin(&l, KD_LOG_INFO, "big");
    kd_log_str(&l, "v", big);
    kd_log_end(&l);
    char *out = read_all(p[0]);
    cr_assert_lt(strlen(out), KD_LOG_LINE_MAX + 1);
    cr_assert(strstr(out, "\"truncated\":true}\n") != NULL, "%s", out);
    free(out);
    free(big);
    close(p[0]);
    close(p[1]);
    kd_log_configure(KD_LOG_INFO, 2);
}

static void *spam(void *arg)
{
    long id = (long)arg;
    for (int i = 0; i < 2000; i++) {
        struct kd_logline l;
        kd_log_begin(&l, KD_LOG_INFO, "spam");
        kd_log_int(&l, "thread", id);
        kd_log_int(&l, "i", i);
        kd_log_end(&l);
    }
    return NULL;
}

Test(log, threaded_lines_never_interleave)
{
    char path[] = "/tmp/kd_log_test_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    unlink(path);
    kd_log_configure(KD_LOG_INFO, fd);
    cr_assert_eq(kd_log_start(), 0);
    pthread_t th[4];
    for (long i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, spam, (void *)i);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    kd_log_stop();
    lseek(fd, 0, SEEK_SET);
    char *out = read_all(fd);
    /* every line is whole: starts with {"ts": and ends with } ; count per thread */
    int count[4] = {0}, lines = 0, dropped_reports = 0;
    for (char *s = strtok(out, "\n"); s != NULL; s = strtok(NULL, "\n")) {
        if (strstr(s, "log_lines_dropped")) {
            dropped_reports++;
            continue;
        }
        cr_assert(strncmp(s, "{\"ts\":\"", 7) == 0 && s[strlen(s) - 1] == '}', "broken line: %s", s);
        long t;
        cr_assert_not_null(strstr(s, "\"thread\":"), "%s", s);
        t = strtol(strstr(s, "\"thread\":") + 9, NULL, 10);
        cr_assert(t >= 0 && t < 4);
        count[t]++;
        lines++;
    }
    cr_assert_eq((uint64_t)lines + kd_log_dropped(), 8000, "lines %d + dropped %llu", lines,
                 (unsigned long long)kd_log_dropped());
    free(out);
    close(fd);
    kd_log_configure(KD_LOG_INFO, 2);
}

/* secretfile_test.c — the token loaders' shared helpers: constant-time equality at every length
 * relation (empty and NULL sides included), escaping and describing values for messages (cut to the
 * buffer, never a long value), and the whole-file read with its size cap. */
#include "core/secretfile.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

Test(secretfile, equal)
{
    static const char a[] = "0123456789abcdef", b[] = "0123456789abcdeX";

    cr_assert(kd_secretfile_equal(a, 16, a, 16));
    cr_assert(kd_secretfile_equal(a, 16, "0123456789abcdef", 16));
    cr_assert_not(kd_secretfile_equal(a, 16, b, 16));
    cr_assert_not(kd_secretfile_equal("X123", 4, a, 4));
    /* A prefix is not equal, either way round; the length difference counts even over zeros. */
    cr_assert_not(kd_secretfile_equal(a, 15, a, 16));
    cr_assert_not(kd_secretfile_equal(a, 16, a, 15));
    cr_assert_not(kd_secretfile_equal("\0\0", 2, "\0", 1));
    /* Empty sides, NULL allowed with length 0. */
    cr_assert(kd_secretfile_equal(NULL, 0, NULL, 0));
    cr_assert(kd_secretfile_equal("", 0, NULL, 0));
    cr_assert_not(kd_secretfile_equal(NULL, 0, a, 1));
    cr_assert_not(kd_secretfile_equal("\0", 1, NULL, 0));
}

Test(secretfile, escape_and_describe)
{
    char buf[KD_SECRETFILE_DESCRIBE_LEN], small[8];
    size_t len = 0;

    kd_secretfile_escape(buf, sizeof(buf), &len, "a\"b\\c\t\xff", 7);
    cr_assert_str_eq(buf, "a\\\"b\\\\c\\x09\\xff");
    cr_assert_eq(len, strlen(buf));
    /* A character that does not fit is left out whole, and the result stays terminated. */
    len = 0;
    kd_secretfile_escape(small, sizeof(small), &len, "abcd\x01", 5);
    cr_assert_str_eq(small, "abcd");
    kd_secretfile_describe(buf, sizeof(buf), "x", 1);
    cr_assert_str_eq(buf, "\"x\"");
    kd_secretfile_describe(buf, sizeof(buf), "\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f",
                           KD_SECRETFILE_SHOW_MAX);
    cr_assert_str_eq(buf, "\"\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08\\x09\\x0a\\x0b\\x0c\\x0d\\x0e\\x0f\"");
    kd_secretfile_describe(buf, sizeof(buf), "0123456789abcdef", 16);
    cr_assert_str_eq(buf, "<16 bytes, not shown>");
}

Test(secretfile, read)
{
    char path[] = "/tmp/kd_secretfile_test_XXXXXX", *buf = NULL;
    size_t len = 0;
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, "0123456789", 10), 10);
    close(fd);
    cr_assert_eq(kd_secretfile_read(path, 10, &buf, &len), 0);
    cr_assert_eq(len, 10);
    cr_assert_eq(memcmp(buf, "0123456789", 10), 0);
    free(buf);
    buf = NULL;
    cr_assert_eq(kd_secretfile_read(path, 9, &buf, &len), -EFBIG);
    cr_assert_null(buf);
    unlink(path);
    cr_assert_eq(kd_secretfile_read(path, 9, &buf, &len), -ENOENT);
    /* A file whose size fstat does not know (a pipe-like file) is read to its end all the same. */
    cr_assert_eq(kd_secretfile_read("/proc/self/status", 1 << 20, &buf, &len), 0);
    cr_assert_gt(len, 0);
    cr_assert_eq(memcmp(buf, "Name:", 5), 0);
    free(buf);
    buf = NULL;
    cr_assert_eq(kd_secretfile_read("/proc/self/status", 16, &buf, &len), -EFBIG);
    cr_assert_null(buf);
}

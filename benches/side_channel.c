/* The side-channel experiment of docs/benchmarks.md: a 16 MiB reply to a {packet,4}
 * request, three ways. Request "p": through the pipe, as one frame. "m": written into a
 * fresh memfd, whose "<pid> <fd>" is the reply (the BEAM reads /proc/<pid>/fd/<fd>);
 * the previous one is closed then, as an acknowledgement would close it. "r": the same
 * with one memfd kept and rewritten (its pages stay allocated). Built by
 * `make bench-side-channel`. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SIZE (16u << 20)

static int read_all(void *buf, size_t n) {
    for (size_t got = 0; got < n;) {
        ssize_t r = read(0, (char *)buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static void write_all(int fd, const void *buf, size_t n, off_t at, int positioned) {
    for (size_t done = 0; done < n;) {
        ssize_t r = positioned ? pwrite(fd, (const char *)buf + done, n - done, at + done)
                               : write(fd, (const char *)buf + done, n - done);
        if (r <= 0) exit(1);
        done += (size_t)r;
    }
}

static void frame(const void *buf, uint32_t n) {
    unsigned char h[4] = {n >> 24, n >> 16, n >> 8, n};
    write_all(1, h, 4, 0, 0);
    write_all(1, buf, n, 0, 0);
}

int main(void) {
    char *payload = malloc(SIZE);
    if (!payload) return 1;
    memset(payload, 'x', SIZE);
    int fresh = -1, kept = -1;
    for (;;) {
        unsigned char h[4];
        char req[64];
        if (read_all(h, 4)) return 0;
        uint32_t len = (uint32_t)h[0] << 24 | h[1] << 16 | h[2] << 8 | h[3];
        if (len == 0 || len > sizeof req || read_all(req, len)) return 0;
        if (req[0] == 'p') {
            frame(payload, SIZE);
            continue;
        }
        int fd;
        if (req[0] == 'm') {
            if (fresh >= 0) close(fresh);
            fd = fresh = memfd_create("reply", MFD_CLOEXEC);
        } else {
            if (kept < 0) kept = memfd_create("reply", MFD_CLOEXEC);
            fd = kept;
        }
        if (fd < 0) return 1;
        write_all(fd, payload, SIZE, 0, 1);
        char text[32];
        int n = snprintf(text, sizeof text, "%d %d", (int)getpid(), fd);
        frame(text, (uint32_t)n);
    }
}

/* The loop shared by benches/echo.c and benches/standin.c: {packet,4} frames read by
 * spinning on a non-blocking stdin (so a frame is picked up the moment it is written),
 * each handed to `on_frame' with its 4-byte length prefix; blocking writes to stdout. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int write_all(const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Runs until stdin ends (0) or an error (1). `on_frame(frame, len)': `frame' points at
 * the length prefix, `len' is the length after it; nonzero stops the loop with 1. */
static int serve_frames(int (*on_frame)(const unsigned char *frame, uint32_t len)) {
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    size_t cap = 1 << 16, len = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) return 1;
    for (;;) {
        if (len == cap) {
            unsigned char *grown = realloc(buf, cap *= 2);
            if (!grown) return 1;
            buf = grown;
        }
        ssize_t n = read(0, buf + len, cap - len);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue; /* spin */
            return 1;
        }
        len += (size_t)n;
        size_t off = 0;
        while (len - off >= 4) {
            uint32_t flen = ((uint32_t)buf[off] << 24) | ((uint32_t)buf[off + 1] << 16) |
                            ((uint32_t)buf[off + 2] << 8) | buf[off + 3];
            if (len - off - 4 < flen) {
                if ((size_t)flen + 4 > cap) { /* a frame larger than the buffer */
                    memmove(buf, buf + off, len - off);
                    len -= off;
                    off = 0;
                    while (cap < (size_t)flen + 4) cap *= 2;
                    unsigned char *grown = realloc(buf, cap);
                    if (!grown) return 1;
                    buf = grown;
                }
                break;
            }
            if (on_frame(buf + off, flen) != 0) return 1;
            off += (size_t)flen + 4;
        }
        memmove(buf, buf + off, len - off);
        len -= off;
    }
}

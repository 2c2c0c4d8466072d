/* The floor for `benches/stages.escript': a {packet,4} echo that spins on a
 * non-blocking stdin and writes every frame back unchanged (blocking stdout). It does
 * nothing else, so a round trip through it is what an Erlang port costs on this host. */
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

int main(void) {
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    size_t cap = 1 << 16, len = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) return 1;
    for (;;) {
        if (len == cap) {
            cap *= 2;
            unsigned char *grown = realloc(buf, cap);
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
                if ((size_t)flen + 4 > cap) {
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
            if (write_all(buf + off, (size_t)flen + 4) < 0) return 1;
            off += (size_t)flen + 4;
        }
        memmove(buf, buf + off, len - off);
        len -= off;
    }
}

/* A stand-in for the pyport port program that answers every request at once, for
 * `benches/stages.escript': `pyport:call/4' over it is the floor of the Erlang side
 * (facade, port owner, monitors), with no Python and no Rust in the way.
 * It says hello ({hello, #{protocol => 2}}), answers `ok' to every control request
 * (context 0: new_context...) and {ok, 3} to every context request with a header, and
 * spins on a non-blocking stdin like benches/echo.c. Frames: docs/protocol.md. */
#include "port_loop.h"

/* External Term Format: 131 version; 104 small tuple; 119 small UTF-8 atom; 116 map;
 * 97 small integer. */
static const unsigned char HELLO[] = {131, 104, 2, 119, 5, 'h', 'e', 'l', 'l', 'o',
                                      116, 0, 0, 0, 1,
                                      119, 8, 'p', 'r', 'o', 't', 'o', 'c', 'o', 'l', 97, 2};
static const unsigned char OK3[] = {131, 104, 2, 119, 2, 'o', 'k', 97, 3};
static const unsigned char OK[] = {131, 119, 2, 'o', 'k'};

/* <<Len:32, Kind, HLen:16, Header, Payload>> */
static int frame_out(unsigned char kind, const unsigned char *h, uint16_t hlen,
                     const unsigned char *p, size_t plen) {
    unsigned char out[7 + 65535 + 64];
    uint32_t len = 3 + (uint32_t)hlen + (uint32_t)plen;
    out[0] = len >> 24; out[1] = len >> 16; out[2] = len >> 8; out[3] = len;
    out[4] = kind; out[5] = hlen >> 8; out[6] = hlen & 0xff;
    memcpy(out + 7, h, hlen);
    memcpy(out + 7 + hlen, p, plen);
    return write_all(out, 4 + len);
}

/* Context 0 (control) gets `ok', any other context {ok, 3}; casts (no header) nothing. */
static int answer(const unsigned char *frame, uint32_t len) {
    const unsigned char *f = frame + 4;
    if (len < 10) return 0;
    uint64_t ctx = 0;
    for (int i = 0; i < 8; i++) ctx = (ctx << 8) | f[i];
    uint16_t hlen = (uint16_t)((f[8] << 8) | f[9]);
    if (hlen == 0 || 10 + (uint32_t)hlen > len) return 0;
    return ctx == 0 ? frame_out(0, f + 10, hlen, OK, sizeof OK)
                    : frame_out(0, f + 10, hlen, OK3, sizeof OK3);
}

int main(void) {
    if (frame_out(1, NULL, 0, HELLO, sizeof HELLO) < 0) return 1;
    return serve_frames(answer);
}

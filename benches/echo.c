/* The floor for `benches/stages.escript': a {packet,4} echo that spins on a
 * non-blocking stdin and writes every frame back unchanged (blocking stdout). It does
 * nothing else, so a round trip through it is what an Erlang port costs on this host. */
#include "port_loop.h"

static int echo(const unsigned char *frame, uint32_t len) {
    return write_all(frame, (size_t)len + 4);
}

int main(void) {
    return serve_frames(echo);
}

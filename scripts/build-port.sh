#!/usr/bin/env bash
# Builds the port program into priv/pyport. rebar3's compile step runs this (see
# rebar.config), so pyport builds itself as a dependency of another project, and a
# release carries the binary in pyport's priv/. Quiet when all is up to date; a missing
# cargo or Python is one line on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "pyport: $*" >&2; exit 1; }
# A port program of the user's own (or the other-Python test run's) is used instead.
[ -z "${PYPORT_EXECUTABLE:-}" ] || exit 0
command -v cargo >/dev/null 2>&1 \
    || fail "cargo not found: the pyport port program is Rust; install Rust (rustup) and compile again"
# ensure-python.sh says what is wrong in one line of its own
python=$(scripts/ensure-python.sh --prefer-installed) || exit 1
PYO3_PYTHON="$python" cargo build --release --quiet \
    || fail "cargo build of the port program failed (see above)"
built="${CARGO_TARGET_DIR:-target}/release/pyport"
mkdir -p priv
if ! cmp -s "$built" priv/pyport 2>/dev/null; then
    install -m 755 "$built" priv/pyport
fi

#!/usr/bin/env bash
# Builds the port program into priv/pyport. rebar3's compile step runs this (see
# rebar.config), so pyport builds itself as a dependency of another project, and a
# release carries the binary in pyport's priv/. Quiet when all is up to date; a missing
# cargo or Python is one line on stderr.
#
# One Python, chosen once: the Python of the first build is recorded in
# priv/pyport.build (python=, why=, version=, stamp=) and taken again by every later
# build, by the app venvs (app-venv.sh) and by `pyport doctor', until PYPORT_PYTHON
# names another. When the stamp (a digest of the Rust sources and that Python) matches
# and priv/pyport is there, nothing is built and cargo is not needed: a `path:' or
# `_checkouts' dependency compiles in no time.
#
#   build-port.sh            build, or find up to date, priv/pyport
#   build-port.sh --python   print the Python priv/pyport links (for app-venv.sh)
#   build-port.sh --bundle   only make, or take away, priv/python-home as
#                            PYPORT_BUNDLE_PYTHON says (app-venv.sh, which an app's
#                            every compile runs, while pyport itself compiles once)
set -euo pipefail
cd "$(dirname "$0")/.."
record=priv/pyport.build
fail() { echo "pyport: $*" >&2; exit 1; }

# recorded KEY: that line of the record, or nothing
recorded() {
    [ -f "$record" ] || return 0
    sed -n "s/^$1=//p" "$record" | head -n 1
}

# The Python to build against, and why: PYPORT_PYTHON, else the recorded one while it
# still works, else the one ensure-python.sh finds (ensure-python.sh says what is wrong
# in one line of its own).
choose_python() {
    local before
    before=$(recorded python)
    if [ -z "${PYPORT_PYTHON:-}" ] && [ -n "$before" ] \
           && PYPORT_PYTHON="$before" scripts/ensure-python.sh >/dev/null 2>&1; then
        python=$before
        why=$(recorded why)
        return
    fi
    if [ -n "$before" ] && [ -z "${PYPORT_PYTHON:-}" ]; then
        echo "pyport: the recorded Python $before no longer works; choosing again" >&2
    fi
    local answer
    answer=$(scripts/ensure-python.sh --prefer-installed --why) || exit 1
    python=$(echo "$answer" | sed -n 1p)
    why=$(echo "$answer" | sed -n 2p)
}

# PYPORT_BUNDLE_PYTHON=1: priv/python-home carries the Python priv/pyport links (its
# libpython, standard library and executable; scripts/bundle-python.py), so a release
# runs where no Python is installed (docs/deployment.md). Made once per Python, kept
# while the variable is set, taken away when it is not.
bundle_python() {
    local home=priv/python-home want version
    if [ "${PYPORT_BUNDLE_PYTHON:-}" != 1 ]; then
        rm -rf "$home"
        return
    fi
    version=$("$python" -c 'import sys; print(sys.version.split()[0])')
    want=$(printf '%s\n%s\n' "$python" "$version" | sha256sum | cut -d' ' -f1)
    [ "$(cat "$home/pyport.stamp" 2>/dev/null || true)" != "$want" ] || return 0
    rm -rf "$home" "$home.tmp"
    mkdir -p priv
    "$python" scripts/bundle-python.py "$home.tmp" \
        || fail "could not copy $python into $home (see above)"
    echo "$want" > "$home.tmp/pyport.stamp"
    mv "$home.tmp" "$home"
}

if [ "${1:-}" = "--python" ]; then
    if [ -n "${PYPORT_EXECUTABLE:-}" ] || [ -z "$(recorded python)" ]; then
        # a port program of the user's own, or none built yet: as a build would choose
        choose_python
    else
        python=$(recorded python)
    fi
    echo "$python"
    exit 0
fi

if [ "${1:-}" = "--bundle" ]; then
    [ -z "${PYPORT_EXECUTABLE:-}" ] || exit 0
    python=$(scripts/build-port.sh --python)
    bundle_python
    exit 0
fi

# A port program of the user's own (or the other-Python test run's) is used instead.
[ -z "${PYPORT_EXECUTABLE:-}" ] || exit 0
choose_python
version=$("$python" -c 'import sys; print(sys.version.split()[0])')

stamp=$( { find src build.rs Cargo.toml Cargo.lock priv/python/erlang*.py -type f -print0 | sort -z | xargs -0 sha256sum
           printf '%s\n%s\n' "$python" "$version"; } | sha256sum | cut -d' ' -f1)
if [ -x priv/pyport ] && [ "$(recorded stamp)" = "$stamp" ]; then
    bundle_python
    exit 0
fi

command -v cargo >/dev/null 2>&1 \
    || fail "cargo not found: the pyport port program is Rust; install Rust (rustup) and compile again"
PYO3_PYTHON="$python" cargo build --release --quiet \
    || fail "cargo build of the port program failed (see above)"
built="${CARGO_TARGET_DIR:-target}/release/pyport"
mkdir -p priv
if ! cmp -s "$built" priv/pyport 2>/dev/null; then
    install -m 755 "$built" priv/pyport
fi
printf 'python=%s\nwhy=%s\nversion=%s\nstamp=%s\n' "$python" "$why" "$version" "$stamp" > "$record.tmp"
mv "$record.tmp" "$record"
bundle_python

#!/usr/bin/env bash
# Prints the path of a CPython >= 3.12 with a shared libpython, for pyport to embed.
# Order: $PYPORT_PYTHON; with --prefer-installed (a build of pyport as a dependency of
# another project), a python3 / python3.1x on the PATH or under pyenv; the cached build;
# else build CPython $series once from Debian's source package into the cache (outside
# the repo; minutes). All progress goes to stderr.
set -euo pipefail

series="${PYPORT_PYTHON_SERIES:-3.13}"
cache="${PYPORT_CACHE:-$HOME/.cache/pyport}"
prefix="$cache/python$series"

log() { echo "ensure-python: $*" >&2; }

usable() { # usable PYTHON: >= 3.12 and built with --enable-shared
    "$1" - <<'PY' 2>/dev/null
import sys, sysconfig
ok = sys.version_info >= (3, 12) and sysconfig.get_config_var("Py_ENABLE_SHARED") == 1
sys.exit(0 if ok else 1)
PY
}

if [ -n "${PYPORT_PYTHON:-}" ]; then
    if usable "$PYPORT_PYTHON"; then echo "$PYPORT_PYTHON"; exit 0; fi
    log "PYPORT_PYTHON=$PYPORT_PYTHON is not a CPython >= 3.12 with a shared libpython"
    exit 1
fi

if [ "${1:-}" = "--prefer-installed" ]; then
    for py in python3.14 python3.13 python3.12 python3 \
              $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV); do
        found=$(command -v "$py" 2>/dev/null || true)
        if [ -n "$found" ] && usable "$found"; then echo "$found"; exit 0; fi
    done
fi

if [ -x "$prefix/bin/python3" ] && usable "$prefix/bin/python3"; then
    echo "$prefix/bin/python3"; exit 0
fi

# Build from Debian's source package. The suites that carry python$series are added as
# deb-src sources only (no binary package changes), with the mirror taken from the
# machine's own apt sources; apt picks the newest version among them.
log "no usable Python found: building CPython $series into $prefix (once; this takes minutes)"
export DEBIAN_FRONTEND=noninteractive
apt_uris() {
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } || true
}
mirror=$(apt_uris | grep -v security | head -n 1 || true)
security=$(apt_uris | grep security | head -n 1 || true)
[ -n "$mirror" ] || { log "no apt mirror found in /etc/apt"; exit 1; }
src_list=/etc/apt/sources.list.d/pyport-python-src.sources
{
    printf 'Types: deb-src\nURIs: %s\nSuites: trixie trixie-updates forky sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror"
    if [ -n "$security" ]; then
        printf '\nTypes: deb-src\nURIs: %s\nSuites: trixie-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$security"
    fi
} > "$src_list"
apt-get update -qq >&2
apt-get install -y -qq dpkg-dev build-essential pkg-config libssl-dev libffi-dev zlib1g-dev \
    libbz2-dev liblzma-dev libsqlite3-dev libncurses-dev libreadline-dev uuid-dev libgdbm-dev \
    libexpat1-dev >&2

work="$cache/build"
rm -rf "$work"; mkdir -p "$work"
# The newest version listed may not be downloadable from the mirror: try newest first.
got=""
for v in $(apt-cache showsrc "python$series" | awk '/^Version:/ {print $2}' | sort -rV | uniq); do
    if ( cd "$work" && apt-get source --download-only "python$series=$v" >"$work/fetch.log" 2>&1 ); then
        got=$v; break
    fi
    rm -f "$work"/python"$series"_*
done
[ -n "$got" ] || { log "no python$series source package could be downloaded"; exit 1; }
log "building python$series $got"
orig=$(ls "$work"/python"$series"_*.orig.tar.* | head -n 1)
mkdir -p "$work/src"
tar -xf "$orig" -C "$work/src" --strip-components=1
cd "$work/src"
./configure --prefix="$prefix" --enable-shared --without-ensurepip \
    LDFLAGS="-Wl,-rpath,$prefix/lib" >"$work/configure.log" 2>&1 \
    || { tail -n 30 "$work/configure.log" >&2; exit 1; }
make -j"$(nproc)" >"$work/make.log" 2>&1 || { tail -n 40 "$work/make.log" >&2; exit 1; }
make install >"$work/install.log" 2>&1 || { tail -n 40 "$work/install.log" >&2; exit 1; }
ln -sf "python$series" "$prefix/bin/python3"
rm -rf "$work"
usable "$prefix/bin/python3" || { log "the build in $prefix is not usable"; exit 1; }
log "built $("$prefix/bin/python3" -V)"
echo "$prefix/bin/python3"

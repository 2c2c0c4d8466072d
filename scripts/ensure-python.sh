#!/usr/bin/env bash
# Prints the path of a CPython >= 3.12 with a shared libpython, for pyport to embed.
# Order: $PYPORT_PYTHON; with --prefer-installed (a build of pyport as a dependency of
# another project), a python3.1x / python3 on the PATH, then the newest under pyenv;
# the cached build; else build CPython $series once from Debian's source package into
# the cache (outside the repo; minutes; needs root and apt-get). Anything wrong is one
# line on stderr; the build's own output goes to a log file that line names.
# With --why, a second line says why that one (build-port.sh records it, and `pyport
# doctor' shows it).
set -euo pipefail

prefer_installed=false
why=false
for arg in "$@"; do
    case "$arg" in
        --prefer-installed) prefer_installed=true ;;
        --why) why=true ;;
        *) echo "pyport: ensure-python.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

series="${PYPORT_PYTHON_SERIES:-3.13}"
cache="${PYPORT_CACHE:-$HOME/.cache/pyport}"
prefix="$cache/python$series"
build_log="$cache/build-python$series.log"

say() { echo "pyport: $*" >&2; }
fail() { say "$*"; exit 1; }
# found PYTHON WHY: the answer (and with --why, the reason)
found() {
    echo "$1"
    if $why; then echo "$2"; fi
    exit 0
}

# usable PYTHON: >= 3.12 and built with --enable-shared. It must print the answer, so an
# executable that is not Python (`true') does not pass by exiting 0.
usable() {
    [ "$("$1" -c 'import sys, sysconfig; print(sys.version_info >= (3, 12) and sysconfig.get_config_var("Py_ENABLE_SHARED") == 1)' \
         </dev/null 2>/dev/null)" = True ]
}

if [ -n "${PYPORT_PYTHON:-}" ]; then
    if usable "$PYPORT_PYTHON"; then found "$PYPORT_PYTHON" "set by PYPORT_PYTHON"; fi
    fail "PYPORT_PYTHON=$PYPORT_PYTHON is not a CPython >= 3.12 with a shared libpython"
fi

if $prefer_installed; then
    for py in python3.14 python3.13 python3.12 python3 \
              $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV); do
        found=$(command -v "$py" 2>/dev/null || true)
        if [ -n "$found" ] && usable "$found"; then
            case "$py" in
                /*) found "$found" "the newest usable Python under pyenv" ;;
                *) found "$found" "the first usable Python on the PATH ($py)" ;;
            esac
        fi
    done
fi

if [ -x "$prefix/bin/python3" ] && usable "$prefix/bin/python3"; then
    found "$prefix/bin/python3" "pyport's own build of CPython $series in $cache"
fi

# Nothing found: build one. That takes Debian's apt as root; without them, say so (and
# touch nothing) rather than fail half-way through.
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    fail "no CPython >= 3.12 with a shared libpython found, and building one needs root and apt-get: set PYPORT_PYTHON to one"
fi

# Build from Debian's source package. The suites that carry python$series are added as
# deb-src sources only (no binary package changes), with the mirror taken from the
# machine's own apt sources; apt picks the newest version among them.
build_python() {
    export DEBIAN_FRONTEND=noninteractive
    apt_uris() {
        { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
          grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } || true
    }
    mirror=$(apt_uris | grep -v security | head -n 1 || true)
    security=$(apt_uris | grep security | head -n 1 || true)
    [ -n "$mirror" ] || { echo "no apt mirror found in /etc/apt"; exit 1; }
    src_list=/etc/apt/sources.list.d/pyport-python-src.sources
    {
        printf 'Types: deb-src\nURIs: %s\nSuites: trixie trixie-updates forky sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror"
        if [ -n "$security" ]; then
            printf '\nTypes: deb-src\nURIs: %s\nSuites: trixie-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$security"
        fi
    } > "$src_list"
    apt-get update -qq
    apt-get install -y -qq dpkg-dev build-essential pkg-config libssl-dev libffi-dev zlib1g-dev \
        libbz2-dev liblzma-dev libsqlite3-dev libncurses-dev libreadline-dev uuid-dev libgdbm-dev \
        libexpat1-dev

    work="$cache/build"
    rm -rf "$work"; mkdir -p "$work"
    # The newest version listed may not be downloadable from the mirror: try newest first.
    got=""
    for v in $(apt-cache showsrc "python$series" | awk '/^Version:/ {print $2}' | sort -rV | uniq); do
        if ( cd "$work" && apt-get source --download-only "python$series=$v" ); then
            got=$v; break
        fi
        rm -f "$work"/python"$series"_*
    done
    [ -n "$got" ] || { echo "no python$series source package could be downloaded"; exit 1; }
    echo "building python$series $got"
    orig=$(ls "$work"/python"$series"_*.orig.tar.* | head -n 1)
    mkdir -p "$work/src"
    tar -xf "$orig" -C "$work/src" --strip-components=1
    cd "$work/src"
    ./configure --prefix="$prefix" --enable-shared --without-ensurepip \
        LDFLAGS="-Wl,-rpath,$prefix/lib"
    make -j"$(nproc)"
    make install
    ln -sf "python$series" "$prefix/bin/python3"
    cd /
    rm -rf "$work"
}

mkdir -p "$cache"
say "no CPython >= 3.12 with a shared libpython found: building CPython $series into $prefix once; this takes minutes (log: $build_log)"
# errexit is off inside a command tested by if/||, so the subshell runs on its own
set +e
( set -e; build_python ) >"$build_log" 2>&1
status=$?
set -e
if [ "$status" != 0 ] || ! usable "$prefix/bin/python3"; then
    # CI shows no files afterwards: there the log's end comes along
    [ -z "${CI:-}" ] || tail -n 40 "$build_log" >&2
    fail "building CPython $series failed; see $build_log"
fi
found "$prefix/bin/python3" "pyport's own build of CPython $series in $cache (built now)"

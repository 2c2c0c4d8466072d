#!/usr/bin/env bash
# Builds an application's virtualenv from its requirements, for pyport's runtimes:
#   app-venv.sh APP_DIR
# APP_DIR/priv/python/requirements.txt (pip's format) -> APP_DIR/priv/python/.venv,
# made with the Python the port program links (the one pyport's build recorded in
# priv/pyport.build, see build-port.sh). The rebar3 plugin (rebar3_pyport, `{pyport,
# venv}') and the Mix compiler (`:pyport') run it after each compile of the app.
#
# The venv is made once per content of the requirements file and that Python: the
# stamp .venv/pyport.stamp holds their digest, and while it matches this script does
# nothing (no pip, no network). Otherwise the venv is made afresh; a package that fails
# to install fails this script with pip's own message, and leaves no stamp, so the next
# compile tries again. No requirements file: no venv.
set -euo pipefail
fail() { echo "pyport: $*" >&2; exit 1; }
[ $# -eq 1 ] || fail "usage: app-venv.sh APP_DIR"
app=$(cd "$1" && pwd)
pyport=$(cd "$(dirname "$0")/.." && pwd)
requirements="$app/priv/python/requirements.txt"
venv="$app/priv/python/.venv"
# pyport compiles once as a dependency, the app at every compile: the copy of Python a
# release carries (PYPORT_BUNDLE_PYTHON) follows the variable from here
"$pyport/scripts/build-port.sh" --bundle
[ -f "$requirements" ] || exit 0

python=$("$pyport/scripts/build-port.sh" --python) || exit 1
version=$("$python" -c 'import sys; print(sys.version)')
stamp=$( { cat "$requirements"; printf '\n%s\n%s\n' "$python" "$version"; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/pyport.stamp" 2>/dev/null || true)" = "$stamp" ]; then
    exit 0
fi

echo "pyport: making $venv for $requirements (Python $python)" >&2
rm -rf "$venv"
"$python" -m venv "$venv" || fail "$python -m venv $venv failed (see above)"
# pip runs in the app's priv/python, so a relative path in the file (./mypkg) means
# one beside it
(cd "$app/priv/python" && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
     -r "$requirements") \
    || fail "pip could not install $requirements (pip's message above); the app's venv is not made"
echo "$stamp" > "$venv/pyport.stamp"

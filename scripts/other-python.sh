#!/usr/bin/env bash
# Prints a CPython >= 3.12 with a shared libpython whose minor version differs from
# that of $1 (the Python `make test` uses), found on the PATH or under pyenv; prints
# nothing when the machine has none. `make test` runs the Common Test suites once more
# on it, so each supported series is tried where it is installed.
set -uo pipefail
main_minor=$("$1" -c 'import sys; print(sys.version_info[1])')
for py in python3.14 python3.13 python3.12 \
          $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
    found=$(command -v "$py" 2>/dev/null) || continue
    "$found" - "$main_minor" <<'PY' 2>/dev/null && { echo "$found"; exit 0; }
import sys, sysconfig
v = sys.version_info
ok = v >= (3, 12) and v[1] != int(sys.argv[1]) and sysconfig.get_config_var("Py_ENABLE_SHARED") == 1
sys.exit(0 if ok else 1)
PY
done
exit 0

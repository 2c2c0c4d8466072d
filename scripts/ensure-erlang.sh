#!/usr/bin/env bash
# Installs Erlang/OTP, rebar3, Common Test, PropEr (the property model of
# test/pyport_model_SUITE) and Elixir (for the Mix and Elixir tests) from Debian's
# packages when absent.
set -euo pipefail
need=()
command -v erl >/dev/null 2>&1 || need+=(erlang-base erlang-dev erlang-eunit erlang-tools erlang-syntax-tools erlang-dialyzer)
command -v rebar3 >/dev/null 2>&1 || need+=(rebar3)
command -v mix >/dev/null 2>&1 || need+=(elixir)
if command -v erl >/dev/null 2>&1; then
    erl -noshell -eval 'case code:lib_dir(common_test) of {error, _} -> halt(1); _ -> halt(0) end.' \
        || need+=(erlang-common-test)
else
    need+=(erlang-common-test)
fi
if command -v erl >/dev/null 2>&1; then
    erl -noshell -eval 'case code:lib_dir(proper) of {error, _} -> halt(1); _ -> halt(0) end.' \
        || need+=(erlang-proper)
else
    need+=(erlang-proper)
fi
[ ${#need[@]} -eq 0 ] && exit 0
echo "ensure-erlang: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq "${need[@]}" >&2

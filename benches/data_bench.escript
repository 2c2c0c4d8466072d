#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Big numpy arrays through pyport (issue 19), in a `main' context (numpy does not
%% import in owngil sub-interpreters), against a 16 MiB binary echo measured in the
%% same run:
%%   - a 64 MiB float64 array returned with `arrays => binary' (MB/s of array bytes)
%%   - the same array sent in as `{ndarray, <<"float64">>, [N], Data}' (MB/s)
%%   - their list forms (the default): returned as a list of floats, sent in as one
%%   - the ratios to the echo's MB/s (10^6 bytes of payload per second of round trip),
%%     the target being 0.8 or more for the binary form
%% Each figure is the median of 5 rounds. numpy comes from the venv the data suite
%% makes (_build/pyport_data_venv/...), made here if it is missing.
%%
%%   escript benches/data_bench.escript
-mode(compile).
-include("bench.hrl").

-define(ARRAY_BYTES, 64 * 1024 * 1024).
-define(ECHO_BYTES, 16 * 1024 * 1024).
-define(ROUNDS, 5).

-define(HELPERS, <<"
import numpy as np

def identity(x):
    return x

ARRAY = np.random.default_rng(1).random(64 * 1024 * 1024 // 8)

def array():
    return ARRAY

def length(a):
    return len(a)
">>).

main(_) ->
    _ = start_pyport(),
    Venv = numpy_venv(),
    {ok, Pid} = pyport:start_runtime(#{venv => Venv,
                                       contexts => [#{name => a, mode => main,
                                                      preload => ?HELPERS}]}),
    {ok, Ctx} = pyport:context(Pid, a),
    Echo = echo(Ctx),
    Out = rate(?ARRAY_BYTES, fun() -> array_out(Ctx, #{arrays => binary}) end),
    In = rate(?ARRAY_BYTES, fun() -> array_in(Ctx) end),
    ListOut = rate(?ARRAY_BYTES, fun() -> array_out(Ctx, #{}) end),
    ListIn = rate(?ARRAY_BYTES, fun() -> list_in(Ctx) end),
    ok = pyport:stop_runtime(Pid),
    io:format("~-48s~12s~12s~n", ["", "MB/s", "vs echo"]),
    Row = fun(Label, Rate) ->
              io:format("~-48s~12s~12s~n", [Label, fmt_int(Rate), fmt(Rate / Echo) ++ "x"])
          end,
    Row("16 MiB binary echo", Echo),
    Row("64 MiB float64 array out, arrays => binary", Out),
    Row("64 MiB float64 array in, {ndarray, ...}", In),
    Row("64 MiB float64 array out, as a list", ListOut),
    Row("64 MiB float64 array in, as a list", ListIn),
    halt(0).

%% The venv with numpy (the data suite's, for the Python under test).
numpy_venv() ->
    Python = case os:getenv("PYPORT_PYTHON") of
                 false -> string:trim(os:cmd(filename:join([bench_root(), "scripts",
                                                            "ensure-python.sh"])));
                 P -> P
             end,
    Tag = re:replace(Python, "[^A-Za-z0-9.]+", "_", [global, {return, list}]),
    Venv = filename:join([bench_root(), "_build", "pyport_data_venv", Tag]),
    Py = filename:join([Venv, "bin", "python"]),
    case os:cmd(Py ++ " -c 'import numpy' 2>&1 && echo ok") of
        "ok\n" ->
            ok;
        _ ->
            _ = os:cmd(Python ++ " -m venv --clear " ++ Venv ++ " && " ++ Py
                       ++ " -m pip install -q numpy"),
            "ok\n" = os:cmd(Py ++ " -c 'import numpy' 2>&1 && echo ok")
    end,
    Venv.

%% MB/s of a 16 MiB binary echo (median of rounds).
echo(Ctx) ->
    Bin = rand:bytes(?ECHO_BYTES),
    rate(?ECHO_BYTES, fun() -> {ok, Bin} = pyport:call(Ctx, '__main__', identity, [Bin]) end).

array_out(Ctx, Opts) ->
    {ok, _} = pyport:call(Ctx, '__main__', array, [], #{}, Opts).

array_in(Ctx) ->
    Term = case get(array_term) of
               undefined ->
                   {ok, T} = pyport:call(Ctx, '__main__', array, [], #{}, #{arrays => binary}),
                   put(array_term, T),
                   T;
               T ->
                   T
           end,
    N = ?ARRAY_BYTES div 8,
    {ok, N} = pyport:call(Ctx, '__main__', length, [Term]).

list_in(Ctx) ->
    List = case get(array_list) of
               undefined ->
                   {ok, L} = pyport:call(Ctx, '__main__', array, []),
                   put(array_list, L),
                   L;
               L -> L
           end,
    N = ?ARRAY_BYTES div 8,
    {ok, N} = pyport:call(Ctx, '__main__', length, [List]).

%% MB/s of Bytes moved by Fun (one warm-up, then the median of rounds).
rate(Bytes, Fun) ->
    _ = Fun(),
    median([begin
                {Us, _} = timer:tc(Fun),
                Bytes / Us
            end || _ <- lists:seq(1, ?ROUNDS)]).

fmt(X) -> float_to_list(float(X), [{decimals, 2}]).

fmt_int(X) -> integer_to_list(round(X)).

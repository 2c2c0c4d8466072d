#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Memory of one runtime (the VmRSS of its OS process, from /proc/<os_pid>/status),
%% for `owngil' and `main' contexts:
%%   - idle: RSS of a runtime with 1 context, then with ?IDLE more idle contexts;
%%     printed as MiB per idle context
%%   - kept: RSS growth over ?CYCLES new_context/stop_context cycles, after ?WARMUP
%%     cycles of warm-up; printed as MiB kept per ended context
%% ?CYCLES is 150, or MEMORY_CYCLES when set (under ~100 the mimalloc figure is noisy:
%% ended interpreters leave partly used segments that the next ones fill). The idle and
%% the kept figures come from two fresh runtimes, ?ROUNDS times; the median and the
%% range are printed. The port program is PYPORT_EXECUTABLE (else the build's
%% priv/pyport); PYPORT_PYTHON, when set, is passed to it as PYPORT_PYTHON_EXECUTABLE
%% and must be the Python whose libpython it was built against. On Python 3.13+ pyport
%% runs with PYTHONMALLOC=mimalloc, on 3.12 with pymalloc: the output says which.
%% Run `make build' first.
-mode(compile).
-include("bench.hrl").

-define(ROUNDS, 3).
-define(IDLE, 8).
-define(WARMUP, 10).
-define(CYCLES, cycles()).

main(_Args) ->
    Exe = start_pyport(),
    Env = case os:getenv("PYPORT_PYTHON") of
              Py when is_list(Py), Py =/= "" -> [{"PYPORT_PYTHON_EXECUTABLE", Py}];
              _ -> []
          end,
    {Version, Malloc} = describe(Env),
    io:format("port program ~s~nPython ~s, PYTHONMALLOC=~s~n", [Exe, Version, Malloc]),
    Rows = [{Mode, [measure(Mode, Env) || _ <- lists:seq(1, ?ROUNDS)]}
            || Mode <- [owngil, main]],
    io:format("~n~-8s ~-22s ~-26s ~-26s~n",
              ["mode", "base MiB", "MiB per idle context", "MiB kept per ended one"]),
    [io:format("~-8s ~-22s ~-26s ~-26s~n",
               [Mode, fmt([B || {B, _, _} <- Rs]), fmt([I || {_, I, _} <- Rs]),
                fmt([K || {_, _, K} <- Rs])])
     || {Mode, Rs} <- Rows],
    io:format("(VmRSS of the port process; median [min-max] of ~b rounds; base: "
              "1 context; idle: ~b more contexts; kept: ~b cycles after ~b of warm-up)~n",
              [?ROUNDS, ?IDLE, ?CYCLES, ?WARMUP]),
    halt(0).

%% The embedded Python's version and allocator.
describe(Env) ->
    Rt = start_runtime(owngil, Env),
    {ok, #{python_version := V}} = pyport:info(Rt),
    {ok, Ctx} = pyport:context(Rt, c0),
    {ok, M} = pyport:eval(Ctx, <<"__import__('os').environ.get('PYTHONMALLOC', 'pymalloc (default)')">>),
    ok = pyport:stop_runtime(Rt),
    {V, M}.

%% {base MiB, MiB per idle context, MiB kept per ended context}, on two fresh runtimes:
%% the memory freed by ended contexts is reused by the next ones, so the two
%% measurements would hide each other in one runtime.
measure(Mode, Env) ->
    Rt = start_runtime(Mode, Env),
    OsPid = os_pid(Rt),
    Base = settled_rss(OsPid),
    _Idle = [begin
                 {ok, C} = pyport:new_context(Rt, #{mode => Mode}),
                 {ok, 1} = pyport:eval(C, <<"1">>),
                 C
             end || _ <- lists:seq(1, ?IDLE)],
    WithIdle = settled_rss(OsPid),
    ok = pyport:stop_runtime(Rt),
    Rt2 = start_runtime(Mode, Env),
    OsPid2 = os_pid(Rt2),
    cycles(Rt2, Mode, ?WARMUP),
    Before = settled_rss(OsPid2),
    cycles(Rt2, Mode, ?CYCLES),
    After = settled_rss(OsPid2),
    ok = pyport:stop_runtime(Rt2),
    {mib(Base), mib(WithIdle - Base) / ?IDLE, mib(After - Before) / ?CYCLES}.

os_pid(Rt) ->
    {ok, #{os_pid := OsPid}} = pyport:info(Rt),
    OsPid.

start_runtime(Mode, Env) ->
    case pyport:start_runtime(#{env => Env, contexts => [#{name => c0, mode => Mode}]}) of
        {ok, Rt} ->
            {ok, C} = pyport:context(Rt, c0),
            {ok, 1} = pyport:eval(C, <<"1">>),
            Rt;
        {error, Reason} ->
            io:format("runtime did not start: ~p~n", [Reason]),
            halt(1)
    end.

cycles() ->
    case os:getenv("MEMORY_CYCLES") of
        N when is_list(N), N =/= "" -> list_to_integer(N);
        _ -> 150
    end.

cycles(Rt, Mode, N) ->
    [begin
         {ok, C} = pyport:new_context(Rt, #{mode => Mode}),
         {ok, 1} = pyport:eval(C, <<"1">>),
         ok = pyport:stop_context(C)
     end || _ <- lists:seq(1, N)],
    ok.

%% VmRSS in KiB once it stops moving (ended interpreters and the spare owngil thread
%% are handled asynchronously): three equal readings 200 ms apart, at most ~6 s.
settled_rss(OsPid) ->
    settled_rss(OsPid, rss(OsPid), 0, 30).

settled_rss(_OsPid, Kb, _Same, 0) ->
    Kb;
settled_rss(_OsPid, Kb, 2, _Left) ->
    Kb;
settled_rss(OsPid, Kb, Same, Left) ->
    timer:sleep(200),
    case rss(OsPid) of
        Kb -> settled_rss(OsPid, Kb, Same + 1, Left - 1);
        New -> settled_rss(OsPid, New, 0, Left - 1)
    end.

rss(OsPid) ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    {match, [Kb]} = re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, binary}]),
    binary_to_integer(Kb).

mib(Kb) ->
    Kb / 1024.

fmt(Xs) ->
    lists:flatten(io_lib:format("~.2f [~.2f-~.2f]", [median(Xs), lists:min(Xs), lists:max(Xs)])).

#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Pools (pyport_pool) of 1 and 2 members, in `main' and `owngil' mode, in one run:
%%   - calls/s of operator.add(1, 2) with 50 callers (50k calls)
%%   - CPU speedup: two pure-Python loops at once against one, on the pool
%%   - the control: the same loop in one, then two plain CPython processes at once
%% Each measurement is taken ?ROUNDS times, the configurations alternated round by
%% round, and the median is printed. Run `make build' first; `make bench' runs it.
-mode(compile).
-include("bench.hrl").

-define(ROUNDS, 5).
-define(CALLERS, 50).
-define(CALLS, 50000).
-define(SPIN, 2000000).
-define(HELPERS, <<"
def spin(n):
    x = 0
    for i in range(n):
        x += i
    return x
">>).

main(_Args) ->
    _ = start_pyport(),
    Configs = [{Mode, Size} || Mode <- [main, owngil], Size <- [1, 2]],
    Pools = [{C, start(C)} || C <- Configs],
    Python = embedded_python(element(2, hd(Pools))),
    Rounds = [[{C, calls_per_s(P), speedup(P)} || {C, P} <- Pools]
              ++ [{control, none, control_speedup(Python)}]
              || _ <- lists:seq(1, ?ROUNDS)],
    io:format("~-20s ~12s ~14s~n", ["pool", "calls/s", "CPU speedup"]),
    [begin
         Row = [R || Round <- Rounds, {C, _, _} = R <- Round, C =:= Config],
         io:format("~-20s ~12s ~14s~n",
                   [label(Config), fmt_rate(median([X || {_, X, _} <- Row])),
                    io_lib:format("~.2fx", [median([S || {_, _, S} <- Row])])])
     end || Config <- Configs ++ [control]],
    io:format("(median of ~b rounds; the CPU speedup is 2 x the time of one ~b-iteration "
              "loop over the time of two at once)~n", [?ROUNDS, ?SPIN]),
    [ok = pyport:stop_pool(P) || {_, P} <- Pools],
    halt(0).

start({Mode, Size} = C) ->
    Name = list_to_atom(lists:flatten(io_lib:format("bench_~s_~b", [Mode, Size]))),
    case pyport:start_pool(Name, #{mode => Mode, size => Size, preload => ?HELPERS}) of
        {ok, Pool} -> Pool;
        {error, Reason} -> io:format("pool ~p did not start: ~p~n", [C, Reason]), halt(1)
    end.

label(control) -> "CPython x1/x2";
label({Mode, Size}) -> io_lib:format("~s, ~b member~s", [Mode, Size, [$s || Size > 1]]).

embedded_python(Pool) ->
    {ok, Py} = pyport:eval(Pool, <<"__import__('sysconfig').get_config_var('BINDIR') + '/python3'">>),
    binary_to_list(Py).

calls_per_s(Pool) ->
    Per = ?CALLS div ?CALLERS,
    T = timed(fun() ->
                  parallel(?CALLERS, fun() ->
                                         [{ok, 3} = pyport:call(Pool, operator, add, [1, 2])
                                          || _ <- lists:seq(1, Per)]
                                     end)
              end),
    ?CALLS * 1000000 / T.

speedup(Pool) ->
    Spin = fun() -> {ok, _} = pyport:call(Pool, '__main__', spin, [?SPIN]) end,
    One = timed(Spin),
    Two = timed(fun() -> parallel(2, Spin) end),
    2 * One / Two.

control_speedup(Python) ->
    Code = "x=0\nfor i in range(" ++ integer_to_list(?SPIN) ++ "):\n    x+=i\n",
    Run = fun() ->
              Port = open_port({spawn_executable, Python}, [{args, ["-c", Code]}, exit_status]),
              receive {Port, {exit_status, 0}} -> ok end
          end,
    One = timed(Run),
    Two = timed(fun() -> parallel(2, Run) end),
    2 * One / Two.

timed(Fun) ->
    T0 = erlang:monotonic_time(microsecond),
    _ = Fun(),
    erlang:monotonic_time(microsecond) - T0.

parallel(K, Fun) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Fun(), Self ! {done, self()} end) || _ <- lists:seq(1, K)],
    [receive {done, P} -> ok end || P <- Pids].

fmt_rate(none) ->
    "-";
fmt_rate(X) ->
    integer_to_list(round(X)).

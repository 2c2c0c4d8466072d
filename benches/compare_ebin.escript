#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Before/after for the Erlang side of the plain call: two builds of pyport's beams, A
%% (the new ebin folder) and B (the baseline's), over the same port program, measured
%% in turn in ONE run, round after round (A B A B ...), each measurement in a fresh VM
%% (two versions of a module cannot share one), with the ratio A/B taken pair by pair
%% and its median reported, since this host's speed drifts. Per round and build:
%%   - latency: median of 5,000 sequential operator.add(1, 2) calls, one caller;
%%   - throughput: calls/s of 50 callers over 2 contexts (50,000 calls).
%% With benches/standin.c's binary as the port program (`make bench' builds it into
%% _build/bench/standin), Python and Rust drop out and only the Erlang side is timed.
%%
%%   escript benches/compare_ebin.escript NEW_EBIN OLD_EBIN PORT_BINARY [ROUNDS]
%% (an old tree's beams: `git worktree add --detach DIR REV && make -C DIR erl', then
%% DIR/_build/default/lib/pyport/ebin)
-mode(compile).

-define(LATENCY_CALLS, 5000).
-define(CALLERS, 50).
-define(THROUGHPUT_CALLS, 50000).

main(["measure", Ebin, Exe]) ->
    measure(Ebin, Exe);
main([New, Old, Exe]) ->
    main([New, Old, Exe, "7"]);
main([New, Old, Exe, Rounds]) ->
    Pairs = [{run(New, Exe), run(Old, Exe)} || _ <- lists:seq(1, list_to_integer(Rounds))],
    report(Pairs),
    halt(0);
main(_) ->
    io:format("usage: compare_ebin.escript NEW_EBIN OLD_EBIN PORT_BINARY [ROUNDS]~n"),
    halt(2).

%% One measurement in a VM of its own.
run(Ebin, Exe) ->
    Out = os:cmd(lists:join(" ", ["escript", escript:script_name(), "measure",
                                  filename:absname(Ebin), filename:absname(Exe)])),
    case io_lib:fread("~f ~f", Out) of
        {ok, [Latency, Rate], _} -> #{latency_us => Latency, calls_per_s => Rate};
        _ -> io:format(standard_error, "measurement failed: ~s~n", [Out]), halt(1)
    end.

measure(Ebin, Exe) ->
    true = code:add_patha(Ebin),
    ok = application:load(pyport),
    ok = application:set_env(pyport, default_runtime, false),
    {ok, _} = application:ensure_all_started(pyport),
    ok = logger:set_primary_config(level, error),
    {ok, Rt} = pyport:start_runtime(#{executable => Exe,
                                      contexts => [#{name => a}, #{name => b}]}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    [{ok, 3} = pyport:call(A, operator, add, [1, 2]) || _ <- lists:seq(1, 1000)],
    Times = [begin
                 T0 = erlang:monotonic_time(nanosecond),
                 {ok, 3} = pyport:call(A, operator, add, [1, 2]),
                 erlang:monotonic_time(nanosecond) - T0
             end || _ <- lists:seq(1, ?LATENCY_CALLS)],
    Per = ?THROUGHPUT_CALLS div ?CALLERS,
    Self = self(),
    T0 = erlang:monotonic_time(nanosecond),
    Pids = [spawn_link(fun() ->
                           Ctx = lists:nth(I rem 2 + 1, [A, B]),
                           [{ok, 3} = pyport:call(Ctx, operator, add, [1, 2])
                            || _ <- lists:seq(1, Per)],
                           Self ! {done, self()}
                       end) || I <- lists:seq(1, ?CALLERS)],
    [receive {done, P} -> ok end || P <- Pids],
    Rate = Per * ?CALLERS / ((erlang:monotonic_time(nanosecond) - T0) / 1.0e9),
    ok = pyport:stop_runtime(Rt),
    io:format("~.3f ~.1f~n", [median(Times) / 1000, Rate]),
    halt(0).

report(Pairs) ->
    io:format("~-14s ~12s ~12s ~14s~n", ["", "new (median)", "old (median)",
                                          "new/old pairs"]),
    lists:foreach(
      fun(Key) ->
              News = [maps:get(Key, N) || {N, _} <- Pairs],
              Olds = [maps:get(Key, O) || {_, O} <- Pairs],
              Ratios = [N / O || {N, O} <- lists:zip(News, Olds)],
              io:format("~-14s ~12.2f ~12.2f ~8.3f (~.2f-~.2f)~n",
                        [Key, median(News), median(Olds), median(Ratios),
                         lists:min(Ratios), lists:max(Ratios)])
      end, [latency_us, calls_per_s]),
    io:format("~p rounds, alternated; latency lower is better, calls/s higher.~n",
              [length(Pairs)]).

median(Xs) ->
    lists:nth((length(Xs) + 1) div 2, lists:sort(Xs)).

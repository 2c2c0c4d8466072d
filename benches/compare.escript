#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Before/after for the plain call: two pyport port binaries, A (the new one) and B
%% (the baseline), measured in turn in ONE run, round after round (A B A B ...), with
%% the ratio A/B taken pair by pair and its median reported, since this host's speed
%% drifts by 2x between runs. Per round and binary, on an `owngil' runtime:
%%   - latency: median of 5,000 sequential operator.add(1, 2) calls, one caller;
%%   - throughput: calls/s of 50 callers over 2 contexts (50,000 calls);
%%   - CPU speedup: a CPU-bound call on 2 contexts at once vs on 1;
%%   - latency again on a context whose asyncio loop exists (it ran a coroutine).
%%
%%   escript benches/compare.escript NEW_BINARY OLD_BINARY [ROUNDS]
%% (`make bench-compare OLD=path/to/old/pyport' builds priv/pyport and runs it.)
-mode(compile).
-include("bench.hrl").

-define(LATENCY_CALLS, 5000).
-define(CALLERS, 50).
-define(THROUGHPUT_CALLS, 50000).
-define(CPU_N, 2000000).

main([New, Old]) ->
    main([New, Old, "7"]);
main([New, Old, Rounds]) ->
    _ = start_pyport(),
    Pairs = [round_pair(New, Old) || _ <- lists:seq(1, list_to_integer(Rounds))],
    report(Pairs),
    halt(0);
main(_) ->
    io:format("usage: compare.escript NEW_BINARY OLD_BINARY [ROUNDS]~n"),
    halt(2).

round_pair(New, Old) ->
    {measure(New), measure(Old)}.

measure(Exe) ->
    {ok, Rt} = pyport:start_runtime(#{executable => Exe,
                                      contexts => [#{name => a}, #{name => b}]}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    ok = pyport:exec(A, work_code()),
    ok = pyport:exec(B, work_code()),
    Latency = latency(A),
    Throughput = throughput([A, B]),
    Speedup = speedup(A, B),
    %% the same context once it has run a coroutine (its event loop exists)
    {ok, 1} = pyport:call(B, '__main__', coro, []),
    LoopLatency = latency(B),
    ok = pyport:stop_runtime(Rt),
    #{latency_us => Latency, calls_per_s => Throughput, speedup => Speedup,
      latency_with_loop_us => LoopLatency}.

work_code() ->
    <<"def work(n):\n    t = 0\n    for i in range(n):\n        t += i * i\n    return t\n"
      "async def coro():\n    return 1\n">>.

latency(Ctx) ->
    [{ok, 3} = pyport:call(Ctx, operator, add, [1, 2]) || _ <- lists:seq(1, 1000)],
    Times = [begin
                 T0 = erlang:monotonic_time(nanosecond),
                 {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
                 erlang:monotonic_time(nanosecond) - T0
             end || _ <- lists:seq(1, ?LATENCY_CALLS)],
    median(Times) / 1000.

throughput(Ctxs) ->
    Per = ?THROUGHPUT_CALLS div ?CALLERS,
    Self = self(),
    T0 = erlang:monotonic_time(nanosecond),
    Pids = [spawn_link(fun() ->
                           Ctx = lists:nth(I rem length(Ctxs) + 1, Ctxs),
                           [{ok, 3} = pyport:call(Ctx, operator, add, [1, 2])
                            || _ <- lists:seq(1, Per)],
                           Self ! {done, self()}
                       end) || I <- lists:seq(1, ?CALLERS)],
    [receive {done, P} -> ok end || P <- Pids],
    Per * ?CALLERS / ((erlang:monotonic_time(nanosecond) - T0) / 1.0e9).

speedup(A, B) ->
    One = timed(fun() -> {ok, _} = pyport:call(A, '__main__', work, [?CPU_N]) end),
    Self = self(),
    Two = timed(fun() ->
                    [spawn_link(fun() ->
                                    {ok, _} = pyport:call(C, '__main__', work, [?CPU_N]),
                                    Self ! done
                                end) || C <- [A, B]],
                    [receive done -> ok end || _ <- [1, 2]]
                end),
    2 * One / Two.

timed(Fun) ->
    T0 = erlang:monotonic_time(nanosecond),
    Fun(),
    erlang:monotonic_time(nanosecond) - T0.

report(Pairs) ->
    io:format("~-22s ~12s ~12s ~14s~n", ["", "new (median)", "old (median)",
                                          "new/old pairs"]),
    lists:foreach(
      fun(Key) ->
              News = [maps:get(Key, N) || {N, _} <- Pairs],
              Olds = [maps:get(Key, O) || {_, O} <- Pairs],
              Ratios = [N / O || {N, O} <- lists:zip(News, Olds)],
              io:format("~-22s ~12.2f ~12.2f ~8.2f (~.2f-~.2f)~n",
                        [Key, median(News), median(Olds), median(Ratios),
                         lists:min(Ratios), lists:max(Ratios)])
      end, [latency_us, latency_with_loop_us, calls_per_s, speedup]),
    io:format("~p rounds, alternated; latency lower is better, the others higher.~n",
              [length(Pairs)]).

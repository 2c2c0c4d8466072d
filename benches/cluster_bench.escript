#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% pyport across nodes, with a peer node of this machine (OTP's `peer'), in one run:
%%   - latency of operator.add(1, 2) on a context here, and on a context of the peer
%%     (the request and its reply cross the distribution), one caller, alternated
%%   - calls/s with 50 callers of a pool of 2 main members here, against a pool of one
%%     main member here and one on the peer (nodes => [here, peer])
%% Medians of ?ROUNDS rounds. Both nodes share this machine's cores, so the 2-node pool
%% shows the cost of the hop, not more cores. Run `make build' first.
-mode(compile).
-include("bench.hrl").

-define(ROUNDS, 5).
-define(LATENCY_CALLS, 2000).
-define(CALLERS, 50).
-define(CALLS, 20000).

main(_Args) ->
    _ = os:cmd("epmd -daemon"),
    {ok, _} = net_kernel:start(pyport_bench, #{name_domain => shortnames}),
    _ = start_pyport(),
    Ebin = pyport_ebin(),
    {ok, Peer, Node} = peer:start_link(#{name => peer:random_name(), args => ["-pa", Ebin]}),
    ok = erpc:call(Node, application, load, [pyport]),
    ok = erpc:call(Node, application, set_env, [pyport, default_runtime, false]),
    {ok, _} = erpc:call(Node, application, ensure_all_started, [pyport]),
    ok = erpc:call(Node, logger, set_primary_config, [level, error]),
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, Local} = pyport:context(Rt, a),
    {ok, RemoteRt} = erpc:call(Node, pyport, start_runtime, [#{contexts => [#{name => a}]}]),
    {ok, Remote} = pyport:context(RemoteRt, a),
    {ok, Here} = pyport:start_pool(bench_here, #{size => 2, mode => main}),
    {ok, Spread} = pyport:start_pool(bench_spread, #{nodes => [node(), Node], size => 1,
                                                    mode => main}),
    Rounds = [{latency(Local), latency(Remote), rate(Here), rate(Spread)}
              || _ <- lists:seq(1, ?ROUNDS)],
    Med = fun(I) -> median([element(I, R) || R <- Rounds]) end,
    io:format("call latency, context here        ~8.1f us~n", [Med(1)]),
    io:format("call latency, context on the peer ~8.1f us  (~.2fx)~n", [Med(2), Med(2) / Med(1)]),
    io:format("pool of 2 here, calls/s           ~8b~n", [round(Med(3))]),
    io:format("pool here + peer, calls/s         ~8b  (~.2fx)~n", [round(Med(4)), Med(4) / Med(3)]),
    io:format("(median of ~b rounds; latency: median of ~b calls each)~n",
              [?ROUNDS, ?LATENCY_CALLS]),
    ok = pyport:stop_pool(Spread),
    ok = pyport:stop_pool(Here),
    peer:stop(Peer),
    halt(0).

latency(Ctx) ->
    Times = [begin
                 T0 = erlang:monotonic_time(nanosecond),
                 {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
                 erlang:monotonic_time(nanosecond) - T0
             end || _ <- lists:seq(1, ?LATENCY_CALLS)],
    median(Times) / 1000.

rate(Pool) ->
    Per = ?CALLS div ?CALLERS,
    Self = self(),
    T0 = erlang:monotonic_time(microsecond),
    Pids = [spawn_link(fun() ->
                           [{ok, 3} = pyport:call(Pool, operator, add, [1, 2])
                            || _ <- lists:seq(1, Per)],
                           Self ! {done, self()}
                       end) || _ <- lists:seq(1, ?CALLERS)],
    [receive {done, P} -> ok end || P <- Pids],
    ?CALLS * 1000000 / (erlang:monotonic_time(microsecond) - T0).

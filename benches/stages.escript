#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% The plain call, stage by stage, in one run (`make bench' builds the C echo):
%%   bare   a C {packet,4} echo spinning on stdin (benches/echo.c), port owned by the
%%          caller: the floor of any port round trip on this host
%%   relay  the same echo, port owned by another process that forwards each reply to
%%          the caller's monitor alias (what a safe port owner costs at least)
%%   raw    the pyport binary driven straight from the caller with raw request frames
%%          (docs/protocol.md), operator.add(1, 2) on an owngil context
%%   facade pyport:call(Ctx, operator, add, [1, 2]) through the facade and port owner
%%   stand-in  pyport:call/4 over benches/standin.c, which answers every request at
%%          once: the Erlang side's own floor (no Python, no Rust)
%% then calls/s of 50 callers (relay over one echo, pyport over 2 contexts, pyport over
%% the stand-in), and a 16 MiB binary echoed by the relay and by pyport (identity).
%% Each stage runs in its own OS process, opened for it and closed after; stages are
%% alternated round by round, ?ROUNDS rounds; medians of the rounds' medians.
%%
%%   escript benches/stages.escript ECHO_BINARY STANDIN_BINARY [ROUNDS [OLD_PYPORT]]
%% With OLD_PYPORT (another build of the port program), its raw and facade stages run
%% in the same rounds too, for a before/after of the Rust side.
-mode(compile).
-include("bench.hrl").

-define(ROUNDS, 7).
-define(CALLS, 5000).
-define(WARMUP, 500).
-define(CALLERS, 50).
-define(RATE_CALLS, 50000).
-define(BIG, 16 * 1024 * 1024).
-define(BIG_ROUNDS, 3).

main([Echo, Standin]) ->
    main([Echo, Standin, integer_to_list(?ROUNDS)]);
main([Echo, Standin, Rounds]) ->
    main([Echo, Standin, Rounds, none]);
main([Echo, Standin, Rounds, Old]) ->
    Exe = start_pyport(),
    Results = [maps:merge(one_round(Echo, Exe), standin_round(Standin, old_round(Old)))
               || _ <- lists:seq(1, list_to_integer(Rounds))],
    report(Results),
    report_old(Old, Results),
    halt(0);
main(_) ->
    io:format("usage: stages.escript ECHO_BINARY STANDIN_BINARY [ROUNDS [OLD_PYPORT]]~n"),
    halt(2).

one_round(Echo, Exe) ->
    #{bare => with_echo(Echo, fun(Port) -> latency(fun() -> bare_call(Port) end) end),
      relay => with_relay(Echo, fun(Relay) -> latency(fun() -> relay_call(Relay, <<"x">>) end) end),
      raw => with_raw(Exe, fun(Port) -> latency(fun() -> raw_call(Port) end) end),
      facade => with_runtime(Exe, fun([Ctx | _]) -> latency(fun() -> facade_call(Ctx) end) end),
      relay_rate => with_relay(Echo, fun(Relay) ->
                                          rate(fun(_) -> relay_call(Relay, <<"x">>) end)
                                      end),
      facade_rate => with_runtime(Exe, fun(Ctxs) ->
                                            rate(fun(I) ->
                                                     facade_call(lists:nth(I rem 2 + 1, Ctxs))
                                                 end)
                                        end),
      relay_big => with_relay(Echo, fun(Relay) ->
                                        Big = big(),
                                        throughput(fun() -> relay_call(Relay, Big) end)
                                    end),
      facade_big => with_runtime(Exe, fun([Ctx | _]) ->
                                          Big = big(),
                                          throughput(fun() ->
                                                         {ok, Big2} = pyport:call(Ctx, '__main__',
                                                                                  identity, [Big]),
                                                         ?BIG = byte_size(Big2)
                                                     end)
                                      end)}.

%% The facade over the stand-in: what the Erlang side costs by itself.
standin_round(Standin, Acc) ->
    Acc#{standin => with_runtime(Standin, fun([Ctx | _]) -> latency(fun() -> facade_call(Ctx) end) end,
                                 false),
         standin_rate => with_runtime(Standin,
                                      fun(Ctxs) ->
                                          rate(fun(I) -> facade_call(lists:nth(I rem 2 + 1, Ctxs)) end)
                                      end, false)}.

old_round(none) ->
    #{};
old_round(Old) ->
    #{old_raw => with_raw(Old, fun(Port) -> latency(fun() -> raw_call(Port) end) end),
      old_facade => with_runtime(Old, fun([Ctx | _]) -> latency(fun() -> facade_call(Ctx) end) end),
      old_facade_rate => with_runtime(Old, fun(Ctxs) ->
                                                rate(fun(I) ->
                                                         facade_call(lists:nth(I rem 2 + 1, Ctxs))
                                                     end)
                                            end)}.

report_old(none, _) ->
    ok;
report_old(Old, Results) ->
    M = fun(Key) -> median([maps:get(Key, R) || R <- Results]) end,
    Ratio = fun(A, B) -> median([maps:get(A, R) / maps:get(B, R) || R <- Results]) end,
    io:format("~nagainst ~s, same rounds (new/old: median of the rounds' ratios):~n", [Old]),
    io:format("~-44s ~10.1f -> ~.1f  ~.2fx~n", ["raw us/call", M(old_raw), M(raw),
                                                Ratio(raw, old_raw)]),
    io:format("~-44s ~10.1f -> ~.1f  ~.2fx~n", ["facade us/call", M(old_facade), M(facade),
                                                Ratio(facade, old_facade)]),
    io:format("~-44s ~10w -> ~w  ~.2fx~n", ["calls/s, 50 callers", round(M(old_facade_rate)),
                                            round(M(facade_rate)),
                                            Ratio(facade_rate, old_facade_rate)]).

big() ->
    binary:copy(<<"0123456789abcdef">>, ?BIG div 16).

%%% Stages

with_echo(Echo, Fun) ->
    Port = open_port({spawn_executable, Echo}, [{packet, 4}, binary, exit_status, use_stdio]),
    try Fun(Port) after port_close(Port) end.

bare_call(Port) ->
    true = erlang:port_command(Port, <<"x">>),
    receive {Port, {data, _}} -> ok end.

%% The relay: owns the echo, forwards each reply to the alias in its header.
with_relay(Echo, Fun) ->
    Self = self(),
    Relay = spawn_link(fun() ->
                           Port = open_port({spawn_executable, Echo},
                                            [{packet, 4}, binary, exit_status, use_stdio]),
                           Self ! {relay, self(), Port},
                           relay_loop(Port)
                       end),
    Port = receive {relay, Relay, P} -> P end,
    try Fun({Relay, Port}) after unlink(Relay), exit(Relay, kill) end.

relay_loop(Port) ->
    receive
        {Port, {data, <<HLen:16, H:HLen/binary, Payload/binary>>}} ->
            Alias = binary_to_term(H),
            Alias ! {Alias, Payload},
            relay_loop(Port)
    end.

relay_call({Relay, Port}, Payload) ->
    Mref = erlang:monitor(process, Relay, [{alias, reply_demonitor}]),
    H = term_to_binary(Mref),
    true = erlang:port_command(Port, [<<(byte_size(H)):16>>, H, Payload]),
    receive
        {Mref, _Reply} -> ok;
        {'DOWN', Mref, _, _, Reason} -> error(Reason)
    end.

%% pyport's binary driven by the caller itself: hello, one context, raw frames. Its
%% command line carries the default limits (the port program has none of its own).
with_raw(Exe, Fun) ->
    Args = pyport_opts:port_args(#{}, pyport_opts:max_atoms(#{})),
    Port = open_port({spawn_executable, Exe},
                     [{packet, 4}, binary, exit_status, use_stdio, {args, Args}]),
    try
        receive {Port, {data, <<1, _/binary>>}} -> ok end,
        H = term_to_binary(init),
        Body = term_to_binary({new_context, 1, #{mode => owngil}}),
        true = erlang:port_command(Port, [<<0:64, (byte_size(H)):16>>, H, Body]),
        ok = raw_reply(Port),
        Fun(Port)
    after
        port_close(Port)
    end.

raw_reply(Port) ->
    receive
        {Port, {data, <<0, HLen:16, _:HLen/binary, Payload/binary>>}} -> binary_to_term(Payload);
        {Port, {data, _Event}} -> raw_reply(Port)
    end.

-define(RAW_BODY, term_to_binary({call, <<"operator">>, <<"add">>, [1, 2], #{}, #{}})).

raw_call(Port) ->
    H = term_to_binary(make_ref()),
    true = erlang:port_command(Port, [<<1:64, (byte_size(H)):16>>, H, ?RAW_BODY]),
    {ok, 3} = raw_reply(Port),
    ok.

with_runtime(Exe, Fun) ->
    with_runtime(Exe, Fun, true).

with_runtime(Exe, Fun, Python) ->
    {ok, Rt} = pyport:start_runtime(#{executable => Exe,
                                      contexts => [#{name => a}, #{name => b}]}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    [ok = pyport:exec(C, <<"def identity(x):\n    return x\n">>) || C <- [A, B], Python],
    try Fun([A, B]) after pyport:stop_runtime(Rt) end.

facade_call(Ctx) ->
    {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
    ok.

%%% Measures

%% Median µs of ?CALLS calls after ?WARMUP.
latency(Call) ->
    [Call() || _ <- lists:seq(1, ?WARMUP)],
    Times = [begin
                 T0 = erlang:monotonic_time(nanosecond),
                 Call(),
                 erlang:monotonic_time(nanosecond) - T0
             end || _ <- lists:seq(1, ?CALLS)],
    median(Times) / 1000.

%% Calls/s of ?CALLERS processes, ?RATE_CALLS calls in all; Call(I) for caller I.
rate(Call) ->
    Per = ?RATE_CALLS div ?CALLERS,
    Self = self(),
    T0 = erlang:monotonic_time(nanosecond),
    Pids = [spawn_link(fun() ->
                           [Call(I) || _ <- lists:seq(1, Per)],
                           Self ! {done, self()}
                       end) || I <- lists:seq(1, ?CALLERS)],
    [receive {done, P} -> ok end || P <- Pids],
    Per * ?CALLERS / ((erlang:monotonic_time(nanosecond) - T0) / 1.0e9).

%% MB/s of ?BIG_ROUNDS echoes of ?BIG bytes (counted once each way).
throughput(Call) ->
    Call(),
    T0 = erlang:monotonic_time(nanosecond),
    [Call() || _ <- lists:seq(1, ?BIG_ROUNDS)],
    2 * ?BIG * ?BIG_ROUNDS / ((erlang:monotonic_time(nanosecond) - T0) / 1000).

%%% Report

report(Results) ->
    M = fun(Key) -> median([maps:get(Key, R) || R <- Results]) end,
    Ratio = fun(A, B) -> median([maps:get(A, R) / maps:get(B, R) || R <- Results]) end,
    io:format("~-44s ~10s ~s~n", ["stage (one caller, operator.add)", "us/call", "ratio"]),
    io:format("~-44s ~10.1f~n", ["bare: C echo, port owned by the caller", M(bare)]),
    io:format("~-44s ~10.1f ~.2fx bare~n", ["relay: C echo through an owner process", M(relay),
                                            Ratio(relay, bare)]),
    io:format("~-44s ~10.1f ~.2fx bare~n", ["raw: pyport binary, raw frames", M(raw),
                                            Ratio(raw, bare)]),
    io:format("~-44s ~10.1f ~.2fx relay~n", ["facade: pyport:call/4", M(facade),
                                             Ratio(facade, relay)]),
    io:format("~-44s ~10.1f ~.2fx relay~n", ["stand-in: pyport:call/4, nothing behind it",
                                             M(standin), Ratio(standin, relay)]),
    io:format("~-44s ~10w~n", ["calls/s, 50 callers, relay echo", round(M(relay_rate))]),
    io:format("~-44s ~10w ~.2fx relay~n", ["calls/s, 50 callers, pyport, 2 contexts",
                                             round(M(facade_rate)),
                                             Ratio(facade_rate, relay_rate)]),
    io:format("~-44s ~10w ~.2fx relay~n", ["calls/s, 50 callers, over the stand-in",
                                           round(M(standin_rate)),
                                           Ratio(standin_rate, relay_rate)]),
    io:format("~-44s ~10w~n", ["16 MiB echo MB/s, relay C echo", round(M(relay_big))]),
    io:format("~-44s ~10w ~.2fx relay~n", ["16 MiB echo MB/s, pyport identity",
                                             round(M(facade_big)),
                                             Ratio(facade_big, relay_big)]),
    io:format("(~b rounds, stages alternated; medians; ratios are medians of the "
              "rounds' own ratios)~n", [length(Results)]).

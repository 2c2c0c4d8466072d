#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Where the Erlang side's time goes under 50 callers: calls/s of pyport:call/4 over
%% benches/standin.c (which answers every request at once, so the Erlang side is all
%% there is), next to a floor built from the same pieces through the same runtime and
%% port owner (monitor with alias, header, a request encoded once beforehand, a receive
%% without timer, the reply left undecoded), and that floor with one piece of the facade
%% added at a time. Variants alternate round by round; medians of the rounds, and each
%% variant's ratio to the facade in the same round (median).
%%
%% With ECHO_BINARY (benches/echo.c), the relay floor of stages.escript runs in the same
%% rounds: a bare receive loop owning the C echo, forwarding each reply to the alias in
%% its header, sent the same request body as the floor.
%%
%%   escript benches/pieces.escript STANDIN_BINARY [ROUNDS [ECHO_BINARY]]
%%   (make bench-pieces)
-mode(compile).
-include("bench.hrl").

-define(ROUNDS, 7).
-define(CALLERS, 50).
-define(CALLS, 200000).
-define(TIMEOUT, 5000).

main([Standin]) ->
    main([Standin, integer_to_list(?ROUNDS)]);
main([Standin, Rounds]) ->
    main([Standin, Rounds, none]);
main([Standin, Rounds, Echo]) ->
    _ = start_pyport(),
    Names = [Name || {Name, _} <- variants(undefined, undefined, undefined)]
        ++ ["relay: the floor through a bare loop, C echo" || Echo =/= none],
    Results = [round(Standin, Echo) || _ <- lists:seq(1, list_to_integer(Rounds))],
    io:format("~b callers over 2 contexts of the stand-in, ~s rounds~n", [?CALLERS, Rounds]),
    io:format("~-46s ~10s ~10s~n", ["", "calls/s", "/ facade"]),
    [io:format("~-46s ~10b ~10.2f~n",
               [Name, median([proplists:get_value(Name, R) || R <- Results]),
                median([proplists:get_value(Name, R) / proplists:get_value("pyport:call/4", R)
                        || R <- Results])])
     || Name <- Names],
    ok.

%% One round: the variants over a stand-in opened for them, then (the stand-in closed:
%% each C program spins a core while it runs) the relay over its echo.
round(Standin, Echo) ->
    {ok, Rt} = pyport:start_runtime(#{executable => Standin,
                                      contexts => [#{name => a}, #{name => b}]}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    %% the floor peeks at pyport's insides: the context handle's runtime key, and the
    %% runtime's row (owner, port) in pyport's table
    {pyport_ctx, Key, _, _} = A,
    [Row] = ets:lookup(pyport_runtimes, Key),
    Rates = [{Name, rate(Call)} || {Name, Call} <- variants(A, B, Row)],
    ok = pyport:stop_runtime(Rt),
    Rates ++ [{"relay: the floor through a bare loop, C echo", relay_rate(Echo)}
              || Echo =/= none].

variants(A, B, Row) ->
    Piece = fun(Pieces) -> fun(I) -> floor_call(Row, I rem 2 + 1, Pieces) end end,
    [{"pyport:call/4",
      fun(I) -> {ok, 3} = pyport:call(element(I rem 2 + 1, {A, B}), operator, add, [1, 2]) end},
     {"floor", Piece([])},
     {"floor + ETS look-up of the runtime", Piece([ets])},
     {"floor + encoding, one 99-byte binary", Piece([encode_whole])},
     {"floor + encoding, small pieces (pyport now)", Piece([encode_spliced])},
     {"floor + receive with a timer", Piece([timer])},
     {"floor + decoding the reply", Piece([decode])},
     {"floor + all of the above (pieces)", Piece([ets, encode_spliced, timer, decode])}].

%% One request through the runtime's port owner, with the pieces asked for.
floor_call({Key, Pid, Port, _, _} = Row0, Ctx, Pieces) ->
    {_, Pid, Port, _, _} = case lists:member(ets, Pieces) of
                               true -> hd(ets:lookup(pyport_runtimes, Key));
                               false -> Row0
                           end,
    Body = body(Pieces),
    Mref = erlang:monitor(process, Pid, [{alias, reply_demonitor}]),
    H = term_to_binary(Mref),
    true = erlang:port_command(Port, [<<Ctx:64, (byte_size(H)):16>>, H, Body]),
    Reply = case lists:member(timer, Pieces) of
                true ->
                    receive
                        {Mref, R} -> R;
                        {'DOWN', Mref, _, _, Reason} -> error(Reason)
                    after ?TIMEOUT -> error(timeout)
                    end;
                false ->
                    receive
                        {Mref, R} -> R;
                        {'DOWN', Mref, _, _, Reason} -> error(Reason)
                    end
            end,
    case lists:member(decode, Pieces) of
        true -> {ok, 3} = binary_to_term(Reply);
        false -> ok
    end.

body(Pieces) ->
    Req = {call, atom_to_binary(operator), atom_to_binary(add), [1, 2], #{}},
    Opts = #{timeout => ?TIMEOUT, caller => self()},
    case {lists:member(encode_whole, Pieces), lists:member(encode_spliced, Pieces)} of
        {true, _} ->
            term_to_binary(erlang:append_element(Req, Opts));
        {_, true} ->
            pyport:encode(Req, Opts);
        _ ->
            case get(body) of
                undefined ->
                    Body = term_to_binary(erlang:append_element(Req, Opts)),
                    put(body, Body),
                    Body;
                Body ->
                    Body
            end
    end.

%% The relay of stages.escript: owns the echo, forwards each reply to the alias in its
%% header.
relay(Echo) ->
    Self = self(),
    Relay = spawn_link(fun() ->
                           Port = open_port({spawn_executable, Echo},
                                            [{packet, 4}, binary, exit_status, use_stdio]),
                           Self ! {relay, self(), Port},
                           relay_loop(Port)
                       end),
    receive {relay, Relay, Port} -> {Relay, Port} end.

relay_loop(Port) ->
    receive
        {Port, {data, <<HLen:16, H:HLen/binary, Payload/binary>>}} ->
            Alias = binary_to_term(H),
            Alias ! {Alias, Payload},
            relay_loop(Port)
    end.

relay_call({Relay, Port}) ->
    Mref = erlang:monitor(process, Relay, [{alias, reply_demonitor}]),
    H = term_to_binary(Mref),
    true = erlang:port_command(Port, [<<(byte_size(H)):16>>, H, body([])]),
    receive
        {Mref, _} -> ok;
        {'DOWN', Mref, _, _, Reason} -> error(Reason)
    end.

relay_rate(Echo) ->
    {Relay, Port} = relay(Echo),
    try rate(fun(_) -> relay_call({Relay, Port}) end)
    after unlink(Relay), exit(Relay, kill)
    end.

rate(Call) ->
    Per = ?CALLS div ?CALLERS,
    Self = self(),
    T0 = erlang:monotonic_time(microsecond),
    Pids = [spawn_link(fun() -> [Call(I) || _ <- lists:seq(1, Per)], Self ! {done, self()} end)
            || I <- lists:seq(1, ?CALLERS)],
    [receive {done, P} -> ok end || P <- Pids],
    round(Per * ?CALLERS * 1000000 / (erlang:monotonic_time(microsecond) - T0)).

#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% The side-channel experiment (docs/benchmarks.md): a 16 MiB reply through the pipe,
%% through a fresh memfd the BEAM reads with file:read_file("/proc/PID/fd/FD"), and
%% through one memfd kept and rewritten. Usage: side_channel.escript PROGRAM [ROUNDS];
%% each round times 10 replies of each way, the ways alternated; medians printed.
-mode(compile).

main([Program | Rest]) ->
    Rounds = case Rest of [R] -> list_to_integer(R); [] -> 9 end,
    Port = open_port({spawn_executable, Program}, [{packet, 4}, binary, exit_status]),
    Ways = [{pipe, fun() -> pipe(Port) end},
            {fresh_memfd, fun() -> memfd(Port, <<"m">>) end},
            {kept_memfd, fun() -> memfd(Port, <<"r">>) end}],
    [16#1000000 = F() || {_, F} <- Ways],
    Times = [[{Way, per_reply(F)} || {Way, F} <- Ways] || _ <- lists:seq(1, Rounds)],
    io:format("16 MiB reply, ms (median of ~b rounds of 10 each):~n", [Rounds]),
    [io:format("  ~-12s ~6.2f  pipe/it per round: ~.2f~n",
               [Way, median([proplists:get_value(Way, T) || T <- Times]),
                median([proplists:get_value(pipe, T) / proplists:get_value(Way, T)
                        || T <- Times])])
     || {Way, _} <- Ways],
    halt(0).

per_reply(F) ->
    {Us, _} = timer:tc(fun() -> [F() || _ <- lists:seq(1, 10)] end),
    Us / 10000.

pipe(Port) ->
    port_command(Port, <<"p">>),
    receive {Port, {data, D}} -> byte_size(D) end.

memfd(Port, Way) ->
    port_command(Port, Way),
    receive
        {Port, {data, Text}} ->
            [Pid, Fd] = string:lexemes(binary_to_list(Text), " "),
            {ok, B} = file:read_file("/proc/" ++ Pid ++ "/fd/" ++ Fd),
            byte_size(B)
    end.

median(Xs) ->
    lists:nth((length(Xs) + 1) div 2, lists:sort(Xs)).

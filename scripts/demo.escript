#!/usr/bin/env escript
%% The main job (`make demo`): starts pyport, creates two owngil contexts, runs a
%% CPU-bound Python function twice on one context, then once on each context in
%% parallel, and prints the results and the measured speedup. Then the other half:
%% one runtime segfaults (ctypes reads address 0) while another keeps answering a
%% caller that never stops, and the demo prints how long the crashed one took to
%% answer again and what the other answered meanwhile.
-mode(compile).

main(_) ->
    Root = filename:dirname(filename:dirname(filename:absname(escript:script_name()))),
    %% `make build's pyport; else the one ERL_LIBS names (the test runs)
    _ = code:add_patha(filename:join([Root, "_build", "default", "lib", "pyport", "ebin"])),
    {ok, _} = application:ensure_all_started(pyport),
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => left}, #{name => right}]}),
    {ok, #{python_version := Version, owngil := OwnGil, os_pid := OsPid}} = pyport:info(Rt),
    io:format("pyport runtime: Python ~s, owngil ~p, OS pid ~p~n", [Version, OwnGil, OsPid]),
    {ok, Left} = pyport:context(Rt, left),
    {ok, Right} = pyport:context(Rt, right),
    Work = <<"def work(n):\n"
             "    total = 0\n"
             "    for i in range(n):\n"
             "        total += i * i % 7\n"
             "    return total\n">>,
    ok = pyport:exec(Left, Work),
    ok = pyport:exec(Right, Work),
    N = 4000000,
    Call = fun(Ctx) -> pyport:call(Ctx, '__main__', work, [N]) end,
    {ok, Expected} = Call(Left),
    {Serial, [{ok, Expected}, {ok, Expected}]} = timer:tc(fun() -> [Call(Left), Call(Left)] end),
    {Parallel, [{ok, Expected}, {ok, Expected}]} = timer:tc(fun() -> parallel([Left, Right], Call) end),
    io:format("work(~p) = ~p~n", [N, Expected]),
    io:format("two calls on one context:       ~7.1f ms~n", [Serial / 1000]),
    io:format("one call on each of 2 contexts: ~7.1f ms~n", [Parallel / 1000]),
    io:format("speedup: ~.2fx on ~p cores~n", [Serial / Parallel, erlang:system_info(logical_processors_available)]),
    ok = pyport:stop_runtime(Rt),
    crash_isolation(),
    ok = application:stop(pyport).

%% Two runtimes, `steady' and `victim'. A process calls steady in a loop; victim
%% segfaults; the demo calls victim until it answers again (a call to a runtime that is
%% restarting fails at once, so it tries every millisecond), then stops the loop. The
%% victim had run for less than 10 s, so it restarts after the back-off's first delay
%% (100 ms, docs/reliability.md); the rest is the new OS process starting Python.
crash_isolation() ->
    {ok, Steady} = pyport:start_runtime(#{name => steady, contexts => [#{name => s}]}),
    {ok, Victim} = pyport:start_runtime(#{name => victim, contexts => [#{name => v}]}),
    {ok, S} = pyport:context(Steady, s),
    {ok, V} = pyport:context(Victim, v),
    {ok, #{os_pid := OldPid}} = pyport:info(Victim),
    Loop = spawn_link(fun() -> steady_loop(S, 0, 0) end),
    io:format("~ncrash isolation: runtime victim (OS pid ~p) segfaults; runtime steady "
              "keeps answering~n", [OldPid]),
    T0 = erlang:monotonic_time(microsecond),
    Crash = pyport:call(V, ctypes, string_at, [0]),
    Tries = until_back(V, 1),
    Back = erlang:monotonic_time(microsecond) - T0,
    Loop ! {stop, self()},
    {Answered, Failed} = receive {Loop, Counts} -> Counts end,
    {ok, #{os_pid := NewPid}} = pyport:info(Victim),
    io:format("victim's call:    ~0p~n", [Crash]),
    io:format("victim back in:   ~.1f ms (new OS pid ~p, ~p tries; 100 ms of it the "
              "restart back-off)~n", [Back / 1000, NewPid, Tries]),
    io:format("steady meanwhile: ~p calls answered, ~p failed~n", [Answered, Failed]),
    ok = pyport:stop_runtime(Victim),
    ok = pyport:stop_runtime(Steady).

until_back(V, Tries) ->
    case pyport:call(V, operator, add, [1, 2]) of
        {ok, 3} -> Tries;
        {error, _} ->
            receive after 1 -> ok end,
            until_back(V, Tries + 1)
    end.

steady_loop(S, Answered, Failed) ->
    receive
        {stop, From} -> From ! {self(), {Answered, Failed}}
    after 0 ->
        case pyport:call(S, operator, add, [1, 2]) of
            {ok, 3} -> steady_loop(S, Answered + 1, Failed);
            _ -> steady_loop(S, Answered, Failed + 1)
        end
    end.

parallel(Ctxs, Fun) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {self(), Fun(Ctx)} end) || Ctx <- Ctxs],
    [receive {Pid, Result} -> Result end || Pid <- Pids].

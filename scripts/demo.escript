#!/usr/bin/env escript
%% The main job (`make demo`): starts pyport, creates two owngil contexts, runs a
%% CPU-bound Python function twice on one context, then once on each context in
%% parallel, and prints the results and the measured speedup.
-mode(compile).

main(_) ->
    Root = filename:dirname(filename:dirname(filename:absname(escript:script_name()))),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "pyport", "ebin"])),
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
    ok = application:stop(pyport).

parallel(Ctxs, Fun) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Self ! {self(), Fun(Ctx)} end) || Ctx <- Ctxs],
    [receive {Pid, Result} -> Result end || Pid <- Pids].

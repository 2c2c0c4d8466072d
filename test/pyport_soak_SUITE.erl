%% @doc Proof under load: many processes making mixed requests while the runtime is
%% crashed three times; every request gets exactly one reply, to its own caller, and
%% memory and file descriptors come back to their baseline.
%%
%% `make test' runs a short version; `make soak' (PYPORT_SOAK=full) runs 1,000
%% processes x 1,000 requests.
-module(pyport_soak_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_soak_rt).
-define(HELPERS, <<"import erlang, time\n"
                   "class Box:\n"
                   "    def __init__(self, v): self.v = v\n"
                   "    def get(self): return self.v\n"
                   "def back(x):\n"
                   "    return erlang.call('pyport_soak_echo', x)\n"
                   "async def later(x):\n"
                   "    return x\n"
                   "def nap(s):\n"
                   "    time.sleep(s)\n"
                   "    return s\n">>).

suite() ->
    [{timetrap, {minutes, 30}}].

all() ->
    [mixed_load_with_crashes, crash_cycles_leak_nothing].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    ok = pyport:register_function(pyport_soak_echo, fun(X) -> X end),
    {Procs, Requests} = case os:getenv("PYPORT_SOAK") of
                            "full" -> {1000, 1000};
                            _ -> {100, 200}
                        end,
    [{procs, Procs}, {requests, Requests} | Config].

end_per_suite(_Config) ->
    _ = pyport:unregister_function(pyport_soak_echo),
    pyport_ct:stop_app().

%%% Cases

mixed_load_with_crashes() ->
    [{doc, "Processes x requests of every kind (sync, async, callbacks into Erlang, "
           "coroutines, streams, envs, handles, timeouts, interrupts) over 2 owngil "
           "contexts and a main context, with the OS process killed three times: every "
           "request gets exactly one reply, to its own caller; errors are only "
           "runtime_down (around the crashes), timeout or interrupted where asked; node "
           "memory and the OS process's memory return to their baseline."}].
mixed_load_with_crashes(Config) ->
    Procs = ?config(procs, Config),
    Requests = ?config(requests, Config),
    {ok, _} = pyport:start_runtime(#{name => ?RUNTIME,
                                     restart => #{min_delay => 1, max_delay => 10},
                                     contexts => [#{name => a, preload => ?HELPERS},
                                                  #{name => b, preload => ?HELPERS},
                                                  #{name => m, mode => main,
                                                    preload => ?HELPERS}]}),
    Ctxs = [begin {ok, C} = pyport:context(?RUNTIME, N), C end || N <- [a, b, m]],
    %% the baseline: after one request of every kind on every context
    [request(K, 1, C) || K <- lists:seq(0, 8), C <- Ctxs],
    NodeBefore = settled_node_memory(),
    RssBefore = rss(?RUNTIME),
    Total = Procs * Requests,
    Progress = counters:new(1, [atomics]),
    Self = self(),
    T0 = erlang:monotonic_time(millisecond),
    Workers = [spawn_monitor(fun() -> Self ! {done, self(), work(I, Requests, Ctxs, Progress)} end)
               || I <- lists:seq(1, Procs)],
    Crashes = [crash_at(Total * K div 4, Progress) || K <- [1, 2, 3]],
    Results = [receive {done, Pid, R} -> R;
                       {'DOWN', Mref, process, Pid, Why} -> ct:fail({worker_died, Why})
               end || {Pid, Mref} <- Workers],
    Wall = erlang:monotonic_time(millisecond) - T0,
    [receive {crashed, C} -> ok end || C <- Crashes],
    Counts = lists:foldl(fun(R, Acc) -> maps:merge_with(fun(_, X, Y) -> X + Y end, R, Acc) end,
                         #{}, Results),
    Replies = lists:sum(maps:values(Counts)),
    ct:log("~b processes x ~b requests in ~b ms; outcomes: ~p", [Procs, Requests, Wall, Counts]),
    ?assertEqual(Total, Replies),
    ?assertEqual([], maps:keys(Counts) -- [ok, runtime_down, timeout, interrupted]),
    ?assert(maps:get(ok, Counts) > Total div 2),
    %% every request of the runtime is answered: back to baseline once it is idle
    pyport_ct:wait_for(fun() -> case pyport:call(hd(Ctxs), operator, add, [1, 2]) of
                                    {ok, 3} -> {ok, up};
                                    Other -> {not_yet, Other}
                                end
                       end, 1000),
    NodeAfter = settled_node_memory(),
    RssAfter = rss(?RUNTIME),
    ct:log("node memory ~b -> ~b bytes; runtime RSS ~b -> ~b bytes (the last after 3 "
           "restarts)", [NodeBefore, NodeAfter, RssBefore, RssAfter]),
    ?assert(NodeAfter < NodeBefore + 16 * 1024 * 1024),
    ?assert(RssAfter < RssBefore + 32 * 1024 * 1024),
    ok = pyport:stop_runtime(?RUNTIME).

crash_cycles_leak_nothing() ->
    [{doc, "100 kill/restart cycles of a runtime leave the node with the file "
           "descriptors and port program processes it had before."}].
crash_cycles_leak_nothing(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}],
                                      restart => #{min_delay => 1, max_delay => 10}}),
    {ok, C} = pyport:context(Rt, a),
    FdsBefore = node_fds(),
    ChildrenBefore = node_children(),
    lists:foreach(fun(_) ->
                      OsPid = pyport_ct:os_pid(Rt),
                      _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
                      pyport_ct:await_new_os_pid(Rt, OsPid),
                      {ok, 3} = pyport:call(C, operator, add, [1, 2])
                  end, lists:seq(1, 100)),
    FdsAfter = node_fds(),
    ChildrenAfter = node_children(),
    ct:log("node fds ~b -> ~b; child processes ~b -> ~b",
           [FdsBefore, FdsAfter, length(ChildrenBefore), length(ChildrenAfter)]),
    ?assertEqual(FdsBefore, FdsAfter),
    ?assertEqual(length(ChildrenBefore), length(ChildrenAfter)),
    ok = pyport:stop_runtime(Rt).

%%% The workers

%% Makes N requests, each checked against the answer it must get; returns a count of
%% outcomes. A reply meant for another request would fail a check.
work(I, N, Ctxs, Progress) ->
    Counts = lists:foldl(fun(J, Acc) ->
                             Ctx = lists:nth((I + J) rem length(Ctxs) + 1, Ctxs),
                             Outcome = request((I * 7 + J) rem 9, I * 1000000 + J, Ctx),
                             counters:add(Progress, 1, 1),
                             %% as a client would: wait for the runtime to be back
                             Outcome =:= runtime_down andalso await_up(),
                             maps:update_with(Outcome, fun(X) -> X + 1 end, 1, Acc)
                         end, #{}, lists:seq(1, N)),
    receive Stray -> exit({stray_message, Stray}) after 0 -> Counts end.

request(0, V, Ctx) ->
    outcome({ok, V + 1}, pyport:call(Ctx, operator, add, [V, 1]));
request(1, V, Ctx) ->
    outcome({ok, V}, pyport:await(pyport:async_call(Ctx, builtins, abs, [-V]), 30000));
request(2, V, Ctx) ->
    outcome({ok, V}, pyport:call(Ctx, '__main__', back, [V]));
request(3, V, Ctx) ->
    outcome({ok, V}, pyport:call(Ctx, '__main__', later, [V]));
request(4, V, Ctx) ->
    case pyport:stream(Ctx, builtins, range, [V, V + 3]) of
        {ok, S} -> outcome({ok, [V, V + 1, V + 2]}, take_all(S, []));
        Error -> outcome(ok, Error)
    end;
request(5, V, Ctx) ->
    case pyport:new_env(Ctx) of
        {ok, Env} ->
            R = case pyport:exec(Ctx, <<"x = 1">>, #{env => Env}) of
                    ok -> pyport:eval(Ctx, <<"x + v">>, #{v => V}, #{env => Env});
                    Error -> Error
                end,
            ok = pyport:drop_env(Env),
            outcome({ok, V + 1}, R);
        Error ->
            outcome(ok, Error)
    end;
request(6, V, Ctx) ->
    case pyport:call(Ctx, '__main__', 'Box', [V], #{}, #{return => ref}) of
        {ok, Ref} ->
            R = pyport:call_method(Ref, get, []),
            ok = pyport:release(Ref),
            outcome({ok, V}, R);
        Error ->
            outcome(ok, Error)
    end;
request(7, _V, Ctx) ->
    %% a deadline that passes: the sleep is ended at once
    outcome(timeout, pyport:call(Ctx, '__main__', nap, [5], #{}, #{timeout => 5}));
request(8, V, Ctx) ->
    %% an interrupt of whatever the context runs now (maybe another caller's request)
    _ = pyport:interrupt(Ctx),  % {error, {runtime_down, _}} while it restarts
    outcome({ok, V}, pyport:call(Ctx, builtins, int, [V])).

await_up() ->
    pyport_ct:wait_for(fun() -> case pyport:info(?RUNTIME) of
                                    {ok, _} -> {ok, up};
                                    Other -> {not_yet, Other}
                                end
                       end, 1000).

take_all(S, Acc) ->
    case pyport:stream_next(S, 30000) of
        {data, X} -> take_all(S, [X | Acc]);
        done -> {ok, lists:reverse(Acc)};
        {error, _} = Error -> Error
    end.

%% The expected answer is `ok'; the errors that load, crashes and interrupts may give
%% are counted by kind; any other answer fails the worker.
outcome(Expected, Expected) when Expected =/= timeout -> ok;
outcome(timeout, {error, timeout}) -> timeout;
outcome(_, {error, {runtime_down, _}}) -> runtime_down;
outcome(_, {error, {context_down, _}}) -> runtime_down;
outcome(_, {error, interrupted}) -> interrupted;
outcome(Expected, Other) -> exit({wrong_reply, Expected, Other}).

%%% Crashes

%% A process that kills the runtime's OS process once Progress reaches At.
crash_at(At, Progress) ->
    Self = self(),
    Ref = make_ref(),
    spawn_link(fun() -> wait_progress(At, Progress), kill_runtime(), Self ! {crashed, Ref} end),
    Ref.

wait_progress(At, Progress) ->
    case counters:get(Progress, 1) >= At of
        true -> ok;
        false -> receive after 5 -> wait_progress(At, Progress) end
    end.

kill_runtime() ->
    case pyport:info(?RUNTIME) of
        {ok, #{os_pid := OsPid}} -> _ = os:cmd("kill -9 " ++ integer_to_list(OsPid));
        {error, _} -> ok
    end.

%%% Measures

settled_node_memory() ->
    [erlang:garbage_collect(P) || P <- processes()],
    erlang:memory(total).

rss(Runtime) ->
    {ok, #{os_pid := OsPid}} = pyport:info(Runtime),
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    [Kb] = [binary_to_integer(K) || <<"VmRSS:", Rest/binary>> <- binary:split(Status, <<"\n">>, [global]),
                                    [K | _] <- [binary:split(string:trim(Rest), <<" ">>)]],
    Kb * 1024.

node_fds() ->
    {ok, Fds} = file:list_dir("/proc/self/fd"),
    length(Fds).

%% The port programs running now (they are children of the VM's erl_child_setup).
node_children() ->
    Exe = filename:join(code:priv_dir(pyport), "pyport"),
    string:tokens(os:cmd("pgrep -f -- " ++ Exe), "\n").


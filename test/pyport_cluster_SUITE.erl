%% @doc Handles across nodes: peer nodes of this machine (OTP's `peer') use handles made
%% here, and this node uses theirs; the requests run on the handle's node.
-module(pyport_cluster_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

all() ->
    [handle_used_where_pyport_is_not_started, handle_never_reaches_another_runtime,
     every_operation_from_another_node, stream_with_credit_from_another_node,
     handles_of_another_node_used_here, nodedown_at_once, nodedown_in_flight,
     python_sends_to_another_node, callback_runs_on_the_runtime_node,
     pool_from_another_node, pool_across_nodes, pool_across_nodes_under_load,
     pool_connects_to_its_nodes, pool_waiter_woken_by_a_remote_member,
     handles_made_before_distribution, owned_by_a_node_that_goes_down,
     port_programs_die_with_their_node].

init_per_suite(Config) ->
    case pyport_ct:start_distribution() of
        ok ->
            ok = pyport_ct:start_app(),
            {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
            {ok, Ctx} = pyport:context(Rt, a),
            [{rt, Rt}, {ctx, Ctx} | Config];
        {error, Reason} ->
            {skip, {no_distribution, Reason}}
    end.

end_per_suite(Config) ->
    _ = pyport:stop_runtime(?config(rt, Config)),
    pyport_ct:stop_app().

%% A peer node of this machine with this node's code path; pyport is loaded there but
%% started only when asked.
start_peer(Started) ->
    start_peer(Started, peer:random_name(?MODULE)).

start_peer(Started, Name) ->
    {ok, Peer, Node} = peer:start_link(#{name => Name, args => pyport_ct:code_path()}),
    case Started of
        true -> start_pyport(fun(M, F, A) -> erpc:call(Node, M, F, A) end);
        false -> ok
    end,
    {Peer, Node}.


%% pyport with its default runtime, started through Call (erpc or peer:call).
start_pyport(Call) ->
    ok = Call(application, load, [pyport]),
    ok = Call(application, set_env, [pyport, default_runtime, true]),
    {ok, _} = Call(application, ensure_all_started, [pyport]),
    ok.

stop_peer(Peer) ->
    catch peer:stop(Peer),
    ok.

on(Node, Fun) ->
    erpc:call(Node, Fun, 30000).

os_pid(Rt) ->
    pyport_ct:os_pid(Rt).

%% A context handle's runtime key and context id (the handle is a record).
ctx_key_id({pyport_ctx, Key, Id, _Home}) -> {Key, Id}.

%%% Cases

handle_used_where_pyport_is_not_started() ->
    [{doc, "A context handle made here, used on a peer where pyport is not started: "
      "the call runs here (this runtime's OS process answers)."}].
handle_used_where_pyport_is_not_started(Config) ->
    Ctx = ?config(ctx, Config),
    {Peer, Node} = start_peer(false),
    try
        ?assertEqual({ok, 4.0}, on(Node, fun() -> pyport:call(Ctx, math, sqrt, [16]) end)),
        ?assertEqual({ok, os_pid(?config(rt, Config))},
                     on(Node, fun() -> pyport:call(Ctx, os, getpid, []) end))
    after
        stop_peer(Peer)
    end.

handle_never_reaches_another_runtime() ->
    [{doc, "With pyport started on the peer, whose default runtime has contexts with "
      "the same ids as ours, our handle still reaches our interpreter: each side "
      "answers with its own OS pid."}].
handle_never_reaches_another_runtime(_Config) ->
    {ok, Default} = pyport:context(pyport, default_1),
    {Peer, Node} = start_peer(true),
    try
        Here = os_pid(pyport),
        There = on(Node, fun() -> pyport_ct:os_pid(pyport) end),
        ?assertNotEqual(Here, There),
        ?assertEqual({ok, Here}, on(Node, fun() -> pyport:call(Default, os, getpid, []) end)),
        {ok, TheirDefault} = on(Node, fun() -> pyport:context(pyport, default_1) end),
        ?assertEqual({ok, There}, pyport:call(TheirDefault, os, getpid, [])),
        %% the premise: the same runtime name and context id on both nodes
        ?assertEqual(ctx_key_id(Default), ctx_key_id(TheirDefault)),
        %% an object handle of the peer, as an argument to our context, is refused
        %% (ids start at a random base per context), never taken for one of ours
        {ok, Ours} = pyport:eval(Default, <<"[1]">>, #{}, #{return => ref}),
        {ok, Theirs} = on(Node, fun() ->
                                    pyport:eval(TheirDefault, <<"[2]">>, #{}, #{return => ref})
                                end),
        ?assertEqual({ok, [1]}, pyport:call(Default, builtins, list, [Ours])),
        ?assertMatch({error, {bad_term, _}}, pyport:call(Default, builtins, list, [Theirs])),
        ?assertMatch({error, {bad_term, _}},
                     on(Node, fun() -> pyport:call(TheirDefault, builtins, list, [Ours]) end))
    after
        stop_peer(Peer)
    end.

every_operation_from_another_node() ->
    [{doc, "From a peer, on a context of this node: eval, exec, async_call/await, cast, "
      "envs, object handles, channels, info, new_context, stop_context, interrupt."}].
every_operation_from_another_node(Config) ->
    Ctx = ?config(ctx, Config),
    Rt = ?config(rt, Config),
    {Peer, Node} = start_peer(false),
    try
        Result = on(Node, fun() ->
            Self = self(),
            {ok, 3} = pyport:eval(Ctx, <<"x + y">>, #{x => 1, y => 2}),
            ok = pyport:exec(Ctx, <<"def remote_f(v): return v * 2">>),
            {ok, 42} = pyport:call(Ctx, '__main__', remote_f, [21]),
            %% erlang.self() is the calling process, on the peer
            {ok, Self} = pyport:eval(Ctx, <<"__import__('erlang').self()">>),
            Ref = pyport:async_call(Ctx, operator, mul, [6, 7]),
            {ok, 42} = pyport:await(Ref, 5000),
            ok = pyport:cast(Ctx, erlang, send, [Self, cast_arrived]),
            receive cast_arrived -> ok after 5000 -> error(no_cast) end,
            %% a cast keeps its caller too
            ok = pyport:exec(Ctx, <<"def to_caller():\n"
                                    "    import erlang\n"
                                    "    erlang.send(erlang.self(), 'from_cast')\n">>),
            ok = pyport:cast(Ctx, '__main__', to_caller, []),
            receive <<"from_cast">> -> ok after 5000 -> error(cast_lost_its_caller) end,
            {ok, Env} = pyport:new_env(Ctx),
            ok = pyport:exec(Ctx, <<"z = 9">>, #{env => Env}),
            {ok, 9} = pyport:eval(Ctx, <<"z">>, #{}, #{env => Env}),
            ok = pyport:drop_env(Env),
            {error, not_found} = pyport:eval(Ctx, <<"z">>, #{}, #{env => Env}),
            {ok, L} = pyport:eval(Ctx, <<"[1, 2]">>, #{}, #{return => ref}),
            {ok, none} = pyport:call_method(L, append, [3]),
            {ok, [1, 2, 3]} = pyport:to_term(L),
            {ok, 3} = pyport:call(Ctx, builtins, len, [L]),
            {ok, Doc} = pyport:getattr(L, '__doc__'),
            true = is_binary(Doc),
            ok = pyport:release(L),
            {error, not_found} = pyport:to_term(L),
            {ok, Chan} = pyport:channel_open(Ctx, <<"remote_chan">>, #{}),
            ok = pyport:channel_send(Chan, hello),
            {ok, hello} = pyport:eval(Ctx, <<"__import__('erlang').channel('remote_chan').try_receive()">>),
            ok = pyport:channel_close(Chan),
            {ok, #{os_pid := OsPid, node := Home}} = pyport:info(Rt),
            true = Home =/= node(),
            {ok, New} = pyport:new_context(Rt, #{}),
            {ok, 2} = pyport:eval(New, <<"1 + 1">>),
            ok = pyport:stop_context(New),
            ok = pyport:interrupt(Ctx),
            OsPid
        end),
        ?assertEqual(os_pid(Rt), Result)
    after
        stop_peer(Peer)
    end.

stream_with_credit_from_another_node() ->
    [{doc, "A stream of a context here, consumed on a peer: 1,000 items with a window "
      "of 8, in order; Python never runs more than the window ahead."}].
stream_with_credit_from_another_node(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:exec(Ctx, <<"produced = 0\n"
                            "def counted(n):\n"
                            "    global produced\n"
                            "    for i in range(n):\n"
                            "        produced = i + 1\n"
                            "        yield i\n">>),
    {Peer, Node} = start_peer(false),
    try
        Items = on(Node, fun() ->
            {ok, S} = pyport:stream(Ctx, '__main__', counted, [1000], #{}, #{window => 8}),
            {data, 0} = pyport:stream_next(S, 5000),
            %% one item taken: the producer runs up to its window, and stops there
            Produced = pyport_ct:wait_for(fun() ->
                                              case pyport:eval(Ctx, <<"produced">>) of
                                                  {ok, N} when N >= 8 -> {ok, N};
                                                  Other -> {not_yet, Other}
                                              end
                                          end, 500),
            ct:log("produced with one item taken, window 8: ~b", [Produced]),
            true = Produced =< 9,
            [0 | pyport_ct:stream_items(S)]
        end),
        ?assertEqual(lists:seq(0, 999), Items)
    after
        stop_peer(Peer)
    end.

handles_of_another_node_used_here() ->
    [{doc, "A runtime pid, context handle and pool of a peer, used here."}].
handles_of_another_node_used_here(_Config) ->
    {Peer, Node} = start_peer(true),
    try
        {ok, Ctx} = on(Node, fun() -> pyport:context(pyport, default_1) end),
        There = on(Node, fun() -> pyport_ct:os_pid(pyport) end),
        ?assertEqual({ok, There}, pyport:call(Ctx, os, getpid, [])),
        RtPid = on(Node, fun() -> whereis(pyport) end),
        {ok, #{os_pid := There}} = pyport:info(RtPid),
        {ok, Ctx} = pyport:context(RtPid, default_1),
        {ok, Stream} = pyport:stream(Ctx, builtins, range, [3]),
        ?assertEqual([{data, 0}, {data, 1}, {data, 2}, done],
                     [pyport:stream_next(Stream, 5000) || _ <- [1, 2, 3, 4]])
    after
        stop_peer(Peer)
    end.

nodedown_at_once() ->
    [{doc, "Once the peer is gone, its handles answer {error, {nodedown, Node}} at "
      "once, and never reach an interpreter of this node."}].
nodedown_at_once(_Config) ->
    {Peer, Node} = start_peer(true),
    {Ctx, Ref, Pool} = on(Node, fun() ->
                                    {ok, C} = pyport:context(pyport, default_1),
                                    {ok, R} = pyport:eval(C, <<"[1]">>, #{}, #{return => ref}),
                                    {ok, P} = pyport:start_pool(gone, #{size => 1}),
                                    {C, R, P}
                                end),
    RtPid = on(Node, fun() -> whereis(pyport) end),
    stop_peer(Peer),
    T0 = erlang:monotonic_time(millisecond),
    Down = {error, {nodedown, Node}},
    ?assertEqual(Down, pyport:call(Ctx, os, getpid, [])),
    ?assertEqual(Down, pyport:eval(Ctx, <<"1">>)),
    ?assertEqual(Down, pyport:exec(Ctx, <<"x = 1">>)),
    ?assertEqual(Down, pyport:cast(Ctx, os, getpid, [])),
    ?assertEqual(Down, pyport:stream(Ctx, builtins, range, [3])),
    ?assertEqual(Down, pyport:new_env(Ctx)),
    ?assertEqual(Down, pyport:stop_context(Ctx)),
    ?assertEqual(Down, pyport:to_term(Ref)),
    ?assertEqual(Down, pyport:call_method(Ref, append, [2])),
    ?assertEqual(Down, pyport:call(Pool, os, getpid, [])),
    ?assertEqual(Down, pyport:pool_info(Pool)),
    ?assertEqual(Down, pyport:info(RtPid)),
    ?assertEqual(Down, pyport:new_context(RtPid, #{})),
    ?assertEqual(Down, pyport:await(pyport:async_call(Ctx, os, getpid, []), 5000)),
    ?assert(erlang:monotonic_time(millisecond) - T0 < 1000).

nodedown_in_flight() ->
    [{doc, "A call in flight to a peer that goes down gets {error, {nodedown, Node}}."}].
nodedown_in_flight(_Config) ->
    {Peer, Node} = start_peer(true),
    {ok, Ctx} = on(Node, fun() -> pyport:context(pyport, default_1) end),
    ok = pyport:exec(Ctx, <<"def sleeper(p):\n"
                            "    import erlang, time\n"
                            "    erlang.send(p, 'started')\n"
                            "    time.sleep(30)\n">>),
    Ref = pyport:async_call(Ctx, '__main__', sleeper, [self()]),
    receive <<"started">> -> ok after 10000 -> ct:fail(not_started) end,
    stop_peer(Peer),
    ?assertEqual({error, {nodedown, Node}}, pyport:await(Ref, 10000)).

python_sends_to_another_node() ->
    [{doc, "erlang.send from Python here to a process on a peer delivers."}].
python_sends_to_another_node(Config) ->
    Ctx = ?config(ctx, Config),
    {Peer, Node} = start_peer(false),
    try
        Self = self(),
        Receiver = erlang:spawn(Node, fun() ->
                                          receive M -> Self ! {got, M} end
                                      end),
        {ok, none} = pyport:eval(Ctx, <<"__import__('erlang').send(p, ('hi', 1))">>,
                                 #{p => Receiver}),
        receive {got, Msg} -> ?assertEqual({<<"hi">>, 1}, Msg)
        after 5000 -> ct:fail(not_delivered)
        end
    after
        stop_peer(Peer)
    end.

callback_runs_on_the_runtime_node() ->
    [{doc, "erlang.call in Python runs the function registered on the runtime's own "
      "node (even when the request came from a peer), and that function may itself "
      "call another node."}].
callback_runs_on_the_runtime_node(Config) ->
    Ctx = ?config(ctx, Config),
    {Peer, Node} = start_peer(false),
    try
        ok = pyport:register_function(where, fun() -> {node(), erpc:call(Node, erlang, node, [])} end),
        Here = node(),
        ?assertEqual({ok, {Here, Node}},
                     on(Node, fun() -> pyport:eval(Ctx, <<"__import__('erlang').call('where')">>) end))
    after
        pyport:unregister_function(where),
        stop_peer(Peer)
    end.

pool_from_another_node() ->
    [{doc, "A pool of this node used from a peer: call, stream and pool_info."}].
pool_from_another_node(_Config) ->
    {ok, Pool} = pyport:start_pool(cluster_pool, #{size => 2, mode => owngil}),
    {Peer, Node} = start_peer(false),
    try
        ?assertEqual({ok, 3}, on(Node, fun() -> pyport:call(Pool, operator, add, [1, 2]) end)),
        ?assertEqual([{data, 0}, {data, 1}, done],
                     on(Node, fun() ->
                                  {ok, S} = pyport:stream(Pool, builtins, range, [2]),
                                  [pyport:stream_next(S, 5000) || _ <- [1, 2, 3]]
                              end)),
        {ok, #{members := Ms}} = on(Node, fun() -> pyport:pool_info(Pool) end),
        ?assertEqual([node(), node()], [N || #{node := N} <- Ms])
    after
        stop_peer(Peer),
        pyport:stop_pool(Pool)
    end.

pool_across_nodes() ->
    [{doc, "A pool with nodes => [here, peer], one main member each: calls reach both "
      "nodes, and envs and handles made through the pool stay on their member, also on "
      "the peer; the peer going down takes only its member out and every later call "
      "succeeds here; the peer coming back (same name, pyport started) gets its "
      "member again."}].
pool_across_nodes(_Config) ->
    Name = peer:random_name(?MODULE),
    {Peer, Node} = start_peer(true, Name),
    {ok, Pool} = pyport:start_pool(spread, #{nodes => [node(), Node], size => 1,
                                             mode => main}),
    try
        {ok, #{size := 2, members := [#{node := Here, status := up},
                                      #{node := Node, status := up, os_pid := TheirPid}]}} =
            pyport:pool_info(Pool),
        ?assertEqual(node(), Here),
        Pids = lists:usort([begin {ok, P} = pyport:call(Pool, os, getpid, []), P end
                            || _ <- lists:seq(1, 20)]),
        ?assert(lists:member(TheirPid, Pids)),
        ?assertEqual(2, length(Pids)),
        %% envs and handles made through the pool stay on their member, also the one on
        %% the peer (ties go round-robin: 4 envs land on both members)
        EnvPids = [begin
                       {ok, Env} = pyport:new_env(Pool),
                       ok = pyport:exec(Pool, <<"import os\nhome = os.getpid()">>, #{env => Env}),
                       {ok, Home} = pyport:eval(Pool, <<"home">>, #{}, #{env => Env}),
                       {ok, Obj} = pyport:eval(Pool, <<"[home]">>, #{}, #{env => Env, return => ref}),
                       ?assertEqual({ok, [Home]}, pyport:call(Pool, builtins, list, [Obj])),
                       Home
                   end || _ <- [1, 2, 3, 4]],
        ?assert(lists:member(TheirPid, EnvPids)),
        %% calls made the moment the connection is gone, before the pool has seen its
        %% nodedown, pass over the peer's member
        true = erlang:disconnect_node(Node),
        Now = [pyport:call(Pool, operator, add, [I, 1]) || I <- lists:seq(1, 20)],
        ?assertEqual([{ok, I + 1} || I <- lists:seq(1, 20)], Now),
        stop_peer(Peer),
        pyport_ct:wait_for(fun() -> member_status(Pool, 2, down) end, 500),
        Results = [pyport:call(Pool, operator, add, [I, 1]) || I <- lists:seq(1, 50)],
        ?assertEqual([{ok, I + 1} || I <- lists:seq(1, 50)], Results),
        {Peer2, Node} = start_peer(true, Name),
        try
            pyport_ct:wait_for(fun() -> member_status(Pool, 2, up) end, 1000),
            {ok, #{members := [_, #{os_pid := NewPid}]}} = pyport:pool_info(Pool),
            Pids2 = lists:usort([begin {ok, P} = pyport:call(Pool, os, getpid, []), P end
                                 || _ <- lists:seq(1, 20)]),
            ?assert(lists:member(NewPid, Pids2))
        after
            stop_peer(Peer2)
        end
    after
        pyport:stop_pool(Pool)
    end.

pool_across_nodes_under_load() ->
    [{doc, "A pool over this node and a peer, one owngil member each: a call made while "
      "one member is busy goes to the other node's member (least loaded across "
      "nodes); when the peer goes down, the call in flight there gets "
      "{error, {nodedown, Node}} at once, the one here finishes, and later calls "
      "succeed here."}].
pool_across_nodes_under_load(_Config) ->
    {Peer, Node} = start_peer(true),
    {ok, Pool} = pyport:start_pool(loaded, #{nodes => [node(), Node], size => 1,
                                             mode => owngil}),
    try
        pyport_ct:wait_for(fun() -> member_status(Pool, 2, up) end, 1000),
        Hold = <<"def hold(p, s):\n"
                 "    import erlang, os, time\n"
                 "    erlang.send(p, os.getpid())\n"
                 "    time.sleep(s)\n"
                 "    return os.getpid()\n">>,
        [ok = pyport:exec(Ctx, Hold) || #{context := Ctx} <- members_of(Pool)],
        Self = self(),
        Call = fun(Tag) ->
                   spawn_link(fun() ->
                                  Self ! {Tag, pyport:call(Pool, '__main__', hold, [Self, 2])}
                              end)
               end,
        Call(first),
        First = receive P1 when is_integer(P1) -> P1 after 10000 -> ct:fail(first) end,
        Call(second),
        Second = receive P2 when is_integer(P2) -> P2 after 10000 -> ct:fail(second) end,
        %% the second went to the member that was free, on the other node
        ?assertNotEqual(First, Second),
        [#{node := Home, os_pid := LocalPid}, #{node := Node}] = members_of(Pool),
        ?assertEqual(node(), Home),
        stop_peer(Peer),
        Answers = [receive {Tag, R} -> R after 10000 -> ct:fail(Tag) end
                   || Tag <- [first, second]],
        ct:log("answers: ~p", [Answers]),
        Down = {error, {nodedown, Node}},
        ?assertEqual(lists:sort([Down, {ok, LocalPid}]), lists:sort(Answers)),
        ?assertEqual([{ok, 3} || _ <- lists:seq(1, 10)],
                     [pyport:call(Pool, operator, add, [1, 2]) || _ <- lists:seq(1, 10)])
    after
        stop_peer(Peer),
        pyport:stop_pool(Pool)
    end.

members_of(Pool) ->
    {ok, #{members := Ms}} = pyport:pool_info(Pool),
    Ms.

pool_waiter_woken_by_a_remote_member() ->
    [{doc, "A caller that finds the pool's only member (on a peer) being replaced under "
      "max_requests waits for it, and is answered as soon as it is ready again (it "
      "waited forever when the pool handled the member's `replace' after the caller "
      "started waiting); with a `timeout', it waits no longer than that."},
     {timetrap, {minutes, 2}}].
pool_waiter_woken_by_a_remote_member(_Config) ->
    {Peer, Node} = start_peer(true),
    {ok, Pool} = pyport:start_pool(waiter, #{nodes => [Node], size => 1, mode => owngil,
                                             max_requests => 1000}),
    try
        pyport_ct:wait_for(fun() -> member_status(Pool, 1, up) end, 1000),
        [{_, Row}] = ets:lookup(pyport_runtimes, {pool, waiter}),
        State = element(5, Row),               % the members' states (atomics)
        PoolPid = lists:last(tuple_to_list(Row)),
        %% the interleaving of two callers: one's request was the member's last (it
        %% marks the member draining, then tells the pool), the other looks meanwhile
        atomics:put(State, 1, 1),
        erlang:trace(PoolPid, true, ['receive']),
        {Caller, Mref} = spawn_monitor(fun() -> exit(pyport:call(Pool, operator, add, [1, 2])) end),
        receive
            {trace, PoolPid, 'receive', {'$gen_call', {Caller, _}, await_ready}} -> ok
        after 10000 ->
            ct:fail(caller_not_waiting)
        end,
        erlang:trace(PoolPid, false, ['receive']),
        flush_trace(PoolPid),
        _ = sys:get_state(PoolPid),            % the pool has the caller waiting
        PoolPid ! {replace, 1},                % what the first caller sends
        receive
            {'DOWN', Mref, process, Caller, Result} -> ?assertEqual({ok, 3}, Result)
        after 10000 ->
            ct:fail(caller_waits_forever)
        end,
        %% with a timeout, the wait is bounded by it
        atomics:put(State, 1, 1),
        ?assertEqual({error, timeout},
                     pyport:call(Pool, operator, add, [1, 2], #{}, #{timeout => 300})),
        PoolPid ! {replace, 1},
        pyport_ct:wait_for(fun() -> member_status(Pool, 1, up) end, 1000)
    after
        pyport:stop_pool(Pool),
        stop_peer(Peer)
    end.

flush_trace(Pid) ->
    receive {trace, Pid, _, _} -> flush_trace(Pid) after 0 -> ok end.

member_status(Pool, I, Want) ->
    {ok, #{members := Ms}} = pyport:pool_info(Pool),
    case lists:nth(I, Ms) of
        #{status := Want} -> {ok, Want};
        Other -> {not_yet, Other}
    end.

port_programs_die_with_their_node() ->
    [{doc, "A node killed with SIGKILL leaves no port program behind: the runtimes' OS "
      "processes end too (end of stdin, and the parent-death signal as a backstop)."}].
port_programs_die_with_their_node(_Config) ->
    {Peer, Node} = start_peer(true),
    {ok, Rt} = erpc:call(Node, pyport, start_runtime, [#{contexts => [#{name => a}]}]),
    OsPids = [begin
                  {ok, #{os_pid := P}} = erpc:call(Node, pyport, info, [R]),
                  P
              end || R <- [pyport, Rt]],
    ?assert(lists:all(fun os_process_alive/1, OsPids)),
    BeamOsPid = erpc:call(Node, os, getpid, []),
    unlink(Peer),  % the peer's controller goes down with the node
    _ = os:cmd("kill -9 " ++ BeamOsPid),
    pyport_ct:wait_for(fun() ->
                           case [P || P <- OsPids, os_process_alive(P)] of
                               [] -> {ok, gone};
                               Left -> {left, Left}
                           end
                       end, 500).

os_process_alive(OsPid) ->
    os:cmd("kill -0 " ++ integer_to_list(OsPid) ++ " 2>/dev/null && echo yes") =:= "yes\n".

pool_connects_to_its_nodes() ->
    [{doc, "A pool whose nodes => [...] names a node this one is not connected to "
      "connects to it itself, and its member there comes up."}].
pool_connects_to_its_nodes(_Config) ->
    %% the peer is controlled over its standard io, so no distribution connects us yet
    {ok, Peer, Node} = peer:start_link(#{name => peer:random_name(?MODULE),
                                         connection => standard_io,
                                         args => ["-setcookie", atom_to_list(erlang:get_cookie())
                                                  | pyport_ct:code_path()]}),
    try
        ok = start_pyport(fun(M, F, A) -> peer:call(Peer, M, F, A, 30000) end),
        ?assertNot(lists:member(Node, nodes([visible, hidden]))),
        {ok, Pool} = pyport:start_pool(reach, #{nodes => [node(), Node], size => 1,
                                                 mode => owngil}),
        try
            pyport_ct:wait_for(fun() -> member_status(Pool, 2, up) end, 1000),
            There = peer:call(Peer, pyport_ct, os_pid, [pyport]),
            {ok, #{members := [_, #{node := Node, os_pid := MemberPid}]}} = pyport:pool_info(Pool),
            ?assertNotEqual(There, os_pid(pyport)),
            Pids = lists:usort([begin {ok, P} = pyport:call(Pool, os, getpid, []), P end
                                || _ <- lists:seq(1, 20)]),
            ?assert(lists:member(MemberPid, Pids))
        after
            pyport:stop_pool(Pool)
        end
    after
        stop_peer(Peer)
    end.

handles_made_before_distribution() ->
    [{doc, "Handles made on a node before it starts distribution (node() was "
      "nonode@nohost) still work after net_kernel:start: context, object handle and "
      "pool."}].
handles_made_before_distribution(_Config) ->
    {ok, Peer, nonode@nohost} = peer:start_link(#{connection => standard_io,
                                                   args => pyport_ct:code_path()}),
    Name = list_to_atom(peer:random_name(?MODULE)),
    try
        ok = start_pyport(fun(M, F, A) -> peer:call(Peer, M, F, A, 30000) end),
        Result = peer:call(Peer, erlang, apply, [fun() -> before_and_after(Name) end, []],
                           30000),
        ?assertEqual({ok, {[{ok, 3}, {ok, [1]}, {ok, 3}], true}}, Result)
    after
        stop_peer(Peer)
    end.

%% On the peer: handles made while not distributed, used once distribution is up.
before_and_after(Name) ->
    {ok, Ctx} = pyport:context(pyport, default_1),
    {ok, Ref} = pyport:eval(Ctx, <<"[1]">>, #{}, #{return => ref}),
    {ok, Pool} = pyport:start_pool(early, #{size => 1, mode => owngil}),
    nonode@nohost = node(),
    {ok, _} = net_kernel:start(Name, #{name_domain => shortnames}),
    Results = [pyport:call(Ctx, operator, add, [1, 2]), pyport:to_term(Ref),
               pyport:call(Pool, operator, add, [1, 2])],
    {ok, {Results, node() =/= nonode@nohost}}.

owned_by_a_node_that_goes_down() ->
    [{doc, "Envs and object handles that a process of a peer made on a context here are "
      "freed when that node goes down (the owner's monitor fires with noconnection)."}].
owned_by_a_node_that_goes_down(Config) ->
    Ctx = ?config(ctx, Config),
    Rt = ?config(rt, Config),
    %% Python's own view: every object made through `tracked' is in LIVE while alive
    ok = pyport:exec(Ctx, <<"import gc, weakref\n"
                            "class Tracked(list):\n"
                            "    __hash__ = object.__hash__\n"
                            "LIVE = weakref.WeakSet()\n"
                            "def tracked(x):\n"
                            "    t = Tracked(x)\n"
                            "    LIVE.add(t)\n"
                            "    return t\n"
                            "def live():\n"
                            "    gc.collect()\n"
                            "    return len(LIVE)\n">>),
    {Peer, Node} = start_peer(false),
    Before = owned(Rt),
    Self = self(),
    _Holder = erlang:spawn(Node, fun() ->
                                     {ok, Env} = pyport:new_env(Ctx),
                                     ok = pyport:exec(Ctx, <<"import __main__\n"
                                                             "kept = __main__.tracked([2])">>,
                                                      #{env => Env}),
                                     {ok, Ref} = pyport:call(Ctx, '__main__', tracked, [[1]],
                                                             #{}, #{return => ref}),
                                     Self ! {made, Env, Ref},
                                     receive stop -> ok end
                                 end),
    receive {made, _, _} -> ok after 10000 -> ct:fail(not_made) end,
    #{envs := E1, refs := R1, processes := P1} = owned(Rt),
    ?assertEqual({1, 1, 1}, {E1 - maps:get(envs, Before), R1 - maps:get(refs, Before),
                             P1 - maps:get(processes, Before)}),
    ?assertEqual({ok, 2}, pyport:call(Ctx, '__main__', live, [])),
    stop_peer(Peer),
    pyport_ct:wait_for(fun() ->
                           case owned(Rt) of
                               Before -> {ok, freed};
                               Now -> {not_yet, Now}
                           end
                       end, 500),
    %% and in Python: the env's globals and the handle's object are gone
    ?assertEqual({ok, 0}, pyport:call(Ctx, '__main__', live, [])).

owned(Rt) ->
    {ok, #{owned := Owned}} = pyport:info(Rt),
    maps:with([envs, refs, processes], Owned).

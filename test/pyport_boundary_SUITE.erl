%% @doc The isolation boundary: what Python sends back cannot exhaust the node's atoms.
-module(pyport_boundary_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(MAX_ATOMS, 100).

all() ->
    [atom_budget, send_flood_is_bounded, send_flood_leaves_others_served, max_reply, output_flood, callbacks_are_bounded,
     limits_come_from_erlang].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

atom_budget() ->
    [{doc, "max_atoms 100: Python's first new atoms decode; once the budget is used up "
           "a reply of 300,000 new atoms is {error, {bad_term, {atom_limit, 100}}} and "
           "the node's atom count does not grow; atoms the node has still decode; a "
           "send holding a new atom is dropped, a callback with one raises in Python, a "
           "stream item with one ends the stream with the error."}].
atom_budget(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}], max_atoms => ?MAX_ATOMS}),
    {ok, C} = pyport:context(Rt, a),
    ok = pyport:register_function(pyport_boundary_echo, fun(X) -> X end),
    ok = pyport:exec(C, <<"import erlang\n"
                          "def fresh(prefix, n):\n"
                          "    return [erlang.atom(f'{prefix}{i}') for i in range(n)]\n"
                          "def send_fresh(pid):\n"
                          "    erlang.send(pid, erlang.atom('pyport_boundary_never_made'))\n"
                          "    erlang.send(pid, 'after')\n"
                          "def call_fresh():\n"
                          "    try:\n"
                          "        erlang.call('pyport_boundary_echo',\n"
                          "                    erlang.atom('pyport_boundary_never_made_2'))\n"
                          "        return 'no error'\n"
                          "    except erlang.Error as e:\n"
                          "        return e.args[0]\n"
                          "def stream_fresh():\n"
                          "    yield 1\n"
                          "    yield erlang.atom('pyport_boundary_never_made_3')\n">>),
    Count0 = erlang:system_info(atom_count),
    %% within the budget: new atoms are made
    {ok, First} = pyport:call(C, '__main__', fresh, [<<"pyport_boundary_a">>, 60]),
    ?assertEqual(60, length(First)),
    ?assert(lists:all(fun is_atom/1, First)),
    Count1 = erlang:system_info(atom_count),
    ct:log("atom count ~b -> ~b", [Count0, Count1]),
    ?assert(Count1 - Count0 >= 59),  % pyport_boundary_a7 is in this module already
    %% past it: refused, and the table does not grow
    ?assertEqual({error, {bad_term, {atom_limit, ?MAX_ATOMS}}},
                 pyport:call(C, '__main__', fresh, [<<"pyport_boundary_b">>, 300000])),
    Count2 = erlang:system_info(atom_count),
    ct:log("atom count: ~b at start, ~b after 60 new, ~b after 300,000 refused",
           [Count0, Count1, Count2]),
    ?assert(Count2 - Count1 < 50),
    %% atoms the node has always decode
    ?assertEqual({ok, [kernel, ok, pyport_boundary_a7]},
                 pyport:eval(C, <<"[erlang.atom(n) for n in ('kernel', 'ok', "
                                  "'pyport_boundary_a7')]">>)),
    %% a send with a new atom is dropped; the next one arrives
    {ok, none} = pyport:call(C, '__main__', send_fresh, [self()]),
    receive Msg -> ?assertEqual(<<"after">>, Msg) end,
    %% a callback with one raises erlang.Error in Python
    ?assertEqual({ok, {atom_limit, ?MAX_ATOMS}}, pyport:call(C, '__main__', call_fresh, [])),
    %% a stream item with one ends the stream
    {ok, S} = pyport:stream(C, '__main__', stream_fresh, []),
    ?assertEqual({data, 1}, pyport:stream_next(S, 5000)),
    ?assertEqual({error, {bad_term, {atom_limit, ?MAX_ATOMS}}}, pyport:stream_next(S, 5000)),
    %% none of the refused names became an atom
    ?assertEqual([], existing([<<"pyport_boundary_never_made">>,
                               <<"pyport_boundary_never_made_2">>,
                               <<"pyport_boundary_never_made_3">>,
                               <<"pyport_boundary_b299999">>])),
    Count3 = erlang:system_info(atom_count),
    ?assert(Count3 - Count1 < 50),
    ok = pyport:unregister_function(pyport_boundary_echo),
    ok = pyport:stop_runtime(Rt).

send_flood_is_bounded() ->
    [{doc, "200,000 erlang.send to a process that does not read, max_mailbox 10,000: its "
           "queue stops at the bound; once the owner has told Python, sends raise "
           "erlang.Busy (never blocking), those already on their way are dropped and "
           "counted in info/1, and every send is one of the three; node memory stays "
           "bounded, sends to another process go through meanwhile, and once the "
           "queue has drained the destination takes sends again."}].
send_flood_is_bounded(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}], max_mailbox => 10000}),
    {ok, C} = pyport:context(Rt, a),
    ok = pyport:exec(C, <<"import erlang, time\n"
                          "def flood(sink, other, n):\n"
                          "    busy = 0\n"
                          "    for i in range(n):\n"
                          "        try:\n"
                          "            erlang.send(sink, (i, 'x' * 100))\n"
                          "        except erlang.Busy:\n"
                          "            busy += 1\n"
                          "    erlang.send(other, 'done')\n"
                          "    return busy\n"
                          "def send_when_clear(sink, deadline):\n"
                          "    end = time.monotonic() + deadline\n"
                          "    while True:\n"
                          "        try:\n"
                          "            return erlang.send(sink, 'again')\n"
                          "        except erlang.Busy:\n"
                          "            if time.monotonic() > end:\n"
                          "                return 'still busy'\n"
                          "            time.sleep(0.001)\n">>),
    Self = self(),
    Sink = spawn(fun() -> receive drain -> ok end, sink_drain(Self) end),
    Mem0 = erlang:memory(total),
    {ok, Busy} = pyport:call(C, '__main__', flood, [Sink, self(), 200000], #{},
                             #{timeout => 60000}),
    receive <<"done">> -> ok after 60000 -> ct:fail({no_message, ?LINE}) end,
    %% the owner delivered `done' after every send before it, so the count is final
    {ok, #{sends_dropped := Dropped}} = pyport:info(Rt),
    {message_queue_len, Queued} = erlang:process_info(Sink, message_queue_len),
    Mem1 = erlang:memory(total),
    ct:log("200,000 sends: ~b queued at the sink, ~b raised erlang.Busy, ~b dropped on "
           "their way; node memory ~b -> ~b bytes", [Queued, Busy, Dropped, Mem0, Mem1]),
    ?assert(Queued =< 10000),
    ?assert(Queued >= 9000),
    ?assertEqual(200000, Queued + Busy + Dropped),
    ?assert(Busy > Dropped),
    ?assert(Mem1 - Mem0 < 64 * 1024 * 1024),
    %% drained, the sink takes sends again (the owner clears it within milliseconds)
    Sink ! drain,
    receive {drained, Sink} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end,
    {ok, none} = pyport:call(C, '__main__', send_when_clear, [Sink, 10.0]),
    receive {again, Sink} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end,
    ok = pyport:stop_runtime(Rt).

%% Takes everything queued (the flood), then says so and forwards `again'.
sink_drain(Parent) ->
    receive
        {_, _} -> sink_drain(Parent)
    after 0 ->
        Parent ! {drained, self()},
        receive <<"again">> -> Parent ! {again, self()} end
    end.

send_flood_leaves_others_served() ->
    [{doc, "One context sends 200 kB binaries as fast as it can to a process that reads "
           "them, for as long as the case runs: meanwhile 300 calls to a second "
           "context and 20 new_context/stop_context pairs each answer within 5 s, and "
           "the port program's peak resident memory stays under 512 MiB. (Before the "
           "fix, a reply that found the stream idle made its thread write the flood's "
           "frames, queued without bound behind it, for as long as the flood lasted: "
           "its context answered nothing more and the queue grew by gigabytes.)"}].
send_flood_leaves_others_served(Config) ->
    Stop = filename:join(?config(priv_dir, Config), "stop_flood"),
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}, #{name => b}],
                                      max_memory => 4 bsl 30}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    ok = pyport:exec(A, <<"import erlang, os\n"
                          "def flood(sink, stop):\n"
                          "    n = 0\n"
                          "    while n % 64 or not os.path.exists(stop):\n"
                          "        erlang.send(sink, b'x' * 200000)\n"
                          "        n += 1\n"
                          "    return n\n">>),
    Self = self(),
    Sink = spawn_link(fun() -> receive _ -> Self ! flooding end, discard() end),
    Flood = pyport:async_call(A, '__main__', flood, [Sink, list_to_binary(Stop)], #{},
                              #{timeout => 120000}),
    receive flooding -> ok after 30000 -> ct:fail(no_flood) end,
    Calls = [pyport:call(B, operator, add, [I, 1], #{}, #{timeout => 5000})
             || I <- lists:seq(1, 300)],
    Churn = [case pyport:new_context(Rt, #{}) of
                 {ok, C} -> pyport:stop_context(C);
                 Other -> Other
             end || _ <- lists:seq(1, 20)],
    ok = file:write_file(Stop, <<>>),
    {ok, Sent} = pyport:await(Flood, 60000),
    {ok, #{os_pid := OsPid}} = pyport:info(Rt),
    Peak = pyport_ct:peak_rss_kib(OsPid) * 1024,
    ct:log("~b binaries of 200 kB sent meanwhile; peak RSS of the port program ~b MiB",
           [Sent, Peak bsr 20]),
    ?assertEqual([{ok, I + 1} || I <- lists:seq(1, 300)], Calls),
    ?assertEqual(lists:duplicate(20, ok), Churn),
    ?assert(Peak < 512 bsl 20),
    unlink(Sink),
    exit(Sink, kill),
    ok = pyport:stop_runtime(Rt).

discard() ->
    receive _ -> discard() end.

max_reply() ->
    [{doc, "max_reply 1000 bytes: a larger result is {error, {reply_too_large, Size, "
           "1000}} (and a larger stream item ends its stream so); smaller ones pass."}].
max_reply(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}], max_reply => 1000}),
    {ok, C} = pyport:context(Rt, a),
    ?assertMatch({error, {reply_too_large, Size, 1000}} when Size > 1000,
                 pyport:eval(C, <<"'x' * 2000">>)),
    ?assertEqual({ok, <<"xx">>}, pyport:eval(C, <<"'x' * 2">>)),
    ok = pyport:exec(C, <<"def items():\n    yield 'small'\n    yield 'x' * 5000\n">>),
    {ok, S} = pyport:stream(C, '__main__', items, []),
    ?assertEqual({data, <<"small">>}, pyport:stream_next(S, 5000)),
    ?assertMatch({error, {reply_too_large, _, 1000}}, pyport:stream_next(S, 5000)),
    ok = pyport:stop_runtime(Rt).

output_flood() ->
    [{doc, "print in a tight loop for 2 s: the node stays responsive (calls to another "
           "runtime answer in under 200 ms throughout), its memory stays bounded, and "
           "the dropped lines are counted in a log message."}].
output_flood(_Config) ->
    ok = pyport_ct:forward_logs(),
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Rt, a),
    ok = pyport:exec(C, <<"import time\n"
                          "def shout(seconds):\n"
                          "    end = time.monotonic() + seconds\n"
                          "    n = 0\n"
                          "    while time.monotonic() < end:\n"
                          "        print('flood', n)\n"
                          "        n += 1\n"
                          "    return n\n">>),
    Mem0 = erlang:memory(total),
    Ref = pyport:async_call(C, '__main__', shout, [2]),
    Worst = probe_latency(Ref, 0),
    {ok, Lines} = pyport:await(Ref, 10000),
    %% one more line after the second is over reports the drops
    ok = pyport:exec(C, <<"print('after')">>),
    Mem1 = erlang:memory(total),
    Dropped = collect_dropped(),
    pyport_ct:stop_forwarding_logs(),
    ct:log("~b lines printed in 2 s; worst call latency meanwhile ~b us; node memory "
           "~b -> ~b; drop reports: ~p", [Lines, Worst, Mem0, Mem1, Dropped]),
    ?assert(Lines > 10000),
    ?assert(Worst < 200000),
    ?assert(Mem1 - Mem0 < 64 * 1024 * 1024),
    ?assertNotEqual([], Dropped),
    ok = pyport:stop_runtime(Rt).

%% Calls the default runtime until the async call Ref has answered; the worst latency.
probe_latency(Ref, Worst) ->
    receive
        {pyport, Ref, _} = Done -> self() ! Done, Worst
    after 0 ->
        T0 = erlang:monotonic_time(microsecond),
        {ok, 3} = pyport:call(operator, add, [1, 2]),
        probe_latency(Ref, max(Worst, erlang:monotonic_time(microsecond) - T0))
    end.

collect_dropped() ->
    receive
        {pyport_log, _Level, Message} ->
            case string:find(Message, "lines of Python output dropped") of
                nomatch -> collect_dropped();
                _ -> [Message | collect_dropped()]
            end
    after 0 ->
        []
    end.

callbacks_are_bounded() ->
    [{doc, "erlang.call from 1,000 Python threads at once: at most 100 callback "
           "processes run at a time in the node, and all 1,000 calls complete."}].
callbacks_are_bounded(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Rt, a),
    Counter = atomics:new(2, []),
    ok = pyport:register_function(pyport_boundary_slow,
                                  fun(X) ->
                                      N = atomics:add_get(Counter, 1, 1),
                                      update_max(Counter, N),
                                      receive after 20 -> ok end,  % the workload
                                      atomics:sub(Counter, 1, 1),
                                      X
                                  end),
    ok = pyport:exec(C, <<"import erlang, threading\n"
                          "def many(n):\n"
                          "    out = [None] * n\n"
                          "    def one(i):\n"
                          "        out[i] = erlang.call('pyport_boundary_slow', i)\n"
                          "    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]\n"
                          "    for t in ts: t.start()\n"
                          "    for t in ts: t.join()\n"
                          "    return out == list(range(n))\n">>),
    ?assertEqual({ok, true}, pyport:call(C, '__main__', many, [1000], #{},
                                         #{timeout => 120000})),
    Max = atomics:get(Counter, 2),
    ct:log("at most ~b callbacks ran at once", [Max]),
    ?assert(Max =< 100),
    ?assert(Max > 1),
    ok = pyport:unregister_function(pyport_boundary_slow),
    ok = pyport:stop_runtime(Rt).

update_max(Counter, N) ->
    Old = atomics:get(Counter, 2),
    case N > Old of
        true ->
            case atomics:compare_exchange(Counter, 2, Old, N) of
                ok -> ok;
                _ -> update_max(Counter, N)
            end;
        false ->
            ok
    end.

%% The names among these that are atoms of the node.
existing(Names) ->
    [N || N <- Names, try binary_to_existing_atom(N) of _ -> true catch error:badarg -> false end].

limits_come_from_erlang() ->
    [{doc, "The port program has no defaults of its own: started without the limits "
           "it answers {start_error, ...} naming the first one missing instead of a "
           "hello (then the keeper's {exited, 2}); started by a runtime without limit options, its info says the "
           "defaults pyport_opts gave it (1 GiB frames, as the port program reports "
           "them back, and 5000 atoms)."}].
limits_come_from_erlang(_Config) ->
    Exe = pyport_opts:executable(#{}),
    Port = open_port({spawn_executable, Exe}, [{packet, 4}, binary, exit_status, use_stdio]),
    ?assertEqual({start_error, <<"--max-frame is required (the Erlang side gives every "
                                 "limit)">>}, next_event(Port)),
    %% the keeper reports the worker's exit and waits for the owner's answer
    ?assertEqual({exited, 2}, next_event(Port)),
    _ = pyport_call:cast_request(Port, 0, exited_seen),
    receive {Port, {exit_status, Status}} -> ?assertEqual(2, Status) end,
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, Info} = pyport:info(Rt),
    ?assertMatch(#{max_frame := 1073741824, max_atoms := 5000}, Info),
    ok = pyport:stop_runtime(Rt).

next_event(Port) ->
    receive
        {Port, {data, <<1, HLen:16, _:HLen/binary, Payload/binary>>}} ->
            binary_to_term(Payload)
    end.

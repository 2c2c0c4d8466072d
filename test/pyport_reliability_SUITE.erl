%% @doc Reliability: crash loops stay contained, runtime handles survive restarts, bad
%% arguments are errors at once.
-module(pyport_reliability_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% A call that segfaults the OS process: reading address 0.
%% A segfault (a read of address 0 through ctypes); on Python 3.12, whose _ctypes
%% refuses sub-interpreters, abort(3): either way the OS process dies by a signal.
-define(CRASH_CODE, "try:\n"
                    "    import ctypes\n"
                    "except ImportError:\n"
                    "    import os\n"
                    "    os.abort()\n"
                    "ctypes.string_at(0)\n").
%% Fast back-off, so many crashes fit in a test.
-define(FAST_RESTART, #{min_delay => 1, max_delay => 10}).

all() ->
    [crash_loop_is_contained, crashing_preload_backs_off, user_supervisor_never_gives_up,
     unnamed_handle_survives_restarts, bad_arguments_are_errors_at_once,
     interrupt_busy_loop, interrupt_waits, sleep_ends_at_deadline, idle_interrupt_is_harmless,
     stuck_in_c_is_replaced, stuck_main_context_restarts_runtime, max_memory,
     forked_child_cannot_write_frames, nested_request_keeps_outer_deadline, unrelated_request_keeps_its_deadline,
     no_os_process_left_behind].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

%%% Cases

crash_loop_is_contained() ->
    [{doc, "200 segfaults in a row in one runtime: it comes back every time, while "
           "another runtime and the default runtime answer every call throughout, and "
           "the application's supervisor and the default runtime are the same processes "
           "at the end."}].
crash_loop_is_contained(_Config) ->
    Sup = whereis(pyport_sup),
    Default = whereis(pyport),
    {ok, Crashy} = pyport:start_runtime(#{contexts => [#{name => a}],
                                          restart => ?FAST_RESTART}),
    {ok, Steady} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Crashy, a),
    {ok, S} = pyport:context(Steady, a),
    Checker = start_checker([S, default]),
    lists:foreach(fun(I) ->
                      OsPid = pyport_ct:os_pid(Crashy),
                      ?assertMatch({error, {runtime_down, _}}, pyport:exec(C, <<?CRASH_CODE>>)),
                      pyport_ct:await_new_os_pid(Crashy, OsPid),
                      ?assertEqual({ok, I}, pyport:call(C, operator, add, [I, 0]))
                  end, lists:seq(1, 200)),
    {Calls, Failures} = stop_checker(Checker),
    ct:log("other runtimes: ~b calls during the crash loop, failures: ~p", [Calls, Failures]),
    ?assert(Calls > 0),
    ?assertEqual([], Failures),
    {ok, #{restarts := Restarts}} = pyport:info(Crashy),
    ?assertEqual(200, Restarts),
    ?assertEqual(Sup, whereis(pyport_sup)),
    ?assertEqual(Default, whereis(pyport)),
    ok = pyport:stop_runtime(Crashy),
    ok = pyport:stop_runtime(Steady).

crashing_preload_backs_off() ->
    [{doc, "A runtime whose preload crashes every time it starts again: its callers get "
           "{error, {runtime_down, _}} at once while it is down, the delay between tries "
           "grows, other runtimes are not affected, and it recovers once the cause is "
           "gone."}].
crashing_preload_backs_off(Config) ->
    Marker = filename:join(?config(priv_dir, Config), "crash_on_start"),
    Preload = iolist_to_binary(
                ["import os\n"
                 "if os.path.exists(", io_lib:format("~p", [Marker]), "):\n"
                 "    exec(", io_lib:format("~p", [?CRASH_CODE]), ")\n"]),
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a, preload => Preload}],
                                      restart => #{min_delay => 20, max_delay => 200}}),
    {ok, C} = pyport:context(Rt, a),
    ok = file:write_file(Marker, <<>>),
    ?assertMatch({error, {runtime_down, _}}, pyport:exec(C, <<?CRASH_CODE>>)),
    %% the restarts keep crashing in the preload: callers are answered at once
    Waits = [begin
                 T0 = erlang:monotonic_time(millisecond),
                 R = pyport:call(C, operator, add, [1, 2]),
                 {erlang:monotonic_time(millisecond) - T0, R}
             end || _ <- lists:seq(1, 20)],
    [?assertMatch({_, {error, {runtime_down, _}}}, W) || W <- Waits],
    ?assert(lists:max([Ms || {Ms, _} <- Waits]) < 100),
    %% restarts continue with back-off (at most 200 ms apart): wait for a few
    R0 = restarts(Rt),
    pyport_ct:wait_for(fun() -> case restarts(Rt) >= R0 + 3 of
                                    true -> {ok, done};
                                    false -> not_yet
                                end
                       end, 300),
    ?assertEqual({ok, 3}, pyport:call(default_ctx(), operator, add, [1, 2])),
    ok = file:delete(Marker),
    pyport_ct:wait_for(fun() -> case pyport:call(C, operator, add, [1, 2]) of
                                    {ok, 3} -> {ok, back};
                                    Other -> Other
                                end
                       end, 500),
    ok = pyport:stop_runtime(Rt).

user_supervisor_never_gives_up() ->
    [{doc, "Under the user's own supervisor (intensity 1 in 60 s) a runtime crashed 10 "
           "times stays the same child and the supervisor lives on."}].
user_supervisor_never_gives_up(_Config) ->
    Spec = pyport_runtime:child_spec(#{contexts => [#{name => a}], restart => ?FAST_RESTART}),
    {ok, Sup} = supervisor:start_link(?MODULE, {strict, Spec}),
    [{_, Child, worker, _}] = supervisor:which_children(Sup),
    {ok, C} = pyport:context(Child, a),
    lists:foreach(fun(_) ->
                      OsPid = pyport_ct:os_pid(Child),
                      ?assertMatch({error, {runtime_down, _}}, pyport:exec(C, <<?CRASH_CODE>>)),
                      pyport_ct:await_new_os_pid(Child, OsPid)
                  end, lists:seq(1, 10)),
    ?assertEqual([{maps:get(id, Spec), Child, worker, [pyport_runtime]}],
                 supervisor:which_children(Sup)),
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2])),
    unlink(Sup),
    Mref = erlang:monitor(process, Sup),
    exit(Sup, shutdown),
    receive {'DOWN', Mref, process, Sup, _} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end.

%% supervisor callback
init({strict, Spec}) ->
    {ok, {#{strategy => one_for_one, intensity => 1, period => 60}, [Spec]}}.

unnamed_handle_survives_restarts() ->
    [{doc, "The handle start_runtime/1 returns for an unnamed runtime works after its "
           "OS process was killed: context/2, info/1, new_context/2, then stop_runtime/1 "
           "leaves no OS process behind."}].
unnamed_handle_survives_restarts(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    OsPid = pyport_ct:os_pid(Rt),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    NewOsPid = pyport_ct:await_new_os_pid(Rt, OsPid),
    {ok, C} = pyport:context(Rt, a),
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2])),
    {ok, #{os_pid := NewOsPid, restarts := 1, runtime := Rt}} = pyport:info(Rt),
    {ok, D} = pyport:new_context(Rt, #{name => d}),
    ?assertEqual({ok, 3}, pyport:call(D, operator, add, [1, 2])),
    ?assertEqual(ok, pyport:stop_runtime(Rt)),
    %% the port program exits when it reads the end of its input
    pyport_ct:wait_for(fun() -> case os_process_alive(NewOsPid) of
                                    false -> {ok, gone};
                                    true -> alive
                                end
                       end, 200).

bad_arguments_are_errors_at_once() ->
    [{doc, "async_call, cast and stream with arguments of the wrong type answer "
           "{error, {bad_request, What}} at once (async_call as its result message), "
           "instead of crashing a process nobody watches."}].
bad_arguments_are_errors_at_once(_Config) ->
    Ctx = default_ctx(),
    Ref1 = pyport:async_call(not_a_ctx, operator, add, [1, 2]),
    ?assertEqual({error, {bad_request, ctx}}, pyport:await(Ref1, 1000)),
    Ref2 = pyport:async_call(Ctx, operator, add, not_a_list),
    ?assertEqual({error, {bad_request, args}}, pyport:await(Ref2, 1000)),
    Ref3 = pyport:async_call(Ctx, 42, add, []),
    ?assertEqual({error, {bad_request, module}}, pyport:await(Ref3, 1000)),
    ?assertEqual({error, {bad_request, args}}, pyport:cast(Ctx, operator, add, x)),
    ?assertEqual({error, {bad_request, kwargs}},
                 pyport:stream(Ctx, builtins, range, [3], not_a_map)),
    ?assertEqual({error, {bad_request, opts}},
                 pyport:stream(Ctx, builtins, range, [3], #{}, [])),
    %% and the good ones still work
    ?assertEqual({ok, 3}, pyport:await(pyport:async_call(Ctx, operator, add, [1, 2]), 5000)).

interrupt_busy_loop() ->
    [{doc, "pyport:interrupt/1 stops a busy Python loop: its caller gets "
           "{error, interrupted}, except BaseException handlers see erlang.Interrupted, "
           "and the context serves the next call."}].
interrupt_busy_loop(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}, #{name => b, mode => main}]}),
    lists:foreach(
      fun(Name) ->
              {ok, C} = pyport:context(Rt, Name),
              ok = pyport:exec(C, <<"import erlang
"
                                    "def spin(pid):
"
                                    "    erlang.send(pid, 'spinning')
"
                                    "    while True:
"
                                    "        pass
">>),
              Ref = pyport:async_call(C, '__main__', spin, [self()]),
              receive <<"spinning">> -> ok after 5000 -> ct:fail(not_spinning) end,
              ok = pyport:interrupt(C),
              ?assertEqual({error, interrupted}, pyport:await(Ref, 5000)),
              ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2]))
      end, [a, b]),
    ok = pyport:stop_runtime(Rt).

interrupt_waits() ->
    [{doc, "Waits pyport owns end at once on interrupt: time.sleep(60), erlang.call of "
           "an Erlang function that does not answer, and a channel receive."}].
interrupt_waits(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Rt, a),
    Self = self(),
    ok = pyport:register_function(pyport_rel_hang,
                                  fun() -> Self ! hanging, receive never -> ok end end),
    {ok, _Chan} = pyport:channel_open(C, <<"idle">>, #{}),
    ok = pyport:exec(C, <<"import erlang, time
"
                          "def nap(pid):
"
                          "    erlang.send(pid, 'waiting')
"
                          "    time.sleep(60)
"
                          "def hang():
"
                          "    erlang.call('pyport_rel_hang')
"
                          "def take(pid):
"
                          "    erlang.send(pid, 'waiting')
"
                          "    return erlang.channel('idle').receive()
">>),
    Wait = fun(Fun, Args, Started) ->
                   Ref = pyport:async_call(C, '__main__', Fun, Args),
                   receive Started -> ok after 5000 -> ct:fail({not_started, Fun}) end,
                   T0 = erlang:monotonic_time(millisecond),
                   ok = pyport:interrupt(C),
                   ?assertEqual({error, interrupted}, pyport:await(Ref, 5000)),
                   Ms = erlang:monotonic_time(millisecond) - T0,
                   ct:log("~p: answered ~b ms after the interrupt", [Fun, Ms]),
                   ?assert(Ms < 1000)
           end,
    Wait(nap, [self()], <<"waiting">>),
    Wait(hang, [], hanging),
    Wait(take, [self()], <<"waiting">>),
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2])),
    ok = pyport:unregister_function(pyport_rel_hang),
    ok = pyport:stop_runtime(Rt).

sleep_ends_at_deadline() ->
    [{doc, "time.sleep(60) under a 200 ms timeout: the caller gets timeout, and the "
           "context answers the next call at once instead of sleeping on."}].
sleep_ends_at_deadline(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Rt, a),
    ?assertEqual({error, timeout}, pyport:call(C, time, sleep, [60], #{}, #{timeout => 200})),
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2], #{}, #{timeout => 5000})),
    Ms = erlang:monotonic_time(millisecond) - T0,
    ct:log("next call answered after ~b ms", [Ms]),
    ?assert(Ms < 1000),
    %% a plain short sleep still sleeps
    T1 = erlang:monotonic_time(millisecond),
    ?assertEqual({ok, none}, pyport:call(C, time, sleep, [0.1])),
    ?assert(erlang:monotonic_time(millisecond) - T1 >= 100),
    ok = pyport:stop_runtime(Rt).

idle_interrupt_is_harmless() ->
    [{doc, "Interrupting an idle context does nothing: the next request runs normally."}].
idle_interrupt_is_harmless(_Config) ->
    C = default_ctx(),
    ok = pyport:interrupt(C),
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2])).

stuck_in_c_is_replaced() ->
    [{doc, "A 3 s select(2) on a pipe nobody writes (blocked in C) under a 200 ms "
           "timeout, stuck_after 500 ms: the caller gets timeout, the next call to the "
           "same handle answers within stuck_after + 1 s from a new interpreter with its "
           "preload state, another context answers throughout, and the stuck thread ends "
           "once select returns."}].
stuck_in_c_is_replaced(_Config) ->
    Preload = <<"import os, select\n"
                "state = 'preloaded'\n"
                "def stuck(n):\n"
                "    r, w = os.pipe()\n"
                "    select.select([r], [], [], n)\n"
                "    os.close(r); os.close(w)\n">>,
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a, preload => Preload},
                                                   #{name => b}],
                                      stuck_after => 500}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    OsPid = pyport_ct:os_pid(Rt),
    ok = pyport:exec(A, <<"state = 'changed'">>),
    Threads = thread_count(OsPid),
    Checker = start_checker([B]),
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual({error, timeout},
                 pyport:call(A, '__main__', stuck, [3], #{}, #{timeout => 200})),
    ?assertEqual({ok, <<"preloaded">>},
                 pyport:eval(A, <<"state">>, #{}, #{timeout => 5000})),
    Ms = erlang:monotonic_time(millisecond) - T0,
    ct:log("timeout at 200 ms, answered by the replacement after ~b ms", [Ms]),
    ?assert(Ms < 200 + 500 + 1000),
    {Calls, Failures} = stop_checker(Checker),
    ?assert(Calls > 0),
    ?assertEqual([], Failures),
    ?assertEqual(OsPid, pyport_ct:os_pid(Rt)),
    %% the stuck thread returns from select, ends its interpreter and exits
    pyport_ct:wait_for(fun() -> case thread_count(OsPid) =< Threads of
                                    true -> {ok, back};
                                    false -> {more_threads, thread_count(OsPid), Threads}
                                end
                       end, 600),
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    %% info/1 counts the replacement, and the context's counters went on across it:
    %% the exec before it, the eval and the add after it (the stuck call ended on the
    %% old interpreter, after the counters moved on; its caller's own timer answered)
    {ok, #{contexts := [StatsA, #{replaced := 0}]}} = pyport:info(Rt),
    ?assertMatch(#{name := a, replaced := 1, requests := 3}, StatsA),
    ok = pyport:stop_runtime(Rt).

stuck_main_context_restarts_runtime() ->
    [{doc, "A main context stuck past its deadline plus stuck_after restarts the runtime "
           "(the main interpreter's GIL may be held): the runtime comes back by itself "
           "and the handle works again."}].
stuck_main_context_restarts_runtime(_Config) ->
    Preload = <<"import ctypes\nlibc = ctypes.CDLL(None)\n">>,
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => m, mode => main,
                                                     preload => Preload}],
                                      stuck_after => 300}),
    {ok, M} = pyport:context(Rt, m),
    OsPid = pyport_ct:os_pid(Rt),
    ?assertEqual({error, timeout},
                 pyport:eval(M, <<"libc.sleep(30)">>, #{}, #{timeout => 200})),
    pyport_ct:await_new_os_pid(Rt, OsPid),
    ?assertEqual({ok, 3}, pyport:call(M, operator, add, [1, 2])),
    ok = pyport:stop_runtime(Rt).

max_memory() ->
    [{doc, "max_memory 400 MiB: bytearray(10**11) raises MemoryError in Python; an "
           "endless append restarts the runtime cleanly ({runtime_down, {port_exit, 76}} "
           "to its caller), which then serves again; other runtimes are untouched."}].
max_memory(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}, #{name => m, mode => main}],
                                      max_memory => 400 * 1024 * 1024,
                                      restart => ?FAST_RESTART}),
    lists:foreach(
      fun(Name) ->
              {ok, C} = pyport:context(Rt, Name),
              ?assertMatch({error, {python, <<"MemoryError">>, _, _}},
                           pyport:eval(C, <<"len(bytearray(10**11))">>)),
              OsPid = pyport_ct:os_pid(Rt),
              ok = pyport:exec(C, <<"def hog():\n"
                                    "    x = []\n"
                                    "    while True:\n"
                                    "        x.append(bytearray(10**6))\n">>),
              ?assertEqual({error, {runtime_down, {port_exit, 76}}},
                           pyport:call(C, '__main__', hog, [], #{}, #{timeout => 60000})),
              pyport_ct:await_new_os_pid(Rt, OsPid),
              ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2]))
      end, [a, m]),
    ?assertEqual({ok, 3}, pyport:call(default_ctx(), operator, add, [1, 2])),
    ok = pyport:stop_runtime(Rt).

forked_child_cannot_write_frames() ->
    [{doc, "A C-level fork() in a main context (as C libraries do; CPython's own "
           "os.fork() aborts such a child in its after-fork code): the child writes "
           "frame-like bytes to every fd it has, and the protocol stream is not touched "
           "(the child has no protocol fds); the runtime answers on as before, in the "
           "same OS process. Without the fork handler these bytes broke the stream."}].
forked_child_cannot_write_frames(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => m, mode => main}]}),
    {ok, M} = pyport:context(Rt, m),
    OsPid = pyport_ct:os_pid(Rt),
    ok = pyport:exec(M, <<"import os, time\n"
                          "def fork_and_scribble():\n"
                          "    import ctypes\n"
                          "    pid = ctypes.CDLL(None).fork()\n"
                          "    if pid == 0:\n"
                          "        for fd in range(3, 256):\n"
                          "            try:\n"
                          "                os.write(fd, b'\\x00\\x00\\x00\\x08\\x00\\x00\\x00garbage')\n"
                          "            except OSError:\n"
                          "                pass\n"
                          "        os._exit(0)\n"
                          "    # A child of a process with sub-interpreters and threads can hang\n"
                          "    # in CPython's after-fork code, or on a full pipe: 5 s at most.\n"
                          "    for _ in range(500):\n"
                          "        if os.waitpid(pid, os.WNOHANG)[0]:\n"
                          "            return 'parent'\n"
                          "        time.sleep(0.01)\n"
                          "    os.kill(pid, 9)\n"
                          "    os.waitpid(pid, 0)\n"
                          "    return 'parent'\n">>),
    ?assertEqual({ok, <<"parent">>}, pyport:call(M, '__main__', fork_and_scribble, [])),
    [?assertEqual({ok, 3}, pyport:call(M, operator, add, [1, 2])) || _ <- lists:seq(1, 100)],
    ?assertEqual(OsPid, pyport_ct:os_pid(Rt)),
    ok = pyport:stop_runtime(Rt).

nested_request_keeps_outer_deadline() ->
    [{doc, "A request with a 1 s timeout calls Erlang, which calls the same context "
           "with no timeout, and that spins: the outer deadline still stops it, so the "
           "context answers the next call at once."}].
nested_request_keeps_outer_deadline(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Rt, a),
    ok = pyport:exec(C, <<"import erlang\n"
                          "def spin():\n"
                          "    while True:\n"
                          "        pass\n"
                          "def outer():\n"
                          "    return erlang.call('pyport_rel_nest')\n">>),
    ok = pyport:register_function(pyport_rel_nest,
                                  fun() ->
                                      pyport:call(C, '__main__', spin, [], #{},
                                                  #{timeout => infinity})
                                  end),
    %% The inner request stops at the outer deadline; the outer request, whose
    %% deadline has passed too, gets CallTimeout from its erlang.call (never the inner
    %% timeout as the value the Erlang function returned), so its caller sees timeout
    %% whichever of its own timer and the reply comes first.
    %% 1 s: the inner request surely starts before the outer deadline (one that
    %% started after it would have no deadline of its own: timeout => infinity)
    ?assertEqual({error, timeout},
                 pyport:call(C, '__main__', outer, [], #{}, #{timeout => 1000})),
    T0 = erlang:monotonic_time(millisecond),
    %% The next call is served at once, with its own deadline: served while the outer
    %% request still waits in `erlang.call', it must not inherit the outer deadline,
    %% which has passed (it did, and answered `timeout', about once in 25 runs).
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2], #{}, #{timeout => 5000})),
    Ms = erlang:monotonic_time(millisecond) - T0,
    ct:log("the context answered ~b ms after the outer timeout", [Ms]),
    ?assert(Ms < 1000),
    ok = pyport:unregister_function(pyport_rel_nest),
    ok = pyport:stop_runtime(Rt).

unrelated_request_keeps_its_deadline() ->
    [{doc, "While a request with a 300 ms timeout waits in erlang.call (its Erlang "
           "function is held), an unrelated request is served in that wait: a 500 ms "
           "time.sleep with a 5 s timeout of its own completes, instead of inheriting "
           "the waiting request's deadline and answering timeout."}].
unrelated_request_keeps_its_deadline(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, C} = pyport:context(Rt, a),
    ok = pyport:exec(C, <<"import erlang\n"
                          "def outer():\n"
                          "    return erlang.call('pyport_rel_hold')\n">>),
    Test = self(),
    ok = pyport:register_function(pyport_rel_hold,
                                  fun() ->
                                      Test ! {held, self()},
                                      receive go -> held end
                                  end),
    Outer = pyport:async_call(C, '__main__', outer, [], #{}, #{timeout => 300}),
    Fun = receive {held, F} -> F after 10000 -> ct:fail(not_held) end,
    ?assertEqual({ok, none}, pyport:call(C, time, sleep, [0.5], #{}, #{timeout => 5000})),
    Fun ! go,
    ?assertEqual({error, timeout}, pyport:await(Outer, 5000)),
    ?assertEqual({ok, 3}, pyport:call(C, operator, add, [1, 2])),
    ok = pyport:unregister_function(pyport_rel_hold),
    ok = pyport:stop_runtime(Rt).

no_os_process_left_behind() ->
    [{doc, "Killing the port owner, killing the runtime's process, stop_runtime/1: each "
           "leaves no port program process behind."}].
no_os_process_left_behind(_Config) ->
    Gone = fun(OsPid) ->
                   pyport_ct:wait_for(fun() -> case os_process_alive(OsPid) of
                                                   false -> {ok, gone};
                                                   true -> alive
                                               end
                                      end, 300)
           end,
    %% the port owner killed: the port closes, the program reads end of input
    {ok, Rt1} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    Os1 = pyport_ct:os_pid(Rt1),
    [{_, Owner, _, _, _}] = ets:lookup(pyport_runtimes, runtime_key(Rt1)),
    exit(Owner, kill),
    Gone(Os1),
    ok = pyport:stop_runtime(Rt1),
    %% the runtime's own process killed: its port owner goes with it
    {ok, Rt2} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    Os2 = pyport_ct:os_pid(Rt2),
    Key2 = runtime_key(Rt2),
    exit(Rt2, kill),
    Gone(Os2),
    %% (pyport_sup starts it again: take that one away)
    ok = supervisor:terminate_child(pyport_sup, {pyport_runtime, Key2}),
    ok = supervisor:delete_child(pyport_sup, {pyport_runtime, Key2}),
    %% stop_runtime/1
    {ok, Rt3} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    Os3 = pyport_ct:os_pid(Rt3),
    ok = pyport:stop_runtime(Rt3),
    Gone(Os3).

%%% Helpers

thread_count(OsPid) ->
    length(filelib:wildcard("/proc/" ++ integer_to_list(OsPid) ++ "/task/*")).

default_ctx() ->
    {ok, Ctx} = pyport:context(pyport, default_1),
    Ctx.

restarts(Rt) ->
    case pyport:info(Rt) of
        {ok, #{restarts := N}} -> N;
        {error, _} -> pyport_runtime:restarts(runtime_key(Rt))
    end.

runtime_key(Rt) ->
    [{_, Key}] = ets:lookup(pyport_runtimes, {pid, Rt}),
    Key.


os_process_alive(OsPid) ->
    filelib:is_dir("/proc/" ++ integer_to_list(OsPid)).

%% A process calling the given contexts (`default' is the default runtime) in a loop
%% until told to stop; it reports how many calls it made and which failed.
start_checker(Targets) ->
    Self = self(),
    spawn_link(fun() -> check_loop(Self, Targets, 0, []) end).

check_loop(Parent, Targets, N, Failures) ->
    receive
        {stop, Parent} -> Parent ! {checked, self(), N, Failures}
    after 0 ->
        Results = [{T, check_call(T)} || T <- Targets],
        Bad = [R || {_, Result} = R <- Results, Result =/= {ok, 3}],
        check_loop(Parent, Targets, N + length(Targets), Bad ++ Failures)
    end.

check_call(default) -> pyport:call(operator, add, [1, 2]);
check_call(Ctx) -> pyport:call(Ctx, operator, add, [1, 2]).

stop_checker(Pid) ->
    Pid ! {stop, self()},
    receive {checked, Pid, N, Failures} -> {N, Failures}
        after 60000 -> ct:fail({no_message, ?LINE}) end.

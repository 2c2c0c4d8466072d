%% @doc A context's life: its end races nothing (the watchdog, threads its code
%% started), a panic of its thread outside a request takes it down cleanly, and
%% threads its code starts belong to it (in both modes).
-module(pyport_lifecycle_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

all() ->
    [{group, owngil}, {group, main}, interrupts_race_stop_context].

groups() ->
    Cases = [panic_outside_request_takes_context_down,
             thread_belongs_to_its_context,
             thread_waiting_in_call_is_released_at_stop,
             contexts_leave_no_fd_gaps],
    [{owngil, [], Cases}, {main, [], Cases}].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    [{executable, os:getenv("PYPORT_LIFECYCLE_EXECUTABLE")} | Config].

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    [{mode, Mode} | Config].

end_per_group(_Mode, _Config) ->
    ok.

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

%% A runtime of its own for each case (its crash would be the finding).
start_runtime(Config, Opts) ->
    Exe = case ?config(executable, Config) of
              false -> #{};
              "" -> #{};
              Path -> #{executable => Path}
          end,
    {ok, Rt} = pyport:start_runtime(maps:merge(Exe, Opts)),
    Rt.

%%% Cases

contexts_leave_no_fd_gaps() ->
    [{doc, "While a thread of a context's code opens and closes files without a pause, "
           "20 other contexts start and stop: the fds pyport makes for them (a poll "
           "and its waker each) live above the ones Python code opens, so no gap is left "
           "among those (test_os's closerange tests take the lowest free fd and the one "
           "after it)."}].
contexts_leave_no_fd_gaps(Config) ->
    Rt = start_runtime(Config, #{contexts => [#{name => c, mode => ?config(mode, Config)}]}),
    {ok, C} = pyport:context(Rt, c),
    ok = pyport:exec(C, <<"import os, threading\n"
                          "def _churn(stop):\n"
                          "    while not stop.is_set():\n"
                          "        os.close(os.open(os.devnull, os.O_RDONLY))\n"
                          "_stop = threading.Event()\n"
                          "_churner = threading.Thread(target=_churn, args=(_stop,))\n"
                          "_churner.start()\n"
                          "def _open(fd):\n"
                          "    try:\n"
                          "        os.fstat(fd)\n"
                          "        return True\n"
                          "    except OSError:\n"
                          "        return False\n"
                          "def gaps():\n"
                          "    _stop.set()\n"
                          "    _churner.join()\n"
                          "    fds = [fd for fd in range(256) if _open(fd)]\n"
                          "    return [fd for fd in range(fds[-1]) if fd not in fds]\n">>),
    [begin
         {ok, X} = pyport:new_context(Rt, #{mode => M}),
         {ok, 2} = pyport:eval(X, <<"1 + 1">>),
         ok = pyport:stop_context(X)
     end || _ <- lists:seq(1, 10), M <- [owngil, main]],
    ?assertEqual({ok, []}, pyport:call(C, '__main__', gaps, [])),
    ok = pyport:stop_runtime(Rt).

interrupts_race_stop_context() ->
    [{doc, "300 owngil contexts, each ended by stop_context while its request's deadline "
           "fires and pyport:interrupt/1 arrives, with the test hook that makes the "
           "watchdog take 20 ms from deciding to interrupt to queuing the interrupt: it "
           "never queues one on an interpreter that has ended (the OS process stays the "
           "same) and every caller gets one of the answers the contract allows."}].
interrupts_race_stop_context(Config) ->
    Rt = start_runtime(Config, #{env => [{"PYPORT_TEST_HOOKS", "1"}]}),
    OsPid = pyport_ct:os_pid(Rt),
    Allowed = fun({ok, _}) -> true;
                 ({error, timeout}) -> true;
                 ({error, interrupted}) -> true;
                 ({error, {context_down, stopped}}) -> true;
                 (_) -> false
              end,
    Me = self(),
    Results =
        [begin
             {ok, C} = pyport:new_context(Rt, #{}),
             %% runs until just about its own deadline, so the watchdog fires while the
             %% request ends and the stop queued behind it ends the interpreter; every
             %% other time pyport:interrupt/1 races them too
             ok = pyport:exec(C, <<"def work(pid, tag):\n"
                                   "    import time, erlang\n"
                                   "    end = time.monotonic() + 0.002\n"
                                   "    erlang.send(pid, (erlang.atom('running'), tag))\n"
                                   "    while time.monotonic() < end:\n"
                                   "        pass\n">>),
             Tag = make_ref(),
             Caller = spawn_link(fun() ->
                                         Me ! {self(), pyport:call(C, '__main__', work,
                                                                   [Me, Tag], #{},
                                                                   #{timeout => 2})}
                                 end),
             %% the caller's own timer may answer before `running' arrives, and a
             %% request that arrives past its deadline is dropped unrun
             Result = receive
                          {running, Tag} ->
                              I rem 2 =:= 0 andalso pyport:interrupt(C),
                              ok = pyport:stop_context(C),
                              receive {Caller, R} -> R end;
                          {Caller, R} ->
                              ok = pyport:stop_context(C),
                              R
                      end,
             %% the stop's answer comes after every event of the context's requests
             receive {running, Tag} -> ok after 0 -> ok end,
             Result
         end || I <- lists:seq(1, 300)],
    ?assertEqual([], [R || R <- Results, not Allowed(R)]),
    ?assertEqual(OsPid, pyport_ct:os_pid(Rt)),
    ?assertEqual({ok, 3}, pyport:call(default_ctx(Rt), operator, add, [1, 2])),
    ok = pyport:stop_runtime(Rt).

panic_outside_request_takes_context_down() ->
    [{doc, "The context thread panics right after answering a request, outside any "
           "request (the PYPORT_TEST_HOOKS hook): the request got its answer, the two "
           "requests queued behind it get {error, {context_down, panic}} at once, and "
           "so does a later one; stop_context is ok and the runtime's other contexts "
           "serve on."}].
panic_outside_request_takes_context_down(Config) ->
    Mode = ?config(mode, Config),
    Rt = start_runtime(Config, #{env => [{"PYPORT_TEST_HOOKS", "1"}]}),
    OsPid = pyport_ct:os_pid(Rt),
    {ok, C} = pyport:new_context(Rt, #{mode => Mode}),
    {ok, Other} = pyport:new_context(Rt, #{mode => Mode}),
    {ok, [R, W]} = pyport:eval(C, <<"list(__import__('os').pipe())">>),
    %% blocks in C (os.read), so the requests sent meanwhile stay queued
    Me = self(),
    Blocked = spawn_link(fun() ->
                                 Me ! {blocked, pyport:exec(C, iolist_to_binary(
                                     ["import _pyport, os\n"
                                      "_pyport._test_panic_outside_request()\n"
                                      "os.read(", integer_to_list(R), ", 1)\n"]))}
                         end),
    Queued = [spawn_link(fun() ->
                                 Me ! {queued, self(), pyport:call(C, operator, add, [I, 1],
                                                                   #{}, #{timeout => 10000})}
                         end) || I <- [1, 2]],
    Id = ctx_id(C),
    pyport_ct:wait_for(fun() -> case queued(Rt, Id) of
                                    N when N >= 2 -> {ok, N};
                                    N -> N
                                end
                       end, 500),
    ok = pyport:exec(Other, iolist_to_binary(["import os\nos.write(", integer_to_list(W),
                                              ", b'x')\n"])),
    receive {blocked, B} -> ?assertEqual(ok, B) end,
    unlink(Blocked),
    [receive {queued, P, Q} -> ?assertEqual({error, {context_down, panic}}, Q) end
     || P <- Queued],
    ?assertEqual({error, {context_down, panic}}, pyport:call(C, operator, add, [1, 2])),
    ok = pyport:stop_context(C),
    ?assertEqual({ok, 3}, pyport:call(Other, operator, add, [1, 2])),
    ?assertEqual(OsPid, pyport_ct:os_pid(Rt)),
    ok = pyport:stop_runtime(Rt).

thread_belongs_to_its_context() ->
    [{doc, "A threading thread started by a request belongs to that request's context: "
           "its erlang.self() is the pid that started it and its erlang.call runs, also "
           "while another process's request runs (in main mode, in another context that "
           "was created later, in the same interpreter); a thread it starts belongs to "
           "the same context."}].
thread_belongs_to_its_context(Config) ->
    Mode = ?config(mode, Config),
    Rt = start_runtime(Config, #{}),
    ok = pyport:register_function(lifecycle_echo, fun(X) -> X end),
    {ok, A} = pyport:new_context(Rt, #{mode => Mode}),
    ok = pyport:exec(A, <<"import threading, erlang\n"
                          "ev = threading.Event()\n"
                          "def body():\n"
                          "    ev.wait()\n"
                          "    box = []\n"
                          "    g = threading.Thread(target=lambda: box.append(erlang.self()))\n"
                          "    g.start()\n"
                          "    g.join()\n"
                          "    t.result = (erlang.self(), erlang.call('lifecycle_echo', 7), box[0])\n"
                          "t = threading.Thread(target=body, name='lifecycle-thread')\n"
                          "t.ev = ev\n"
                          "t.start()\n">>),
    %% in main mode the thread is reached from context B (same interpreter); in owngil
    %% from A itself, by another request
    {ok, B} = pyport:new_context(Rt, #{mode => Mode}),
    Joiner = case Mode of main -> B; owngil -> A end,
    Me = self(),
    Other = spawn_link(fun() ->
        ok = pyport:exec(Joiner, <<"import threading\n"
                                   "t = [t for t in threading.enumerate()\n"
                                   "     if t.name == 'lifecycle-thread'][0]\n"
                                   "t.ev.set()\n"
                                   "t.join(10)\n">>),
        Me ! {joined, self(), pyport:eval(Joiner, <<"t.result">>)}
    end),
    receive {joined, Other, Result} -> ?assertEqual({ok, {Me, 7, Me}}, Result) end,
    ok = pyport:unregister_function(lifecycle_echo),
    ok = pyport:stop_runtime(Rt).

thread_waiting_in_call_is_released_at_stop() ->
    [{doc, "A threading thread of a context waits in erlang.call on an Erlang function "
           "that does not return; stop_context returns ok, the wait raises "
           "erlang.Error((context_down, stopped)), and so does the thread's next "
           "erlang.call."}].
thread_waiting_in_call_is_released_at_stop(Config) ->
    Mode = ?config(mode, Config),
    Rt = start_runtime(Config, #{}),
    Me = self(),
    ok = pyport:register_function(lifecycle_block,
                                  fun() -> Me ! {blocked, self()},
                                           receive release -> ok end
                                  end),
    Out = filename:join(?config(priv_dir, Config),
                        "released_" ++ atom_to_list(Mode) ++ ".txt"),
    {ok, A} = pyport:new_context(Rt, #{mode => Mode}),
    {ok, B} = pyport:new_context(Rt, #{mode => Mode}),
    ok = pyport:exec(A, iolist_to_binary(
        ["import threading, erlang\n"
         "def outcome(f):\n"
         "    try:\n"
         "        f()\n"
         "        return 'returned'\n"
         "    except erlang.Error as e:\n"
         "        return ' '.join(['Error'] + [str(x) for x in e.args[0]] +\n"
         "                        [str(all(isinstance(x, erlang.Atom) for x in e.args[0]))])\n"
         "def body():\n"
         "    first = outcome(lambda: erlang.call('lifecycle_block'))\n"
         "    again = outcome(lambda: erlang.call('lifecycle_block'))\n"
         "    with open(", io_lib:format("~p", [Out]), ", 'w') as f:\n"
         "        f.write(first + '\\n' + again)\n"
         "threading.Thread(target=body, name='lifecycle-blocked').start()\n"])),
    Fn = receive {blocked, P} -> P end,
    ?assertEqual(ok, pyport:stop_context(A)),
    %% stop_context answers once the context stopped serving; the thread, released
    %% then, writes its outcome (an owngil interpreter's end joins it)
    %% (written in one piece once both calls were released; an empty file was opened
    %% but not written yet)
    Text = pyport_ct:wait_for(fun() -> case file:read_file(Out) of
                                           {ok, <<_, _/binary>> = T} -> {ok, T};
                                           {ok, <<>>} -> {not_yet, empty};
                                           Other -> Other
                                       end
                              end, 500),
    ?assertEqual(<<"Error context_down stopped True\nError context_down stopped True">>, Text),
    Fn ! release,
    ?assertEqual({ok, 3}, pyport:call(B, operator, add, [1, 2])),
    ok = pyport:unregister_function(lifecycle_block),
    ok = pyport:stop_runtime(Rt).

%%% Helpers

default_ctx(Rt) ->
    {ok, C} = pyport:new_context(Rt, #{}),
    C.

ctx_id(Ctx) ->
    element(3, Ctx).

queued(Rt, Id) ->
    {ok, #{contexts := Contexts}} = pyport:info(Rt),
    case [Q || #{id := I, queued := Q} <- Contexts, I =:= Id] of
        [Q] -> Q;
        [] -> 0
    end.

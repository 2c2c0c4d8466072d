%% @doc Deadlines and interrupts reach their own request only: a request's timeout or
%% `pyport:interrupt/1' never lands in a task on the loop, a stream pump or another
%% request that happens to run while that request waits in a wait pyport owns
%% (`erlang.call', a channel receive, `time.sleep'). Also: a request whose own deadline
%% passed while it waited is timed out even when its wait ended meanwhile; a coroutine
%% call's deadline counts from the request's arrival; a loop step that keeps raising
%% backs off instead of spinning. Every case runs in both context modes.
-module(pyport_deadline_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% Preloaded into every context. `main' contexts share one `__main__': the tables are
%% kept across the second preload and keys are per case.
-define(HELPERS, <<"
import asyncio, time, erlang

STATE = globals().get('STATE', {})

async def _spin(key, sleeps):
    try:
        while True:
            if sleeps:
                time.sleep(0.0005)
            else:
                sum(range(20000))
            STATE[key] = STATE.get(key, 0) + 1
            await asyncio.sleep(0)
    except BaseException as e:
        STATE[key + ':died'] = type(e).__name__
        raise

async def start_spinner(key, sleeps=False):
    STATE[key + ':task'] = asyncio.get_running_loop().create_task(_spin(key, sleeps))

def spinner(key):
    task = STATE[key + ':task']
    return (task.done(), STATE.get(key + ':died'), STATE.get(key, 0))

def stop_spinner(key):
    STATE.pop(key + ':task').cancel()

def stop_spinners():
    for key in [k for k in STATE if k.endswith(':task')]:
        STATE.pop(key).cancel()

def wait_in_call(name):
    return erlang.call(name)

def busy():
    for _ in range(10):
        sum(range(20000))
    return 'ok'

def busy_gen():
    i = 0
    while True:
        sum(range(20000))
        yield i
        i += 1

def outer_records(key, name):
    try:
        STATE[key] = ('returned', erlang.call(name))
    except erlang.CallTimeout:
        STATE[key] = 'timeout'
        raise

def spin_forever():
    while True:
        pass

def announced_sleep(pid, s):
    erlang.send(pid, 'sleeping')
    time.sleep(s)

async def nap_report(pid, s):
    try:
        await asyncio.sleep(s)
        erlang.send(pid, 'completed')
    except asyncio.CancelledError:
        erlang.send(pid, 'cancelled')
        raise

def break_selector():
    loop = asyncio.get_event_loop()
    def broken(timeout=None):
        raise OSError('selector broken')
    STATE['selector'] = loop._selector.select
    loop._selector.select = broken
    loop.call_soon(lambda: None)

def mend_selector():
    select = STATE.pop('selector', None)
    if select is not None:
        asyncio.get_event_loop()._selector.select = select

async def anap(s, v):
    await asyncio.sleep(s)
    return v
">>).

-define(HOLD, pyport_dl_hold).
%% Holds its caller for 2 s, telling nobody (its caller's deadline is far shorter).
-define(SLOW, pyport_dl_slow).
-define(ROUNDS, 30).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, owngil}, {group, main}].

groups() ->
    [{owngil, [], cases()}, {main, [], cases()}].

cases() ->
    [timeout_spares_loop_task, timeout_spares_sleeping_task, interrupt_spares_loop_task, timeout_spares_stream_pump,
     timeout_spares_nested_request, outer_deadline_passed_during_nested_request,
     outer_deadline_passed_in_wait_is_timeout,
     coroutine_deadline_counts_from_arrival, raising_loop_step_backs_off].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    pyport_ct:init_mode_group(pyport_deadline, Mode, ?HELPERS, Config).

end_per_group(_Mode, Config) ->
    pyport_ct:end_mode_group(Config).

init_per_testcase(_Case, Config) ->
    Test = self(),
    %% An Erlang function that holds its caller until released (or 10 s).
    ok = pyport:register_function(?HOLD, fun() ->
                                                 Test ! {held, self()},
                                                 receive release -> released
                                                 after 10000 -> gave_up
                                                 end
                                         end),
    ok = pyport:register_function(?SLOW, fun() ->
                                                 receive never -> never
                                                 after 2000 -> slow
                                                 end
                                         end),
    pyport_ct:contexts_ab(?config(runtime, Config), Config).

end_per_testcase(_Case, Config) ->
    ok = pyport:unregister_function(?HOLD),
    ok = pyport:unregister_function(?SLOW),
    [{ok, none} = pyport:call(?config(C, Config), '__main__', F, [])
     || C <- [a, b], F <- [stop_spinners, mend_selector]],
    pyport_ct:assert_no_messages().

%%% Cases

timeout_spares_loop_task() ->
    [{doc, "A background task spins on the loop (sum, then sleep(0)). Requests that "
           "wait in erlang.call past their 100 ms timeout each answer timeout, and the "
           "task is still running afterwards: no CallTimeout landed in it."}].
timeout_spares_loop_task(Config) ->
    A = ?config(a, Config),
    Key = key(Config, task_timeout),
    {ok, none} = pyport:call(A, '__main__', start_spinner, [Key]),
    [begin
         ?assertEqual({error, timeout}, slow_call(A, #{timeout => 100}))
     end || _ <- lists:seq(1, ?ROUNDS)],
    settle(Config),
    assert_spinning(A, Key).

timeout_spares_sleeping_task() ->
    [{doc, "A background task calls time.sleep (briefly) again and again. Requests "
           "that wait in erlang.call past their 100 ms timeout do not make the task's "
           "time.sleep raise CallTimeout: only a request's own sleep is tied to its "
           "deadline."}].
timeout_spares_sleeping_task(Config) ->
    A = ?config(a, Config),
    Key = key(Config, task_sleep),
    {ok, none} = pyport:call(A, '__main__', start_spinner, [Key], #{sleeps => true}),
    [?assertEqual({error, timeout}, slow_call(A, #{timeout => 100}))
     || _ <- lists:seq(1, ?ROUNDS)],
    settle(Config),
    assert_spinning(A, Key).

interrupt_spares_loop_task() ->
    [{doc, "A background task spins on the loop; pyport:interrupt/1 while a request "
           "waits in erlang.call stops that request ({error, interrupted}) and not "
           "the task the loop runs meanwhile."}].
interrupt_spares_loop_task(Config) ->
    A = ?config(a, Config),
    Key = key(Config, task_interrupt),
    {ok, none} = pyport:call(A, '__main__', start_spinner, [Key]),
    [begin
         Ref = pyport:async_call(A, '__main__', wait_in_call, [?HOLD], #{},
                                 #{timeout => 10000}),
         Holder = receive {held, H} -> H after 10000 -> ct:fail(not_held) end,
         ok = pyport:interrupt(A),
         ?assertEqual({error, interrupted}, pyport:await(Ref, 10000)),
         Holder ! release
     end || _ <- lists:seq(1, ?ROUNDS)],
    settle(Config),
    assert_spinning(A, Key).

timeout_spares_stream_pump() ->
    [{doc, "A process consumes a stream whose generator keeps computing; requests "
           "waiting in erlang.call time out meanwhile. The stream goes on delivering "
           "items: its pump, run by the loop during those waits, was not interrupted."}].
timeout_spares_stream_pump(Config) ->
    A = ?config(a, Config),
    Test = self(),
    %% a stream is read by the process that started it
    Consumer = spawn_link(fun() ->
                                  {ok, Stream} = pyport:stream(A, '__main__', busy_gen, [],
                                                               #{}, #{timeout => infinity}),
                                  consume(Test, Stream, 0)
                          end),
    [begin
         ?assertEqual({error, timeout}, slow_call(A, #{timeout => 100}))
     end || _ <- lists:seq(1, ?ROUNDS)],
    settle(Config),
    Consumer ! {stop, Test},
    {Items, Result} = receive {consumed, Consumer, N, R} -> {N, R}
                      after 10000 -> ct:fail(consumer_stuck)
                      end,
    ct:log("the consumer took ~b items", [Items]),
    ?assertEqual(streaming, Result).

timeout_spares_nested_request() ->
    [{doc, "While requests wait in erlang.call past their 100 ms timeout, another "
           "process keeps calling a function that computes for a while (no timeout): "
           "those calls, served nested in the waits, all answer their value."}].
timeout_spares_nested_request(Config) ->
    A = ?config(a, Config),
    B = ?config(b, Config),
    %% In `main' both contexts share the interpreter, and the pending call of A's
    %% deadline may be run by B's thread: keep B busy so it often is.
    KeyB = key(Config, nested_b),
    {ok, none} = pyport:call(B, '__main__', start_spinner, [KeyB]),
    Test = self(),
    Caller = spawn_link(fun() -> call_busy(Test, A, 0, []) end),
    [begin
         ?assertEqual({error, timeout}, slow_call(A, #{timeout => 100}))
     end || _ <- lists:seq(1, ?ROUNDS)],
    Caller ! {stop, Test},
    {Calls, Failures} = receive {called, Caller, N, F} -> {N, F}
                        after 10000 -> ct:fail(caller_stuck)
                        end,
    settle(Config),
    ct:log("the other process made ~b calls", [Calls]),
    ?assertEqual([], Failures),
    ?assert(Calls > 0),
    assert_spinning(B, KeyB).

outer_deadline_passed_during_nested_request() ->
    [{doc, "A request with a 300 ms timeout waits in erlang.call; an unrelated request "
           "(a 600 ms time.sleep) is served nested in that wait, and the Erlang function "
           "returns while it sleeps. When the nested request is done, the outer request, "
           "whose deadline passed meanwhile, gets CallTimeout from its erlang.call, not "
           "the value: it never runs on past its deadline."}].
outer_deadline_passed_during_nested_request(Config) ->
    A = ?config(a, Config),
    Key = key(Config, outer_nested),
    Test = self(),
    Outer = pyport:async_call(A, '__main__', outer_records, [Key, ?HOLD], #{},
                              #{timeout => 300}),
    Holder = receive {held, H} -> H after 10000 -> ct:fail(not_held) end,
    Nested = pyport:async_call(A, '__main__', announced_sleep, [Test, 0.6], #{},
                               #{timeout => 5000}),
    receive <<"sleeping">> -> ok after 10000 -> ct:fail(not_sleeping) end,
    Holder ! release,
    ?assertEqual({ok, none}, pyport:await(Nested, 10000)),
    ?assertEqual({error, timeout}, pyport:await(Outer, 10000)),
    settle(Config),
    ?assertEqual({ok, <<"timeout">>}, pyport:eval(A, <<"STATE[k]">>, #{k => Key})).

outer_deadline_passed_in_wait_is_timeout() ->
    [{doc, "A request with a 500 ms timeout calls Erlang, which calls the same context "
           "with no timeout, and that spins: the outer deadline stops the inner request, "
           "and the outer request, whose deadline has passed, gets CallTimeout from its "
           "erlang.call (not the inner {error, timeout} as the call's value), so its "
           "caller gets exactly {error, timeout}."}].
outer_deadline_passed_in_wait_is_timeout(Config) ->
    A = ?config(a, Config),
    Key = key(Config, outer_records),
    ok = pyport:register_function(pyport_dl_nest,
                                  fun() ->
                                      pyport:call(A, '__main__', spin_forever, [], #{},
                                                  #{timeout => infinity})
                                  end),
    try
        ?assertEqual({error, timeout},
                     pyport:call(A, '__main__', outer_records, [Key, pyport_dl_nest], #{},
                                 #{timeout => 500})),
        %% what the outer request's erlang.call did, looked up once it is over
        settle(Config),
        ?assertEqual({ok, <<"timeout">>},
                     pyport:eval(A, <<"STATE[k]">>, #{k => Key}))
    after
        ok = pyport:unregister_function(pyport_dl_nest)
    end.

coroutine_deadline_counts_from_arrival() ->
    [{doc, "A coroutine call with a 2 s timeout arrives while the context sleeps 1 s "
           "in another request; the coroutine naps 1.5 s. Its deadline counts from its "
           "arrival, so the task is cancelled at 2 s (before its nap ends at 2.5 s), "
           "not at 3 s (2 s after it started)."}].
coroutine_deadline_counts_from_arrival(Config) ->
    A = ?config(a, Config),
    Test = self(),
    Sleeper = pyport:async_call(A, '__main__', announced_sleep, [Test, 1.0]),
    receive <<"sleeping">> -> ok after 10000 -> ct:fail(not_sleeping) end,
    ?assertEqual({error, timeout},
                 pyport:call(A, '__main__', nap_report, [Test, 1.5], #{}, #{timeout => 2000})),
    ?assertEqual({ok, none}, pyport:await(Sleeper, 10000)),
    Outcome = receive <<"cancelled">> -> cancelled;
                      <<"completed">> -> completed
              after 10000 -> ct:fail(no_outcome)
              end,
    ?assertEqual(cancelled, Outcome).

raising_loop_step_backs_off() ->
    [{doc, "The loop's selector raises on every step. The context keeps answering, its "
           "OS process does not burn a core retrying (CPU time over a 1 s window stays "
           "a small fraction of it), and once the selector is mended the loop runs "
           "coroutines again."}].
raising_loop_step_backs_off(Config) ->
    A = ?config(a, Config),
    Rt = ?config(runtime, Config),
    OsPid = pyport_ct:os_pid(Rt),
    %% the loop exists once a coroutine ran
    ?assertEqual({ok, ready}, pyport:call(A, '__main__', anap, [0, ready])),
    {ok, none} = pyport:call(A, '__main__', break_selector, []),
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    Before = cpu_ms(OsPid),
    %% the measuring window (what is measured is CPU time, not a wait for an event)
    receive after 1000 -> ok end,
    Used = cpu_ms(OsPid) - Before,
    ct:log("CPU time of the OS process over 1 s with a raising loop step: ~b ms", [Used]),
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    {ok, none} = pyport:call(A, '__main__', mend_selector, []),
    ?assertEqual({ok, done}, pyport:call(A, '__main__', anap, [0.01, done])),
    ?assert(Used < 250).

%%% Helpers

key(Config, Name) ->
    iolist_to_binary(io_lib:format("~p:~p", [?config(mode, Config), Name])).

%% A call that waits in erlang.call on the slow function, with Opts.
slow_call(Ctx, Opts) ->
    pyport:call(Ctx, '__main__', wait_in_call, [?SLOW], #{}, Opts).

%% Waits until no request runs on the context (every wait above has unwound in
%% Python, so no late interrupt can still be on its way); bounded retries.
settle(Config) ->
    Rt = ?config(runtime, Config),
    pyport_ct:wait_for(fun() ->
                               {ok, #{contexts := Ctxs}} = pyport:info(Rt),
                               case [C || #{running := true} = C <- Ctxs] of
                                   [] -> {ok, idle};
                                   Running -> {running, Running}
                               end
                       end, 1000).

assert_spinning(Ctx, Key) ->
    {ok, {Done, Died, Steps}} = pyport:call(Ctx, '__main__', spinner, [Key]),
    ct:log("spinner ~s: done ~p, died of ~p, ~b steps", [Key, Done, Died, Steps]),
    ?assertEqual({false, none}, {Done, Died}),
    {ok, none} = pyport:call(Ctx, '__main__', stop_spinner, [Key]).

consume(Test, Stream, N) ->
    receive
        {stop, Test} ->
            ok = pyport:stream_cancel(Stream),
            Test ! {consumed, self(), N, streaming}
    after 0 ->
        case pyport:stream_next(Stream, 10000) of
            {data, _} -> consume(Test, Stream, N + 1);
            Other ->
                receive {stop, Test} -> Test ! {consumed, self(), N, Other} end
        end
    end.

call_busy(Test, Ctx, N, Failures) ->
    receive
        {stop, Test} -> Test ! {called, self(), N, Failures}
    after 0 ->
        case pyport:call(Ctx, '__main__', busy, [], #{}, #{timeout => infinity}) of
            {ok, <<"ok">>} -> call_busy(Test, Ctx, N + 1, Failures);
            Other -> call_busy(Test, Ctx, N + 1, [Other | Failures])
        end
    end.

%% utime + stime of an OS process, in ms.
cpu_ms(OsPid) ->
    {ok, Stat} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat"),
    %% the command name (field 2) is in parentheses and may hold spaces
    [_, After] = binary:split(Stat, <<") ">>),
    Fields = binary:split(After, <<" ">>, [global]),
    %% fields 14 and 15 of the stat line; After starts at field 3
    Ticks = binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields)),
    Ticks * 1000 div clk_tck().

clk_tck() ->
    case string:trim(os:cmd("getconf CLK_TCK")) of
        "" -> 100;
        T -> list_to_integer(T)
    end.

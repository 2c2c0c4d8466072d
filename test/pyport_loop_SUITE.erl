%% @doc The event loop of each context: tasks, timers, servers, the reactor and
%% subprocesses keep running between requests; many coroutine calls share one context;
%% erlang.async_call needs no thread per call; sync requests run with no loop running;
%% pending coroutine calls fail at once when their context or runtime goes away.
%% Every case runs in both context modes (groups `owngil' and `main').
-module(pyport_loop_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% Preloaded into every context of the suite. The shared tables survive a second
%% preload into the same interpreter (`main' contexts may share one).
-define(HELPERS, <<"
import asyncio, os, erlang

TASKS = globals().get('TASKS', set())
SERVERS = globals().get('SERVERS', {})
PIPES = globals().get('PIPES', {})

def keep(task):
    # the loop holds tasks weakly: keep a strong reference until each one ends
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
    return task

async def ticker(pid, n, interval):
    for i in range(n):
        await asyncio.sleep(interval)
        erlang.send(pid, ('tick', i))

async def start_ticker(pid, n, interval):
    keep(asyncio.get_running_loop().create_task(ticker(pid, n, interval)))

async def start_timer(pid, delay, msg):
    asyncio.get_running_loop().call_later(delay, erlang.send, pid, msg)

async def anap(s, v):
    await asyncio.sleep(s)
    return v

async def announced_nap(pid, s, v):
    erlang.send(pid, ('started', v))
    await asyncio.sleep(s)
    return v

async def wait_forever(pid, i):
    erlang.send(pid, ('waiting', i))
    await asyncio.Event().wait()

def run_coro(x):
    async def double():
        await asyncio.sleep(0.01)
        return 2 * x
    return asyncio.run(double())

def loop_running():
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False

async def loop_running_in_coro():
    return loop_running()

async def gather_calls(name, n):
    return list(await asyncio.gather(*[erlang.async_call(name, i) for i in range(n)]))

async def async_attempt(name, *args):
    try:
        return ('ok', await erlang.async_call(name, *args))
    except erlang.Error as e:
        return ('error', e.args[0])

async def async_plain(name, *args):
    return await erlang.async_call(name, *args)

async def echo_handler(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    finally:
        writer.close()

async def echo_server():
    server = await asyncio.start_server(echo_handler, '127.0.0.1', 0)
    port = server.sockets[0].getsockname()[1]
    SERVERS[port] = server
    return port

async def close_server(port):
    SERVERS.pop(port).close()

async def echo_via(port, text):
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    writer.write(text.encode() + b'\\n')
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return line

async def watch_readable(pid):
    r, w = os.pipe()
    os.set_blocking(r, False)
    def readable():
        erlang.send(pid, ('read', os.read(r, 1024)))
    asyncio.get_running_loop().add_reader(r, readable)
    PIPES[w] = (r, w)
    return w

def write_pipe(w, text):
    return os.write(w, text.encode())

async def watch_writable(pid):
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b'x' * 65536)
    except BlockingIOError:
        pass
    loop = asyncio.get_running_loop()
    def writable():
        loop.remove_writer(w)
        erlang.send(pid, erlang.atom('writable'))
    loop.add_writer(w, writable)
    PIPES[r] = (r, w)
    return r

def drain_pipe(r):
    os.set_blocking(r, False)
    n = 0
    try:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                return n
            n += len(chunk)
    except BlockingIOError:
        return n

async def close_pipe(key):
    r, w = PIPES.pop(key)
    loop = asyncio.get_running_loop()
    loop.remove_reader(r)
    loop.remove_writer(w)
    os.close(r)
    os.close(w)

async def run_echo():
    proc = await asyncio.create_subprocess_exec('echo', 'hi', stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return (out, proc.returncode)

async def in_executor(x):
    return await asyncio.get_running_loop().run_in_executor(None, pow, x, 2)

async def spawn_failing_task():
    async def fail():
        raise ValueError('task boom')
    asyncio.get_running_loop().create_task(fail())

async def schedule_failing_callback():
    def fail():
        raise ValueError('callback boom')
    asyncio.get_running_loop().call_soon(fail)
">>).

-define(FUNCTIONS, [pyport_loop_echo, pyport_loop_slow_echo, pyport_loop_held,
                    pyport_loop_fail]).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, owngil}, {group, main}].

groups() ->
    [{owngil, [], cases()}, {main, [], cases()}].

cases() ->
    [task_outlives_request, timer_fires_between_requests, tcp_echo_server,
     tcp_servers_in_two_contexts, many_coroutines_on_one_context, asyncio_run_in_sync_call,
     async_calls_in_flight_together, async_calls_without_a_thread_each, async_call_error,
     reactor_add_reader, reactor_add_writer, subprocess_exec, run_in_executor,
     failing_task_keeps_loop, failing_callback_logged, stop_context_fails_pending,
     runtime_crash_fails_pending].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    pyport_ct:init_mode_group(pyport_loop, Mode, ?HELPERS, Config).

end_per_group(_Mode, Config) ->
    pyport_ct:end_mode_group(Config).

init_per_testcase(_Case, Config) ->
    pyport_ct:contexts_ab(?config(runtime, Config), Config).

end_per_testcase(_Case, _Config) ->
    [ok = pyport:unregister_function(Name) || Name <- ?FUNCTIONS],
    pyport_ct:assert_no_messages().

%%% Cases

task_outlives_request() ->
    [{doc, "A task created by a coroutine call keeps running after that call replied: "
           "its ticks arrive while no request runs."}].
task_outlives_request(Config) ->
    A = ?config(a, Config),
    Self = self(),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', start_ticker, [Self, 5, 0.1])),
    %% the reply did not wait for the task (which takes 0.5 s)
    ?assert(length(mailbox()) < 5),
    [receive
         {<<"tick">>, I} -> ok
     after 5000 ->
         ct:fail({no_tick, I})
     end || I <- lists:seq(0, 4)],
    %% the context still serves plain requests afterwards
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])).

timer_fires_between_requests() ->
    [{doc, "loop.call_later set by one request fires later, while no request runs; "
           "several timers fire in deadline order."}].
timer_fires_between_requests(Config) ->
    A = ?config(a, Config),
    Self = self(),
    {ok, none} = pyport:call(A, '__main__', start_timer, [Self, 0.5, late]),
    {ok, none} = pyport:call(A, '__main__', start_timer, [Self, 0.05, early]),
    %% the replies did not wait for the timers
    ?assertNot(lists:member(late, mailbox())),
    ?assertEqual(early, receive M1 -> M1 after 5000 -> ct:fail(no_timer) end),
    ?assertEqual(late, receive M2 -> M2 after 5000 -> ct:fail(no_timer) end).

tcp_echo_server() ->
    [{doc, "asyncio.start_server keeps accepting after the call that started it "
           "returned: 20 Erlang clients at once each get their lines echoed."}].
tcp_echo_server(Config) ->
    A = ?config(a, Config),
    {ok, Port} = pyport:call(A, '__main__', echo_server, []),
    ?assert(is_integer(Port) andalso Port > 0),
    try
        ok = echo_clients([Port], 20)
    after
        {ok, none} = pyport:call(A, '__main__', close_server, [Port])
    end.

tcp_servers_in_two_contexts() ->
    [{doc, "Contexts a and b each run an echo server; clients hit both in parallel, "
           "and each context's open_connection reaches the other one's server."}].
tcp_servers_in_two_contexts(Config) ->
    A = ?config(a, Config),
    B = ?config(b, Config),
    {ok, PortA} = pyport:call(A, '__main__', echo_server, []),
    {ok, PortB} = pyport:call(B, '__main__', echo_server, []),
    ?assertNotEqual(PortA, PortB),
    try
        ok = echo_clients([PortA, PortB], 10),
        ?assertEqual({ok, <<"from a\n">>}, pyport:call(A, '__main__', echo_via, [PortB, <<"from a">>])),
        ?assertEqual({ok, <<"from b\n">>}, pyport:call(B, '__main__', echo_via, [PortA, <<"from b">>]))
    after
        {ok, none} = pyport:call(A, '__main__', close_server, [PortA]),
        {ok, none} = pyport:call(B, '__main__', close_server, [PortB])
    end.

many_coroutines_on_one_context() ->
    [{doc, "100 calls of a coroutine sleeping 0.2 s, from 100 processes, run "
           "concurrently on one context (all done in < 2 s), and a plain sync call "
           "made while they sleep is answered at once, before they finish."}].
many_coroutines_on_one_context(Config) ->
    A = ?config(a, Config),
    Self = self(),
    N = 100,
    Seq = lists:seq(1, N),
    T0 = now_ms(),
    [spawn_link(fun() ->
                    Result = pyport:call(A, '__main__', announced_nap, [Self, 0.2, I]),
                    Self ! {napped, I, Result, now_ms()}
                end) || I <- Seq],
    %% every coroutine is now suspended in its sleep
    [receive {<<"started">>, I} -> ok after 5000 -> ct:fail({not_started, I}) end || I <- Seq],
    T1 = now_ms(),
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    T2 = now_ms(),
    Finished = length([M || {napped, _, _, _} = M <- mailbox()]),
    Replies = [receive
                   {napped, I, Result, At} -> {Result, At}
               after 5000 ->
                   ct:fail({no_reply, I})
               end || I <- Seq],
    ?assertEqual([{ok, I} || I <- Seq], [R || {R, _} <- Replies]),
    Last = lists:max([At || {_, At} <- Replies]),
    ct:log("sync call took ~b ms; ~b of ~b coroutines had replied; all done in ~b ms",
           [T2 - T1, Finished, N, Last - T0]),
    ?assert(T2 - T1 < 150),
    ?assert(Finished < N),
    ?assert(Last - T0 < 2000).

asyncio_run_in_sync_call() ->
    [{doc, "A sync request runs with no loop running: asyncio.get_running_loop() "
           "raises and asyncio.run() works; the context's own loop is unharmed (a "
           "timer set before fires, coroutine calls still work)."}].
asyncio_run_in_sync_call(Config) ->
    A = ?config(a, Config),
    Self = self(),
    {ok, none} = pyport:call(A, '__main__', start_timer, [Self, 0.1, still_here]),
    ?assertEqual({ok, false}, pyport:call(A, '__main__', loop_running, [])),
    ?assertEqual({ok, 42}, pyport:call(A, '__main__', run_coro, [21])),
    ?assertEqual({ok, 10}, pyport:call(A, '__main__', run_coro, [5])),
    ?assertEqual({ok, true}, pyport:call(A, '__main__', loop_running_in_coro, [])),
    ?assertEqual({ok, 7}, pyport:call(A, '__main__', anap, [0.01, 7])),
    ?assertEqual(still_here, receive M -> M after 5000 -> ct:fail(no_timer) end),
    ?assertEqual({ok, false}, pyport:call(A, '__main__', loop_running, [])).

async_calls_in_flight_together() ->
    [{doc, "await asyncio.gather of 20 erlang.async_call of a function taking 0.3 s: "
           "they run at the same time (well under 20 x 0.3 s), results in order."}].
async_calls_in_flight_together(Config) ->
    A = ?config(a, Config),
    ok = pyport:register_function(pyport_loop_slow_echo,
                                  fun(X) ->
                                      %% the workload being timed, not a wait in the test
                                      receive after 300 -> X end
                                  end),
    T0 = now_ms(),
    Result = pyport:call(A, '__main__', gather_calls, [<<"pyport_loop_slow_echo">>, 20]),
    Ms = now_ms() - T0,
    ct:log("20 async calls of 300 ms each took ~b ms", [Ms]),
    ?assertEqual({ok, lists:seq(0, 19)}, Result),
    ?assert(Ms < 5 * 300).

async_calls_without_a_thread_each() ->
    [{doc, "20 erlang.async_call in flight at once do not cost a thread each in the "
           "runtime's OS process."}].
async_calls_without_a_thread_each(Config) ->
    A = ?config(a, Config),
    OsPid = pyport_ct:os_pid(?config(runtime, Config)),
    Self = self(),
    ok = pyport:register_function(pyport_loop_echo, fun(X) -> X end),
    ok = pyport:register_function(pyport_loop_held,
                                  fun(X) ->
                                      Self ! {held, self()},
                                      receive release -> X after 30000 -> never_released end
                                  end),
    %% whatever the first async_call sets up once is in place before counting
    ?assertEqual({ok, [0]}, pyport:call(A, '__main__', gather_calls, [<<"pyport_loop_echo">>, 1])),
    Before = thread_count(OsPid),
    Ref = pyport:async_call(A, '__main__', gather_calls, [<<"pyport_loop_held">>, 20]),
    Held = [receive {held, Pid} -> Pid after 5000 -> ct:fail({not_held, I}) end
            || I <- lists:seq(1, 20)],
    During = thread_count(OsPid),
    [Pid ! release || Pid <- Held],
    ?assertEqual({ok, lists:seq(0, 19)}, pyport:await(Ref, 10000)),
    ct:log("threads before: ~b, with 20 async calls in flight: ~b", [Before, During]),
    ?assert(During - Before < 5).

async_call_error() ->
    [{doc, "erlang.async_call of a function that fails in Erlang, or of no function, "
           "raises erlang.Error carrying the reason; uncaught, it is the call's error."}].
async_call_error(Config) ->
    A = ?config(a, Config),
    ok = pyport:register_function(pyport_loop_fail, fun() -> error(boom) end),
    ok = pyport:register_function(pyport_loop_echo, fun(X) -> X end),
    ?assertEqual({ok, {<<"error">>, {error, boom}}},
                 pyport:call(A, '__main__', async_attempt, [<<"pyport_loop_fail">>])),
    ?assertEqual({ok, {<<"error">>, {not_registered, <<"pyport_loop_nobody">>}}},
                 pyport:call(A, '__main__', async_attempt, [<<"pyport_loop_nobody">>])),
    ?assertMatch({error, {python, <<"erlang.Error">>, _, _}},
                 pyport:call(A, '__main__', async_plain, [<<"pyport_loop_fail">>])),
    %% the loop goes on
    ?assertEqual({ok, {<<"ok">>, 5}},
                 pyport:call(A, '__main__', async_attempt, [<<"pyport_loop_echo">>, 5])).

reactor_add_reader() ->
    [{doc, "loop.add_reader on a pipe: data written by later requests wakes the "
           "callback between requests."}].
reactor_add_reader(Config) ->
    A = ?config(a, Config),
    Self = self(),
    {ok, W} = pyport:call(A, '__main__', watch_readable, [Self]),
    try
        [begin
             ?assertEqual({ok, byte_size(Text)}, pyport:call(A, '__main__', write_pipe, [W, Text])),
             ?assertEqual({<<"read">>, Text},
                          receive M -> M after 5000 -> ct:fail({not_read, Text}) end)
         end || Text <- [<<"ping">>, <<"pong">>, <<"again">>]]
    after
        {ok, none} = pyport:call(A, '__main__', close_pipe, [W])
    end.

reactor_add_writer() ->
    [{doc, "loop.add_writer on a full pipe: the callback stays quiet until a later "
           "request drains the pipe, then fires."}].
reactor_add_writer(Config) ->
    A = ?config(a, Config),
    Self = self(),
    {ok, R} = pyport:call(A, '__main__', watch_writable, [Self]),
    try
        %% a round trip through the context; the pipe is still full
        ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
        %% a negative check, synchronised on the loop: two coroutine calls, each a task
        %% the loop steps (its select sees the pipe's fd); a writer callback would have
        %% sent `writable' before their replies, which come the same way
        [?assertEqual({ok, turn}, pyport:call(A, '__main__', anap, [0, turn])) || _ <- [1, 2]],
        receive writable -> ct:fail(writable_while_full) after 0 -> ok end,
        {ok, Drained} = pyport:call(A, '__main__', drain_pipe, [R]),
        ?assert(Drained > 0),
        receive writable -> ok after 5000 -> ct:fail(writer_callback_not_run) end
    after
        {ok, none} = pyport:call(A, '__main__', close_pipe, [R])
    end.

subprocess_exec() ->
    [{doc, "asyncio.create_subprocess_exec + communicate() in a coroutine call."}].
subprocess_exec(Config) ->
    ?assertEqual({ok, {<<"hi\n">>, 0}}, pyport:call(?config(a, Config), '__main__', run_echo, [])).

run_in_executor() ->
    [{doc, "loop.run_in_executor in a coroutine call."}].
run_in_executor(Config) ->
    ?assertEqual({ok, 144}, pyport:call(?config(a, Config), '__main__', in_executor, [12])).

failing_task_keeps_loop() ->
    [{doc, "A task that raises and is never awaited does not break the loop: "
           "coroutine calls and timers still work afterwards."}].
failing_task_keeps_loop(Config) ->
    A = ?config(a, Config),
    Self = self(),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', spawn_failing_task, [])),
    ?assertEqual({ok, 7}, pyport:call(A, '__main__', anap, [0.01, 7])),
    {ok, none} = pyport:call(A, '__main__', start_timer, [Self, 0.01, after_failure]),
    ?assertEqual(after_failure, receive M -> M after 5000 -> ct:fail(no_timer) end).

failing_callback_logged() ->
    [{doc, "An exception raised by a loop callback (call_soon) is logged (domain "
           "[pyport, python]) and the loop keeps serving."}].
failing_callback_logged(Config) ->
    A = ?config(a, Config),
    Self = self(),
    ok = pyport_ct:forward_logs(),
    try
        ?assertEqual({ok, none}, pyport:call(A, '__main__', schedule_failing_callback, [])),
        Log = await_log([<<"callback boom">>, <<"Exception in callback">>]),
        ct:log("logged: ~ts", [Log]),
        ?assertEqual({ok, 7}, pyport:call(A, '__main__', anap, [0.01, 7])),
        {ok, none} = pyport:call(A, '__main__', start_timer, [Self, 0.01, after_failure]),
        ?assertEqual(after_failure, receive_skipping_logs(5000))
    after
        pyport_ct:stop_forwarding_logs(),
        flush_logs()
    end.

stop_context_fails_pending() ->
    [{doc, "Stopping a context with 10 coroutine calls waiting on an Event that is "
           "never set answers every caller with an error at once (not at its 30 s "
           "timeout)."}].
stop_context_fails_pending(Config) ->
    {ok, Ctx} = pyport:new_context(?config(runtime, Config),
                                   #{mode => ?config(mode, Config), preload => ?HELPERS}),
    Callers = start_waiters(Ctx, 10),
    T0 = now_ms(),
    ok = pyport:stop_context(Ctx),
    Results = await_waiters(Callers),
    Ms = now_ms() - T0,
    ct:log("pending callers answered ~b ms after stop_context: ~p", [Ms, Results]),
    [?assertEqual({error, {context_down, stopped}}, R) || R <- Results],
    ?assert(Ms < 5000),
    ?assertEqual({error, {context_down, unknown_context}},
                 pyport:call(Ctx, operator, add, [1, 2])),
    %% the group's contexts go on
    ?assertEqual({ok, 3}, pyport:call(?config(a, Config), operator, add, [1, 2])).

runtime_crash_fails_pending() ->
    [{doc, "Killing the OS process of a runtime with 10 coroutine calls pending "
           "answers every caller with {error, {runtime_down, _}} at once."}].
runtime_crash_fails_pending(Config) ->
    Mode = ?config(mode, Config),
    Name = list_to_atom("pyport_loop_crash_" ++ atom_to_list(Mode)),
    {ok, _} = pyport:start_runtime(#{name => Name,
                                     contexts => [#{name => x, mode => Mode,
                                                    preload => ?HELPERS}]}),
    {ok, X} = pyport:context(Name, x),
    OsPid = pyport_ct:os_pid(Name),
    Callers = start_waiters(X, 10),
    T0 = now_ms(),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    Results = await_waiters(Callers),
    Ms = now_ms() - T0,
    ct:log("pending callers answered ~b ms after the kill: ~p", [Ms, Results]),
    [?assertMatch({error, {runtime_down, _}}, R) || R <- Results],
    ?assert(Ms < 5000),
    %% let the supervisor restart it before stopping it for good
    _ = pyport_ct:await_new_os_pid(Name, OsPid),
    ok = pyport:stop_runtime(Name).

%%% Helpers

now_ms() ->
    erlang:monotonic_time(millisecond).

mailbox() ->
    {messages, Messages} = erlang:process_info(self(), messages),
    Messages.

thread_count(OsPid) ->
    {ok, Tasks} = file:list_dir("/proc/" ++ integer_to_list(OsPid) ++ "/task"),
    length(Tasks).


%% Starts N processes, each calling wait_forever (30 s timeout) on Ctx, and returns
%% once every one of those coroutines runs; answers come as {waiter, I, Result}.
start_waiters(Ctx, N) ->
    Self = self(),
    Seq = lists:seq(1, N),
    [spawn_link(fun() ->
                    Self ! {waiter, I, pyport:call(Ctx, '__main__', wait_forever, [Self, I], #{},
                                                   #{timeout => 30000})}
                end) || I <- Seq],
    [receive {<<"waiting">>, I} -> ok after 5000 -> ct:fail({not_waiting, I}) end || I <- Seq],
    Seq.

await_waiters(Seq) ->
    [receive {waiter, I, Result} -> Result after 10000 -> ct:fail({no_answer, I}) end
     || I <- Seq].

%% Connects Clients clients to each port at once; each sends three lines and must get
%% them back.
echo_clients(Ports, Clients) ->
    Self = self(),
    Started = [{spawn_link(fun() -> Self ! {echoed, self(), catch echo_lines(Port, I)} end),
                Port, I}
               || Port <- Ports, I <- lists:seq(1, Clients)],
    [receive
         {echoed, Pid, Echoed} ->
             ?assertEqual([{ok, Line} || Line <- lines(Port, I)], Echoed)
     after 15000 ->
         ct:fail({no_echo, Port, I})
     end || {Pid, Port, I} <- Started],
    ok.

echo_lines(Port, I) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}, {packet, line}],
                              5000),
    Echoed = [begin
                  ok = gen_tcp:send(S, Line),
                  gen_tcp:recv(S, 0, 5000)
              end || Line <- lines(Port, I)],
    ok = gen_tcp:close(S),
    Echoed.

lines(Port, I) ->
    [iolist_to_binary(io_lib:format("port ~b client ~b line ~b~n", [Port, I, J]))
     || J <- lists:seq(1, 3)].

%% The first forwarded log message that contains one of Patterns.
await_log(Patterns) ->
    receive
        {pyport_log, _Level, Msg} ->
            case binary:match(Msg, Patterns) of
                nomatch -> await_log(Patterns);
                _ -> Msg
            end
    after 5000 ->
        ct:fail({not_logged, Patterns})
    end.

%% The next message that is not a forwarded log.
receive_skipping_logs(Timeout) ->
    receive
        {pyport_log, _, _} -> receive_skipping_logs(Timeout);
        Msg -> Msg
    after Timeout ->
        ct:fail(no_message)
    end.

flush_logs() ->
    receive
        {pyport_log, _, _} -> flush_logs()
    after 0 ->
        ok
    end.

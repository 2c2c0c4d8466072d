#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% pyport benchmarks, for `owngil' and `main' contexts side by side:
%%   - sync call latency of operator.add(1, 2), one caller (median, p99)
%%   - Python -> Erlang -> Python round trip: erlang.call of a registered fun that
%%     returns its argument, timed in Python (median, p99)
%%   - calls/s with 50 callers over 2 contexts (100k calls)
%%   - CPU-bound speedup of 2 contexts over 1
%%   - 16 MiB binary echo throughput
%%   - runtime start to first reply
%%   - new context creation time
%%   - async tasks/s: 1,000 concurrent calls of a coroutine on one context, with the
%%     same 1,000 concurrent callers of sync operator.add as a control
%%   - stream items/s of a generator of 100k small ints (window 64)
%%   - channel messages/s: 100k small terms into an `async for' consumer
%%   - requests/s of an asyncio line-echo server with 50 gen_tcp clients
%% The event-loop measurements (the last four) report the median of 5 rounds.
%%
%% Run `rebar3 compile' (and `make build' for priv/pyport) first, then
%%   escript benches/pyport_bench.escript
%% The port program is priv/pyport unless PYPORT_EXECUTABLE says otherwise. What the
%% port programs write to stderr goes to a file (named at the end if there was any),
%% and only errors of pyport's logger events are printed, so the output is the table.
-mode(compile).
-include("bench.hrl").

-define(LATENCY_CALLS, 10000).
-define(WARMUP_CALLS, 2000).
-define(CALLERS, 50).
-define(THROUGHPUT_CALLS, 100000).
-define(ECHO_BYTES, 16 * 1024 * 1024).
-define(ECHO_ROUNDS, 5).
-define(START_ROUNDS, 5).
-define(NEW_CONTEXT_ROUNDS, 10).
-define(CPU_CALL_MS, 200).
-define(CALLBACK_CALLS, 5000).
-define(CALLBACK_WARMUP, 500).
-define(LOOP_ROUNDS, 5).
-define(TASK_CALLERS, 1000).
-define(STREAM_ITEMS, 100000).
-define(STREAM_WINDOW, 64).
-define(CHANNEL_MESSAGES, 100000).
-define(CHANNEL_CAPACITY, 1000).
-define(TCP_CLIENTS, 50).
-define(TCP_REQUESTS, 1000).
-define(TCP_LINE, <<"hello pyport\n">>).

-define(HELPERS, <<"
def identity(x):
    return x

def work(n):
    total = 0
    for i in range(n):
        total += i * i
    return total

def roundtrips(n):
    import erlang
    import time
    call = erlang.call
    clock = time.perf_counter_ns
    times = []
    for i in range(n):
        t0 = clock()
        if call('pyport_bench_echo', i) != i:
            raise ValueError(i)
        times.append(clock() - t0)
    return times

import asyncio

async def async_one():
    await asyncio.sleep(0)
    return 1

def gen(n):
    yield from range(n)

_bench_tasks = set()

def _keep(task):
    _bench_tasks.add(task)
    task.add_done_callback(_bench_tasks.discard)

async def _consume(pid, n):
    import erlang
    count = 0
    async for item in erlang.channel('bench'):
        count += 1
        if count >= n:
            break
    erlang.send(pid, ('done', count))

async def start_consumer(pid, n):
    _keep(asyncio.get_running_loop().create_task(_consume(pid, n)))
    return True

async def _echo_line(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    finally:
        writer.close()

_echo_servers = []

async def start_echo_server():
    server = await asyncio.start_server(_echo_line, '127.0.0.1', 0)
    _echo_servers.append(server)
    return server.sockets[0].getsockname()[1]

async def stop_echo_servers():
    while _echo_servers:
        server = _echo_servers.pop()
        server.close()
        await server.wait_closed()
    return True
">>).

main(_Args) ->
    Stderr = setup(),
    Results = [{Mode, bench(Mode)} || Mode <- [owngil, main]],
    print(Results),
    report_stderr(Stderr),
    halt(0).

setup() ->
    _ = start_pyport(),
    Stderr = quiet_executable(bench_root()),
    ok = pyport:register_function(pyport_bench_echo, fun(X) -> X end),
    {ok, #{python_version := Version}} = start_and_info(),
    io:format("pyport bench: OTP ~s, Python ~s, ~p schedulers, ~p logical processors~n~n",
              [erlang:system_info(otp_release), Version,
               erlang:system_info(schedulers_online),
               erlang:system_info(logical_processors_available)]),
    Stderr.

%% A wrapper that runs the port program with its stderr sent to a file, made the
%% executable of every runtime through PYPORT_EXECUTABLE. Returns the file's name.
quiet_executable(Root) ->
    Exe = case os:getenv("PYPORT_EXECUTABLE") of
              Path when is_list(Path), Path =/= "" -> filename:absname(Path);
              _ -> filename:join([Root, "priv", "pyport"])
          end,
    filelib:is_regular(Exe) orelse die("~s not found: run `make build` first", [Exe]),
    Dir = filename:join(os_tmp(), "pyport_bench_" ++ os:getpid()),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    Stderr = filename:join(Dir, "stderr.log"),
    Wrapper = filename:join(Dir, "pyport"),
    ok = file:write_file(Wrapper, ["#!/bin/sh\nexec '", Exe, "' \"$@\" 2>>'", Stderr, "'\n"]),
    ok = file:change_mode(Wrapper, 8#755),
    true = os:putenv("PYPORT_EXECUTABLE", Wrapper),
    Stderr.

os_tmp() ->
    case os:getenv("TMPDIR") of
        Dir when is_list(Dir), Dir =/= "" -> Dir;
        _ -> "/tmp"
    end.

report_stderr(Stderr) ->
    case filelib:file_size(Stderr) of
        0 -> _ = file:delete(Stderr), _ = file:del_dir(filename:dirname(Stderr)), ok;
        Size -> io:format("~nthe port programs wrote ~p bytes to stderr: ~s~n", [Size, Stderr])
    end.

start_and_info() ->
    case pyport:start_runtime(#{}) of
        {ok, Pid} ->
            Info = pyport:info(Pid),
            ok = pyport:stop_runtime(Pid),
            Info;
        {error, Reason} ->
            die("cannot start the port program: ~p (run `make build`?)", [Reason])
    end.

die(Format, Args) ->
    io:format(standard_error, "pyport_bench: " ++ Format ++ "~n", Args),
    halt(1).

bench(Mode) ->
    io:format("~s: ", [Mode]),
    Start = step(fun() -> start_to_first_reply(Mode) end),
    {ok, Pid} = pyport:start_runtime(#{contexts => [#{name => a, mode => Mode, preload => ?HELPERS},
                                                    #{name => b, mode => Mode, preload => ?HELPERS}]}),
    {ok, A} = pyport:context(Pid, a),
    {ok, B} = pyport:context(Pid, b),
    Latency = step(fun() -> latency(A) end),
    Callback = step(fun() -> callback_latency(A) end),
    Throughput = step(fun() -> throughput([A, B]) end),
    Speedup = step(fun() -> cpu_speedup(A, B) end),
    Echo = step(fun() -> echo(A) end),
    NewContext = step(fun() -> new_context(Pid, Mode) end),
    Tasks = step(fun() -> tasks(A) end),
    Stream = step(fun() -> stream(A) end),
    Channel = step(fun() -> channel(A) end),
    Server = step(fun() -> echo_server(A) end),
    ok = pyport:stop_runtime(Pid),
    io:format("~n"),
    #{start => Start, latency => Latency, callback => Callback, throughput => Throughput,
      speedup => Speedup, echo => Echo, new_context => NewContext, tasks => Tasks,
      stream => Stream, channel => Channel, server => Server}.

step(Fun) ->
    Result = Fun(),
    io:format("."),
    Result.

%% Milliseconds from start_runtime to the first reply of a call (median of rounds).
start_to_first_reply(Mode) ->
    median([begin
                T0 = erlang:monotonic_time(microsecond),
                {ok, Pid} = pyport:start_runtime(#{contexts => [#{name => a, mode => Mode}]}),
                {ok, Ctx} = pyport:context(Pid, a),
                {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
                T1 = erlang:monotonic_time(microsecond),
                ok = pyport:stop_runtime(Pid),
                (T1 - T0) / 1000
            end || _ <- lists:seq(1, ?START_ROUNDS)]).

%% Microseconds per sync call, one caller: {Median, P99}.
latency(Ctx) ->
    [{ok, 3} = pyport:call(Ctx, operator, add, [1, 2]) || _ <- lists:seq(1, ?WARMUP_CALLS)],
    Times = [begin
                 T0 = erlang:monotonic_time(nanosecond),
                 {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
                 erlang:monotonic_time(nanosecond) - T0
             end || _ <- lists:seq(1, ?LATENCY_CALLS)],
    Sorted = lists:sort(Times),
    {percentile(Sorted, 50) / 1000, percentile(Sorted, 99) / 1000}.

%% Microseconds per Python -> Erlang -> Python round trip, as Python measures each
%% erlang.call: {Median, P99}.
callback_latency(Ctx) ->
    {ok, _} = pyport:call(Ctx, '__main__', roundtrips, [?CALLBACK_WARMUP]),
    {ok, Times} = pyport:call(Ctx, '__main__', roundtrips, [?CALLBACK_CALLS]),
    Sorted = lists:sort(Times),
    {percentile(Sorted, 50) / 1000, percentile(Sorted, 99) / 1000}.

%% Calls per second, ?CALLERS processes spread over the contexts.
throughput(Contexts) ->
    PerCaller = ?THROUGHPUT_CALLS div ?CALLERS,
    Self = self(),
    N = length(Contexts),
    T0 = erlang:monotonic_time(microsecond),
    Callers = [spawn_link(fun() ->
                              Ctx = lists:nth(I rem N + 1, Contexts),
                              [{ok, 3} = pyport:call(Ctx, operator, add, [1, 2])
                               || _ <- lists:seq(1, PerCaller)],
                              Self ! {done, self()}
                          end) || I <- lists:seq(1, ?CALLERS)],
    [receive {done, C} -> ok end || C <- Callers],
    Us = erlang:monotonic_time(microsecond) - T0,
    PerCaller * ?CALLERS / (Us / 1.0e6).

%% Time of 4 CPU-bound calls on one context over the time of 2 + 2 on two contexts.
cpu_speedup(A, B) ->
    Probe = 200000,
    {ProbeUs, {ok, _}} = timer:tc(pyport, call, [A, '__main__', work, [Probe]]),
    Size = max(Probe, Probe * (?CPU_CALL_MS * 1000) div max(ProbeUs, 1)),
    {OneUs, _} = timer:tc(fun() -> run_work([A], Size, 4) end),
    {TwoUs, _} = timer:tc(fun() -> run_work([A, B], Size, 4) end),
    OneUs / TwoUs.

run_work(Contexts, Size, Calls) ->
    PerContext = Calls div length(Contexts),
    Self = self(),
    Workers = [spawn_link(fun() ->
                              [{ok, _} = pyport:call(Ctx, '__main__', work, [Size])
                               || _ <- lists:seq(1, PerContext)],
                              Self ! {done, self()}
                          end) || Ctx <- Contexts],
    [receive {done, W} -> ok end || W <- Workers].

%% MB/s (10^6 bytes of payload per second of round trip) of a 16 MiB binary echo.
echo(Ctx) ->
    Bin = rand:bytes(?ECHO_BYTES),
    {ok, Bin} = pyport:call(Ctx, '__main__', identity, [Bin]),
    Rates = [begin
                 {Us, {ok, Back}} = timer:tc(pyport, call, [Ctx, '__main__', identity, [Bin]]),
                 ?ECHO_BYTES = byte_size(Back),
                 ?ECHO_BYTES / Us
             end || _ <- lists:seq(1, ?ECHO_ROUNDS)],
    median(Rates).

%% Milliseconds to create a context (median of rounds).
new_context(Pid, Mode) ->
    Times = [begin
                 {Us, {ok, Ctx}} = timer:tc(pyport, new_context, [Pid, #{mode => Mode}]),
                 ok = pyport:stop_context(Ctx),
                 Us / 1000
             end || _ <- lists:seq(1, ?NEW_CONTEXT_ROUNDS)],
    median(Times).

%% {AsyncTasksPerSecond, SyncCallsPerSecond}: ?TASK_CALLERS processes, started
%% beforehand, each make one call to the same context at once; the rate is the number of
%% calls over the wall time from the start signal to the last reply (median of rounds,
%% the async and the sync control taking turns).
tasks(Ctx) ->
    Async = fun() -> {ok, 1} = pyport:call(Ctx, '__main__', async_one, []) end,
    Sync = fun() -> {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]) end,
    Async(), Sync(),
    Rounds = [{concurrent_rate(Async), concurrent_rate(Sync)}
              || _ <- lists:seq(1, ?LOOP_ROUNDS)],
    {median([A || {A, _} <- Rounds]), median([S || {_, S} <- Rounds])}.

concurrent_rate(Call) ->
    Self = self(),
    Callers = [spawn_link(fun() ->
                              receive go -> ok end,
                              Call(),
                              Self ! {done, self()}
                          end) || _ <- lists:seq(1, ?TASK_CALLERS)],
    T0 = erlang:monotonic_time(microsecond),
    [C ! go || C <- Callers],
    [receive {done, C} -> ok end || C <- Callers],
    Us = erlang:monotonic_time(microsecond) - T0,
    ?TASK_CALLERS / (Us / 1.0e6).

%% Items per second of a stream of ?STREAM_ITEMS small ints taken with stream_next
%% (median of rounds).
stream(Ctx) ->
    median([begin
                T0 = erlang:monotonic_time(microsecond),
                {ok, Ref} = pyport:stream(Ctx, '__main__', gen, [?STREAM_ITEMS], #{},
                                          #{window => ?STREAM_WINDOW}),
                ?STREAM_ITEMS = drain_stream(Ref, 0),
                Us = erlang:monotonic_time(microsecond) - T0,
                ?STREAM_ITEMS / (Us / 1.0e6)
            end || _ <- lists:seq(1, ?LOOP_ROUNDS)]).

drain_stream(Ref, N) ->
    case pyport:stream_next(Ref, 30000) of
        {data, N} -> drain_stream(Ref, N + 1);
        done -> N
    end.

%% Messages per second from the first channel_send to the consumer's `done' message,
%% ?CHANNEL_MESSAGES small terms into an `async for' consumer (median of rounds).
channel(Ctx) ->
    median([begin
                {ok, Chan} = pyport:channel_open(Ctx, <<"bench">>,
                                                 #{capacity => ?CHANNEL_CAPACITY}),
                {ok, true} = pyport:call(Ctx, '__main__', start_consumer,
                                         [self(), ?CHANNEL_MESSAGES]),
                T0 = erlang:monotonic_time(microsecond),
                ok = channel_send_all(Chan, 0),
                Count = receive
                            {<<"done">>, C} -> C
                        after 60000 ->
                            die("no done message from the channel consumer", [])
                        end,
                Us = erlang:monotonic_time(microsecond) - T0,
                ok = pyport:channel_close(Chan),
                ?CHANNEL_MESSAGES = Count,
                ?CHANNEL_MESSAGES / (Us / 1.0e6)
            end || _ <- lists:seq(1, ?LOOP_ROUNDS)]).

channel_send_all(_Chan, ?CHANNEL_MESSAGES) ->
    ok;
channel_send_all(Chan, I) ->
    case pyport:channel_send(Chan, {I, I}) of
        ok -> channel_send_all(Chan, I + 1);
        busy -> erlang:yield(), channel_send_all(Chan, I)
    end.

%% Requests per second of an asyncio line-echo server in the context: ?TCP_CLIENTS
%% processes, connected beforehand, each do ?TCP_REQUESTS round trips of a short line
%% (median of rounds).
echo_server(Ctx) ->
    {ok, Port} = pyport:call(Ctx, '__main__', start_echo_server, []),
    Rate = median([echo_server_round(Port) || _ <- lists:seq(1, ?LOOP_ROUNDS)]),
    {ok, true} = pyport:call(Ctx, '__main__', stop_echo_servers, []),
    Rate.

echo_server_round(Port) ->
    Self = self(),
    Clients = [spawn_link(fun() ->
                              {ok, Sock} = gen_tcp:connect({127, 0, 0, 1}, Port,
                                                           [binary, {active, false},
                                                            {packet, line}]),
                              Self ! {connected, self()},
                              receive go -> ok end,
                              ok = echo_requests(Sock, ?TCP_REQUESTS),
                              ok = gen_tcp:close(Sock),
                              Self ! {done, self()}
                          end) || _ <- lists:seq(1, ?TCP_CLIENTS)],
    [receive {connected, C} -> ok end || C <- Clients],
    T0 = erlang:monotonic_time(microsecond),
    [C ! go || C <- Clients],
    [receive {done, C} -> ok end || C <- Clients],
    Us = erlang:monotonic_time(microsecond) - T0,
    ?TCP_CLIENTS * ?TCP_REQUESTS / (Us / 1.0e6).

echo_requests(_Sock, 0) ->
    ok;
echo_requests(Sock, N) ->
    ok = gen_tcp:send(Sock, ?TCP_LINE),
    {ok, ?TCP_LINE} = gen_tcp:recv(Sock, 0, 30000),
    echo_requests(Sock, N - 1).

percentile(Sorted, P) ->
    Index = max(1, min(length(Sorted), round(P / 100 * length(Sorted)))),
    lists:nth(Index, Sorted).

print(Results) ->
    Rows = [{"sync call latency, median (us)", fun(#{latency := {M, _}}) -> fmt(M) end},
            {"sync call latency, p99 (us)", fun(#{latency := {_, P}}) -> fmt(P) end},
            {"Python->Erlang->Python, median (us)", fun(#{callback := {M, _}}) -> fmt(M) end},
            {"Python->Erlang->Python, p99 (us)", fun(#{callback := {_, P}}) -> fmt(P) end},
            {"calls/s, 50 callers, 2 contexts", fun(#{throughput := T}) -> fmt_int(T) end},
            {"CPU-bound speedup, 2 contexts vs 1", fun(#{speedup := S}) -> fmt(S) ++ "x" end},
            {"16 MiB echo (MB/s)", fun(#{echo := E}) -> fmt_int(E) end},
            {"runtime start to first reply (ms)", fun(#{start := S}) -> fmt(S) end},
            {"new context (ms)", fun(#{new_context := N}) -> fmt(N) end},
            {"async tasks/s, 1000 callers, 1 context", fun(#{tasks := {T, _}}) -> fmt_int(T) end},
            {"  control: sync calls/s, same callers", fun(#{tasks := {_, S}}) -> fmt_int(S) end},
            {"stream items/s (100k ints, window 64)", fun(#{stream := S}) -> fmt_int(S) end},
            {"channel msgs/s (100k, capacity 1000)", fun(#{channel := C}) -> fmt_int(C) end},
            {"echo server req/s (50 clients x 1000)", fun(#{server := S}) -> fmt_int(S) end}],
    Modes = [Mode || {Mode, _} <- Results],
    io:format("~n~-38s" ++ lists:append(["~14s" || _ <- Modes]) ++ "~n",
              ["" | [atom_to_list(M) || M <- Modes]]),
    lists:foreach(fun({Label, Fun}) ->
                      io:format("~-38s" ++ lists:append(["~14s" || _ <- Modes]) ++ "~n",
                                [Label | [Fun(R) || {_, R} <- Results]])
                  end, Rows).

fmt(X) -> float_to_list(float(X), [{decimals, 2}]).

fmt_int(X) -> integer_to_list(round(X)).

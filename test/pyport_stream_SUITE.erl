%% @doc Streams: stream/4,5,6, stream_next/1,2, stream_ack/1 and stream_cancel/1 over
%% generators, async generators and plain iterables; demand-driven delivery, closing
%% the generator on cancel or on the consumer's death, errors, and a long stream that
%% shares its context with other requests. Every case runs in both context modes
%% (groups `owngil' and `main').
-module(pyport_stream_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(HELPERS, <<"
import asyncio, erlang

def count(n):
    for i in range(n):
        yield i

def count_from(n, start=0, step=1):
    for i in range(n):
        yield start + i * step

async def acount(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i

async def slow_items(delay, n):
    for i in range(n):
        await asyncio.sleep(delay)
        yield i

def many():
    yield from range(1000000)

def forever():
    i = 0
    while True:
        yield i
        i += 1

def guarded(pid):
    try:
        i = 0
        while True:
            yield i
            i += 1
    finally:
        erlang.send(pid, erlang.atom('finally_ran'))

async def aguarded(pid):
    try:
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0)
    finally:
        erlang.send(pid, erlang.atom('finally_ran'))

def fails_after(n):
    for i in range(1, n + 1):
        yield i
    raise ValueError('stream broke')

async def afails_after(n):
    for i in range(1, n + 1):
        await asyncio.sleep(0)
        yield i
    raise ValueError('stream broke')

def fails_at_once():
    raise ValueError('no stream')

def odd_items():
    yield 1
    yield object()

def keys(d):
    return d.keys()

def squares(n):
    return (i * i for i in range(n))
">>).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, owngil}, {group, main}].

groups() ->
    [{owngil, [], cases()}, {main, [], cases()}].

cases() ->
    [sync_generator, async_generator, plain_iterables, kwargs_and_opts, stream_next_timeout,
     receive_and_ack, window_bounds_mailbox, default_window, cancel_sync_generator,
     cancel_async_generator, consumer_exit_closes_sync_generator,
     consumer_exit_closes_async_generator, error_mid_stream, error_before_first_item,
     unconvertible_item, long_stream_shares_context, runtime_crash_mid_stream,
     context_stopped_mid_stream].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    pyport_ct:init_mode_group(pyport_stream, Mode, ?HELPERS, Config).

end_per_group(_Mode, Config) ->
    pyport_ct:end_mode_group(Config).

init_per_testcase(_Case, Config) ->
    pyport_ct:contexts_ab(?config(runtime, Config), Config).

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

%%% Cases

sync_generator() ->
    [{doc, "A generator's items arrive in order, then done; also an empty one and one "
           "longer than the default window. stream_next/1 works like stream_next/2."}].
sync_generator(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', count, [3]),
    ?assert(is_reference(Ref)),
    ?assertEqual({data, 0}, pyport:stream_next(Ref)),
    ?assertEqual({data, 1}, pyport:stream_next(Ref)),
    ?assertEqual({data, 2}, pyport:stream_next(Ref)),
    ?assertEqual(done, pyport:stream_next(Ref)),
    ?assertEqual({done, []}, stream_all(A, count, [0])),
    ?assertEqual({done, lists:seq(0, 999)}, stream_all(A, count, [1000])).

async_generator() ->
    [{doc, "An async generator's items arrive in order, then done."}].
async_generator(Config) ->
    A = ?config(a, Config),
    ?assertEqual({done, [0, 1, 2, 3, 4]}, stream_all(A, acount, [5])),
    ?assertEqual({done, []}, stream_all(A, acount, [0])),
    ?assertEqual({done, lists:seq(0, 999)}, stream_all(A, acount, [1000])).

plain_iterables() ->
    [{doc, "Any iterable streams: a list, a range, a dict's keys, a tuple, a "
           "generator expression."}].
plain_iterables(Config) ->
    A = ?config(a, Config),
    ?assertEqual({done, [1, <<"two">>, three, {4}]},
                 collect(stream(A, builtins, list, [[1, <<"two">>, three, {4}]]))),
    ?assertEqual({done, [0, 1, 2, 3, 4]}, collect(stream(A, builtins, range, [5]))),
    {done, Keys} = collect(stream(A, '__main__', keys, [#{<<"x">> => 1, <<"y">> => 2,
                                                          <<"z">> => 3}])),
    ?assertEqual([<<"x">>, <<"y">>, <<"z">>], lists:sort(Keys)),
    ?assertEqual({done, [a, b]}, collect(stream(A, builtins, tuple, [[a, b]]))),
    ?assertEqual({done, [0, 1, 4, 9]}, stream_all(A, squares, [4])).

kwargs_and_opts() ->
    [{doc, "stream/5 passes keyword arguments; stream/6 takes Opts (window); module "
           "and function may be binaries."}].
kwargs_and_opts(Config) ->
    A = ?config(a, Config),
    ?assertEqual({done, [10, 12, 14]},
                 collect(pyport:stream(A, '__main__', count_from, [3], #{start => 10, step => 2}))),
    ?assertEqual({done, lists:seq(0, 99)},
                 collect(pyport:stream(A, <<"__main__">>, <<"count">>, [100], #{},
                                       #{window => 2}))),
    ?assertEqual({done, [5, 6]},
                 collect(pyport:stream(A, '__main__', count_from, [2], #{start => 5},
                                       #{window => 1}))).

stream_next_timeout() ->
    [{doc, "stream_next/2 gives {error, timeout} when no item came in time; the "
           "stream goes on."}].
stream_next_timeout(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', slow_items, [0.5, 1]),
    ?assertEqual({error, timeout}, pyport:stream_next(Ref, 20)),
    ?assertEqual({data, 0}, pyport:stream_next(Ref, 5000)),
    ?assertEqual(done, pyport:stream_next(Ref, 5000)).

receive_and_ack() ->
    [{doc, "A caller that receives the messages itself and acks each one gets every "
           "item (past the window) and the final done; never more than the window "
           "waits in its mailbox."}].
receive_and_ack(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', count, [50], #{}, #{window => 4}),
    Items = [receive
                 {pyport_stream, Ref, {data, Item}} ->
                     ?assert(queue_len() =< 4),
                     ok = pyport:stream_ack(Ref),
                     Item
             after 5000 ->
                 ct:fail({no_item, I})
             end || I <- lists:seq(0, 49)],
    ?assertEqual(lists:seq(0, 49), Items),
    receive {pyport_stream, Ref, Final} -> ?assertEqual(done, Final)
    after 5000 -> ct:fail(no_done)
    end.

window_bounds_mailbox() ->
    [{doc, "window => 8 over a producer of 1,000,000 items: the producer stops at 8 "
           "items ahead; a consumer taking one item per ms never has more than 8 in "
           "its mailbox; stream_cancel ends it."}].
window_bounds_mailbox(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', many, [], #{}, #{window => 8}),
    ok = await_queue_len(8, 8),
    %% a request through the same context; the producer had its chance and waits
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    ?assertEqual(8, queue_len()),
    MaxSeen = paced_take(Ref, 0, 300, 8, 0),
    ct:log("at most ~b items were waiting in the mailbox", [MaxSeen]),
    ok = pyport:stream_cancel(Ref),
    ?assertEqual(0, queue_len()).

default_window() ->
    [{doc, "Without Opts the window is 64: a caller that takes nothing gets exactly 64 "
           "items; taking them lets 64 more come, no more."}].
default_window(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', forever, []),
    ok = await_queue_len(64, 64),
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    ?assertEqual(64, queue_len()),
    ?assertEqual([{data, I} || I <- lists:seq(0, 63)],
                 [pyport:stream_next(Ref, 5000) || _ <- lists:seq(0, 63)]),
    ok = await_queue_len(64, 64),
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    ?assertEqual(64, queue_len()),
    ?assertEqual({data, 64}, pyport:stream_next(Ref, 5000)),
    ok = pyport:stream_cancel(Ref),
    ?assertEqual(0, queue_len()).

cancel_sync_generator() ->
    [{doc, "stream_cancel/1 closes a generator (its finally runs) and no message "
           "for the stream arrives afterwards, not even ones already sent."}].
cancel_sync_generator(Config) ->
    cancel_closes(?config(a, Config), guarded).

cancel_async_generator() ->
    [{doc, "stream_cancel/1 closes an async generator (its finally runs) and no "
           "message for the stream arrives afterwards."}].
cancel_async_generator(Config) ->
    cancel_closes(?config(a, Config), aguarded).

consumer_exit_closes_sync_generator() ->
    [{doc, "The death of the consumer closes its generator (its finally runs)."}].
consumer_exit_closes_sync_generator(Config) ->
    consumer_exit_closes(?config(a, Config), guarded).

consumer_exit_closes_async_generator() ->
    [{doc, "The death of the consumer closes its async generator (its finally runs)."}].
consumer_exit_closes_async_generator(Config) ->
    consumer_exit_closes(?config(a, Config), aguarded).

error_mid_stream() ->
    [{doc, "A generator (sync or async) that yields 1, 2 then raises ValueError: "
           "data 1, data 2, then the error as the final message."}].
error_mid_stream(Config) ->
    A = ?config(a, Config),
    %% taken with stream_next
    {ok, Ref} = pyport:stream(A, '__main__', fails_after, [2]),
    ?assertEqual({data, 1}, pyport:stream_next(Ref, 5000)),
    ?assertEqual({data, 2}, pyport:stream_next(Ref, 5000)),
    {error, {python, Type, Message, _Tb}} = pyport:stream_next(Ref, 5000),
    ?assertEqual(<<"ValueError">>, Type),
    ?assertNotEqual(nomatch, binary:match(Message, <<"stream broke">>)),
    %% received directly, from an async generator
    {ok, ARef} = pyport:stream(A, '__main__', afails_after, [2]),
    Messages = [receive
                    {pyport_stream, ARef, {data, _} = Data} ->
                        ok = pyport:stream_ack(ARef),
                        Data;
                    {pyport_stream, ARef, {error, {python, T, M, _}}} ->
                        ?assertNotEqual(nomatch, binary:match(M, <<"stream broke">>)),
                        {error, binary_to_atom(T)};
                    {pyport_stream, ARef, Other} ->
                        ct:fail({unexpected, Other})
                after 5000 ->
                    ct:fail({no_message, I})
                end || I <- [1, 2, 3]],
    ?assertEqual([{data, 1}, {data, 2}, {error, 'ValueError'}], Messages).

error_before_first_item() ->
    [{doc, "An exception raised by the function itself is the first and only "
           "message; a result that is not iterable and an unknown function are "
           "errors too."}].
error_before_first_item(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', fails_at_once, []),
    receive
        {pyport_stream, Ref, First} ->
            ?assertMatch({error, {python, <<"ValueError">>, _, _}}, First)
    after 5000 ->
        ct:fail(no_error)
    end,
    ?assertMatch({error, {python, <<"TypeError">>, _, _}},
                 first_error(pyport:stream(A, builtins, abs, [-1]))),
    %% as for call/4: a name missing from __main__ is a NameError
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 first_error(pyport:stream(A, '__main__', pyport_no_such_function, []))),
    %% the context is fine
    ?assertEqual({done, [0, 1]}, stream_all(A, count, [2])).

unconvertible_item() ->
    [{doc, "An item that cannot be converted ends the stream with {error, "
           "{bad_term, _}} after the items before it."}].
unconvertible_item(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:stream(A, '__main__', odd_items, []),
    ?assertEqual({data, 1}, pyport:stream_next(Ref, 5000)),
    ?assertMatch({error, {bad_term, _}}, pyport:stream_next(Ref, 5000)),
    ?assertEqual({done, [0]}, stream_all(A, count, [1])).

long_stream_shares_context() ->
    [{doc, "A long sync generator does not monopolise its context: plain calls to "
           "the same context return promptly while its consumer takes nothing, and "
           "while another process drains it as fast as it can."}].
long_stream_shares_context(Config) ->
    A = ?config(a, Config),
    %% consumer not taking: the stream waits for credit
    {ok, Ref} = pyport:stream(A, '__main__', count, [100000], #{}, #{window => 4}),
    ok = await_queue_len(4, 4),
    Idle = [timed_add(A, I) || I <- lists:seq(1, 5)],
    ok = pyport:stream_cancel(Ref),
    %% consumer draining as fast as it can
    Self = self(),
    Drainer = spawn_link(fun() ->
                             {ok, R} = pyport:stream(A, '__main__', count, [100000000], #{},
                                                     #{window => 4}),
                             {data, 0} = pyport:stream_next(R, 5000),
                             Self ! {draining, self()},
                             Self ! {drained, self(), drain(R, 1)}
                         end),
    receive {draining, Drainer} -> ok after 5000 -> ct:fail(not_draining) end,
    Busy = [timed_add(A, I) || I <- lists:seq(1, 20)],
    Drainer ! stop,
    Drained = receive {drained, Drainer, N} -> N after 10000 -> ct:fail(drainer_stuck) end,
    ct:log("sync calls beside an idle stream: ~w ms; beside a draining one: ~w ms; "
           "~b items drained meanwhile", [Idle, Busy, Drained]),
    ?assert(lists:max(Idle) < 1000),
    ?assert(lists:max(Busy) < 1000),
    ?assert(Drained > 1).

runtime_crash_mid_stream() ->
    [{doc, "When the runtime's OS process dies mid-stream, stream_next gives "
           "{error, {runtime_down, _}} promptly (after the items already delivered)."}].
runtime_crash_mid_stream(Config) ->
    Mode = ?config(mode, Config),
    Name = list_to_atom("pyport_stream_crash_" ++ atom_to_list(Mode)),
    {ok, _} = pyport:start_runtime(#{name => Name,
                                     contexts => [#{name => x, mode => Mode,
                                                    preload => ?HELPERS}]}),
    {ok, X} = pyport:context(Name, x),
    OsPid = pyport_ct:os_pid(Name),
    {ok, Ref} = pyport:stream(X, '__main__', forever, [], #{}, #{window => 4}),
    ?assertEqual({data, 0}, pyport:stream_next(Ref, 5000)),
    ?assertEqual({data, 1}, pyport:stream_next(Ref, 5000)),
    T0 = now_ms(),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    Final = final_after_data(Ref, 10),
    Ms = now_ms() - T0,
    ct:log("stream ended with ~p, ~b ms after the kill", [Final, Ms]),
    ?assertMatch({error, {runtime_down, _}}, Final),
    ?assert(Ms < 5000),
    _ = pyport_ct:await_new_os_pid(Name, OsPid),
    ok = pyport:stop_runtime(Name).

context_stopped_mid_stream() ->
    [{doc, "When the context is stopped mid-stream, stream_next gives an error "
           "promptly; a stream on the stopped context is an error too."}].
context_stopped_mid_stream(Config) ->
    {ok, Ctx} = pyport:new_context(?config(runtime, Config),
                                   #{mode => ?config(mode, Config), preload => ?HELPERS}),
    {ok, Ref} = pyport:stream(Ctx, '__main__', forever, [], #{}, #{window => 4}),
    ?assertEqual({data, 0}, pyport:stream_next(Ref, 5000)),
    ?assertEqual({data, 1}, pyport:stream_next(Ref, 5000)),
    T0 = now_ms(),
    ok = pyport:stop_context(Ctx),
    Final = final_after_data(Ref, 10),
    Ms = now_ms() - T0,
    ct:log("stream ended with ~p, ~b ms after stop_context", [Final, Ms]),
    ?assertEqual({error, {context_down, stopped}}, Final),
    ?assert(Ms < 5000),
    ?assertEqual({error, {context_down, unknown_context}},
                 first_error(pyport:stream(Ctx, '__main__', count, [3]))),
    ?assertEqual({done, [0, 1]}, stream_all(?config(a, Config), count, [2])).

%%% Helpers

now_ms() ->
    erlang:monotonic_time(millisecond).

queue_len() ->
    {message_queue_len, Len} = erlang:process_info(self(), message_queue_len),
    Len.

%% Waits (bounded polling) until exactly Len messages are queued; more than Max
%% fails at once.
await_queue_len(Len, Max) ->
    pyport_ct:wait_for(fun() ->
                           case queue_len() of
                               Len -> {ok, ok};
                               N when N > Max -> ct:fail({window_exceeded, N, Max});
                               N -> {queued, N}
                           end
                       end, 500).

stream(Ctx, M, F, Args) ->
    pyport:stream(Ctx, M, F, Args).

stream_all(Ctx, F, Args) ->
    collect(pyport:stream(Ctx, '__main__', F, Args)).

%% {done, Items} or {{error, E}, Items} for a stream/4,5,6 result.
collect({ok, Ref}) ->
    collect(Ref, []);
collect(Other) ->
    ct:fail({no_stream, Other}).

collect(Ref, Acc) ->
    case pyport:stream_next(Ref, 5000) of
        {data, Item} -> collect(Ref, [Item | Acc]);
        done -> {done, lists:reverse(Acc)};
        {error, _} = Error -> {Error, lists:reverse(Acc)}
    end.

%% The error a stream ends with when it has no items: refused by stream/4 or sent
%% as the first message.
first_error({error, _} = Error) ->
    Error;
first_error({ok, Ref}) ->
    case pyport:stream_next(Ref, 5000) of
        {data, Item} -> ct:fail({unexpected_item, Item});
        Final -> Final
    end.

%% Takes up to MaxData further items, then returns the final message.
final_after_data(Ref, MaxData) ->
    case pyport:stream_next(Ref, 5000) of
        {data, _} when MaxData > 0 -> final_after_data(Ref, MaxData - 1);
        {data, _} = Data -> ct:fail({still_streaming, Data});
        Final -> Final
    end.

%% Receives items Next..Stop-1 itself, one per ms, acking each; checks the mailbox
%% never holds more than Window messages; returns the most it saw.
paced_take(_Ref, Stop, Stop, _Window, MaxSeen) ->
    MaxSeen;
paced_take(Ref, Next, Stop, Window, MaxSeen) ->
    Len = queue_len(),
    ?assert(Len =< Window),
    receive
        {pyport_stream, Ref, {data, Item}} ->
            ?assertEqual(Next, Item),
            ok = pyport:stream_ack(Ref),
            %% the consumer's pace: this is the workload, not a wait for something
            receive after 1 -> ok end,
            paced_take(Ref, Next + 1, Stop, Window, max(MaxSeen, Len))
    after 5000 ->
        ct:fail({no_item, Next})
    end.

cancel_closes(Ctx, Generator) ->
    {ok, Ref} = pyport:stream(Ctx, '__main__', Generator, [self()], #{}, #{window => 4}),
    ?assertEqual([{data, 0}, {data, 1}, {data, 2}],
                 [pyport:stream_next(Ref, 5000) || _ <- [1, 2, 3]]),
    ok = pyport:stream_cancel(Ref),
    {messages, Left} = erlang:process_info(self(), messages),
    ?assertEqual([], [M || {pyport_stream, R, _} = M <- Left, R =:= Ref]),
    receive finally_ran -> ok after 5000 -> ct:fail(finally_not_run) end,
    %% the context serves on; its frames come after any of the cancelled stream's
    ?assertEqual({done, [0, 1]}, stream_all(Ctx, count, [2])),
    %% so this negative check needs no wait: nothing more came for this stream
    receive {pyport_stream, Ref, _} = Msg -> ct:fail({after_cancel, Msg}) after 0 -> ok end.

consumer_exit_closes(Ctx, Generator) ->
    Self = self(),
    {Pid, Mref} = spawn_monitor(fun() ->
                                    {ok, Ref} = pyport:stream(Ctx, '__main__', Generator,
                                                              [Self], #{}, #{window => 4}),
                                    Items = [pyport:stream_next(Ref, 5000) || _ <- [1, 2]],
                                    Self ! {took, self(), Items}
                                end),
    receive
        {took, Pid, Items} -> ?assertEqual([{data, 0}, {data, 1}], Items)
    after 5000 ->
        ct:fail(no_items)
    end,
    receive
        {'DOWN', Mref, process, Pid, Reason} -> ?assertEqual(normal, Reason)
    after 5000 ->
        ct:fail(consumer_alive)
    end,
    receive finally_ran -> ok after 5000 -> ct:fail(finally_not_run) end,
    ?assertEqual({done, [0, 1]}, stream_all(Ctx, count, [2])).

%% A plain call to Ctx; returns how long it took, in ms.
timed_add(Ctx, I) ->
    T0 = now_ms(),
    ?assertEqual({ok, I + 1}, pyport:call(Ctx, operator, add, [I, 1])),
    now_ms() - T0.

%% The drainer's loop: takes items until told to stop, then cancels; returns how
%% many it took.
drain(Ref, N) ->
    receive
        stop ->
            ok = pyport:stream_cancel(Ref),
            N
    after 0 ->
        {data, N} = pyport:stream_next(Ref, 5000),
        drain(Ref, N + 1)
    end.


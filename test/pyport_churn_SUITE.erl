%% @doc Churn: thousands of requests of the kinds that leave something in the port
%% program until they end (streams, channels, envs, handles) leave nothing once they
%% have ended. Checked on the port program's own bookkeeping, exactly (info/1 counts
%% per context: `open', requests the event loop answers later, and `channels'), in
%% Python (the loop's streams and tasks, objects by weak reference) and on the port
%% owner (its items and the monitors on it), not on resident memory, which is noisy:
%% `make soak' measures that (benches/churn.escript). Every case runs in both context
%% modes (groups `owngil' and `main').
-module(pyport_churn_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% requests of each kind per case
-define(N, 2000).

-define(HELPERS, <<"
import asyncio, erlang, gc, socket, weakref

def forever():
    i = 0
    while True:
        yield i
        i += 1

async def aforever():
    i = 0
    while True:
        yield i
        i += 1
        await asyncio.sleep(0)

async def acount(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i

def fails_after(n):
    yield from range(n)
    raise ValueError('stream broke')

def loop_state():
    loop = asyncio.get_event_loop()
    return {'streams': len(loop._pyport_streams),
            'tasks': len([t for t in asyncio.all_tasks(loop) if not t.done()])}

def cancel_all_tasks():
    for t in asyncio.all_tasks(asyncio.get_event_loop()):
        t.cancel()

def take(name):
    return erlang.channel(name).receive(10)

held = {}

def hold(name):
    held[name] = erlang.channel(name)

def take_held(name):
    return held[name].receive(10)

def drop_held(name):
    del held[name]

def lookup(name):
    try:
        ch = erlang.channel(name)
    except LookupError:
        return erlang.atom('lookup_error')
    try:
        ch.receive(10)
    except erlang.ChannelClosed:
        return erlang.atom('closed')
    return erlang.atom('item')

class Box:
    pass

watched = weakref.WeakSet()

def new_box():
    box = Box()
    watched.add(box)
    return box

def boxes():
    gc.collect()
    return len(watched)

def busy(pid, port):
    s = socket.create_connection(('127.0.0.1', port))
    erlang.send(pid, erlang.atom('started'))
    s.recv(1)
    s.close()
    return 'done'
">>).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, owngil}, {group, main}].

groups() ->
    [{owngil, [], cases()}, {main, [], cases()}].

cases() ->
    [cancelled_streams_leave_nothing, finished_streams_leave_nothing,
     stream_cancelled_in_python_ends, channels_closed_leave_nothing,
     channel_held_by_python_is_kept, closed_channel_names_are_bounded,
     giving_back_passes_a_full_queue].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    pyport_ct:init_mode_group(pyport_churn, Mode, ?HELPERS, Config).

end_per_group(_Mode, Config) ->
    pyport_ct:end_mode_group(Config).

init_per_testcase(_Case, Config) ->
    Runtime = ?config(runtime, Config),
    {ok, Ctx} = pyport:context(Runtime, a),
    [{ctx, Ctx} | Config].

end_per_testcase(_Case, _Config) ->
    ok.

%%% Cases

cancelled_streams_leave_nothing() ->
    [{doc, "Streams cancelled before their first item and after one (sync and async "
           "generators) leave no open request in the port program, no stream or task in "
           "Python, no item and no monitor on the port owner."}].
cancelled_streams_leave_nothing(Config) ->
    Ctx = ?config(ctx, Config),
    Runtime = ?config(runtime, Config),
    Monitors = owner_monitors(Runtime),
    lists:foreach(fun(I) ->
                      {ok, S} = pyport:stream(Ctx, '__main__', forever, []),
                      ok = pyport:stream_cancel(S),
                      paced(Ctx, I)
                  end, lists:seq(1, ?N)),
    lists:foreach(fun(_) ->
                      {ok, S} = pyport:stream(Ctx, '__main__', forever, [], #{},
                                              #{window => 2}),
                      {data, 0} = pyport:stream_next(S, 60000),
                      ok = pyport:stream_cancel(S)
                  end, lists:seq(1, ?N)),
    lists:foreach(fun(_) ->
                      {ok, S} = pyport:stream(Ctx, '__main__', aforever, [], #{},
                                              #{window => 2}),
                      {data, 0} = pyport:stream_next(S, 60000),
                      ok = pyport:stream_cancel(S)
                  end, lists:seq(1, ?N div 4)),
    assert_nothing_open(Runtime, Ctx),
    ?assertEqual(Monitors, owner_monitors(Runtime)),
    pyport_ct:assert_no_messages().

finished_streams_leave_nothing() ->
    [{doc, "Streams that ran to their end (sync and async generators, and one that "
           "raised) leave nothing open either."}].
finished_streams_leave_nothing(Config) ->
    Ctx = ?config(ctx, Config),
    Runtime = ?config(runtime, Config),
    Monitors = owner_monitors(Runtime),
    lists:foreach(fun(I) ->
                      {ok, S} = pyport:stream(Ctx, builtins, range, [I, I + 3]),
                      [I, _, _] = pyport_ct:stream_items(S),
                      {ok, A} = pyport:stream(Ctx, '__main__', acount, [2]),
                      [0, 1] = pyport_ct:stream_items(A),
                      {ok, F} = pyport:stream(Ctx, '__main__', fails_after, [1]),
                      {data, 0} = pyport:stream_next(F, 60000),
                      {error, {python, <<"ValueError">>, _, _}} = pyport:stream_next(F, 60000)
                  end, lists:seq(1, ?N div 2)),
    assert_nothing_open(Runtime, Ctx),
    ?assertEqual(Monitors, owner_monitors(Runtime)),
    pyport_ct:assert_no_messages().

stream_cancelled_in_python_ends() ->
    [{doc, "A stream whose pump task other Python code cancels ends with an error "
           "(before, its consumer waited for ever and the request stayed open)."}].
stream_cancelled_in_python_ends(Config) ->
    Ctx = ?config(ctx, Config),
    Runtime = ?config(runtime, Config),
    {ok, S} = pyport:stream(Ctx, '__main__', forever, [], #{}, #{window => 1}),
    {data, 0} = pyport:stream_next(S, 60000),
    {ok, _} = pyport:call(Ctx, '__main__', cancel_all_tasks, []),
    ?assertMatch({error, {python, <<"asyncio.exceptions.CancelledError">>, _, _}},
                 final(S)),
    assert_nothing_open(Runtime, Ctx),
    pyport_ct:assert_no_messages().

channels_closed_leave_nothing() ->
    [{doc, "Channels opened, fed and closed (one name or 20, drained by Python or not, "
           "re-opened under the same name before they were closed) leave in the port "
           "program only the last closed channel of each name that still holds an item "
           "(erlang.channel(Name) still finds it)."}].
channels_closed_leave_nothing(Config) ->
    Ctx = ?config(ctx, Config),
    Runtime = ?config(runtime, Config),
    Cycle = fun(Name, I, Drain) ->
                {ok, Ch} = pyport:channel_open(Ctx, Name, #{capacity => 4}),
                ok = pyport:channel_send(Ch, I),
                Drain andalso ({ok, I} =:= pyport:call(Ctx, '__main__', take, [Name])
                               orelse ct:fail({not_taken, I})),
                ok = pyport:channel_close(Ch),
                paced(Ctx, I)
            end,
    %% one name, nobody takes: the last one keeps its item
    [Cycle(q, I, false) || I <- lists:seq(1, ?N)],
    ?assertEqual(1, channels(Runtime, Ctx)),
    %% drained by Python: nothing at all
    [Cycle(q, I, true) || I <- lists:seq(1, ?N)],
    ?assertEqual(0, channels(Runtime, Ctx)),
    %% 20 names, nobody takes: the last of each name
    Names = [list_to_atom("q" ++ integer_to_list(K)) || K <- lists:seq(1, 20)],
    [Cycle(lists:nth(I rem 20 + 1, Names), I, false) || I <- lists:seq(1, ?N)],
    ?assertEqual(20, channels(Runtime, Ctx)),
    [Cycle(Name, 0, true) || Name <- Names],
    ?assertEqual(0, channels(Runtime, Ctx)),
    %% opened again before being closed: the replaced one goes too
    lists:foreach(fun(I) ->
                      {ok, Ch1} = pyport:channel_open(Ctx, r, #{capacity => 4}),
                      {ok, Ch2} = pyport:channel_open(Ctx, r, #{capacity => 4}),
                      _ = pyport:channel_send(Ch1, I),
                      ok = pyport:channel_close(Ch2),
                      ok = pyport:channel_close(Ch1),
                      paced(Ctx, I)
                  end, lists:seq(1, ?N)),
    ?assertEqual(0, channels(Runtime, Ctx)),
    assert_nothing_open(Runtime, Ctx).

channel_held_by_python_is_kept() ->
    [{doc, "A closed channel that a Python Channel object holds keeps its items for it "
           "after its name was opened again; it is freed when that object goes."}].
channel_held_by_python_is_kept(Config) ->
    Ctx = ?config(ctx, Config),
    Runtime = ?config(runtime, Config),
    {ok, Ch} = pyport:channel_open(Ctx, held, #{capacity => 4}),
    {ok, _} = pyport:call(Ctx, '__main__', hold, [held]),
    ok = pyport:channel_send(Ch, 1),
    ok = pyport:channel_send(Ch, 2),
    ok = pyport:channel_close(Ch),
    {ok, New} = pyport:channel_open(Ctx, held, #{capacity => 4}),
    ?assertEqual(2, channels(Runtime, Ctx)),
    ?assertEqual({ok, 1}, pyport:call(Ctx, '__main__', take_held, [held])),
    ?assertEqual({ok, 2}, pyport:call(Ctx, '__main__', take_held, [held])),
    ?assertMatch({error, {python, <<"erlang.ChannelClosed">>, _, _}},
                 pyport:call(Ctx, '__main__', take_held, [held])),
    {ok, _} = pyport:call(Ctx, '__main__', drop_held, [held]),
    ?assertEqual(1, channels(Runtime, Ctx)),
    %% a replaced channel still holding items, held by Python, freed when dropped
    ok = pyport:channel_send(New, 3),
    {ok, _} = pyport:call(Ctx, '__main__', hold, [held]),
    {ok, Last} = pyport:channel_open(Ctx, held, #{capacity => 4}),
    ?assertEqual(2, channels(Runtime, Ctx)),
    {ok, _} = pyport:call(Ctx, '__main__', drop_held, [held]),
    ?assertEqual(1, channels(Runtime, Ctx)),
    ok = pyport:channel_close(Last),
    ?assertEqual(0, channels(Runtime, Ctx)).

closed_channel_names_are_bounded() ->
    [{doc, "erlang.channel(Name) finds a closed channel (closed) among the last 1024 "
           "closed; older names are forgotten (LookupError), so channels with a new "
           "name each time do not grow the port program either."}].
closed_channel_names_are_bounded(Config) ->
    Ctx = ?config(ctx, Config),
    Runtime = ?config(runtime, Config),
    Names = [<<"n", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 1100)],
    lists:foreach(fun({I, Name}) ->
                      {ok, Ch} = pyport:channel_open(Ctx, Name, #{capacity => 4}),
                      ok = pyport:channel_send(Ch, I),
                      ok = pyport:channel_close(Ch),
                      paced(Ctx, I)
                  end, lists:zip(lists:seq(1, 1100), Names)),
    %% the last 1024 keep their item for a reader that comes late
    ?assertEqual(1024, channels(Runtime, Ctx)),
    ?assertEqual({ok, lookup_error}, pyport:call(Ctx, '__main__', lookup, [hd(Names)])),
    ?assertEqual({ok, item}, pyport:call(Ctx, '__main__', lookup, [lists:last(Names)])),
    ?assertEqual({ok, closed}, pyport:call(Ctx, '__main__', lookup, [lists:last(Names)])),
    %% drained, they go
    [{ok, _} = pyport:call(Ctx, '__main__', take, [N]) || N <- lists:nthtail(76, Names),
                                                          N =/= lists:last(Names)],
    ?assertEqual(0, channels(Runtime, Ctx)).

giving_back_passes_a_full_queue() ->
    [{doc, "stream_cancel, stream_credit, drop_env and release are taken by a context "
           "whose queue is full (queue_capacity) instead of being refused as "
           "overloaded, which left the stream running or stalled and the env and the "
           "object alive."}].
giving_back_passes_a_full_queue(Config) ->
    Mode = ?config(mode, Config),
    {ok, Rt} = pyport:start_runtime(#{queue_capacity => 2,
                                      contexts => [#{name => a, mode => Mode,
                                                     preload => ?HELPERS}]}),
    {ok, Ctx} = pyport:context(Rt, a),
    {ok, Env} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"import __main__\nbox = __main__.new_box()">>, #{env => Env}),
    {ok, Ref} = pyport:call(Ctx, '__main__', new_box, [], #{}, #{return => ref}),
    ?assertEqual({ok, 2}, pyport:call(Ctx, '__main__', boxes, [])),
    {ok, Cancelled} = pyport:stream(Ctx, '__main__', forever, [], #{}, #{window => 2}),
    {ok, Credited} = pyport:stream(Ctx, '__main__', forever, [], #{}, #{window => 2}),
    {data, 0} = pyport:stream_next(Cancelled, 60000),
    {data, 0} = pyport:stream_next(Credited, 60000),
    %% both pumps have filled their window (items 1 and 2 are here) and wait for
    %% credit; the credit frames just sent may still be queued
    sync(Ctx),
    Conn = block(Ctx),
    %% the queue is full (two casts)
    ok = pyport:cast(Ctx, operator, add, [1, 2]),
    ok = pyport:cast(Ctx, operator, add, [1, 2]),
    ok = pyport:stream_cancel(Cancelled),
    {data, 1} = pyport:stream_next(Credited, 60000),  % grants credit for item 3
    ok = pyport:drop_env(Env),
    ok = pyport:release(Ref),
    %% a request that wants an answer is still refused
    ?assertEqual({error, overloaded}, pyport:call(Ctx, operator, add, [1, 2])),
    unblock(Conn),
    sync(Ctx),
    ?assertEqual({ok, 0}, pyport:call(Ctx, '__main__', boxes, [])),
    %% item 3 came for the credit granted while the queue was full, item 4 for this take
    ?assertEqual({data, 2}, pyport:stream_next(Credited, 60000)),
    ?assertEqual({data, 3}, pyport:stream_next(Credited, 60000)),
    ?assertEqual({data, 4}, pyport:stream_next(Credited, 60000)),
    ok = pyport:stream_cancel(Credited),
    sync(Ctx),
    assert_nothing_open(Rt, Ctx),
    ok = pyport:stop_runtime(Rt).

%%% Helpers

%% A round trip through a context whose queue may be over its capacity for a while
%% (give-backs passed it): tried again while it answers overloaded.
sync(Ctx) ->
    pyport_ct:wait_for(fun() -> pyport:call(Ctx, operator, add, [1, 2]) end, 1000).

%% Requests that wait for no answer: a round trip now and then, so they do not fill
%% the context's queue.
paced(Ctx, I) ->
    I rem 200 =:= 0 andalso ({ok, 3} =:= pyport:call(Ctx, operator, add, [1, 2])
                             orelse ct:fail(no_round_trip)),
    ok.

%% After a round trip through the context (everything sent before has been served):
%% no request open in the port program, no stream or task in Python, no stream
%% owned on the port owner.
assert_nothing_open(Runtime, Ctx) ->
    {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
    Stats = context_stats(Runtime, Ctx),
    ?assertMatch(#{open := 0, streams := 0}, Stats),
    ?assertEqual({ok, #{<<"streams">> => 0, <<"tasks">> => 0}},
                 pyport:call(Ctx, '__main__', loop_state, [])),
    {ok, #{owned := Owned}} = pyport:info(Runtime),
    ?assertMatch(#{streams := 0}, Owned).

channels(Runtime, Ctx) ->
    {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
    maps:get(channels, context_stats(Runtime, Ctx)).

%% The info/1 entry of context `a' (every case uses that one).
context_stats(Runtime, _Ctx) ->
    {ok, #{contexts := Contexts}} = pyport:info(Runtime),
    [Stats] = [C || #{name := a} = C <- Contexts],
    Stats.

%% The monitors on the runtime's port owner (a stream holds one while it runs).
owner_monitors(Runtime) ->
    [{Runtime, Owner, _, _, _}] = ets:lookup(pyport_runtimes, Runtime),
    {monitored_by, By} = process_info(Owner, monitored_by),
    length(By).

%% The final message of a stream, skipping items.
final(S) ->
    case pyport:stream_next(S, 60000) of
        {data, _} -> final(S);
        Final -> Final
    end.

%% Blocks the context in a socket read until unblock/1: busy for as long as the test
%% wants, with nothing timed.
block(Ctx) ->
    {ok, Listen} = gen_tcp:listen(0, [binary, {active, false}, {ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(Listen),
    Self = self(),
    spawn_link(fun() -> Self ! {busy, pyport:call(Ctx, '__main__', busy, [Self, Port])} end),
    receive
        started -> ok;
        {busy, Early} -> ct:fail({busy_returned, Early})
    after 60000 -> ct:fail({no_message, ?LINE})
    end,
    {ok, Conn} = gen_tcp:accept(Listen, 60000),
    ok = gen_tcp:close(Listen),
    Conn.

unblock(Conn) ->
    ok = gen_tcp:send(Conn, <<"x">>),
    receive {busy, {ok, <<"done">>}} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end,
    ok = gen_tcp:close(Conn).

%% @doc Channels: channel_open/3, channel_send/2 and channel_close/1 feeding Python
%% consumers (ch.receive, ch.try_receive, async for) in a context. Every case runs in
%% both context modes (groups `owngil' and `main').
-module(pyport_channel_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% Preloaded into every context of the suite. TASKS survives a second preload into
%% the same interpreter (`main' contexts may share one).
-define(HELPERS, <<"
import asyncio, erlang

TASKS = globals().get('TASKS', set())

def take(name, n):
    ch = erlang.channel(name)
    return [ch.receive() for _ in range(n)]

def take_typed(name, n):
    ch = erlang.channel(name)
    out = []
    for _ in range(n):
        item = ch.receive()
        out.append((type(item).__name__, item))
    return out

def try_take(name):
    return erlang.channel(name).try_receive()

def outcome(name, timeout=None):
    try:
        return ('item', erlang.channel(name).receive(timeout=timeout))
    except erlang.ChannelClosed:
        return 'closed'
    except TimeoutError:
        return 'timeout'

def announced_outcome(name, pid):
    erlang.send(pid, erlang.atom('receiving'))
    return outcome(name)

async def forward(ch, pid):
    async for item in ch:
        erlang.send(pid, ('got', item))
    erlang.send(pid, erlang.atom('closed'))

async def collect(ch, pid):
    items = [item async for item in ch]
    erlang.send(pid, ('all', items))

async def start_consumer(kind, name, pid):
    ch = erlang.channel(name)
    coro = forward(ch, pid) if kind == 'forward' else collect(ch, pid)
    task = asyncio.get_running_loop().create_task(coro)
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
">>).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, owngil}, {group, main}].

groups() ->
    [{owngil, [], cases()}, {main, [], cases()}].

cases() ->
    [send_then_receive, atom_or_binary_name, try_receive_empty, busy_at_capacity,
     default_capacity, closed_after_close, drained_then_closed, receive_timeout,
     blocked_receive_wakes_on_send, blocked_receive_wakes_on_close, async_consumer,
     async_consumer_10000_in_order, sync_consumer_with_flow_control,
     open_on_stopped_context].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    pyport_ct:init_mode_group(pyport_channel, Mode, ?HELPERS, Config).

end_per_group(_Mode, Config) ->
    pyport_ct:end_mode_group(Config).

init_per_testcase(_Case, Config) ->
    pyport_ct:contexts_ab(?config(runtime, Config), Config).

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

%%% Cases

send_then_receive() ->
    [{doc, "Terms sent before Python reads are received in order by ch.receive(), "
           "converted as call arguments are."}].
send_then_receive(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    Items = [42, <<"text">>, {pair, [1, 2.5]}, #{key => <<"v">>}, {bytes, <<0, 255>>}, hello],
    [?assertEqual(ok, pyport:channel_send(Chan, Item)) || Item <- Items],
    ?assertEqual({ok, [{<<"int">>, 42}, {<<"str">>, <<"text">>}, {<<"tuple">>, {pair, [1, 2.5]}},
                       {<<"dict">>, #{key => <<"v">>}}, {<<"bytes">>, <<0, 255>>},
                       {<<"Atom">>, hello}]},
                 pyport:call(A, '__main__', take_typed, [Name, length(Items)])),
    %% three more, taken by a plain receive loop
    [ok = pyport:channel_send(Chan, I) || I <- [1, 2, 3]],
    ?assertEqual({ok, [1, 2, 3]}, pyport:call(A, '__main__', take, [Name, 3])),
    ok = pyport:channel_close(Chan).

atom_or_binary_name() ->
    [{doc, "A channel name may be an atom or a binary; Python finds it by its text."}].
atom_or_binary_name(Config) ->
    A = ?config(a, Config),
    {ok, ByAtom} = pyport:channel_open(A, pyport_channel_by_atom, #{}),
    {ok, ByBinary} = pyport:channel_open(A, <<"pyport_channel_by_binary">>, #{}),
    ok = pyport:channel_send(ByAtom, 1),
    ok = pyport:channel_send(ByBinary, 2),
    ?assertEqual({ok, [1]}, pyport:call(A, '__main__', take, [<<"pyport_channel_by_atom">>, 1])),
    ?assertEqual({ok, [2]}, pyport:call(A, '__main__', take, [<<"pyport_channel_by_binary">>, 1])),
    ok = pyport:channel_close(ByAtom),
    ok = pyport:channel_close(ByBinary).

try_receive_empty() ->
    [{doc, "ch.try_receive() returns None on an empty channel, else the next item."}].
try_receive_empty(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', try_take, [Name])),
    ok = pyport:channel_send(Chan, 7),
    %% the item may reach the context a little after channel_send returned
    ?assertEqual(7, pyport_ct:wait_for(fun() -> try_take(A, Name) end, 500)),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', try_take, [Name])),
    ok = pyport:channel_close(Chan).

busy_at_capacity() ->
    [{doc, "With capacity 5 and no consumer, 5 sends are ok and the next ones busy; "
           "once Python took the items, sends are ok again, up to capacity."}].
busy_at_capacity(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{capacity => 5}),
    [?assertEqual(ok, pyport:channel_send(Chan, I)) || I <- lists:seq(1, 5)],
    ?assertEqual(busy, pyport:channel_send(Chan, 6)),
    ?assertEqual(busy, pyport:channel_send(Chan, 6)),
    ?assertEqual({ok, [1, 2, 3, 4, 5]}, pyport:call(A, '__main__', take, [Name, 5])),
    %% the Erlang side may learn about the taken items a little later
    [ok = send_when_free(Chan, I) || I <- lists:seq(6, 10)],
    ?assertEqual(busy, pyport:channel_send(Chan, 11)),
    ?assertEqual({ok, [6, 7, 8, 9, 10]}, pyport:call(A, '__main__', take, [Name, 5])),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', try_take, [Name])),
    ok = pyport:channel_close(Chan).

default_capacity() ->
    [{doc, "The default capacity is 1000 items."}].
default_capacity(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    Sent = [pyport:channel_send(Chan, I) || I <- lists:seq(1, 1000)],
    ?assertEqual([], [R || R <- Sent, R =/= ok]),
    ?assertEqual(busy, pyport:channel_send(Chan, 1001)),
    ?assertEqual({ok, lists:seq(1, 1000)}, pyport:call(A, '__main__', take, [Name, 1000])),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', try_take, [Name])),
    ok = pyport:channel_close(Chan).

closed_after_close() ->
    [{doc, "channel_send after channel_close gives {error, closed}; closing again is "
           "ok."}].
closed_after_close(Config) ->
    A = ?config(a, Config),
    {ok, Chan} = pyport:channel_open(A, atom_to_binary(?FUNCTION_NAME), #{}),
    ?assertEqual(ok, pyport:channel_send(Chan, 1)),
    ?assertEqual(ok, pyport:channel_close(Chan)),
    ?assertEqual({error, closed}, pyport:channel_send(Chan, 2)),
    ?assertEqual(ok, pyport:channel_close(Chan)),
    ?assertEqual({error, closed}, pyport:channel_send(Chan, 3)).

drained_then_closed() ->
    [{doc, "Items sent before the close are still received; then ch.receive() raises "
           "erlang.ChannelClosed."}].
drained_then_closed(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    ok = pyport:channel_send(Chan, 1),
    ok = pyport:channel_send(Chan, 2),
    ok = pyport:channel_close(Chan),
    ?assertEqual({ok, {<<"item">>, 1}}, pyport:call(A, '__main__', outcome, [Name])),
    ?assertEqual({ok, {<<"item">>, 2}}, pyport:call(A, '__main__', outcome, [Name])),
    ?assertEqual({ok, <<"closed">>}, pyport:call(A, '__main__', outcome, [Name])),
    ?assertEqual({ok, <<"closed">>}, pyport:call(A, '__main__', outcome, [Name])).

receive_timeout() ->
    [{doc, "ch.receive(timeout=T) on an empty channel raises TimeoutError after T; "
           "the channel works afterwards."}].
receive_timeout(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    T0 = now_ms(),
    ?assertEqual({ok, <<"timeout">>}, pyport:call(A, '__main__', outcome, [Name, 0.1])),
    Ms = now_ms() - T0,
    ?assert(Ms >= 90),
    ?assert(Ms < 5000),
    ok = pyport:channel_send(Chan, 5),
    ?assertEqual({ok, {<<"item">>, 5}}, pyport:call(A, '__main__', outcome, [Name, 5.0])),
    ok = pyport:channel_close(Chan).

blocked_receive_wakes_on_send() ->
    [{doc, "A sync call blocked in ch.receive() (30 s call timeout) returns as soon "
           "as another process sends an item."}].
blocked_receive_wakes_on_send(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    Caller = blocked_receiver(A, Name),
    T0 = now_ms(),
    ok = pyport:channel_send(Chan, wake_up),
    Result = receive {received, Caller, R} -> R after 5000 -> ct:fail(still_blocked) end,
    Ms = now_ms() - T0,
    ct:log("the blocked receive returned ~b ms after the send", [Ms]),
    ?assertEqual({ok, {<<"item">>, wake_up}}, Result),
    ?assert(Ms < 1000),
    ok = pyport:channel_close(Chan).

blocked_receive_wakes_on_close() ->
    [{doc, "A sync call blocked in ch.receive() gets erlang.ChannelClosed as soon as "
           "the channel is closed."}].
blocked_receive_wakes_on_close(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    Caller = blocked_receiver(A, Name),
    T0 = now_ms(),
    ok = pyport:channel_close(Chan),
    Result = receive {received, Caller, R} -> R after 5000 -> ct:fail(still_blocked) end,
    Ms = now_ms() - T0,
    ?assertEqual({ok, <<"closed">>}, Result),
    ?assert(Ms < 1000).

async_consumer() ->
    [{doc, "A task consuming with `async for` gets items sent after it started, "
           "between requests, and sees the end when the channel is closed."}].
async_consumer(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{}),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', start_consumer, [forward, Name, self()])),
    ok = pyport:channel_send(Chan, first),
    ?assertEqual({<<"got">>, first}, next_message()),
    ok = pyport:channel_send(Chan, <<"second">>),
    ok = pyport:channel_send(Chan, [3]),
    ?assertEqual({<<"got">>, <<"second">>}, next_message()),
    ?assertEqual({<<"got">>, [3]}, next_message()),
    %% the context serves plain requests while its consumer waits
    ?assertEqual({ok, 3}, pyport:call(A, operator, add, [1, 2])),
    ok = pyport:channel_close(Chan),
    ?assertEqual(closed, next_message()).

async_consumer_10000_in_order() ->
    [{doc, "10,000 items through a channel of capacity 100 into an `async for` "
           "consumer arrive complete and in order (the sender retries on busy)."}].
async_consumer_10000_in_order(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{capacity => 100}),
    ?assertEqual({ok, none}, pyport:call(A, '__main__', start_consumer, [collect, Name, self()])),
    N = 10000,
    ok = send_all(Chan, lists:seq(1, N)),
    ok = pyport:channel_close(Chan),
    receive
        {<<"all">>, Items} ->
            ?assertEqual(N, length(Items)),
            ?assertEqual(lists:seq(1, N), Items)
    after 30000 ->
        ct:fail(consumer_did_not_end)
    end.

sync_consumer_with_flow_control() ->
    [{doc, "A sync call taking 1000 items with ch.receive() from a channel of "
           "capacity 10, fed by a sender that retries on busy, gets them all in order."}].
sync_consumer_with_flow_control(Config) ->
    A = ?config(a, Config),
    Name = atom_to_binary(?FUNCTION_NAME),
    {ok, Chan} = pyport:channel_open(A, Name, #{capacity => 10}),
    N = 1000,
    Ref = pyport:async_call(A, '__main__', take, [Name, N], #{}, #{timeout => 30000}),
    ok = send_all(Chan, lists:seq(1, N)),
    ?assertEqual({ok, lists:seq(1, N)}, pyport:await(Ref, 30000)),
    ok = pyport:channel_close(Chan).

open_on_stopped_context() ->
    [{doc, "channel_open on a stopped context is an error."}].
open_on_stopped_context(Config) ->
    {ok, Ctx} = pyport:new_context(?config(runtime, Config),
                                   #{mode => ?config(mode, Config), preload => ?HELPERS}),
    ok = pyport:stop_context(Ctx),
    ?assertEqual({error, {context_down, unknown_context}},
                 pyport:channel_open(Ctx, atom_to_binary(?FUNCTION_NAME), #{})).

%%% Helpers

now_ms() ->
    erlang:monotonic_time(millisecond).

next_message() ->
    receive Msg -> Msg after 5000 -> ct:fail(no_message) end.

%% try_receive through a call, as {ok, Item} once there is one (for wait_for).
try_take(Ctx, Name) ->
    case pyport:call(Ctx, '__main__', try_take, [Name]) of
        {ok, none} -> empty;
        {ok, Item} -> {ok, Item};
        Error -> ct:fail({try_take, Error})
    end.

%% channel_send, retrying (bounded polling) while the channel is busy.
send_when_free(Chan, Item) ->
    pyport_ct:wait_for(fun() ->
                           case pyport:channel_send(Chan, Item) of
                               ok -> {ok, ok};
                               busy -> busy;
                               Error -> ct:fail({channel_send, Item, Error})
                           end
                       end, 1000).

send_all(_Chan, []) ->
    ok;
send_all(Chan, [Item | Rest]) ->
    case pyport:channel_send(Chan, Item) of
        ok -> ok;
        busy -> ok = send_when_free(Chan, Item);
        Error -> ct:fail({channel_send, Item, Error})
    end,
    send_all(Chan, Rest).

%% Starts a process whose sync call blocks in ch.receive() on channel Name (30 s call
%% timeout); returns once Python is about to block. The answer comes as
%% {received, Pid, Result}.
blocked_receiver(Ctx, Name) ->
    Self = self(),
    Caller = spawn_link(fun() ->
                            R = pyport:call(Ctx, '__main__', announced_outcome, [Name, Self],
                                            #{}, #{timeout => 30000}),
                            Self ! {received, self(), R}
                        end),
    receive receiving -> ok after 5000 -> ct:fail(receiver_not_started) end,
    Caller.

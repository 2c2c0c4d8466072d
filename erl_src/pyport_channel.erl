%% @private Channels, on the sender's side (pyport:channel_open/3, channel_send/2,
%% channel_close/1). The handle carries what a send needs: the port, the frame bound
%% and a `counters' array (items Python has not taken yet, closed flag) shared with the
%% port owner, which subtracts on `channel_ack' events and sets the flag when the
%% context or the runtime goes, or when the name is opened again. So a send never
%% waits for any process.
-module(pyport_channel).

-export([open/3]).
-export([send/2]).
-export([close/1]).

-include("pyport_handles.hrl").

-define(DEFAULT_CAPACITY, 1000).
-define(CHANNEL_OPTIONS, [capacity]).

%% @doc Opens channel Name in context Id of runtime Key (pyport:channel_open/3).
-spec open(#pyport_ctx{}, pyport_call:name(), map()) ->
          {ok, #pyport_channel{}} | {error, term()}.
open(#pyport_ctx{key = Key, id = Id}, Name, Opts) ->
    Capacity = maps:get(capacity, Opts, ?DEFAULT_CAPACITY),
    Unknown = pyport_call:unknown_option(Opts, ?CHANNEL_OPTIONS),
    case pyport_table:port_row(Key) of
        {ok, _} when Unknown =/= none ->
            {error, {bad_option, Unknown}};
        {ok, _} when not (is_integer(Capacity) andalso Capacity > 0) ->
            {error, {bad_request, {capacity, Capacity}}};
        {ok, {_, Pid, Port, _, MaxFrame} = Runtime} ->
            Bin = pyport_call:name(Name),
            case pyport_call:new_id(Runtime, Id, {channel_open, Bin, Capacity}) of
                {ok, ChanId} ->
                    Counters = counters:new(2, [atomics]),
                    %% once this returns, the handle of the channel this one replaced
                    %% (same name, same context) answers `{error, closed}'
                    pyport_port:channel_opened(Pid, Id, ChanId, Bin, Counters),
                    {ok, #pyport_channel{key = Key, ctx = Id, id = ChanId, port = Port,
                                         port_owner = Pid, max_frame = MaxFrame,
                                         capacity = Capacity, counters = Counters}};
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% @doc Sends Term to the channel: `ok', `busy' or `{error, closed}'
%% (pyport:channel_send/2).
-spec send(#pyport_channel{}, term()) -> ok | busy | {error, term()}.
send(#pyport_channel{counters = Counters, capacity = Capacity} = Chan, Term) ->
    case counters:get(Counters, 2) of
        0 ->
            case counters:get(Counters, 1) >= Capacity of
                true -> busy;
                false -> write(Chan, Term)
            end;
        _ ->
            {error, closed}
    end.

write(#pyport_channel{port = Port, ctx = Ctx, id = Id, counters = Counters,
                      max_frame = MaxFrame}, Term) ->
    Body = term_to_binary({channel_send, Id, Term}),
    Size = 10 + byte_size(Body),
    if
        Size > MaxFrame ->
            {error, {frame_too_large, Size, MaxFrame}};
        true ->
            counters:add(Counters, 1, 1),
            case pyport_call:cast_request(Port, Ctx, Body) of
                true -> ok;
                false -> counters:put(Counters, 2, 1), {error, closed}
            end
    end.

%% @doc Closes the channel; closing it again is `ok' (pyport:channel_close/1).
-spec close(#pyport_channel{}) -> ok.
close(#pyport_channel{port = Port, ctx = Ctx, id = Id, port_owner = Pid, counters = Counters}) ->
    case counters:get(Counters, 2) of
        0 ->
            counters:put(Counters, 2, 1),
            _ = pyport_call:cast_request(Port, Ctx, term_to_binary({channel_close, Id})),
            gen_server:cast(Pid, {channel_closed, Ctx, Id});
        _ ->
            ok
    end.

%% @private Streams, on the consumer's side (pyport:stream/4,5,6, stream_next/1,2,
%% stream_ack/1, stream_cancel/1).
%%
%% A stream is the alias of a monitor of the runtime's port owner, kept for the
%% stream's life, so a crash ends the stream at once; the frame header
%% `{pyport_stream, Alias}' tells the owner to deliver the stream's frames as
%% `{pyport_stream, Alias, Msg}'. The owner tracks the stream as an item of the
%% consumer, so the consumer's death cancels it.
%%
%% The consumer's credit state lives in its process dictionary, under
%% `{pyport_stream, Stream}': the handle is the bare alias (users match the messages
%% and the 'DOWN' with it, so it cannot carry more), the state changes with every item
%% taken, and only the consuming process reads it; it is erased when the stream ends.
%% No process or table would be a cheaper or more natural owner.
-module(pyport_stream).

-export([start/6]).
-export([next/2]).
-export([ack/1]).
-export([cancel/1]).

-include("pyport_handles.hrl").

-define(DEFAULT_WINDOW, 64).

-record(stream_state, {port :: port(),
                       ctx :: pos_integer(),
                       id :: binary(),
                       owner :: pid(),
                       batch :: pos_integer(),
                       unacked = 0 :: non_neg_integer()}).

%% @doc Starts a stream of `Module.Function(*Args, **Kwargs)' on Target (arguments and
%% option keys already checked). A stream of another node's context is consumed here
%% as well: the frames are written there, and the messages and credit cross the
%% distribution.
-spec start(#pyport_ctx{} | #pyport_pool{}, pyport_call:name(), pyport_call:name(), list(),
            map(), map()) -> {ok, reference()} | {error, term()}.
start(#pyport_pool{home = Home} = Pool, Module, Function, Args, Kwargs, Opts)
  when node(Home) =/= node() ->
    case pyport_remote:call(node(Home), pool_member, [Pool]) of
        {ok, Ctx} -> start(Ctx, Module, Function, Args, Kwargs, Opts);
        {error, _} = Error -> Error
    end;
start(#pyport_pool{} = Pool, Module, Function, Args, Kwargs, Opts) ->
    pyport_affinity:on_pool(Pool, [Args, Kwargs], Opts,
                            fun(Ctx) -> start(Ctx, Module, Function, Args, Kwargs, Opts) end);
start(#pyport_ctx{key = Key, id = Id, home = Home}, Module, Function, Args, Kwargs, Opts) ->
    Row = case node(Home) =:= node() of
              true -> pyport_table:port_row(Key);
              false -> pyport_remote:call(node(Home), runtime_row, [Key])
          end,
    start_on(Row, Key, Id, {stream, pyport_call:name(Module), pyport_call:name(Function),
                            Args, Kwargs}, Opts).

start_on(Row, Key, Id, Req, Opts) ->
    Window = maps:get(window, Opts, ?DEFAULT_WINDOW),
    case Row of
        {ok, _} when not (is_integer(Window) andalso Window > 0) ->
            {error, {bad_request, {window, Window}}};
        {ok, {_, Pid, Port, CallTimeout, MaxFrame}} ->
            Timeout = maps:get(timeout, Opts, CallTimeout),
            WireOpts0 = Opts#{timeout => Timeout, caller => self(), window => Window},
            case pyport_call:wire_opts(Key, Id, Pid, WireOpts0) of
                {ok, WireOpts} ->
                    Body = pyport_call:encode(Req, WireOpts),
                    monitored(Pid, Port, Id, Body, Window, MaxFrame);
                other_run ->
                    {error, not_found};
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

monitored(Pid, Port, Id, Body, Window, MaxFrame) ->
    Stream = erlang:monitor(process, Pid, [{alias, demonitor}]),
    H = term_to_binary({pyport_stream, Stream}),
    case pyport_call:write_request(Port, Id, H, Body, MaxFrame) of
        ok ->
            pyport_call:own(Pid, self(), Id, {stream, H}),
            put({?MODULE, Stream}, #stream_state{port = Port, ctx = Id, id = H, owner = Pid,
                                                 batch = max(1, Window div 2)}),
            {ok, Stream};
        not_written ->
            erlang:demonitor(Stream, [flush]),
            {error, {runtime_down, port_closed}};
        {error, _} = Error ->
            erlang:demonitor(Stream, [flush]),
            Error
    end.

%% @doc The next message of the stream, within Timeout (pyport:stream_next/2).
-spec next(reference(), timeout()) -> {data, term()} | done | {error, term()}.
next(Stream, Timeout) ->
    case get({?MODULE, Stream}) of
        undefined ->
            {error, not_found};
        State ->
            receive
                {pyport_stream, Stream, {data, _} = Data} ->
                    ack(Stream, State),
                    Data;
                {pyport_stream, Stream, Final} ->
                    finish(Stream, State, Final),
                    Final;
                {'DOWN', Stream, process, Pid, noconnection} ->
                    erase({?MODULE, Stream}),
                    {error, {nodedown, node(Pid)}};
                {'DOWN', Stream, process, _, Reason} ->
                    erase({?MODULE, Stream}),
                    {error, {runtime_down, Reason}}
            after Timeout ->
                {error, timeout}
            end
    end.

%% @doc Credit for one item taken (pyport:stream_ack/1).
-spec ack(reference()) -> ok.
ack(Stream) ->
    case get({?MODULE, Stream}) of
        undefined -> ok;
        State -> ack(Stream, State)
    end.

%% Credit goes back in batches of half the window, so the producer never has more than
%% `window' items out and the port sees one credit frame per batch.
ack(Stream, #stream_state{unacked = N, batch = Batch} = State) when N + 1 < Batch ->
    put({?MODULE, Stream}, State#stream_state{unacked = N + 1}),
    ok;
ack(Stream, #stream_state{port = Port, ctx = Ctx, id = H, unacked = N} = State) ->
    _ = pyport_call:cast_request(Port, Ctx, {stream_credit, H, N + 1, #{}}),
    put({?MODULE, Stream}, State#stream_state{unacked = 0}),
    ok.

%% @doc Stops the stream (pyport:stream_cancel/1).
-spec cancel(reference()) -> ok.
cancel(Stream) ->
    case erase({?MODULE, Stream}) of
        undefined ->
            ok;
        #stream_state{port = Port, ctx = Ctx, id = H} = State ->
            _ = pyport_call:cast_request(Port, Ctx, {stream_cancel, H, #{}}),
            forget(Stream, State)
    end.

finish(Stream, #stream_state{port = Port, ctx = Ctx, id = H} = State, Final) ->
    erase({?MODULE, Stream}),
    %% An error made on this side (an item the node refused) leaves the Python end
    %% running: stop it. After the port's own final frame this finds nothing to stop.
    Final =:= done orelse pyport_call:cast_request(Port, Ctx, {stream_cancel, H, #{}}),
    forget(Stream, State).

%% The owner stops tracking the stream; no message of it stays behind.
forget(Stream, #stream_state{ctx = Ctx, id = H, owner = Pid}) ->
    pyport_call:disown(Pid, Ctx, {stream, H}),
    erlang:demonitor(Stream, [flush]),
    flush(Stream).

flush(Stream) ->
    receive
        {pyport_stream, Stream, _} -> flush(Stream)
    after 0 ->
        ok
    end.

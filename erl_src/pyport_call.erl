%% @private The call path, run in the calling process: a request's options checked and
%% put in wire form, its frame encoded and written to the port, the reply received
%% (with the monitor and alias of the port owner) and decoded, its timeout; and the
%% frames that want no reply (casts, credit, drops). Nothing else writes a request
%% frame or waits for a reply of the port program (the port owner's own control
%% requests go through pyport_port, which waits for them as a gen_server call).
%%
%% The frame (docs/protocol.md): `<<Ctx:64, HLen:16, Header, ETF>>'. Header is
%% `term_to_binary(Alias)' for a request with a reply, `{pyport_stream, Alias}' for a
%% stream's, empty for none.
-module(pyport_call).

-export([request/4]).
-export([new_id/3]).
-export([cast/6]).
-export([wire_opts/4]).
-export([write_request/5]).
-export([encode/2]).
-export([request_frame/3]).
-export([cast_request/3]).
-export([write/2]).
-export([own/4]).
-export([disown/3]).
-export([name/1]).
-export([unknown_option/2]).

-export_type([row/0]).
-export_type([name/0]).

-include("pyport_handles.hrl").

%% Binary arguments larger than this are not copied into the request frame.
-define(IOVEC_THRESHOLD, 65536).
-define(REENTRANT_BIT, (1 bsl 63)).
%% The process dictionary key of the runtime row a process used last (request/4).
-define(LAST_RUNTIME, pyport_last_runtime).

-type name() :: atom() | binary() | string().
%% A runtime's row in pyport's table (pyport_table): its port owner, its port, its
%% call_timeout and its max_frame.
-type row() :: pyport_table:port_row().

%% @doc The reply to request Req (the request body without its trailing Opts map) to
%% context Id of runtime Key. Opts is checked for unknown keys first, at no cost for
%% the plain shapes (none, or only a timeout). The effective timeout and the caller
%% are sent along in Opts (the port program interrupts code that overran, and
%% `erlang.self()' is the caller); an env goes as its id.
%%
%% The runtime's row is kept in the process dictionary between requests (a look-up in
%% pyport's table is about a tenth of a call's cost under load). The row stays true for
%% the life of its port owner, and its port closes when the owner ends; so a request
%% whose port turns out closed (the runtime restarted or stopped since), or whose env
%% belongs to another run of the runtime than the kept row, was not written, and is
%% made again with the row looked up afresh. Nothing else checks the row: a check that
%% the owner is alive waits for the signals this process sent it, which costs more than
%% the look-up.
-spec request(pyport_runtime:key(), pos_integer(), tuple(), map()) ->
          {ok, term()} | {error, term()}.
request(Key, Id, Req, Opts) when map_size(Opts) =:= 0 ->
    request_known(Key, Id, Req, Opts);
request(Key, Id, Req, #{timeout := _} = Opts) when map_size(Opts) =:= 1 ->
    request_known(Key, Id, Req, Opts);
request(Key, Id, Req, Opts) ->
    case unknown_option(Opts, ?CALL_OPTIONS) of
        none -> request_known(Key, Id, Req, Opts);
        Unknown -> {error, {bad_option, Unknown}}
    end.

request_known(Key, Id, Req, Opts) ->
    case get(?LAST_RUNTIME) of
        {Key, _, _, _, _} = Runtime ->
            case try_request(Runtime, Id, Req, Opts) of
                Stale when Stale =:= not_written; Stale =:= other_run ->
                    _ = erase(?LAST_RUNTIME),
                    request_looked_up(Key, Id, Req, Opts);
                Reply ->
                    Reply
            end;
        _ ->
            request_looked_up(Key, Id, Req, Opts)
    end.

request_looked_up(Key, Id, Req, Opts) ->
    case pyport_table:port_row(Key) of
        {ok, Runtime} ->
            _ = put(?LAST_RUNTIME, Runtime),
            row_request(Runtime, Id, Req, Opts);
        {error, _} = Error ->
            Error
    end.

row_request(Runtime, Id, Req, Opts) ->
    case try_request(Runtime, Id, Req, Opts) of
        not_written -> {error, {runtime_down, port_closed}};
        other_run -> {error, not_found};
        Reply -> Reply
    end.

%% The request's reply; `not_written' when the port was closed, `other_run' when its
%% env was made by another run of the runtime (neither was sent).
try_request({Key, Pid, Port, CallTimeout, MaxFrame}, Id, Req, Opts) ->
    Timeout = maps:get(timeout, Opts, CallTimeout),
    Owner = maps:get(caller, Opts, self()),
    case wire_opts(Key, Id, Pid, Opts#{timeout => Timeout, caller => Owner}) of
        {ok, WireOpts} ->
            Body = encode(Req, WireOpts),
            Reply = send_request(Pid, Port, wire_ctx(Key, Id), Body, Timeout, MaxFrame),
            returned(Reply, Key, Id, Pid, Owner, Opts);
        NotSent ->
            NotSent
    end.

%% @doc A request to that runtime's context answered with the id of something it made
%% (an env, a channel).
-spec new_id(row(), pos_integer(), tuple()) -> {ok, integer()} | {error, term()}.
new_id(Runtime, Id, Req) ->
    case row_request(Runtime, Id, Req, #{}) of
        {ok, New} when is_integer(New) -> {ok, New};
        {ok, Other} -> {error, {bad_reply, Other}};
        {error, _} = Error -> Error
    end.

%% A request made by the Erlang function Python called with `erlang.call' (or by a
%% process it started with async_call/4,5,6) to the context waiting for it carries the
%% re-entrant bit: that context serves it however deep its waits are nested.
wire_ctx(Key, Id) ->
    case get(pyport_reentrant) of
        {Key, Id} -> Id bor ?REENTRANT_BIT;
        _ -> Id
    end.

%% @doc Opts in wire form for a request to context Id of runtime Key whose port owner
%% is Pid. An env is checked here, so it never reaches another context: it must come
%% from this runtime (and from this run of it, else `other_run') and this context. A
%% timeout is what `receive' takes.
-spec wire_opts(pyport_runtime:key(), pos_integer(), pid(), map()) ->
          {ok, map()} | other_run | {error, term()}.
wire_opts(_Key, _Id, _Pid, #{timeout := T})
  when not (T =:= infinity orelse (is_integer(T) andalso T >= 0 andalso T =< 16#ffffffff)) ->
    {error, {bad_request, {timeout, T}}};
wire_opts(Key, Id, Pid, #{env := Env} = Opts) ->
    case Env of
        #pyport_env{key = Key, ctx = Id, id = EnvId, port_owner = Pid} ->
            {ok, Opts#{env => EnvId}};
        #pyport_env{key = Key, ctx = Id} ->
            other_run;  % made before the runtime restarted, or after the row was read
        _ ->
            {error, {env_wrong_context, Env}}
    end;
wire_opts(_Key, _Id, _Pid, Opts) ->
    {ok, Opts}.

%% With `return => ref' the reply names an object kept in the context: it becomes a
%% handle owned by the calling process.
returned({ok, {pyport_ref, RefId}}, Key, Id, Pid, Owner, #{return := ref})
  when is_integer(RefId) ->
    own(Pid, Owner, Id, {ref, RefId}),
    {ok, #pyport_ref{key = Key, ctx = Id, id = RefId}};
returned(Reply, _Key, _Id, _Pid, _Owner, _Opts) ->
    Reply.

%% The monitor (with an alias) and the receive stay in one function, so the receive
%% skips the messages queued before the monitor was made (`erlc +recv_opt_info'
%% reports it). The reply leaves no 'DOWN' behind, even when the runtime exits right
%% after sending it: `reply_demonitor' removes the monitor as the reply's signal
%% reaches this process, and the runtime's 'DOWN' (the port owner sends both) always
%% comes after it and finds no monitor (pyport_contract_SUITE checks this with the
%% caller suspended meanwhile). After a timeout the demonitor deactivates the alias: a
%% late reply is dropped and can never reach a later call; one that arrived just
%% before is taken out of the mailbox here.
send_request(Pid, Port, Id, Body, Timeout, MaxFrame) ->
    Mref = erlang:monitor(process, Pid, [{alias, reply_demonitor}]),
    case write_request(Port, Id, term_to_binary(Mref), Body, MaxFrame) of
        ok ->
            receive
                {Mref, Reply} ->
                    decode(Reply);
                {'DOWN', Mref, _, _, Reason} ->
                    {error, {runtime_down, Reason}}
            after Timeout ->
                erlang:demonitor(Mref, [flush]),
                receive
                    {Mref, Reply} -> decode(Reply)
                after 0 ->
                    {error, timeout}
                end
            end;
        NotWritten ->
            erlang:demonitor(Mref, [flush]),
            NotWritten
    end.

%% @doc Writes a request frame with header H (also to a port of another node): `ok',
%% `not_written' when the port is closed, or `{error, frame_too_large...}'.
-spec write_request(port(), non_neg_integer(), binary(), iodata(), pos_integer()) ->
          ok | not_written | {error, {frame_too_large, pos_integer(), pos_integer()}}.
write_request(Port, Id, H, Body, MaxFrame) ->
    Size = 10 + byte_size(H) + iolist_size(Body),
    if
        Size > MaxFrame ->
            {error, {frame_too_large, Size, MaxFrame}};
        true ->
            try write(Port, request_frame(Id, H, Body)) of
                true -> ok
            catch
                error:badarg -> not_written
            end
    end.

%% @doc Casts `Module.Function(*Args)' to context Id of runtime Key, for Caller: no
%% reply. It has the runtime's call_timeout as its deadline; a closed port loses it,
%% as `!' would; one over max_frame is logged.
-spec cast(pyport_runtime:key(), pos_integer(), binary(), binary(), list(), pid()) -> ok.
cast(Key, Id, Module, Function, Args, Caller) ->
    case pyport_table:port_row(Key) of
        {ok, {_, _Pid, Port, CallTimeout, MaxFrame}} ->
            Body = encode({call, Module, Function, Args, #{}},
                          #{caller => Caller, timeout => CallTimeout}),
            case write_request(Port, Id, <<>>, Body, MaxFrame) of
                {error, {frame_too_large, Size, MaxFrame}} ->
                    logger:warning("pyport:cast of ~p bytes is over max_frame ~p",
                                   [Size, MaxFrame], #{domain => [pyport]});
                _WrittenOrClosed ->
                    ok
            end;
        {error, _} ->
            ok
    end.

%% @doc A request frame for the port (docs/protocol.md): the context id, the header
%% (empty: no reply wanted) and the request's ETF.
-spec request_frame(non_neg_integer(), binary(), iodata()) -> iolist().
request_frame(Ctx, Header, Body) ->
    [<<Ctx:64, (byte_size(Header)):16>>, Header, Body].

%% @doc Writes a frame to the port, also to the port of a runtime on another node (a
%% stream consumed here whose context lives there): `true', or `badarg' raised when
%% the port is gone (or its node is).
-spec write(port(), iodata()) -> true.
write(Port, Frame) when node(Port) =:= node() ->
    erlang:port_command(Port, Frame);
write(Port, Frame) ->
    try
        erpc:call(node(Port), erlang, port_command, [Port, Frame], 5000)
    catch
        error:_ -> error(badarg)
    end.

%% @doc Writes a request that wants no reply (empty header) to context `Ctx';
%% `Request' is a term or its encoding. False when the port is gone.
-spec cast_request(port(), non_neg_integer(), term()) -> boolean().
cast_request(Port, Ctx, Body) when is_binary(Body) ->
    try
        write(Port, request_frame(Ctx, <<>>, Body))
    catch
        error:badarg -> false
    end;
cast_request(Port, Ctx, Request) ->
    cast_request(Port, Ctx, term_to_binary(Request)).

%% @doc Tells the port owner Pid that Owner owns Item of context Id (an env, an object
%% handle, a stream), to be freed when Owner exits.
-spec own(pid(), pid(), pos_integer(), {env | ref, integer()} | {stream, binary()}) -> ok.
own(Pid, Owner, Id, Item) ->
    gen_server:cast(Pid, {own, Owner, Id, Item}).

%% @doc Tells the port owner Pid that Item of context Id was freed.
-spec disown(pid(), pos_integer(), {env | ref, integer()} | {stream, binary()}) -> ok.
disown(Pid, Id, Item) ->
    gen_server:cast(Pid, {disown, Id, Item}).

%%% Encoding and decoding

%% @doc The body of a request: the ETF of Req with Opts appended as its last element,
%% as iodata. Req is encoded alone and Opts spliced in after its elements. The usual
%% Opts, a timeout and this process as the caller, are written out directly with the
%% caller's encoding kept in the process dictionary: encoding a pid is the dearest
%% part of a small request, and without it every piece stays under the 64 bytes past
%% which a binary is allocated off the heap (an `operator.add(1, 2)' call: 240 ns ->
%% 140 ns).
-spec encode(tuple(), map()) -> iolist().
encode(Req, Opts) ->
    [<<131, 104, Arity, First/binary>> | More] = encode(Req),
    [<<131, 104, (Arity + 1)>>, First | More] ++ [encode_opts(Opts)].

encode_opts(#{timeout := Timeout, caller := Caller} = Opts)
  when map_size(Opts) =:= 2, Caller =:= self(),
       ((is_integer(Timeout) andalso Timeout >= 0 andalso Timeout < 16#80000000)
        orelse Timeout =:= infinity) ->
    [<<116, 2:32, 119, 7, "timeout">>,
     case Timeout of
         infinity -> <<119, 8, "infinity">>;
         _ when Timeout < 256 -> <<97, Timeout>>;
         _ -> <<98, Timeout:32>>
     end,
     <<119, 6, "caller">>, self_ext()];
encode_opts(Opts) ->
    <<131, Ext/binary>> = term_to_binary(Opts),
    Ext.

%% This process's pid in ETF (without the version byte), as of this node name and
%% creation: starting or restarting distribution changes it.
self_ext() ->
    Node = {node(), erlang:system_info(creation)},
    case get(pyport_self) of
        {Node, Ext} ->
            Ext;
        _ ->
            <<131, Ext/binary>> = term_to_binary(self()),
            _ = put(pyport_self, {Node, Ext}),
            Ext
    end.

%% A request whose arguments hold a large binary is encoded with term_to_iovec/1, which
%% refers to the binary instead of copying it; term_to_binary/1 is faster for the rest.
encode({Op, _, _, Args, _} = Req) when Op =:= call; Op =:= call_method; Op =:= stream ->
    case has_large_binary(Args, 8) of
        true -> erlang:term_to_iovec(Req);
        false -> [term_to_binary(Req)]
    end;
encode(Req) ->
    [term_to_binary(Req)].

has_large_binary([Arg | Args], Budget) when Budget > 0 ->
    (is_binary(Arg) andalso byte_size(Arg) > ?IOVEC_THRESHOLD)
        %% a numpy array's data (issue 19)
        orelse (is_tuple(Arg) andalso tuple_size(Arg) =:= 4
                andalso element(1, Arg) =:= ndarray
                andalso is_binary(element(4, Arg))
                andalso byte_size(element(4, Arg)) > ?IOVEC_THRESHOLD)
        orelse has_large_binary(Args, Budget - 1);
has_large_binary(_, _) ->
    false.

%% A reply that is exactly {ok, Binary} yields a sub-binary of the reply instead of a
%% copy (binary_to_term/1 copies), which matters for large binaries.
decode(<<131, 104, 2, 119, 2, "ok", 109, Len:32, Bin/binary>>) when byte_size(Bin) =:= Len ->
    {ok, Bin};
decode(<<131, 104, 2, 100, 0, 2, "ok", 109, Len:32, Bin/binary>>) when byte_size(Bin) =:= Len ->
    {ok, Bin};
%% Likewise `{ok, {ndarray, DType, Shape, Data}}' (a numpy array, `arrays => binary'):
%% Data stays a sub-binary of the reply.
decode(<<131, 104, 2, 119, 2, "ok", 104, 4, 119, 7, "ndarray", 109, DLen:32,
         DType:DLen/binary, Rest/binary>> = Reply) ->
    case ndarray_shape(Rest) of
        {Shape, <<109, Len:32, Data/binary>>} when byte_size(Data) =:= Len ->
            {ok, {ndarray, DType, Shape, Data}};
        _ ->
            binary_to_term(Reply)
    end;
decode({pyport_safe, Max, Reply}) ->
    %% it holds atoms past the runtime's max_atoms budget: only existing ones decode
    case pyport_atoms:decode(Reply, {true, Max}) of
        {ok, Term} -> Term;
        {error, Limit} -> {error, {bad_term, Limit}}
    end;
decode(Reply) ->
    binary_to_term(Reply).

%% The shape list of an ndarray reply, as the port program writes it, and what follows;
%% `error' for any other encoding (then the whole reply is decoded as usual).
ndarray_shape(<<106, Rest/binary>>) ->
    {[], Rest};
ndarray_shape(<<108, N:32, Rest/binary>>) ->
    ndarray_dims(N, Rest, []);
ndarray_shape(_) ->
    error.

ndarray_dims(0, <<106, Rest/binary>>, Acc) ->
    {lists:reverse(Acc), Rest};
ndarray_dims(N, <<97, D, Rest/binary>>, Acc) when N > 0 ->
    ndarray_dims(N - 1, Rest, [D | Acc]);
ndarray_dims(N, <<98, D:32/signed, Rest/binary>>, Acc) when N > 0 ->
    ndarray_dims(N - 1, Rest, [D | Acc]);
ndarray_dims(_, _, _) ->
    error.

%% @doc A module, function or channel name as the port program takes it.
-spec name(name()) -> binary().
name(Name) when is_atom(Name) -> atom_to_binary(Name, utf8);
name(Name) when is_binary(Name) -> Name;
name(Name) when is_list(Name) -> unicode:characters_to_binary(Name).

%% @doc The first key of Opts that is not in Known, or `none'.
-spec unknown_option(map(), [atom()]) -> term().
unknown_option(Opts, _Known) when map_size(Opts) =:= 0 ->
    none;
unknown_option(Opts, Known) ->
    pyport_opts:unknown_key(Opts, Known).

%% @doc The open channels of a runtime's OS process, as the port owner knows them: the
%% `counters' array each channel's handles share (1: items sent and not yet taken by
%% Python, 2: the closed flag). The port program's `channel_ack' events take items off
%% the first counter; a channel replaced by one of the same name, closed by its
%% context's end or by the OS process's end gets its closed flag, so its handles answer
%% `{error, closed}'. The `channels()' of this module live in the port owner's state
%% (the acks come to it as port frames). No process of its own.
-module(pyport_channels).

-export([new/0]).
-export([opened/5]).
-export([closed/3]).
-export([acked/4]).
-export([forget_context/2]).
-export([close_all/1]).

-export_type([channels/0]).

-type ctx_id() :: pos_integer().
-type chan_id() :: pos_integer().
-record(channels, {
    %% open channels: the counters their handles share
    by_id = #{} :: #{{ctx_id(), chan_id()} => counters:counters_ref()},
    %% the open channel of each name, by context
    by_name = #{} :: #{{ctx_id(), binary()} => chan_id()}
}).
-opaque channels() :: #channels{}.

%% @doc No channel open.
-spec new() -> channels().
new() ->
    #channels{}.

%% @doc A channel was opened: its handles share Counters. A channel of the same name in
%% that context is replaced (the port program closed it): its handles answer
%% `{error, closed}' from now on.
-spec opened(ctx_id(), chan_id(), binary(), counters:counters_ref(), channels()) ->
          channels().
opened(CtxId, ChanId, Name, Counters, #channels{by_id = ById, by_name = ByName}) ->
    ById1 = case ByName of
                #{{CtxId, Name} := Old} -> close({CtxId, Old}, ById);
                #{} -> ById
            end,
    #channels{by_id = ById1#{{CtxId, ChanId} => Counters},
              by_name = ByName#{{CtxId, Name} => ChanId}}.

%% @doc A user closed the channel (its handle set the closed flag already).
-spec closed(ctx_id(), chan_id(), channels()) -> channels().
closed(CtxId, ChanId, #channels{by_id = ById, by_name = ByName}) ->
    #channels{by_id = maps:remove({CtxId, ChanId}, ById),
              by_name = maps:filter(fun({C, _}, Id) ->
                                            not (C =:= CtxId andalso Id =:= ChanId)
                                    end, ByName)}.

%% @doc Python took N items of the channel.
-spec acked(ctx_id(), chan_id(), integer(), channels()) -> ok.
acked(CtxId, ChanId, N, #channels{by_id = ById}) ->
    case ById of
        #{{CtxId, ChanId} := Counters} -> counters:sub(Counters, 1, N);
        #{} -> ok
    end.

%% @doc A stopped context closed its channels: their handles answer `{error, closed}'.
-spec forget_context(ctx_id(), channels()) -> channels().
forget_context(Id, #channels{by_id = ById, by_name = ByName}) ->
    {Gone, Left} = maps:fold(fun({Ctx, _}, C, {G, L}) when Ctx =:= Id -> {[C | G], L};
                                (K, C, {G, L}) -> {G, L#{K => C}}
                             end, {[], #{}}, ById),
    lists:foreach(fun set_closed/1, Gone),
    #channels{by_id = Left, by_name = maps:filter(fun({Ctx, _}, _) -> Ctx =/= Id end, ByName)}.

%% @doc The OS process is gone, and its channels with it.
-spec close_all(channels()) -> ok.
close_all(#channels{by_id = ById}) ->
    maps:foreach(fun(_, Counters) -> set_closed(Counters) end, ById).

%% The handles of a channel that is gone answer `{error, closed}'.
close(Chan, ById) ->
    case maps:take(Chan, ById) of
        {Counters, Rest} -> set_closed(Counters), Rest;
        error -> ById
    end.

set_closed(Counters) ->
    counters:put(Counters, 2, 1).

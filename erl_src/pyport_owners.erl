%% @doc Who owns which env, object handle and stream of a runtime's OS process, and
%% freeing them when their owner exits. The facade casts `{own, Pid, CtxId, Item}' to
%% the port owner after creating one (and `{disown, CtxId, Item}' after a user let it
%% go); the port owner keeps the `owners()' of this module in its state, monitors each
%% owning process once and, when it goes down, down/3 writes a fire-and-forget
%% `drop_env', `release' or `stream_cancel' for each of its items. The items live as
%% long as the OS process, as the port owner does, so no process of its own.
-module(pyport_owners).

-export([new/0]).
-export([own/3]).
-export([disown/2]).
-export([down/3]).
-export([forget_context/2]).
-export([counts/1]).
-export([streams/1]).

-export_type([owners/0]).
-export_type([item/0]).

-type ctx_id() :: pos_integer().
%% An env or an object handle (by id) or a stream (by its header) in a context.
-type item() :: {env | ref, non_neg_integer()} | {stream, binary()}.
-type owned() :: {ctx_id(), item()}.
-record(owners, {
    %% processes owning items: their monitor and their items
    by_pid = #{} :: #{pid() => {reference(), #{owned() => true}}},
    %% each item's owner
    owned = #{} :: #{owned() => pid()}
}).
-opaque owners() :: #owners{}.

%% @doc Nothing owned.
-spec new() -> owners().
new() ->
    #owners{}.

%% @doc Pid owns the item from now on (it is monitored once, for all its items).
-spec own(pid(), owned(), owners()) -> owners().
own(Pid, Item, #owners{by_pid = ByPid, owned = Owned} = O) ->
    {Mref, Items} = case ByPid of
                        #{Pid := Known} -> Known;
                        #{} -> {erlang:monitor(process, Pid), #{}}
                    end,
    %% an item that changes hands (it cannot in practice: ids are not reused)
    O1 = case Owned of
             #{Item := Pid} -> O;
             #{Item := _Other} -> disown(Item, O);
             #{} -> O
         end,
    O1#owners{by_pid = (O1#owners.by_pid)#{Pid => {Mref, Items#{Item => true}}},
              owned = (O1#owners.owned)#{Item => Pid}}.

%% @doc The item was dropped or released by a user (or its context is gone).
-spec disown(owned(), owners()) -> owners().
disown(Item, #owners{by_pid = ByPid, owned = Owned} = O) ->
    case maps:take(Item, Owned) of
        {Pid, Rest} ->
            ByPid1 = case maps:get(Pid, ByPid) of
                         {Mref, #{Item := _} = Items} when map_size(Items) =:= 1 ->
                             erlang:demonitor(Mref, [flush]),
                             maps:remove(Pid, ByPid);
                         {Mref, Items} ->
                             ByPid#{Pid => {Mref, maps:remove(Item, Items)}}
                     end,
            O#owners{by_pid = ByPid1, owned = Rest};
        error ->
            O
    end.

%% @doc A `DOWN' message: `error' when Pid owns nothing here; else everything it owned
%% is freed, with frames that want no reply.
-spec down(pid(), port(), owners()) -> {ok, owners()} | error.
down(Pid, Port, #owners{by_pid = ByPid, owned = Owned} = O) ->
    case maps:take(Pid, ByPid) of
        {{_Mref, Items}, Rest} ->
            lists:foreach(fun(Item) -> free(Port, Item) end, maps:keys(Items)),
            {ok, O#owners{by_pid = Rest, owned = maps:without(maps:keys(Items), Owned)}};
        error ->
            error
    end.

free(Port, {Ctx, {env, EnvId}}) ->
    pyport_call:cast_request(Port, Ctx, {drop_env, EnvId, #{}});
free(Port, {Ctx, {ref, RefId}}) ->
    pyport_call:cast_request(Port, Ctx, {release, RefId, #{}});
free(Port, {Ctx, {stream, H}}) ->
    pyport_call:cast_request(Port, Ctx, {stream_cancel, H, #{}}).

%% @doc A stopped context took its envs, handles and streams with it.
-spec forget_context(ctx_id(), owners()) -> owners().
forget_context(Ctx, #owners{owned = Owned} = O) ->
    lists:foldl(fun disown/2, O, [Item || {ItemCtx, _} = Item <- maps:keys(Owned),
                                          ItemCtx =:= Ctx]).

%% @doc How many processes own envs, handles and streams, and how many of each are
%% tracked (info/1's `owned').
-spec counts(owners()) -> #{processes := non_neg_integer(), envs := non_neg_integer(),
                            refs := non_neg_integer(), streams := non_neg_integer()}.
counts(#owners{by_pid = ByPid, owned = Owned}) ->
    Items = maps:keys(Owned),
    #{processes => map_size(ByPid),
      envs => length([E || {_, {env, _}} = E <- Items]),
      refs => length([R || {_, {ref, _}} = R <- Items]),
      streams => length([T || {_, {stream, _}} = T <- Items])}.

%% @doc Open streams per context (a pool drains a member until they end).
-spec streams(owners()) -> #{ctx_id() => pos_integer()}.
streams(#owners{owned = Owned}) ->
    lists:foldl(fun({Ctx, {stream, _}}, Acc) ->
                        maps:update_with(Ctx, fun(N) -> N + 1 end, 1, Acc);
                   (_, Acc) ->
                        Acc
                end, #{}, maps:keys(Owned)).

%% @private Pool affinity, on the caller's side: the member of a pool a request goes
%% to. That is the member holding the env or an object handle the request uses (they
%% stay on their member), else the least loaded one (pyport_dispatch:checkout/2); the
%% request counts as in flight on that member while it runs. The pool's process
%% (pyport_pool) is not involved: its ETS row and counters are read and updated here.
-module(pyport_affinity).

-export([on_pool/4]).
-export([member_ctx/1]).

-include("pyport_handles.hrl").

%% How many terms of a pool request's arguments are looked at for an object handle.
-define(REF_SEARCH, 64).

%% @doc Fun(Ctx) for the member Ctx of Pool that a request with these arguments (Args:
%% a term in which to look for an object handle) and Opts goes to.
-spec on_pool(#pyport_pool{}, term(), map(), fun((#pyport_ctx{}) -> Reply)) ->
          Reply | {error, term()}.
on_pool(Pool, Args, Opts, Fun) ->
    case pyport_call:unknown_option(Opts, ?STREAM_OPTIONS) of
        none -> on_pool_checked(Pool, Args, Opts, Fun);
        Unknown -> {error, {bad_option, Unknown}}
    end.

on_pool_checked(#pyport_pool{name = Name}, Args, Opts, Fun) ->
    case affinity(Args, Opts) of
        {ok, #pyport_ctx{key = Key, id = Id, home = Home} = Ctx} ->
            case pyport_dispatch:checkout_member(Name, Key, Id, node(Home)) of
                {ok, Ticket} ->
                    try
                        Fun(Ctx)
                    after
                        pyport_dispatch:checkin(Ticket)
                    end;
                none ->
                    Fun(Ctx)
            end;
        none ->
            case pyport_dispatch:checkout(Name, maps:get(timeout, Opts, default)) of
                {ok, Ticket, Member} ->
                    try
                        Fun(member_ctx(Member))
                    after
                        pyport_dispatch:checkin(Ticket)
                    end;
                {error, _} = Error ->
                    Error
            end
    end.

%% @doc A pool member's context (as pyport_pool names it) as a handle.
-spec member_ctx({pyport_runtime:key(), pos_integer(), pid()} | undefined) ->
          #pyport_ctx{} | undefined.
member_ctx({Key, Id, Home}) -> #pyport_ctx{key = Key, id = Id, home = Home};
member_ctx(undefined) -> undefined.

affinity(_Args, #{env := #pyport_env{key = Key, ctx = Id, port_owner = Pid}}) ->
    {ok, #pyport_ctx{key = Key, id = Id, home = Pid}};
affinity(Args, _Opts) ->
    case find_ref([Args], ?REF_SEARCH) of
        {found, #pyport_ref{key = Key, ctx = Id, home = Home}} ->
            %% the context keeps the handle's node: a member may live on another node
            {ok, #pyport_ctx{key = Key, id = Id, home = Home}};
        _ ->
            none
    end.

%% The first object handle among Terms and inside their lists, tuples and map values,
%% looking at no more than Budget terms (a request's arguments are scanned only this
%% far for the member to send it to). Returns the budget left when none was found.
find_ref(_, 0) ->
    0;
find_ref([], Budget) ->
    Budget;
find_ref([#pyport_ref{} = Ref | _], _) ->
    {found, Ref};
find_ref([T | Rest], Budget) ->
    Inner = if
                is_list(T) -> T;
                is_tuple(T) -> tuple_to_list(T);
                is_map(T) -> maps:values(T);
                true -> []
            end,
    case find_ref(Inner, Budget - 1) of
        {found, _} = Found -> Found;
        Left -> find_ref(Rest, Left)
    end;
find_ref(_ImproperTail, Budget) ->
    Budget.

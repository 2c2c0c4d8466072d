%% @doc A pool's dispatch, run in the caller: the member with the fewest requests in
%% flight (ties round-robin), counted until the request is answered. No message to the
%% pool's process (pyport_pool) unless every member is being replaced: callers read
%% the pool's row (pyport_pool.hrl) and its atomics themselves.
-module(pyport_dispatch).

-export([checkout/1]).
-export([checkout/2]).
-export([checkin/1]).
-export([checkout_member/4]).
-export([member_contexts/1]).
-export([row/1]).

-export_type([ticket/0]).

-include("pyport_pool.hrl").

%% What checkin/1 needs of a checkout/1: the in-flight counters and the member's index.
-opaque ticket() :: {atomics:atomics_ref(), pos_integer()}.

%% @doc Takes the ready member with the fewest requests in flight and counts one more
%% request on it: `{ok, Ticket, Member}' (the ticket goes back with checkin/1) or
%% `{error, Reason}'. Members whose runtime is down are passed over while another is up.
-spec checkout(atom()) -> {ok, ticket(), pyport_pool:member()} | {error, term()}.
checkout(Name) ->
    checkout(Name, infinity).

%% @doc checkout/1 waiting at most Timeout ms for a member being replaced
%% (`{error, timeout}' past it); `default' is the pool's `call_timeout'.
-spec checkout(atom(), timeout() | default) -> {ok, ticket(), pyport_pool:member()} | {error, term()}.
checkout(Name, Timeout) ->
    case row(Name) of
        {ok, #row{call_timeout = Default} = Row} ->
            T = case Timeout of
                    default -> Default;
                    _ -> Timeout
                end,
            checkout(Row, tuple_size(Row#row.members), [], T);
        {error, _} = Error -> Error
    end.

%% @doc Counts a request that must go to one member, the one whose context is `Key',
%% `Id' on Node (it uses an env or object handle made there): in flight until
%% checkin/1, as a request of checkout/1 is, so a member being replaced finishes it
%% first. `none' when no member has that context (then it is not counted).
-spec checkout_member(atom(), pyport_runtime:key(), pos_integer(), node()) ->
          {ok, ticket()} | none.
checkout_member(Name, Key, Id, Node) ->
    case row(Name) of
        {ok, #row{members = Ms, load = Load} = Row} ->
            case member_index(Ms, {Key, Id, Node}, tuple_size(Ms)) of
                none ->
                    none;
                I ->
                    atomics:add(Load, I, 1),
                    _ = atomics:get(Row#row.state, I) =:= ?READY andalso served(Row, I),
                    {ok, {Load, I}}
            end;
        {error, _} ->
            none
    end.

member_index(_Ms, _Ctx, 0) ->
    none;
member_index(Ms, {Key, Id, Node} = Ctx, I) ->
    Match = case element(I, Ms) of
                {remote, Node, _, {Key, Id, _}} -> true;
                {Key, Context} when Node =:= node() ->
                    pyport_runtime:context_id(Key, Context) =:= {ok, Id};
                _ -> false
            end,
    case Match of
        true -> I;
        false -> member_index(Ms, Ctx, I - 1)
    end.

%% @doc The request taken with checkout/1 is answered. The ticket holds the very
%% counter it was counted on, so no second look-up is needed (and a pool started again
%% meanwhile is not miscounted).
-spec checkin(ticket()) -> ok.
checkin({Load, Index}) ->
    atomics:sub(Load, Index, 1).

%% @doc Every member's context, on every node of the pool, whatever its state (for
%% pyport:reload/3, which answers for each): those of this node by their names, those
%% of other nodes as last started there (a member never started there has none).
-spec member_contexts(atom()) -> {ok, [pyport_pool:member()]} | {error, {pool_down, atom()}}.
member_contexts(Name) ->
    case row(Name) of
        {ok, #row{members = Ms}} ->
            {ok, lists:filtermap(fun member_context/1, tuple_to_list(Ms))};
        {error, _} = Error ->
            Error
    end.

member_context({remote, _Node, _J, undefined}) ->
    false;
member_context({remote, _Node, _J, Member}) ->
    {true, Member};
member_context({Key, Context}) ->
    case pyport_runtime:context_id(Key, Context) of
        {ok, Id} -> {true, {Key, Id, whereis(init)}};
        {error, not_found} -> false
    end.

%% @doc The pool's row: its members and counters, as its process last wrote them.
-spec row(atom()) -> {ok, #row{}} | {error, {pool_down, atom()}}.
row(Name) ->
    case pyport_table:lookup({pool, Name}) of
        [{_, Row}] -> {ok, Row};
        [] -> {error, {pool_down, Name}}
    end.

%% Tries members from the least loaded up; Skip holds those found down.
checkout(#row{members = Members} = Row, Size, Skip, Timeout) ->
    case least_loaded(Row, Size, Skip) of
        none ->
            await_ready(Row, Size, Skip, Timeout);
        I ->
            case element(I, Members) of
                {remote, Node, _J, Member} ->
                    %% a node already gone is passed over before this pool has seen
                    %% its nodedown (the request would only answer nodedown)
                    case pyport_remote:connected(Node) of
                        true -> take(Row, I, Member, Size, Skip, Timeout);
                        false -> checkout(Row, Size, [I | Skip], Timeout)
                    end;
                {Key, Context} ->
                    case pyport_runtime:is_up(Key) andalso
                         pyport_runtime:context_id(Key, Context) of
                        {ok, Id} -> take(Row, I, {Key, Id, whereis(init)}, Size, Skip, Timeout);
                        _ -> checkout(Row, Size, [I | Skip], Timeout)
                    end
            end
    end.

%% No member is ready and up. While some are being replaced (max_requests), wait for
%% one rather than fail the call, at most Timeout (the request's); when all are down,
%% say so at once. The pool answers every waiter as soon as a member is ready again or
%% none is being replaced any more (wake_waiting/1).
await_ready(#row{name = Name, state = St, pid = Pid}, Size, Skip, Timeout) ->
    Replacing = [I || I <- lists:seq(1, Size), atomics:get(St, I) =:= ?DRAINING,
                      not lists:member(I, Skip)],
    case Replacing of
        [] ->
            {error, {runtime_down, no_member_up}};
        _ ->
            Deadline = deadline(Timeout),
            try gen_server:call(Pid, await_ready, Timeout) of
                ok -> checkout(Name, left(Deadline))
            catch
                exit:{timeout, _} -> {error, timeout};
                exit:_ -> {error, {runtime_down, no_member_up}}
            end
    end.

deadline(infinity) -> infinity;
deadline(Ms) -> erlang:monotonic_time(millisecond) + Ms.

left(infinity) -> infinity;
left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

%% Counts the request, then looks at the state again: a member being drained that was
%% ready a moment ago is given back, so the drain never misses a request.
take(#row{load = Load, state = St} = Row, I, Member, Size, Skip, Timeout) ->
    atomics:add(Load, I, 1),
    case atomics:get(St, I) of
        ?READY ->
            _ = served(Row, I),
            {ok, {Load, I}, Member};
        _ ->
            atomics:sub(Load, I, 1),
            checkout(Row, Size, [I | Skip], Timeout)
    end.

%% One more request served by member I; the one that makes max_requests takes the
%% member out of dispatch and has it replaced.
served(#row{served = Served, max_requests = Max, state = St, pid = Pid}, I) ->
    case atomics:add_get(Served, I, 1) =:= Max of
        true ->
            atomics:put(St, I, ?DRAINING),
            Pid ! {replace, I};
        false ->
            ok
    end.

%% The ready member with the fewest requests in flight, ties broken round-robin.
least_loaded(#row{load = Load, state = St}, Size, Skip) ->
    Start = atomics:add_get(Load, Size + 1, 1) rem Size,
    least_loaded(Load, St, Size, Skip, Start, 0, none, infinity).

least_loaded(_Load, _St, Size, _Skip, _Start, Size, Best, _BestLoad) ->
    Best;
least_loaded(Load, St, Size, Skip, Start, N, Best, BestLoad) ->
    I = (Start + N) rem Size + 1,
    case atomics:get(St, I) =:= ?READY andalso not lists:member(I, Skip) of
        true ->
            case atomics:get(Load, I) of
                L when L < BestLoad -> least_loaded(Load, St, Size, Skip, Start, N + 1, I, L);
                _ -> least_loaded(Load, St, Size, Skip, Start, N + 1, Best, BestLoad)
            end;
        false ->
            least_loaded(Load, St, Size, Skip, Start, N + 1, Best, BestLoad)
    end.

%% @private Handles of other nodes: a request on a handle whose `home' is another node
%% runs there, over distribution (`erpc', the same pyport function on that node), and
%% its reply comes back. The caller on this node stays the caller (`erlang.self()', and
%% the owner of the envs and handles the request makes).
-module(pyport_remote).

-export([call/3]).
-export([call/4]).
-export([request/4]).
-export([node_of/1]).
-export([connected/1]).

-include("pyport_handles.hrl").

%% @doc pyport:Function(Args...) on Node (call/4 without a request timeout).
-spec call(node(), atom(), list()) -> term().
call(Node, Function, Args) ->
    call(Node, Function, Args, #{}).

%% @doc pyport:Function(Args...) on Node. A node this one is not connected to is
%% `{error, {nodedown, Node}}' at once (no connection attempt that could hang); one
%% that goes down meanwhile, the same. The request's own timeout (in Opts) runs on the
%% other node; this one only bounds a node that stops answering without going down.
-spec call(node(), atom(), list(), map()) -> term().
call(Node, Function, Args, Opts) ->
    case connected(Node) of
        false ->
            {error, {nodedown, Node}};
        true ->
            try
                erpc:call(Node, pyport, Function, Args, timeout(Opts))
            catch
                error:{erpc, noconnection} -> {error, {nodedown, Node}};
                error:{erpc, timeout} -> {error, timeout};
                error:{exception, undef, [{pyport, Function, _, _} | _]} ->
                    {error, {runtime_down, {pyport_not_loaded, Node}}};
                error:{exception, Reason, Stack} -> erlang:raise(error, Reason, Stack);
                exit:{exception, Reason} -> exit(Reason)
            end
    end.

timeout(#{timeout := T}) when is_integer(T) -> T + 5000;
timeout(_) -> infinity.

%% @doc pyport:Function(Args..., Opts) on the node of Handle, with this process as the
%% request's caller unless Opts name one already.
-spec request(#pyport_ctx{} | #pyport_pool{} | #pyport_ref{}, atom(), list(), map()) ->
          term().
request(Handle, Function, Args, Opts) ->
    call(node_of(Handle), Function, Args ++ [as_caller(Opts)], Opts).

as_caller(Opts) ->
    Opts#{caller => maps:get(caller, Opts, self())}.

%% @doc The node of a context, pool or object handle.
-spec node_of(#pyport_ctx{} | #pyport_pool{} | #pyport_ref{}) -> node().
node_of(#pyport_ctx{home = Home}) -> node(Home);
node_of(#pyport_pool{home = Home}) -> node(Home);
node_of(#pyport_ref{home = Home}) -> node(Home).

%% @doc Whether this node is connected to Node (hidden nodes too).
-spec connected(node()) -> boolean().
connected(Node) ->
    lists:member(Node, nodes([visible, hidden])).

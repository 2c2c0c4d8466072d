%% @doc The runtimes' table (`pyport_runtimes', created by `pyport_sup'): the one place
%% its runtime rows are read and written (a pool reads and writes its own row). Rows,
%% by the process that writes them:
%%   `pyport_port' (the port owner of the running OS process):
%%     {Key, PortOwner, Port, CallTimeout, MaxFrame}   the running OS process
%%     {{ctx, Key, Name}, Id}                           named contexts
%%     {{contexts, Key}, {Id1, ..., IdN}}               the contexts from Opts, in order
%%     {{atoms, Key}, N}                                the atom budget spent (pyport_atoms)
%%   (the first removed when it ends, the others replaced at the next start)
%%   `pyport_runtime' (the runtime's stable process):
%%     {{pid, Runtime}, Key}                            the runtime's pid -> its key
%%     {Key, down, Reason}                              while no OS process serves
%%     {{restarts, Key}, N}                             restarts so far
%%   (all the runtime's rows removed when it stops)
%%   `pyport_pool': {{pool, Name}, Row}.
%% No process: the table is public and read by callers directly.
-module(pyport_table).

-export([lookup/1]).
-export([count/1]).
-export([port_row/1]).
-export([publish/6]).
-export([unpublish/2]).
-export([name_context/3]).
-export([forget_context/4]).
-export([atom_admitted/1]).
-export([runtime_started/2]).
-export([runtime_down/2]).
-export([restarted/2]).
-export([runtime_stopped/2]).

-export_type([key/0]).
-export_type([port_row/0]).

-define(TABLE, pyport_runtimes).

%% A runtime's key: its registered name, a reference, or a pool member's
%% `{pyport_pool, Name, I}'.
-type key() :: atom() | reference() | tuple().
%% The row of the OS process serving a runtime now.
-type port_row() :: {key(), PortOwner :: pid(), port(), CallTimeout :: timeout(),
                     MaxFrame :: pos_integer()}.

%% @doc The table's rows under Key; none when pyport is not started (no table).
-spec lookup(term()) -> [tuple()].
lookup(Key) ->
    try
        ets:lookup(?TABLE, Key)
    catch
        error:badarg -> []
    end.

%% @doc The count in a `{Row, N}' row; 0 without the row (or without the table).
-spec count(term()) -> non_neg_integer().
count(Row) ->
    case lookup(Row) of
        [{_, N}] -> N;
        [] -> 0
    end.

%% @doc The row of the OS process serving the runtime now, or why there is none.
-spec port_row(key()) -> {ok, port_row()} | {error, {runtime_down, term()}}.
port_row(Key) ->
    case lookup(Key) of
        [{_, Pid, _, _, _} = Row] when is_pid(Pid) -> {ok, Row};
        [{_, down, Reason}] -> {error, {runtime_down, Reason}};
        [] -> {error, {runtime_down, noproc}}
    end.

%%% Written by the port owner

%% @doc Makes a port owner's OS process visible to callers, replacing whatever a killed
%% predecessor left (its context names, and the `down' row of `pyport_runtime'):
%% Contexts are the Opts contexts in order, with their names (or `undefined').
-spec publish(key(), pid(), port(), timeout(), pos_integer(),
              [{pos_integer(), atom()}]) -> true.
publish(Key, PortOwner, Port, CallTimeout, MaxFrame, Contexts) ->
    true = ets:match_delete(?TABLE, {{ctx, Key, '_'}, '_'}),
    true = ets:insert(?TABLE, [{{ctx, Key, Name}, Id} || {Id, Name} <- Contexts,
                                                         Name =/= undefined]),
    true = ets:insert(?TABLE, {{contexts, Key}, list_to_tuple([Id || {Id, _} <- Contexts])}),
    true = ets:insert(?TABLE, {Key, PortOwner, Port, CallTimeout, MaxFrame}).

%% @doc Withdraws the port owner's row (when its OS process is gone); `pyport_runtime'
%% then marks the runtime down (or, when it stops, removes the rest). Context names
%% stay: those of the Opts contexts name the same contexts after the restart.
-spec unpublish(key(), pid()) -> true.
unpublish(Key, PortOwner) ->
    try
        true = ets:match_delete(?TABLE, {Key, PortOwner, '_', '_', '_'})
    catch
        error:badarg -> true  % the table is gone: the application is stopping
    end.

%% @doc A context made with new_context has a name.
-spec name_context(key(), atom(), pos_integer()) -> true.
name_context(Key, Name, Id) ->
    true = ets:insert(?TABLE, {{ctx, Key, Name}, Id}).

%% @doc A context stopped: its names go, and a context of the Opts ones (OptsContext)
%% also leaves the set the default calls pick from (until the next restart).
-spec forget_context(key(), [atom()], pos_integer(), boolean()) -> true.
forget_context(Key, Names, Id, OptsContext) ->
    lists:foreach(fun(Name) -> ets:delete_object(?TABLE, {{ctx, Key, Name}, Id}) end, Names),
    case lookup({contexts, Key}) of
        [{_, Ids}] when OptsContext ->
            Left = [Other || Other <- tuple_to_list(Ids), Other =/= Id],
            true = ets:insert(?TABLE, {{contexts, Key}, list_to_tuple(Left)});
        _ ->
            true
    end.

%% @doc One more new atom in the node from the runtime's Python.
-spec atom_admitted(key()) -> integer().
atom_admitted(Key) ->
    ets:update_counter(?TABLE, {atoms, Key}, 1, {{atoms, Key}, 0}).

%%% Written by the runtime's process

%% @doc The runtime's first OS process is up.
-spec runtime_started(pid(), key()) -> true.
runtime_started(Runtime, Key) ->
    true = ets:insert(?TABLE, [{{pid, Runtime}, Key}, {{restarts, Key}, 0}]).

%% @doc No OS process serves the runtime (Reason: the last one's exit, or `recycling').
-spec runtime_down(key(), term()) -> true.
runtime_down(Key, Reason) ->
    true = ets:insert(?TABLE, {Key, down, Reason}).

%% @doc The runtime's OS process was replaced N times so far.
-spec restarted(key(), non_neg_integer()) -> true.
restarted(Key, N) ->
    true = ets:insert(?TABLE, {{restarts, Key}, N}).

%% @doc The runtime stopped: all its rows go.
-spec runtime_stopped(pid(), key()) -> true.
runtime_stopped(Runtime, Key) ->
    try
        true = ets:delete(?TABLE, Key),
        true = ets:delete(?TABLE, {pid, Runtime}),
        true = ets:delete(?TABLE, {restarts, Key}),
        true = ets:delete(?TABLE, {atoms, Key}),
        true = ets:match_delete(?TABLE, {{ctx, Key, '_'}, '_'}),
        true = ets:delete(?TABLE, {contexts, Key})
    catch
        error:badarg -> true  % the table is gone: the application is stopping
    end.

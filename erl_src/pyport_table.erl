%% @doc Reading the runtimes' table (`pyport_runtimes', created by `pyport_sup'): the
%% one place its rows are looked up. Rows, by who writes them:
%%   `pyport_port' (the port owner of the running OS process):
%%     {Key, PortOwner, Port, CallTimeout, MaxFrame}   the running OS process
%%     {{ctx, Key, Name}, Id}                           named contexts
%%     {{contexts, Key}, {Id1, ..., IdN}}               the contexts from Opts, in order
%%     {{atoms, Key}, N}                                the atom budget spent (pyport_atoms)
%%   `pyport_runtime' (the runtime's stable process):
%%     {{pid, Runtime}, Key}                            the runtime's pid -> its key
%%     {Key, down, Reason}                              while no OS process serves
%%     {{restarts, Key}, N}                             restarts so far
%%   `pyport_pool': {{pool, Name}, Row}.
%% No process: the table is public and read by callers directly.
-module(pyport_table).

-export([lookup/1]).
-export([count/1]).
-export([port_row/1]).

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

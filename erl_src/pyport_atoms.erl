%% @doc The atom budget (`max_atoms'): how many atoms a runtime's Python may create in
%% the node over the runtime's life, across restarts of its OS process. The port
%% program counts each atom name it sends and reports it (`{atom_admitted, Name}');
%% the count of those the node did not have is kept in the row `{{atoms, Key}, N}'. A
%% frame holding a name past the budget is marked (the top bit of its kind) and is
%% decoded here with `[safe]': atoms the node has decode, others are refused. The one
%% place a frame from the port is decoded safely. No process.
-module(pyport_atoms).

-export([spent/1]).
-export([left/2]).
-export([admitted/2]).
-export([decode/2]).
-export([log_used_up/2]).

%% @doc New atoms the runtime's Python made in the node so far, over all its OS
%% processes (the row is removed by `pyport_runtime' when the runtime stops).
-spec spent(pyport_table:key()) -> non_neg_integer().
spent(Key) ->
    pyport_table:count({atoms, Key}).

%% @doc What the runtime's earlier OS processes left of a budget of Max.
-spec left(pyport_table:key(), non_neg_integer()) -> non_neg_integer().
left(Key, Max) ->
    max(0, Max - spent(Key)).

%% @doc The port program counted a name it is about to send as an atom: it spends the
%% runtime's budget if the node does not have that atom yet (the frame that makes it
%% comes after this event).
-spec admitted(pyport_table:key(), binary()) -> ok.
admitted(Key, Name) ->
    try binary_to_existing_atom(Name, utf8) of
        _ -> ok
    catch
        error:badarg ->
            _ = pyport_table:atom_admitted(Key),
            ok
    end.

%% @doc Decodes a payload; with `{true, Max}' (the frame is past the budget) safely:
%% `{error, {atom_limit, Max}}' when it holds an atom the node does not have.
-spec decode(binary(), {boolean(), non_neg_integer()}) ->
          {ok, term()} | {error, {atom_limit, non_neg_integer()}}.
decode(Payload, {false, _}) ->
    try
        {ok, binary_to_term(Payload)}
    catch
        error:badarg -> {ok, {undecodable, Payload}}  % not from the port program
    end;
decode(Payload, {true, Max}) ->
    try
        {ok, binary_to_term(Payload, [safe])}
    catch
        error:badarg -> {error, {atom_limit, Max}}
    end.

%% @doc Logs that Python has used up its budget (the port owner does it once per OS
%% process).
-spec log_used_up(pyport_table:key(), non_neg_integer()) -> ok.
log_used_up(Key, Max) ->
    logger:warning("pyport runtime ~p: Python used up its budget of ~b new atoms "
                   "(max_atoms); results with atoms the node does not have yet are "
                   "refused from now on", [Key, Max], #{domain => [pyport]}).

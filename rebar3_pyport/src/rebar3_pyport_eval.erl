%% @doc `rebar3 pyport eval EXPR' (rebar3_pyport_cli; rebar3 wants a module per provider).
-module(rebar3_pyport_eval).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    rebar3_pyport_cli:init(eval, ?MODULE, "eval EXPR", "Print the value of a Python expression", State).

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    rebar3_pyport_cli:run("eval", State).

-spec format_error(term()) -> iolist().
format_error(Why) ->
    rebar3_pyport_cli:format_error(Why).

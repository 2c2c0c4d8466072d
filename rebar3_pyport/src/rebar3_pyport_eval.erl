%% @doc `rebar3 pyport eval EXPR': print the value of a Python expression (see rebar3_pyport_cli).
-module(rebar3_pyport_eval).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    {ok, rebar_state:add_provider(State, rebar3_pyport_cli:provider(eval, ?MODULE, "eval EXPR", "Print the value of a Python expression"))}.

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    rebar3_pyport_cli:run("eval", State).

-spec format_error(term()) -> iolist().
format_error(Why) ->
    rebar3_pyport_cli:format_error(Why).

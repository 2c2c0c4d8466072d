%% @doc `rebar3 pyport run FILE.py [ARG...]': run a Python file as __main__ (see rebar3_pyport_cli).
-module(rebar3_pyport_run).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    {ok, rebar_state:add_provider(State, rebar3_pyport_cli:provider(run, ?MODULE, "run FILE.py [ARG...]", "Run a Python file as __main__"))}.

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    rebar3_pyport_cli:run("run", State).

-spec format_error(term()) -> iolist().
format_error(Why) ->
    rebar3_pyport_cli:format_error(Why).

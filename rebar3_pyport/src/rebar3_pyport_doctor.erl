%% @doc `rebar3 pyport doctor [MODULE...]': the Python, OWN_GIL support, and where each module imports (see rebar3_pyport_cli).
-module(rebar3_pyport_doctor).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    {ok, rebar_state:add_provider(State, rebar3_pyport_cli:provider(doctor, ?MODULE, "doctor [MODULE...]", "The Python, OWN_GIL support, and where each module imports"))}.

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    rebar3_pyport_cli:run("doctor", State).

-spec format_error(term()) -> iolist().
format_error(Why) ->
    rebar3_pyport_cli:format_error(Why).

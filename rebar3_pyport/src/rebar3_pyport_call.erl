%% @doc `rebar3 pyport call MOD FUN [ARG...]': print MOD.FUN(*ARGS) (see rebar3_pyport_cli).
-module(rebar3_pyport_call).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    {ok, rebar_state:add_provider(State, rebar3_pyport_cli:provider(call, ?MODULE, "call MOD FUN [ARG...]", "Print MOD.FUN(*ARGS)"))}.

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    rebar3_pyport_cli:run("call", State).

-spec format_error(term()) -> iolist().
format_error(Why) ->
    rebar3_pyport_cli:format_error(Why).

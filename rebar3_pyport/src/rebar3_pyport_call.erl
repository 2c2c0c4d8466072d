%% @doc `rebar3 pyport call MOD FUN [ARG...]' (rebar3_pyport_cli; rebar3 wants a module per provider).
-module(rebar3_pyport_call).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    rebar3_pyport_cli:init(call, ?MODULE, "call MOD FUN [ARG...]", "Print MOD.FUN(*ARGS)", State).

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    rebar3_pyport_cli:run("call", State).

-spec format_error(term()) -> iolist().
format_error(Why) ->
    rebar3_pyport_cli:format_error(Why).

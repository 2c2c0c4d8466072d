%% @doc The pyport OTP application: starts `pyport_sup'.
-module(pyport_app).
-behaviour(application).

-export([start/2]).
-export([stop/1]).

%% @doc Application callback: starts pyport's top supervisor.
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    pyport_sup:start_link().

%% @doc Application callback: nothing to clean up (the supervisor stops the runtimes).
-spec stop(term()) -> ok.
stop(_State) ->
    ok.

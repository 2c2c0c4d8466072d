%% @doc The pyport OTP application: starts `pyport_sup', and lets pyport's log events
%% (domain `[pyport | _]': Python's output, pyport's own warnings) through the node's
%% `default' logger handler, whose filters pass only OTP's domains and events without
%% one. The handler filter that does it is named `pyport': `logger:remove_handler_filter
%% (default, pyport)' takes it away again; a primary filter or a `default' handler filter
%% of the user's own that stops the domain wins over it (docs/api.md, "Output").
-module(pyport_app).
-behaviour(application).

-export([start/2]).
-export([stop/1]).

-define(FILTER, pyport).

%% @doc Application callback: starts pyport's top supervisor.
-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    %% no `default' handler (removed, or replaced by Elixir's): nothing to do
    _ = logger:add_handler_filter(default, ?FILTER,
                                  {fun logger_filters:domain/2, {log, sub, [pyport]}}),
    pyport_sup:start_link().

%% @doc Application callback: takes the handler filter away (the supervisor stops the
%% runtimes).
-spec stop(term()) -> ok.
stop(_State) ->
    _ = logger:remove_handler_filter(default, ?FILTER),
    ok.

%% @doc The rebar3 plugin of pyport, for an app that depends on pyport:
%%
%%   {deps, [{pyport, {git, Url, Ref}}]}.
%%   {plugins, [{rebar3_pyport, {git_subdir, Url, Ref, "rebar3_pyport"}}]}.
%%   {provider_hooks, [{post, [{compile, {pyport, venv}}]}]}.
%%
%% Providers (namespace `pyport'):
%%   rebar3 pyport venv     the app's venv from priv/python/requirements.txt (the hook)
%%   rebar3 pyport doctor | eval | run | call
%%                          pyport's command line (docs/cli.md) with the project's own
%%                          port program and venv
%% Each runs a script or module of the pyport dependency, so the plugin and the
%% dependency agree as long as they come from the same commit.
-module(rebar3_pyport).

-export([init/1]).
-export([pyport_dir/1]).
-export([project_apps/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    lists:foldl(fun(Module, {ok, S}) -> Module:init(S) end, {ok, State},
                [rebar3_pyport_venv, rebar3_pyport_doctor, rebar3_pyport_eval,
                 rebar3_pyport_run, rebar3_pyport_call]).

%% @doc The pyport dependency's source directory, or an error naming what is missing.
-spec pyport_dir(rebar_state:t()) -> {ok, file:filename()} | {error, string()}.
pyport_dir(State) ->
    case [D || D <- rebar_state:all_deps(State), rebar_app_info:name(D) =:= <<"pyport">>] of
        [Dep | _] -> {ok, rebar_app_info:dir(Dep)};
        [] -> {error, "pyport is not a dependency of this project (add it to deps)"}
    end.

%% @doc The apps a provider works on: the one being compiled when run as a compile
%% hook, else all of the project's.
-spec project_apps(rebar_state:t()) -> [rebar_app_info:t()].
project_apps(State) ->
    case rebar_state:current_app(State) of
        undefined -> rebar_state:project_apps(State);
        App -> [App]
    end.

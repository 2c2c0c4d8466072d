%% @doc An application's own Python packages. An app lists them in
%% `priv/python/requirements.txt'; compiling it (the rebar3 plugin's `{pyport, venv}'
%% hook, or Mix's `:pyport' compiler, both running scripts/app-venv.sh) makes the
%% virtualenv `priv/python/.venv' with the Python the port program links. A runtime
%% uses the venv of its application:
%%
%%   - the `app' option, when given;
%%   - else the application of the process that makes the runtime's child spec or
%%     starts the pool (`pyport:start_runtime/1', `pyport_runtime:child_spec/1' in a
%%     supervisor's init, `pyport:start_pool/2'; `application:get_application/0'), so a
%%     runtime in an app's supervision tree, or started by its processes, uses its venv;
%%   - for the default runtime, `app' in the `default_runtime' options, else the one
%%     loaded application that has a built venv (none when several have one: then set
%%     `app').
%%
%% An explicit `venv' option wins over all of them. An application without a built
%% venv adds nothing; one that the node does not know is `{bad_option, {app, App}}'.
-module(pyport_app_env).

-export([with_caller_app/1]).
-export([default_app/1]).
-export([venvs/1]).
-export([check/1]).
-export([venv_dir/1]).

%% @doc Opts with `app' set to the calling process's application, unless Opts names
%% an `app' or a `venv' already, or the caller belongs to no application.
-spec with_caller_app(map()) -> map().
with_caller_app(Opts) when is_map_key(app, Opts); is_map_key(venv, Opts) ->
    Opts;
with_caller_app(Opts) ->
    case application:get_application() of
        {ok, App} -> Opts#{app => App};
        undefined -> Opts
    end.

%% @doc The default runtime's Opts with `app' set (see the module doc).
-spec default_app(map()) -> map().
default_app(Opts) when is_map_key(app, Opts); is_map_key(venv, Opts) ->
    Opts;
default_app(Opts) ->
    case [App || {App, _, _} <- application:loaded_applications(), has_venv(App)] of
        [App] ->
            Opts#{app => App};
        [] ->
            Opts;
        Apps ->
            logger:warning("pyport: the default runtime uses no app's venv: several "
                           "applications have one (~p); set {pyport, [{default_runtime, "
                           "#{app => App}}]}", [Apps], #{domain => [pyport]}),
            Opts
    end.

%% @doc The venv directories a runtime with Opts uses for its `app' (none or one).
-spec venvs(map()) -> [file:filename()].
venvs(#{app := App}) when is_atom(App) ->
    [Dir || Dir <- [venv_dir(App)], is_list(Dir), filelib:is_dir(Dir)];
venvs(_) ->
    [].

%% @doc `ok', or `{error, {bad_option, {app, App}}}' for an `app' that is not an
%% application the node can find.
-spec check(map()) -> ok | {error, {bad_option, {app, term()}}}.
check(#{app := App}) when is_atom(App) ->
    case code:priv_dir(App) of
        {error, bad_name} -> {error, {bad_option, {app, App}}};
        _ -> ok
    end;
check(#{app := App}) ->
    {error, {bad_option, {app, App}}};
check(_) ->
    ok.

%% @doc Where App's venv is (whether or not it was made), or `none' for an unknown App.
-spec venv_dir(atom()) -> file:filename() | none.
venv_dir(App) ->
    case code:priv_dir(App) of
        {error, bad_name} -> none;
        Priv -> filename:join([Priv, "python", ".venv"])
    end.

has_venv(App) ->
    venvs(#{app => App}) =/= [].

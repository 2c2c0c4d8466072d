%% @doc pyport's command line (pyport_cli) as rebar3 providers, run in rebar3's VM on
%% the project's own port program (the pyport dependency's priv/pyport) and venv (the
%% first project app with a priv/python/.venv): `rebar3 pyport doctor|eval|run|call'.
%% Each compiles first, so the port program and the venv are up to date. The exit
%% status is the command's (as the escript's: docs/cli.md).
-module(rebar3_pyport_cli).

-export([init/5]).
-export([run/2]).
-export([format_error/1]).

%% @doc Adds the provider `rebar3 pyport Name', implemented by Module.
-spec init(atom(), module(), string(), string(), rebar_state:t()) -> {ok, rebar_state:t()}.
init(Name, Module, Usage, Desc, State) ->
    {ok, rebar_state:add_provider(State, provider(Name, Module, Usage, Desc))}.

provider(Name, Module, Usage, Desc) ->
    providers:create([{name, Name}, {namespace, pyport}, {module, Module},
                      {bare, true}, {deps, [{default, compile}]},
                      {example, "rebar3 pyport " ++ Usage}, {opts, []},
                      {short_desc, Desc}, {desc, Desc ++ " (pyport's command line, docs/cli.md)"}]).

%% @doc Runs `pyport Command Args' with the project's port program and venv; halts
%% with the command's exit status when it is not 0.
-spec run(string(), rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
run(Command, State) ->
    case rebar3_pyport:pyport_dir(State) of
        {ok, Pyport} ->
            rebar_paths:set_paths([deps, plugins], State),
            Binary = filename:join([Pyport, "priv", "pyport"]),
            Args = ["--port-binary", Binary] ++ venv_args(State)
                ++ [Command | rebar_state:command_args(State)],
            case pyport_cli:run(Args) of
                0 -> {ok, State};
                Status -> erlang:halt(Status)
            end;
        {error, Why} ->
            {error, {?MODULE, Why}}
    end.

venv_args(State) ->
    Venvs = [V || App <- rebar_state:project_apps(State),
                  V <- [filename:join([rebar_app_info:dir(App), "priv", "python", ".venv"])],
                  filelib:is_dir(V)],
    case Venvs of
        [Venv | _] -> ["--venv", Venv];
        [] -> []
    end.

-spec format_error(term()) -> iolist().
format_error(Why) ->
    "pyport: " ++ Why.

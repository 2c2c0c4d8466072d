%% @doc `rebar3 pyport venv': makes each project app's Python venv,
%% `priv/python/.venv', from its `priv/python/requirements.txt', with the Python
%% pyport's port program links (pyport's scripts/app-venv.sh). Once per content of
%% that file: an unchanged file costs nothing and needs no network. Meant as a compile
%% hook: `{provider_hooks, [{post, [{compile, {pyport, venv}}]}]}'.
-module(rebar3_pyport_venv).
-behaviour(provider).

-export([init/1]).
-export([do/1]).
-export([format_error/1]).

-spec init(rebar_state:t()) -> {ok, rebar_state:t()}.
init(State) ->
    Provider = providers:create([{name, venv}, {namespace, pyport}, {module, ?MODULE},
                                 {bare, true}, {deps, [{default, install_deps}]},
                                 {example, "rebar3 pyport venv"}, {opts, []},
                                 {short_desc, "Make the app's Python venv from priv/python/requirements.txt"},
                                 {desc, "Makes priv/python/.venv of each project app that has a "
                                        "priv/python/requirements.txt, with the Python pyport's "
                                        "port program links; nothing when the file is unchanged."}]),
    {ok, rebar_state:add_provider(State, Provider)}.

-spec do(rebar_state:t()) -> {ok, rebar_state:t()} | {error, {module(), term()}}.
do(State) ->
    case rebar3_pyport:pyport_dir(State) of
        {ok, Pyport} ->
            Script = filename:join([Pyport, "scripts", "app-venv.sh"]),
            venvs(Script, rebar3_pyport:project_apps(State), State);
        {error, Why} ->
            {error, {?MODULE, Why}}
    end.

venvs(_Script, [], State) ->
    {ok, State};
venvs(Script, [App | Apps], State) ->
    Dir = rebar_app_info:dir(App),
    Port = open_port({spawn_executable, Script},
                     [{args, [Dir]}, exit_status, stderr_to_stdout, binary, stream]),
    case relay(Port) of
        0 -> venvs(Script, Apps, State);
        _ -> {error, {?MODULE, {failed, rebar_app_info:name(App)}}}
    end.

%% The script's output (pip's messages) as it comes; its exit status.
relay(Port) ->
    receive
        {Port, {data, Data}} -> io:put_chars(Data), relay(Port);
        {Port, {exit_status, Status}} -> Status
    end.

-spec format_error(term()) -> iolist().
format_error({failed, App}) ->
    io_lib:format("pyport: the Python venv of ~ts was not made (see above)", [App]);
format_error(Why) when is_list(Why) ->
    "pyport: " ++ Why.

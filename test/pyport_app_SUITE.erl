%% @doc An app's life with pyport as a dependency (issue 20), as a user drives it: a
%% throwaway rebar3 app (pyport in `_checkouts', the rebar3_pyport plugin by
%% git_subdir) and a throwaway Mix project (pyport by `path:'), both on one clone of
%% this checkout's commit, built once in init_per_suite.
%%
%% - the app's Python packages: priv/python/requirements.txt, a venv made by the
%%   compile, once per content of the file, used by the app's runtimes and pools;
%% - one Python, chosen once: the dependency's first build records its Python, later
%%   compiles (with no PYPORT_PYTHON and no cargo) take it and rebuild nothing;
%% - tooling with the dependency: `rebar3 pyport doctor|eval|run|call' and `mix
%%   pyport.doctor|eval|run|call' on the app's own port program and venv;
%% - a release that carries its Python: built with PYPORT_BUNDLE_PYTHON=1, moved, and
%%   run where the build tree, the Python cache and every other Python are hidden.
%%
%% Needs the package index (a small pure-Python package, `six') for the first venv.
-module(pyport_app_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% the package the apps need, and its answer
-define(PACKAGE, "six").
-define(CHECK, "[{ok,<<\"hi\">>},{ok,<<\"hi\">>},{ok,<<\"hi\">>},{ok,<<\"hi\">>}]").

suite() ->
    [{timetrap, {minutes, 20}}].

all() ->
    [rebar3_app_packages, mix_app_packages,
     rebar3_path_dependency, mix_path_dependency,
     rebar3_tooling, mix_tooling,
     rebar3_release_carries_python, mix_release_carries_python].

init_per_suite(Config) ->
    Root = pyport_ct:repo_root(),
    Python = case os:getenv("PYPORT_PYTHON") of
                 P when is_list(P), P =/= "" -> P;
                 _ -> element(2, pyport_ct:shell(Root, "scripts/ensure-python.sh"))
             end,
    Clone = filename:join(?config(priv_dir, Config), "pyport"),
    {0, _} = pyport_ct:shell(?config(priv_dir, Config),
                             "git clone -q " ++ Root ++ " pyport && cd pyport && git checkout -q "
                             ++ pyport_ct:head_commit()),
    %% the dependency's first build: the Python it links is chosen here, by PYPORT_PYTHON
    {0, _} = pyport_ct:shell(Clone, cargo_env(Root) ++ " PYPORT_PYTHON=" ++ string:trim(Python)
                             ++ " scripts/build-port.sh"),
    [{root, Root}, {clone, Clone}, {python, string:trim(Python)} | Config].

end_per_suite(_Config) ->
    ok.

%%% Item 2: the app's Python packages

rebar3_app_packages() ->
    [{doc, "A rebar3 app with priv/python/requirements.txt naming a package and the "
           "{pyport, venv} compile hook: `rebar3 compile' makes priv/python/.venv with "
           "the Python the port program links; the default runtime, a runtime and a pool "
           "the app starts, and a runtime with `app => lifeapp' import the package, a "
           "runtime of no app does not; a second compile with no route to the package "
           "index changes nothing; a changed file makes the venv again; a package that "
           "does not exist fails the compile with pip's message."}].
rebar3_app_packages(Config) ->
    App = rebar3_app(Config),
    Venv = filename:join(App, "priv/python/.venv"),
    {ok, Cfg} = file:read_file(filename:join(Venv, "pyvenv.cfg")),
    ?assertNotEqual(nomatch, string:find(Cfg, "home = " ++ filename:dirname(?config(python, Config)))),
    {0, Out} = pyport_ct:shell(App, user_env() ++ " erl -noshell " ++ rebar3_paths()
                               ++ " -eval '" ++ check_call("lifeapp") ++ "'"),
    ?assertNotEqual(nomatch, string:find(Out, "check=" ?CHECK)),
    ?assertNotEqual(nomatch, string:find(Out, "no_app=ModuleNotFoundError")),
    unchanged_costs_nothing(App, Venv, "rebar3 compile"),
    changed_and_failing(App, Venv, "rebar3 compile").

mix_app_packages() ->
    [{doc, "The same from a Mix project with `compilers: Mix.compilers() ++ [:pyport]': "
           "`mix compile' makes the venv; `mix run' finds the package in the default "
           "runtime, the app's own runtime and pool, and with `app: :lifemix'; a second "
           "compile with no route to the index changes nothing; a changed file makes "
           "the venv again; a missing package fails `mix compile' with pip's message."}].
mix_app_packages(Config) ->
    case os:find_executable("mix") of
        false -> {skip, "mix (Elixir) is not installed"};
        _ -> mix_app_packages_(Config)
    end.

mix_app_packages_(Config) ->
    Dir = mix_app(Config),
    Venv = filename:join(Dir, "priv/python/.venv"),
    {0, Out} = pyport_ct:shell(Dir, mix_env(Config) ++ " mix run -e '" ++ mix_check_call() ++ "'"),
    ?assertNotEqual(nomatch, string:find(Out, "check=" ?CHECK)),
    ?assertNotEqual(nomatch, string:find(Out, "no_app=ModuleNotFoundError")),
    unchanged_costs_nothing(Dir, Venv, mix_env(Config) ++ " mix compile"),
    changed_and_failing(Dir, Venv, mix_env(Config) ++ " mix compile").

%% A compile with the index out of reach: no output about the venv, the stamp as it was.
unchanged_costs_nothing(Dir, Venv, Compile) ->
    Stamp = filename:join(Venv, "pyport.stamp"),
    Before = modified(Stamp),
    {0, Out} = pyport_ct:shell(Dir, no_index() ++ " " ++ Compile),
    ?assertEqual(nomatch, string:find(Out, "making")),
    ?assertEqual(Before, modified(Stamp)).

%% the modification and change times of a file
modified(File) ->
    {ok, #file_info{mtime = M, ctime = C}} = file:read_file_info(File, [{time, posix}]),
    {M, C}.

changed_and_failing(Dir, Venv, Compile) ->
    Requirements = filename:join(Dir, "priv/python/requirements.txt"),
    Stamp = filename:join(Venv, "pyport.stamp"),
    {ok, Old} = file:read_file(Stamp),
    ok = file:write_file(Requirements, ?PACKAGE "\n# pinned by nobody\n"),
    {0, Out1} = pyport_ct:shell(Dir, user_env() ++ " " ++ Compile),
    ?assertNotEqual(nomatch, string:find(Out1, "pyport: making " ++ Venv)),
    {ok, New} = file:read_file(Stamp),
    ?assertNotEqual(Old, New),
    ok = file:write_file(Requirements, ?PACKAGE "\npyport-no-such-package-20\n"),
    {Status, Out2} = pyport_ct:shell(Dir, user_env() ++ " " ++ Compile),
    ?assertNotEqual(0, Status),
    ?assertNotEqual(nomatch, string:find(Out2, "No matching distribution found for pyport-no-such-package-20")),
    ?assertEqual(false, filelib:is_regular(Stamp)),
    %% back as it was, for the cases after this one
    ok = file:write_file(Requirements, ?PACKAGE "\n"),
    {0, _} = pyport_ct:shell(Dir, user_env() ++ " " ++ Compile).

%%% Item 4: one Python, chosen once

rebar3_path_dependency() ->
    [{doc, "pyport in _checkouts, built once with PYPORT_PYTHON set (init_per_suite): "
           "`rebar3 compile' with PYPORT_PYTHON unset and no cargo on the PATH succeeds "
           "and leaves the port program and its record (the Python, and why) as they "
           "were, although discovery alone would pick another Python here when this "
           "machine has one; `pyport doctor' names that Python and why."}].
rebar3_path_dependency(Config) ->
    App = rebar3_app(Config),
    Clone = ?config(clone, Config),
    Before = built(Clone),
    {0, _} = pyport_ct:shell(App, no_cargo(Config) ++ " rebar3 compile"),
    ?assertEqual(Before, built(Clone)),
    {_, _, Record} = Before,
    ?assertNotEqual(nomatch, string:find(Record, "python=" ++ ?config(python, Config) ++ "\n")),
    ?assertNotEqual(nomatch, string:find(Record, "why=set by PYPORT_PYTHON\n")),
    {0, Discovered} = pyport_ct:shell(Clone, user_env() ++ " scripts/ensure-python.sh --prefer-installed"),
    ct:log("discovery alone would take ~ts", [Discovered]),
    {0, Out} = pyport_ct:shell(App, user_env() ++ " erl -noshell " ++ rebar3_paths()
                               ++ " -eval 'pyport_cli:main([\"--port-binary\", \"" ++ Clone
                               ++ "/priv/pyport\", \"doctor\", \"json\"])'"),
    ?assertMatch({match, _}, re:run(Out, "^Python +[0-9.]+ \\(" ++ ?config(python, Config) ++ "\\)",
                                    [multiline])),
    ?assertMatch({match, _}, re:run(Out, "^chosen +set by PYPORT_PYTHON \\(recorded in " ++ Clone,
                                    [multiline])).

mix_path_dependency() ->
    [{doc, "The Mix project with pyport by `path:': `mix compile' and `mix run' with "
           "PYPORT_PYTHON unset and no cargo on the PATH succeed, call Python, and leave "
           "the port program and its record as they were."}].
mix_path_dependency(Config) ->
    case os:find_executable("mix") of
        false -> {skip, "mix (Elixir) is not installed"};
        _ -> mix_path_dependency_(Config)
    end.

mix_path_dependency_(Config) ->
    Dir = mix_app(Config),
    Clone = ?config(clone, Config),
    Before = built(Clone),
    Env = no_cargo(Config) ++ " MIX_HOME=" ++ filename:join([?config(root, Config), "_build", "mix_home"]),
    {0, _} = pyport_ct:shell(Dir, Env ++ " mix compile"),
    {0, Out} = pyport_ct:shell(Dir, Env ++ " mix run -e 'IO.inspect(:pyport.call(:math, :sqrt, [16]))'"),
    ?assertNotEqual(nomatch, string:find(Out, "{:ok, 4.0}")),
    ?assertEqual(Before, built(Clone)).

%% The port program's modification time and content, and its record.
built(Clone) ->
    Binary = filename:join([Clone, "priv", "pyport"]),
    {ok, Bytes} = file:read_file(Binary),
    {ok, Record} = file:read_file(filename:join([Clone, "priv", "pyport.build"])),
    {modified(Binary), erlang:md5(Bytes), binary_to_list(Record)}.

%% As a user runs things, with no cargo on the PATH.
no_cargo(Config) ->
    Bin = filename:join(?config(priv_dir, Config), "no_cargo_bin"),
    case filelib:is_dir(Bin) of
        true -> ok;
        false ->
            ok = file:make_dir(Bin),
            _ = pyport_ct:path_without(Bin, fun(Name) -> Name =:= "cargo" end)
    end,
    user_env() ++ " PATH=" ++ Bin.

%%% Item 7: tooling with the dependency

rebar3_tooling() ->
    [{doc, "In the rebar3 app: `rebar3 pyport doctor six' names the recorded Python and "
           "why, and finds the app's package in both modes; `eval', `call' (of the "
           "app's package) and `run' (a script importing it, ending with sys.exit(3): "
           "exit status 3) answer as the escript does."}].
rebar3_tooling(Config) ->
    tooling(Config, rebar3_app(Config), user_env() ++ " REBAR_COLOR=none rebar3 pyport ").

mix_tooling() ->
    [{doc, "The same with `mix pyport.doctor', `mix pyport.eval', `mix pyport.call' and "
           "`mix pyport.run' in the Mix project."}].
mix_tooling(Config) ->
    case os:find_executable("mix") of
        false -> {skip, "mix (Elixir) is not installed"};
        _ -> tooling(Config, mix_app(Config), mix_env(Config) ++ " mix pyport.")
    end.

tooling(Config, Dir, Tool) ->
    Python = ?config(python, Config),
    {0, Doctor} = pyport_ct:shell(Dir, Tool ++ "doctor six"),
    ?assertMatch({match, _}, re:run(Doctor, "^Python +[0-9.]+ \\(" ++ Python ++ "\\)", [multiline])),
    ?assertMatch({match, _}, re:run(Doctor, "^chosen +set by PYPORT_PYTHON", [multiline])),
    ?assertMatch({match, _}, re:run(Doctor, "^six +ok +ok$", [multiline])),
    {0, Eval} = pyport_ct:shell(Dir, Tool ++ "eval '6*7'"),
    ?assertMatch({match, _}, re:run(Eval, "^42$", [multiline])),
    {0, Call} = pyport_ct:shell(Dir, Tool ++ "call six ensure_str hi"),
    ?assertMatch({match, _}, re:run(Call, "^hi$", [multiline])),
    Script = filename:join(Dir, "script.py"),
    ok = file:write_file(Script, "import sys, six\nprint('args', sys.argv[1:], six.ensure_str('x'))\n"
                                 "sys.exit(3)\n"),
    {3, Run} = pyport_ct:shell(Dir, Tool ++ "run " ++ Script ++ " a b"),
    ?assertEqual({match, 1}, count("^args \\['a', 'b'\\] x$", Run)).

count(Regex, Text) ->
    case re:run(Text, Regex, [multiline, global]) of
        {match, Matches} -> {match, length(Matches)};
        nomatch -> nomatch
    end.

%%% Item 6: a release that carries its Python

rebar3_release_carries_python() ->
    [{doc, "`PYPORT_BUNDLE_PYTHON=1 rebar3 release' of lifeapp (relx, ERTS included): "
           "the release, moved to a folder of its own and run in a mount namespace where "
           "the Python cache, pyenv, the system's Pythons, the checkout and the app's "
           "build tree are hidden and with an empty environment, calls the package of "
           "its requirements through the default runtime, its runtime and pool; "
           "libpython, sys.prefix, the package and a subprocess of sys.executable are "
           "all the release's own. Logs the release's size."}].
rebar3_release_carries_python(Config) ->
    App = rebar3_app(Config),
    RebarConfig = filename:join(App, "rebar.config"),
    {ok, Old} = file:read_file(RebarConfig),
    ok = file:write_file(RebarConfig, [Old, "{relx, [{release, {lifeapp, \"0.1.0\"}, [lifeapp]},\n"
                                            "        {dev_mode, false}, {include_erts, true}]}.\n"]),
    try
        {0, _} = pyport_ct:shell(App, user_env() ++ " PYPORT_BUNDLE_PYTHON=1 rebar3 release"),
        %% relx's eval asks a running node: the release is started as a daemon, and
        %% stopped after
        carried_python(Config, filename:join(App, "_build/default/rel/lifeapp"), "lifeapp",
                       "bin/lifeapp daemon\n"
                       "i=0; until bin/lifeapp ping >/dev/null 2>&1; do\n"
                       "    i=$((i + 1)); [ $i -lt 300 ] || exit 9; sleep 0.1\n"
                       "done\n"
                       "bin/lifeapp eval '" ++ release_check("lifeapp") ++ "'\n"
                       "status=$?\nbin/lifeapp stop\nexit $status\n")
    after
        ok = file:write_file(RebarConfig, Old),
        %% the clone's bundle goes with the variable
        {0, _} = pyport_ct:shell(App, user_env() ++ " rebar3 compile")
    end.

mix_release_carries_python() ->
    [{doc, "The same with `PYPORT_BUNDLE_PYTHON=1 mix release' of lifemix (MIX_ENV=prod)."}].
mix_release_carries_python(Config) ->
    case os:find_executable("mix") of
        false ->
            {skip, "mix (Elixir) is not installed"};
        _ ->
            Dir = mix_app(Config),
            Env = mix_env(Config) ++ " MIX_ENV=prod PYPORT_BUNDLE_PYTHON=1",
            try
                {0, _} = pyport_ct:shell(Dir, Env ++ " mix release --overwrite"),
                carried_python(Config, filename:join(Dir, "_build/prod/rel/lifemix"), "lifemix",
                               "bin/lifemix eval '" ++ mix_release_check() ++ "'")
            after
                {0, _} = pyport_ct:shell(Dir, mix_env(Config) ++ " mix compile")
            end
    end.

%% Moves the release Rel to a folder outside every build tree and runs Command in it,
%% in a mount namespace that hides every Python but the release's, with an empty
%% environment; checks the result.txt of release_check/1.
carried_python(Config, Rel, Name, Command) ->
    {0, Tmp} = pyport_ct:shell("/", "mktemp -d /tmp/pyport-release-XXXXXX"),
    Moved = filename:join(string:trim(Tmp), Name),
    try
        {0, _} = pyport_ct:shell("/", "mv " ++ Rel ++ " " ++ Moved),
        {0, Size} = pyport_ct:shell(Moved, "du -sh . lib/pyport-*/priv/python-home "
                                    "lib/" ++ Name ++ "-*/priv/python/.venv erts-*"),
        ct:log("the release's size:~n~s", [Size]),
        Python = ?config(python, Config),
        Hidden = [filename:dirname(filename:dirname(Python)),
                  filename:join(os:getenv("HOME"), ".cache/pyport"),
                  filename:join(os:getenv("HOME"), ".pyenv"),
                  ?config(root, Config), ?config(clone, Config), ?config(priv_dir, Config)]
                 ++ filelib:wildcard("/usr/lib/python3*") ++ filelib:wildcard("/usr/local/lib/python3*"),
        %% a folder inside another hidden one is hidden with it (and is no mount point
        %% once that one is)
        Dirs = lists:usort([normal(D) || D <- Hidden, filelib:is_dir(D)]),
        Mounts = [["mount -t tmpfs none ", D, " && "]
                  || D <- Dirs, not lists:any(fun(Up) -> lists:prefix(Up ++ "/", D) end, Dirs)],
        ok = file:write_file(filename:join(Moved, "run.sh"), Command),
        {0, _} = pyport_ct:shell(Moved, lists:flatten(
                                            ["unshare -m sh -c '", Mounts,
                                             "exec env -i HOME=/nonexistent PATH=/usr/bin:/bin sh run.sh'"])),
        {ok, Result} = file:read_file(filename:join(Moved, "result.txt")),
        Out = binary_to_list(Result),
        ct:log("result.txt:~n~s", [Out]),
        ?assertNotEqual(nomatch, string:find(Out, "check=" ?CHECK)),
        {match, [Lib, Prefix, Package, Child]} =
            re:run(Out, "where=\\[<<\"([^\"]*)\">>,<<\"([^\"]*)\">>,<<\"([^\"]*)\">>,<<\"([^\"]*)\">>\\]",
                   [{capture, all_but_first, list}]),
        Home = filename:join([Moved, hd(filelib:wildcard("lib/pyport-*", Moved)), "priv", "python-home"]),
        ?assertEqual({Home, Home}, {Prefix, Child}),
        ?assertEqual(filename:join(Home, "lib"), filename:dirname(Lib)),
        ?assertMatch({match, _}, re:run(Package, "^" ++ Moved ++ "/lib/" ++ Name ++
                                            "-0.1.0/priv/python/.venv/lib/python3[.0-9]+/site-packages/six.py$"))
    after
        pyport_ct:shell("/", "rm -rf " ++ string:trim(Tmp))
    end.

%% Erlang that starts App and writes result.txt in the release's root (relx's eval
%% runs on the release's node, whose output is not ours): check=[...] as check_call/1
%% prints, and where=[...] (python_where/0).
release_check(App) ->
    "{ok, _} = application:ensure_all_started(" ++ App ++ "), "
    "Check = " ++ App ++ ":check(), "
    "{ok, Where} = pyport:eval(<<\"" ++ python_where() ++ "\">>), "
    "ok = file:write_file(filename:join(code:root_dir(), \"result.txt\"), "
    "io_lib:format(\"check=~0p~nwhere=~0p~n\", [Check, Where])).".

%% The same in Elixir, for lifemix.
mix_release_check() ->
    "{:ok, _} = Application.ensure_all_started(:lifemix); "
    "check = Lifemix.check(); "
    "{:ok, where} = :pyport.eval(\"" ++ python_where() ++ "\"); "
    ":ok = :file.write_file(:filename.join(:code.root_dir(), ~c\"result.txt\"), "
    ":io_lib.format(~c\"check=~0p~nwhere=~0p~n\", [check, where]))".

%% A Python expression, its double quotes escaped for an Erlang or Elixir string: the
%% libpython the OS process mapped, sys.prefix, the package's file, and the sys.prefix
%% of a subprocess running sys.executable.
python_where() ->
    "[[l.split()[-1] for l in open(\\\"/proc/self/maps\\\") if \\\"libpython\\\" in l][0], "
    "__import__(\\\"sys\\\").prefix, __import__(\\\"six\\\").__file__, "
    "__import__(\\\"subprocess\\\").run([__import__(\\\"sys\\\").executable, \\\"-c\\\", "
    "\\\"import sys; print(sys.prefix)\\\"], capture_output=True, text=True).stdout.strip()]".

%% Dir as an absolute path with no `.', `..' or trailing slash.
normal(Dir) ->
    Parts = lists:foldl(fun(".", Acc) -> Acc;
                           ("..", [_ | Acc]) -> Acc;
                           (Part, Acc) -> [Part | Acc]
                        end, [], filename:split(filename:absname(Dir))),
    filename:join(lists:reverse(Parts)).

%%% The throwaway apps

%% lifeapp: a rebar3 app whose start/2 starts a runtime and a pool (so they belong to
%% it), with check/0 calling the package through each. Made and compiled once.
rebar3_app(Config) ->
    App = filename:join(?config(priv_dir, Config), "lifeapp"),
    case filelib:is_dir(App) of
        true -> App;
        false -> make_rebar3_app(Config, App)
    end.

make_rebar3_app(Config, App) ->
    Root = ?config(root, Config),
    ok = filelib:ensure_dir(filename:join([App, "src", "x"])),
    ok = filelib:ensure_dir(filename:join([App, "priv", "python", "x"])),
    ok = filelib:ensure_dir(filename:join([App, "_checkouts", "x"])),
    ok = file:make_symlink(?config(clone, Config), filename:join([App, "_checkouts", "pyport"])),
    Url = "file://" ++ Root,
    Ref = pyport_ct:head_commit(),
    ok = file:write_file(
           filename:join(App, "rebar.config"),
           io_lib:format("{deps, [{pyport, {git, ~p, {ref, ~p}}}]}.~n"
                         "{plugins, [{rebar3_pyport, {git_subdir, ~p, {ref, ~p}, \"rebar3_pyport\"}}]}.~n"
                         "{provider_hooks, [{post, [{compile, {pyport, venv}}]}]}.~n",
                         [Url, Ref, Url, Ref])),
    ok = file:write_file(
           filename:join([App, "src", "lifeapp.app.src"]),
           "{application, lifeapp, [{description, \"an app with Python packages\"},\n"
           "  {vsn, \"0.1.0\"}, {modules, []}, {registered, []}, {mod, {lifeapp, []}},\n"
           "  {applications, [kernel, stdlib, pyport]}, {env, []}]}.\n"),
    ok = file:write_file(
           filename:join([App, "src", "lifeapp.erl"]),
           "-module(lifeapp).\n-behaviour(application).\n-behaviour(supervisor).\n"
           "-export([start/2, stop/1, init/1, check/0]).\n"
           "start(_, _) ->\n"
           "    {ok, _} = pyport:start_runtime(#{name => lifeapp_rt, contexts => [#{name => a}]}),\n"
           "    {ok, Pool} = pyport:start_pool(lifeapp_pool, #{size => 1}),\n"
           "    persistent_term:put(lifeapp_pool, Pool),\n"
           "    supervisor:start_link(?MODULE, []).\n"
           "stop(_) -> ok.\n"
           "init([]) -> {ok, {#{}, []}}.\n"
           "check() ->\n"
           "    Call = fun(T) -> pyport:call(T, six, ensure_str, [<<\"hi\">>]) end,\n"
           "    {ok, A} = pyport:context(lifeapp_rt, a),\n"
           "    {ok, Own} = pyport:start_runtime(#{app => lifeapp, contexts => [#{name => b}]}),\n"
           "    {ok, B} = pyport:context(Own, b),\n"
           "    [pyport:call(six, ensure_str, [<<\"hi\">>]), Call(A),\n"
           "     Call(persistent_term:get(lifeapp_pool)), Call(B)].\n"),
    ok = file:write_file(filename:join([App, "priv", "python", "requirements.txt"]), ?PACKAGE "\n"),
    {0, _} = pyport_ct:shell(App, user_env() ++ " rebar3 compile"),
    App.

%% Erlang that prints check=[...] for App, then no_app=<the error type> for a runtime
%% started by the shell's process, which belongs to no application.
check_call(App) ->
    "{ok, _} = application:ensure_all_started(" ++ App ++ "), "
    "io:format(\"check=~0p~n\", [" ++ App ++ ":check()]), "
    "{ok, Rt} = pyport:start_runtime(#{contexts => [#{name => c}]}), "
    "{ok, C} = pyport:context(Rt, c), "
    "{error, {python, Type, _, _}} = pyport:call(C, six, ensure_str, [<<\"hi\">>]), "
    "io:format(\"no_app=~ts~n\", [Type]), halt().".

rebar3_paths() ->
    "-pa _build/default/lib/*/ebin _build/default/checkouts/*/ebin".

%% lifemix: the Mix project of the same shape.
mix_app(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "lifemix"),
    case filelib:is_dir(Dir) of
        true -> Dir;
        false -> make_mix_app(Config, Dir)
    end.

make_mix_app(Config, Dir) ->
    ok = filelib:ensure_dir(filename:join([Dir, "lib", "x"])),
    ok = filelib:ensure_dir(filename:join([Dir, "priv", "python", "x"])),
    ok = file:write_file(
           filename:join(Dir, "mix.exs"),
           io_lib:format("defmodule Lifemix.MixProject do~n"
                         "  use Mix.Project~n"
                         "  def project, do: [app: :lifemix, version: \"0.1.0\", deps: deps(),~n"
                         "                    compilers: Mix.compilers() ++ [:pyport]]~n"
                         "  def application, do: [mod: {Lifemix, []}, extra_applications: [:logger]]~n"
                         "  defp deps, do: [{:pyport, path: ~p}]~n"
                         "end~n", [?config(clone, Config)])),
    ok = file:write_file(
           filename:join([Dir, "lib", "lifemix.ex"]),
           "defmodule Lifemix do\n"
           "  use Application\n"
           "  def start(_, _) do\n"
           "    {:ok, _} = :pyport.start_runtime(%{name: :lifemix_rt, contexts: [%{name: :a}]})\n"
           "    {:ok, pool} = :pyport.start_pool(:lifemix_pool, %{size: 1})\n"
           "    :persistent_term.put(:lifemix_pool, pool)\n"
           "    Supervisor.start_link([], strategy: :one_for_one)\n"
           "  end\n"
           "  def check do\n"
           "    call = fn t -> :pyport.call(t, :six, :ensure_str, [\"hi\"]) end\n"
           "    {:ok, a} = :pyport.context(:lifemix_rt, :a)\n"
           "    {:ok, own} = :pyport.start_runtime(%{app: :lifemix, contexts: [%{name: :b}]})\n"
           "    {:ok, b} = :pyport.context(own, :b)\n"
           "    [:pyport.call(:six, :ensure_str, [\"hi\"]), call.(a),\n"
           "     call.(:persistent_term.get(:lifemix_pool)), call.(b)]\n"
           "  end\n"
           "end\n"),
    ok = file:write_file(filename:join([Dir, "priv", "python", "requirements.txt"]), ?PACKAGE "\n"),
    {0, _} = pyport_ct:shell(Dir, mix_env(Config) ++ " mix compile"),
    Dir.

%% Elixir that prints what check_call/1 prints, in Erlang's format.
mix_check_call() ->
    ":io.format(\"check=~0p~n\", [Lifemix.check()]); "
    "{:ok, rt} = :pyport.start_runtime(%{contexts: [%{name: :c}]}); "
    "{:ok, c} = :pyport.context(rt, :c); "
    "{:error, {:python, type, _, _}} = :pyport.call(c, :six, :ensure_str, [\"hi\"]); "
    "IO.puts(\"no_app=#{type}\")".

%%% Environments

%% As a user runs things: no PYPORT_PYTHON, no PYPORT_EXECUTABLE.
user_env() ->
    "env -u PYPORT_PYTHON -u PYPORT_EXECUTABLE".

mix_env(Config) ->
    user_env() ++ " MIX_HOME=" ++ filename:join([?config(root, Config), "_build", "mix_home"]).

%% pip with no route to a package index (and no local wheels)
no_index() ->
    user_env() ++ " PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_FIND_LINKS= PIP_NO_INDEX=1".

cargo_env(Root) ->
    "CARGO_TARGET_DIR=" ++ filename:join([Root, "target", "dependency-build"]).

%% @doc The build scripts as a dependency build meets them: scripts/build-port.sh (the
%% rebar3 compile hook) and scripts/ensure-python.sh, run for real with a PATH, pyenv
%% root and cache made for each case (symlinks to this machine's own tools and
%% Pythons), in a copy of the sources that has no port program built yet (a built and
%% stamped one would need no cargo and no Python search). No case starts a CPython
%% build: the one that finds no Python has no apt-get on its PATH.
-module(pyport_build_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

suite() ->
    [{timetrap, {minutes, 2}}].

all() ->
    [missing_cargo, bad_pyport_python, no_python_found, discovery_order,
     up_to_date_needs_no_cargo].

init_per_suite(Config) ->
    Tree = source_copy(Config, "tree"),
    Scripts = filename:join(Tree, "scripts"),
    [{build_port, filename:join(Scripts, "build-port.sh")},
     {ensure_python, filename:join(Scripts, "ensure-python.sh")} | Config].

end_per_suite(_Config) ->
    ok.

%%% Cases

missing_cargo() ->
    [{doc, "build-port.sh, in a copy of the sources with nothing built yet, with this "
           "machine's PATH less cargo: exactly one line on stderr, saying cargo is "
           "missing, nothing on stdout, a non-zero exit."}].
missing_cargo(Config) ->
    Tree = source_copy(Config, "missing_cargo_tree"),
    Bin = path_without(Config, "missing_cargo", fun(Name) -> Name =:= "cargo" end),
    Script = filename:join([Tree, "scripts", "build-port.sh"]),
    {Status, Out, Err} = run(Config, ["PATH=" ++ Bin], Script, ""),
    ?assertNotEqual(0, Status),
    ?assertEqual("", Out),
    ?assertMatch(["pyport: cargo not found" ++ _], lines(Err)).

bad_pyport_python() ->
    [{doc, "build-port.sh with PYPORT_PYTHON naming no file, an executable that is not "
           "Python (`true', which exits 0), a directory, or an older Python found on "
           "this machine: one line naming it, nothing on stdout, a non-zero exit."}].
bad_pyport_python(Config) ->
    case os:find_executable("cargo") of
        false -> {skip, "no cargo on the PATH"};
        _ -> bad_pyport_python_(Config)
    end.

bad_pyport_python_(Config) ->
    Bad = ["/no/such/python", os:find_executable("true"), ?config(priv_dir, Config)]
          ++ [Py || Py <- [os:find_executable("python3")], Py =/= false, not usable(Py)],
    lists:foreach(
      fun(Python) ->
          {Status, Out, Err} = run(Config, ["PYPORT_PYTHON=" ++ Python],
                                   ?config(build_port, Config), ""),
          ?assertNotEqual(0, Status),
          ?assertEqual("", Out),
          ?assertEqual(["pyport: PYPORT_PYTHON=" ++ Python ++ " is not a CPython >= 3.12 "
                        "with a shared libpython"], lines(Err))
      end, Bad).

no_python_found() ->
    [{doc, "build-port.sh where no Python can be found (no python* and no apt-get on the "
           "PATH, empty pyenv root and cache, PYPORT_PYTHON unset): one line saying so "
           "and how to go on, a non-zero exit, and nothing written to the cache (no "
           "build was started)."}].
no_python_found(Config) ->
    Bin = path_without(Config, "no_python",
                       fun(Name) -> lists:prefix("python", Name) orelse Name =:= "apt-get" end),
    %% the guard that keeps this case from starting a CPython build as root
    ?assertEqual(false, filelib:is_file(filename:join(Bin, "apt-get"))),
    Pyenv = fresh_dir(Config, "no_python_pyenv"),
    Cache = fresh_dir(Config, "no_python_cache"),
    {Status, Out, Err} = run(Config, ["PATH=" ++ Bin, "PYENV_ROOT=" ++ Pyenv,
                                      "PYPORT_CACHE=" ++ Cache],
                             ?config(build_port, Config), ""),
    ?assertNotEqual(0, Status),
    ?assertEqual("", Out),
    ?assertMatch(["pyport: no CPython >= 3.12 with a shared libpython found" ++ _], lines(Err)),
    ?assertNotEqual(nomatch, string:find(Err, "set PYPORT_PYTHON")),
    ?assertEqual({ok, []}, file:list_dir(Cache)).

discovery_order() ->
    [{doc, "ensure-python.sh --prefer-installed with PYPORT_PYTHON unset takes a usable "
           "python3.1x on the PATH (an older python3 there is passed over), else the "
           "newest usable one under PYENV_ROOT, else the cached build; PYPORT_PYTHON, when "
           "set, comes before all of them."}].
discovery_order(Config) ->
    case {pyenv_pythons(), cached_python()} of
        {[], _} -> {skip, "no CPython >= 3.12 with a shared libpython under pyenv"};
        {_, {skip, _} = Skip} -> Skip;
        {Installed, {ok, Series, CachedPrefix}} ->
            discovery_order(Config, Installed, Series, CachedPrefix)
    end.

discovery_order(Config, Installed, Series, CachedPrefix) ->
    Bin = path_without(Config, "order", fun(Name) -> lists:prefix("python", Name) end),
    %% on the PATH: the oldest usable pyenv Python under its python3.1x name, and an
    %% older python3 if this machine has one
    {PathVersion, PathPy} = hd(Installed),
    OnPath = filename:join(Bin, "python" ++ minor_series(PathVersion)),
    ok = file:make_symlink(PathPy, OnPath),
    _ = [ok = file:make_symlink(Old, filename:join(Bin, "python3")) || Old <- old_python()],
    %% under the fake pyenv root: every usable pyenv version (the newest must win)
    Pyenv = fresh_dir(Config, "order_pyenv"),
    Versions = filename:join(Pyenv, "versions"),
    ok = file:make_dir(Versions),
    _ = [ok = file:make_symlink(filename:dirname(filename:dirname(Py)), filename:join(Versions, V))
         || {V, Py} <- Installed],
    {NewestVersion, _} = lists:last(Installed),
    InPyenv = filename:join([Versions, NewestVersion, "bin", "python3"]),
    %% the cache: the real cached build under a fresh cache directory
    Cache = fresh_dir(Config, "order_cache"),
    ok = file:make_symlink(CachedPrefix, filename:join(Cache, "python" ++ Series)),
    Cached = filename:join([Cache, "python" ++ Series, "bin", "python3"]),
    Env = ["PATH=" ++ Bin, "PYENV_ROOT=" ++ Pyenv, "PYPORT_CACHE=" ++ Cache,
           "PYPORT_PYTHON_SERIES=" ++ Series],
    Found = fun(Extra) ->
                {0, Out, ""} = run(Config, Extra ++ Env, ?config(ensure_python, Config),
                                   "--prefer-installed"),
                string:trim(Out)
            end,
    ?assertEqual(InPyenv, Found(["PYPORT_PYTHON=" ++ InPyenv])),
    ?assertEqual(OnPath, Found([])),
    ok = file:delete(OnPath),
    ?assertEqual(InPyenv, Found([])),
    _ = [ok = file:delete(filename:join(Versions, V)) || {V, _} <- Installed],
    ?assertEqual(Cached, Found([])).

up_to_date_needs_no_cargo() ->
    [{doc, "A copy of the sources with this checkout's port program and its record "
           "(priv/pyport.build, written by build-port.sh): with no cargo on the PATH and "
           "PYPORT_PYTHON unset, or set to the recorded Python, build-port.sh does nothing "
           "and succeeds, and `--python' names the recorded Python; a changed Rust source "
           "or another PYPORT_PYTHON asks for a build (here: `cargo not found')."}].
up_to_date_needs_no_cargo(Config) ->
    Root = pyport_ct:repo_root(),
    Record = filename:join([Root, "priv", "pyport.build"]),
    case filelib:is_regular(Record) of
        false -> {skip, "this checkout's port program has no record: run make build"};
        true -> up_to_date_needs_no_cargo(Config, Root, Record)
    end.

up_to_date_needs_no_cargo(Config, Root, Record) ->
    Tree = source_copy(Config, "built"),
    {ok, _} = file:copy(filename:join([Root, "priv", "pyport"]), filename:join([Tree, "priv", "pyport"])),
    ok = file:change_mode(filename:join([Tree, "priv", "pyport"]), 8#755),
    {ok, _} = file:copy(Record, filename:join([Tree, "priv", "pyport.build"])),
    {ok, RecordText} = file:read_file(Record),
    [Python] = [P || "python=" ++ P <- lines(binary_to_list(RecordText))],
    Bin = path_without(Config, "built_no_cargo", fun(Name) -> Name =:= "cargo" end),
    Script = filename:join([Tree, "scripts", "build-port.sh"]),
    ?assertEqual({0, "", ""}, run(Config, ["PATH=" ++ Bin], Script, "")),
    ?assertEqual({0, "", ""}, run(Config, ["PATH=" ++ Bin, "PYPORT_PYTHON=" ++ Python], Script, "")),
    ?assertEqual({0, Python ++ "\n", ""}, run(Config, ["PATH=" ++ Bin], Script, "--python")),
    case [Py || {_, Py} <- pyenv_pythons(), Py =/= Python] of
        [Other | _] ->
            {1, "", Err1} = run(Config, ["PATH=" ++ Bin, "PYPORT_PYTHON=" ++ Other], Script, ""),
            ?assertMatch(["pyport: cargo not found" ++ _], lines(Err1));
        [] ->
            ok
    end,
    Main = filename:join([Tree, "src", "main.rs"]),
    ok = file:write_file(Main, "// changed\n", [append]),
    {1, "", Err2} = run(Config, ["PATH=" ++ Bin], Script, ""),
    ?assertMatch(["pyport: cargo not found" ++ _], lines(Err2)),
    ?assertEqual({ok, RecordText}, file:read_file(filename:join([Tree, "priv", "pyport.build"]))).

%%% Helpers

%% A copy of what build-port.sh reads (scripts, the Rust sources and manifests, and
%% the Python the binary embeds, priv/python/erlang*.py), with nothing built yet.
source_copy(Config, Name) ->
    Tree = fresh_dir(Config, Name),
    Root = pyport_ct:repo_root(),
    {0, _} = pyport_ct:shell(Root, "cp -r scripts src build.rs Cargo.toml Cargo.lock " ++ Tree
                             ++ " && mkdir -p " ++ Tree ++ "/priv/python && cp priv/python/erlang*.py "
                             ++ Tree ++ "/priv/python/"),
    Tree.

%% Runs Command Args with the environment less PYPORT_* plus Env; its exit status,
%% stdout and stderr, apart.
run(Config, Env, Command, Args) ->
    Dir = ?config(priv_dir, Config),
    OutFile = filename:join(Dir, "stdout"),
    ErrFile = filename:join(Dir, "stderr"),
    Shell = lists:flatten(
              ["env -u PYPORT_EXECUTABLE -u PYPORT_PYTHON -u PYPORT_PYTHON_SERIES ",
               [[quote(E), " "] || E <- Env], quote(Command), " ", Args,
               " >", quote(OutFile), " 2>", quote(ErrFile), "; echo $?"]),
    Status = list_to_integer(string:trim(os:cmd(Shell))),
    {ok, Out} = file:read_file(OutFile),
    {ok, Err} = file:read_file(ErrFile),
    ct:log("~ts~nexit ~b~nstdout:~n~ts~nstderr:~n~ts", [Shell, Status, Out, Err]),
    {Status, binary_to_list(Out), binary_to_list(Err)}.

quote(S) ->
    "'" ++ S ++ "'".

lines(Text) ->
    string:lexemes(Text, "\n").

path_without(Config, Name, Drop) ->
    pyport_ct:path_without(fresh_dir(Config, Name ++ "_bin"), Drop).

fresh_dir(Config, Name) ->
    Dir = filename:join(?config(priv_dir, Config), Name),
    ok = file:make_dir(Dir),
    Dir.

%% Whether a Python is one pyport can embed (asked of the Python itself).
usable(Python) ->
    Answer = os:cmd(quote(Python) ++ " -c 'import sys, sysconfig; print(sys.version_info >= "
                    "(3, 12) and sysconfig.get_config_var(\"Py_ENABLE_SHARED\") == 1)' 2>/dev/null"),
    string:trim(Answer) =:= "True".

pyenv_root() ->
    case os:getenv("PYENV_ROOT") of
        Root when is_list(Root), Root =/= "" -> Root;
        _ -> filename:join(os:getenv("HOME"), ".pyenv")
    end.

%% [{Version, Python}] of the usable pyenv Pythons, oldest first.
pyenv_pythons() ->
    Pythons = [{filename:basename(filename:dirname(filename:dirname(Py))), Py}
               || Py <- filelib:wildcard(filename:join([pyenv_root(), "versions", "3.*", "bin",
                                                        "python3"])),
                  usable(Py)],
    lists:sort(fun({A, _}, {B, _}) -> version(A) =< version(B) end, Pythons).

version(V) ->
    [list_to_integer(N) || N <- string:lexemes(V, "."),
                           lists:all(fun(C) -> C >= $0 andalso C =< $9 end, N)].

%% "3.12.1" -> "3.12"
minor_series(V) ->
    [Major, Minor | _] = string:lexemes(V, "."),
    Major ++ "." ++ Minor.

%% An older Python (the PATH's python3 or a pyenv one), to sit on the PATH as python3.
old_python() ->
    Candidates = [os:find_executable("python3")]
                 ++ filelib:wildcard(filename:join([pyenv_root(), "versions", "3.*", "bin", "python3"])),
    Runs = fun(Py) -> os:cmd(quote(Py) ++ " -c '' >/dev/null 2>&1; echo $?") =:= "0\n" end,
    case [Py || Py <- Candidates, Py =/= false, not usable(Py), Runs(Py)] of
        [Old | _] -> [Old];
        [] -> []
    end.

%% {ok, Series, Prefix} of the cached build ensure-python.sh makes.
cached_python() ->
    Cache = case os:getenv("PYPORT_CACHE") of
                C when is_list(C), C =/= "" -> C;
                _ -> filename:join([os:getenv("HOME"), ".cache", "pyport"])
            end,
    case [P || P <- filelib:wildcard(filename:join(Cache, "python3.*")),
               usable(filename:join([P, "bin", "python3"]))] of
        [Prefix | _] ->
            "python" ++ Series = filename:basename(Prefix),
            {ok, Series, Prefix};
        [] ->
            {skip, "no cached CPython build in " ++ Cache}
    end.

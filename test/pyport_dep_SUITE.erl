%% @doc pyport as a dependency: a throwaway rebar3 application that depends on pyport
%% (by git, at this checkout's commit) compiles with plain
%% `rebar3 compile', which builds the port binary, calls Python, and ships in a release
%% that still works after it is moved elsewhere.
-module(pyport_dep_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

suite() ->
    [{timetrap, {minutes, 20}}].

all() ->
    [rebar3_dependency_and_release].

rebar3_dependency_and_release() ->
    [{doc, "A new rebar3 app with {deps, [{pyport, {git, ...}}]}: `rebar3 compile' builds "
           "_build/default/lib/pyport/priv/pyport; a VM started on that code path runs "
           "pyport:call(math, sqrt, [16]); `rebar3 release' carries the binary, and the "
           "release moved to another directory runs the same call."}].
rebar3_dependency_and_release(Config) ->
    Root = pyport_ct:repo_root(),
    App = filename:join(?config(priv_dir, Config), "depapp"),
    ok = write_app(App, Root),
    %% a cargo target dir of its own, kept between runs (the first build takes minutes)
    Env = "CARGO_TARGET_DIR=" ++ filename:join([Root, "target", "dependency-build"]),
    {0, _} = pyport_ct:shell(App, Env ++ " rebar3 compile"),
    Binary = filename:join([App, "_build", "default", "lib", "pyport", "priv", "pyport"]),
    ?assert(filelib:is_regular(Binary)),
    Call = "{ok, _} = application:ensure_all_started(pyport), "
           "io:format(\"result=~p~n\", [depapp:sqrt()]), halt().",
    {0, Out1} = pyport_ct:shell(App, "erl -noshell -pa _build/default/lib/*/ebin -eval '" ++ Call ++ "'"),
    ?assertNotEqual(nomatch, string:find(Out1, "result={ok,4.0}")),
    {0, _} = pyport_ct:shell(App, Env ++ " rebar3 release"),
    Moved = filename:join(?config(priv_dir, Config), "moved"),
    ok = filelib:ensure_dir(filename:join(Moved, "x")),
    {0, _} = pyport_ct:shell(App, "mv _build/default/rel/depapp " ++ Moved),
    Rel = filename:join(Moved, "depapp"),
    ?assert(filelib:is_regular(filename:join([Rel, "lib", lib_dir_name(Rel), "priv", "pyport"]))),
    {0, _} = pyport_ct:shell(Rel, "bin/depapp daemon"),
    pyport_ct:wait_for(fun() -> case pyport_ct:shell(Rel, "bin/depapp ping") of
                                    {0, _} -> {ok, up};
                                    Other -> {not_yet, Other}
                                end
                       end, 300),
    {0, Out2} = pyport_ct:shell(Rel, "bin/depapp eval "
                         "'lists:flatten(io_lib:format(\"result=~p\", [depapp:sqrt()])).'"),
    _ = pyport_ct:shell(Rel, "bin/depapp stop"),
    ?assertNotEqual(nomatch, string:find(Out2, "result={ok,4.0}")).

%%% Helpers

write_app(App, Root) ->
    ok = filelib:ensure_dir(filename:join([App, "src", "x"])),
    ok = file:write_file(
           filename:join(App, "rebar.config"),
           io_lib:format("{deps, [{pyport, {git, ~p, {ref, ~p}}}]}.~n"
                         "{relx, [{release, {depapp, \"0.1.0\"}, [depapp]},~n"
                         "        {dev_mode, false}, {include_erts, false},~n"
                         "        {extended_start_script, true}]}.~n",
                         ["file://" ++ Root, pyport_ct:head_commit()])),
    ok = file:write_file(
           filename:join([App, "src", "depapp.app.src"]),
           "{application, depapp, [{description, \"pyport as a dependency\"},\n"
           "  {vsn, \"0.1.0\"}, {modules, []}, {registered, []},\n"
           "  {applications, [kernel, stdlib, pyport]}, {env, []}]}.\n"),
    ok = file:write_file(
           filename:join([App, "src", "depapp.erl"]),
           "-module(depapp).\n-export([sqrt/0]).\n"
           "sqrt() -> pyport:call(math, sqrt, [16]).\n").

%% The directory of pyport inside a release (its name carries the version).
lib_dir_name(Rel) ->
    [Dir] = [filename:basename(D) || D <- filelib:wildcard(filename:join([Rel, "lib", "pyport-*"]))],
    Dir.


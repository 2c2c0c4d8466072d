%% @doc The `pyport' command line (the escript `make' builds), run as a user would.
-module(pyport_cli_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

all() ->
    [eval, run_streams_output, call, doctor, doctor_installed, finds_port_binary,
     port_binary_from_env, usage_and_errors, bench].

init_per_suite(Config) ->
    Root = pyport_ct:repo_root(),
    Cli = filename:join([Root, "_build", "default", "bin", "pyport"]),
    filelib:is_regular(Cli) orelse ct:fail({no_escript, Cli, "run `make build'"}),
    Binary = filename:join([Root, "priv", "pyport"]),
    filelib:is_regular(Binary) orelse ct:fail({no_port_binary, Binary, "run `make build'"}),
    [{cli, Cli}, {binary, Binary} | Config].

end_per_suite(_Config) ->
    ok.

%%% Cases

eval() ->
    [{doc, "pyport eval '6*7' prints 42 and exits 0; strings print as themselves."}].
eval(Config) ->
    ?assertEqual({0, "42\n"}, cli(Config, "eval '6*7'")),
    ?assertEqual({0, "abc\n"}, cli(Config, "eval \"'ab' + 'c'\"")).

run_streams_output() ->
    [{doc, "pyport run FILE a b: sys.argv is set, lines arrive as they are printed (the "
           "first one well before the script ends), sys.exit's code is the exit status."}].
run_streams_output(Config) ->
    Script = filename:join(?config(priv_dir, Config), "script.py"),
    ok = file:write_file(Script, <<"import sys, time\n"
                                   "print('argv', sys.argv[1:])\n"
                                   "sys.stdout.flush()\n"
                                   "time.sleep(1.5)\n"
                                   "print('done')\n"
                                   "sys.exit(3)\n">>),
    Port = open_port({spawn_executable, ?config(cli, Config)},
                     [{args, ["--port-binary", ?config(binary, Config), "run", Script,
                              "a", "b"]},
                      exit_status, {line, 1000}, stderr_to_stdout]),
    T0 = erlang:monotonic_time(millisecond),
    First = receive {Port, {data, {eol, L1}}} -> {L1, erlang:monotonic_time(millisecond) - T0}
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    Second = receive {Port, {data, {eol, L2}}} -> {L2, erlang:monotonic_time(millisecond) - T0}
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    Status = receive {Port, {exit_status, S}} -> S
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    ct:log("first line ~p, second ~p (ms from start), exit ~b", [First, Second, Status]),
    ?assertMatch({"argv ['a', 'b']", _}, First),
    ?assertMatch({"done", _}, Second),
    %% the first line came at least a second before the second: it was not held back
    ?assert(element(2, Second) - element(2, First) >= 1000),
    ?assertEqual(3, Status).

call() ->
    [{doc, "pyport call json dumps '[1,2]' prints [1, 2]; arguments parse as Python "
           "literals, else stay strings."}].
call(Config) ->
    ?assertEqual({0, "[1, 2]\n"}, cli(Config, "call json dumps '[1,2]'")),
    ?assertEqual({0, "HELLO\n"}, cli(Config, "call builtins str.upper hello")),
    ?assertEqual({0, "4.0\n"}, cli(Config, "call math sqrt 16")).

doctor() ->
    [{doc, "pyport doctor json readline: the Python and OWN_GIL support, and a table: "
           "json imports in both modes, readline only in main (it refuses "
           "sub-interpreters)."}].
doctor(Config) ->
    {0, Out} = cli(Config, "doctor json readline"),
    ct:log("~s", [Out]),
    ?assertMatch({match, _}, re:run(Out, "^Python +3\\.1[2-9]", [multiline])),
    ?assertMatch({match, _}, re:run(Out, "^OWN_GIL +yes", [multiline])),
    ?assertMatch({match, _}, re:run(Out, "^json +ok +ok$", [multiline])),
    ?assertMatch({match, _}, re:run(Out, "^readline +ok +ImportError", [multiline])).

doctor_installed() ->
    [{doc, "Plain pyport doctor (no module names), with two distributions installed on "
           "PYTHONPATH: within the timetrap it prints the Python, OWN_GIL, the installed "
           "packages by import name (one importing everywhere, one that imports readline "
           "only in main), and the standard library's extension modules (json in both, "
           "no private or test ones)."},
     {timetrap, {minutes, 2}}].
doctor_installed(Config) ->
    Site = filename:join(?config(priv_dir, Config), "site"),
    ok = install(Site, "pyport-doctor-probe", "pyport_probe_ok", <<"import json\n">>),
    ok = install(Site, "pyport-doctor-main-only", "pyport_probe_main", <<"import readline\n">>),
    {0, Out} = cmd("env -u PYPORT_EXECUTABLE PYTHONPATH=" ++ Site ++ " " ++ ?config(cli, Config)
                   ++ " --port-binary " ++ ?config(binary, Config) ++ " doctor"),
    ct:log("~s", [Out]),
    ?assertMatch({match, _}, re:run(Out, "^Python +3\\.1[2-9]", [multiline])),
    ?assertMatch({match, _}, re:run(Out, "^OWN_GIL +yes", [multiline])),
    [_, Installed, Stdlib] = string:split(Out, "\n\n", all),
    ?assertMatch("installed packages\nmodule " ++ _, Installed),
    ?assertMatch({match, _}, re:run(Installed, "^pyport_probe_ok +ok +ok$", [multiline])),
    ?assertMatch({match, _}, re:run(Installed, "^pyport_probe_main +ok +ImportError",
                                    [multiline])),
    ?assertMatch("standard library extension modules\nmodule " ++ _, Stdlib),
    ?assertMatch({match, _}, re:run(Stdlib, "^json +ok +ok$", [multiline])),
    ?assertMatch(nomatch, re:run(Stdlib, "^(_|xx|test)", [multiline])).

finds_port_binary() ->
    [{doc, "Without --port-binary or PYPORT_EXECUTABLE the built escript finds the binary "
           "in _build/default/lib/pyport/priv, also when run through a symlink from "
           "elsewhere; a copy of the escript with no build beside it exits 2 with one "
           "line saying where it looked."}].
finds_port_binary(Config) ->
    Cli = ?config(cli, Config),
    ?assertEqual({0, "42\n"}, cmd("env -u PYPORT_EXECUTABLE " ++ Cli ++ " eval '6*7'")),
    Linked = filename:join(fresh_dir(Config, "linked"), "pyport"),
    ok = file:make_symlink(Cli, Linked),
    ?assertEqual({0, "42\n"}, cmd("env -u PYPORT_EXECUTABLE " ++ Linked ++ " eval '6*7'")),
    Alone = lone_escript(Config, "alone"),
    Expected = filename:join([filename:dirname(filename:dirname(Alone)), "lib", "pyport", "priv",
                              "pyport"]),
    ?assertEqual({2, "pyport: no port binary at " ++ Expected ++ " (beside this escript; use "
                     "--port-binary or PYPORT_EXECUTABLE)\n"},
                 cmd("env -u PYPORT_EXECUTABLE " ++ Alone ++ " eval '6*7'")).

port_binary_from_env() ->
    [{doc, "PYPORT_EXECUTABLE names the binary for a copy of the escript that has none "
           "beside it; set to a path with nothing there it is exit 2 and one line naming "
           "it; --port-binary comes before it."}].
port_binary_from_env(Config) ->
    Alone = lone_escript(Config, "env"),
    Binary = ?config(binary, Config),
    ?assertEqual({0, "42\n"}, cmd("PYPORT_EXECUTABLE=" ++ Binary ++ " " ++ Alone ++ " eval '6*7'")),
    ?assertEqual({2, "pyport: no port binary at /no/such/pyport (given by PYPORT_EXECUTABLE)\n"},
                 cmd("PYPORT_EXECUTABLE=/no/such/pyport " ++ Alone ++ " eval '6*7'")),
    ?assertEqual({0, "42\n"}, cmd("PYPORT_EXECUTABLE=/no/such/pyport " ++ Alone
                                  ++ " --port-binary " ++ Binary ++ " eval '6*7'")).

usage_and_errors() ->
    [{doc, "Exit statuses: 2 for usage (no command, unknown command, a missing file or "
           "port binary), 1 for a Python error (its traceback on stderr)."}].
usage_and_errors(Config) ->
    ?assertMatch({2, "usage: pyport" ++ _}, cli(Config, "")),
    ?assertMatch({2, "usage: pyport" ++ _}, cli(Config, "frobnicate")),
    ?assertMatch({2, _}, cli(Config, "run /no/such/file.py")),
    ?assertMatch({2, "pyport: no port binary" ++ _},
                 cmd(?config(cli, Config) ++ " --port-binary /no/such/binary eval 1")),
    {1, Err} = cli(Config, "eval '1/0'"),
    ?assertNotEqual(nomatch, string:find(Err, "ZeroDivisionError: division by zero")).

bench() ->
    [{doc, "pyport bench prints the headline numbers."}].
bench(Config) ->
    {0, Out} = cli(Config, "bench"),
    ct:log("~s", [Out]),
    ?assertMatch({match, _}, re:run(Out, "sync call latency, median +[0-9.]+ us")),
    ?assertMatch({match, _}, re:run(Out, "calls/s, 50 callers, 2 ctx +[0-9]+")),
    ?assertMatch({match, _}, re:run(Out, "CPU speedup, 2 contexts +[0-9.]+x")).

%%% Helpers

cli(Config, Args) ->
    cmd(?config(cli, Config) ++ " --port-binary " ++ ?config(binary, Config) ++ " " ++ Args).

%% A copy of the escript in Name/bin, with no lib/pyport/priv beside it.
lone_escript(Config, Name) ->
    Bin = filename:join(fresh_dir(Config, Name), "bin"),
    ok = file:make_dir(Bin),
    Copy = filename:join(Bin, "pyport"),
    {ok, _} = file:copy(?config(cli, Config), Copy),
    ok = file:change_mode(Copy, 8#755),
    Copy.

fresh_dir(Config, Name) ->
    Dir = filename:join(?config(priv_dir, Config), Name),
    ok = file:make_dir(Dir),
    Dir.

%% Installs distribution Dist with the one package Package (its __init__.py is Init) in
%% Site, as pip would lay it out (dist-info with METADATA and top_level.txt).
install(Site, Dist, Package, Init) ->
    ok = filelib:ensure_dir(filename:join([Site, Package, "__init__.py"])),
    ok = file:write_file(filename:join([Site, Package, "__init__.py"]), Init),
    Info = filename:join(Site, lists:flatten(string:replace(Dist, "-", "_", all)) ++ "-1.0.dist-info"),
    ok = filelib:ensure_dir(filename:join(Info, "METADATA")),
    ok = file:write_file(filename:join(Info, "METADATA"),
                         ["Metadata-Version: 2.1\nName: ", Dist, "\nVersion: 1.0\n"]),
    file:write_file(filename:join(Info, "top_level.txt"), [Package, "\n"]).

%% The command's exit status and its output (stdout and stderr).
cmd(Command) ->
    pyport_ct:shell(".", Command).

%% @doc The `pyport' command line (the escript `make' builds), run as a user would.
-module(pyport_cli_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

all() ->
    [eval, run_streams_output, call, doctor, usage_and_errors, bench].

init_per_suite(Config) ->
    Root = pyport_ct:repo_root(),
    Cli = filename:join([Root, "_build", "default", "bin", "pyport"]),
    filelib:is_regular(Cli) orelse ct:fail({no_escript, Cli, "run `make build'"}),
    [{cli, Cli}, {binary, filename:join([Root, "priv", "pyport"])} | Config].

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
    First = receive {Port, {data, {eol, L1}}} -> {L1, erlang:monotonic_time(millisecond) - T0} end,
    Second = receive {Port, {data, {eol, L2}}} -> {L2, erlang:monotonic_time(millisecond) - T0} end,
    Status = receive {Port, {exit_status, S}} -> S end,
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

%% The command's exit status and its output (stdout and stderr).
cmd(Command) ->
    pyport_ct:shell(".", Command).

%% @doc `make demo' (scripts/demo.escript) shows both halves of the promise: the
%% speedup of two owngil contexts, and crash isolation (one runtime segfaults while
%% another keeps answering, and the crashed one comes back).
-module(pyport_demo_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [demo_shows_crash_isolation].

demo_shows_crash_isolation() ->
    [{doc, "escript scripts/demo.escript exits 0 and prints the speedup, then: the "
           "victim runtime's call answered {error, {runtime_down, {port_exit, 139}}} "
           "(SIGSEGV), how long it took to answer again, and that the steady runtime "
           "answered calls all along and failed none."}].
demo_shows_crash_isolation(_Config) ->
    Root = pyport_ct:repo_root(),
    Libs = filename:dirname(code:lib_dir(pyport)),
    {0, Out} = pyport_ct:shell(Root, "ERL_LIBS=" ++ Libs ++ " escript scripts/demo.escript"),
    Has = fun(Regex) -> ?assertMatch({match, _}, re:run(Out, Regex, [multiline]), Regex) end,
    Has("^speedup: [0-9.]+x on [0-9]+ cores$"),
    Has("^victim's call: +\\{error,\\{runtime_down,\\{port_exit,139\\}\\}\\}$"),
    Has("^victim back in: +[0-9.]+ ms \\(new OS pid [0-9]+, [0-9]+ tries"),
    Has("^steady meanwhile: +[1-9][0-9]* calls answered, 0 failed$").

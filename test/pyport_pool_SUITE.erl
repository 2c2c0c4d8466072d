%% @doc Pools (pyport_pool): modes, dispatch, affinity, faults, max_requests, options,
%% and a venv with numpy, against real runtimes.
-module(pyport_pool_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% Which member answered: the OS pid (main) and the context's thread (owngil).
-define(WHO, <<"import os, threading\n"
               "def who():\n"
               "    return (os.getpid(), threading.get_ident())\n"
               "def slow(s):\n"
               "    import time\n"
               "    time.sleep(s)\n"
               "    return who()\n"
               "def spin(n):\n"
               "    x = 0\n"
               "    for i in range(n):\n"
               "        x += i\n"
               "    return x\n">>).

all() ->
    [start_stop, pool_goes_where_a_context_goes, least_loaded_dispatch, affinity,
     owngil_mode, owngil_max_requests_and_restart, auto_mode_owngil, auto_mode_main,
     auto_mode_crash_checked_alone,
     member_crash_restarts_alone, max_requests_replaces, max_requests_waits_for_work,
     options_on_every_member, child_spec_in_own_tree, bad_options, cpu_scales_like_processes,
     owngil_cpu_scales_like_processes,
     numpy_in_main_pool_and_auto_mode].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

%%% Helpers

start(Name, Opts) ->
    {ok, Pool} = pyport:start_pool(Name, maps:merge(#{preload => ?WHO}, Opts)),
    Pool.

who(Target) ->
    {ok, {OsPid, Thread}} = pyport:call(Target, '__main__', who, []),
    {OsPid, Thread}.

members(Pool) ->
    {ok, #{members := Members}} = pyport:pool_info(Pool),
    Members.

member_ctx(Pool, I) ->
    #{context := Ctx} = lists:nth(I, members(Pool)),
    Ctx.

%% Waits until exactly one member has a request in flight; returns its index.
busy_member(Pool) ->
    pyport_ct:wait_for(fun() ->
                           case [I || #{index := I, in_flight := 1} <- members(Pool)] of
                               [I] -> {ok, I};
                               Other -> {not_yet, Other}
                           end
                       end, 500).

%% Waits until every member is up.
await_full(Pool) ->
    pyport_ct:wait_for(fun() ->
                           Ms = members(Pool),
                           case [M || #{status := up} = M <- Ms] of
                               Ms -> {ok, Ms};
                               _ -> {not_yet, Ms}
                           end
                       end, 1000).

%%% Cases

start_stop() ->
    [{doc, "start_pool/2 in main mode with 2 members: calls work, pool_info/1 shows the "
      "mode, its reason and two members in OS processes of their own; stop_pool/1 ends "
      "them and later calls are {error, {pool_down, Name}}."}].
start_stop(_Config) ->
    Pool = start(p_start, #{size => 2, mode => main}),
    ?assertEqual({ok, 4.0}, pyport:call(Pool, math, sqrt, [16])),
    {ok, Info} = pyport:pool_info(Pool),
    #{mode := main, mode_reason := Why, size := 2, members := [M1, M2]} = Info,
    ?assert(is_binary(Why)),
    #{os_pid := P1, node := Node, status := up} = M1,
    #{os_pid := P2} = M2,
    ?assertEqual(node(), Node),
    ?assertNotEqual(P1, P2),
    ?assertEqual({ok, Pool}, pyport:pool(p_start)),
    ?assertEqual({error, {already_started, p_start}}, pyport:start_pool(p_start, #{})),
    ok = pyport:stop_pool(Pool),
    ?assertEqual({error, {pool_down, p_start}}, pyport:call(Pool, math, sqrt, [16])),
    ?assertEqual({error, not_found}, pyport:pool(p_start)),
    ?assertEqual({error, not_found}, pyport:stop_pool(Pool)),
    pyport_ct:wait_for(fun() -> case [P || P <- [P1, P2], is_os_pid_alive(P)] of
                                    [] -> {ok, gone};
                                    Alive -> {alive, Alive}
                                end
                       end, 500).

pool_goes_where_a_context_goes() ->
    [{doc, "call, eval, exec, async_call/await, cast, stream, new_env and return => ref "
      "all take a pool."}].
pool_goes_where_a_context_goes(_Config) ->
    Pool = start(p_api, #{size => 2, mode => main}),
    ?assertEqual({ok, 3}, pyport:call(Pool, operator, add, [1, 2])),
    ?assertEqual({ok, 6}, pyport:eval(Pool, <<"x * 2">>, #{x => 3})),
    ?assertEqual(ok, pyport:exec(Pool, <<"import math">>)),
    Ref = pyport:async_call(Pool, operator, mul, [6, 7]),
    ?assertEqual({ok, 42}, pyport:await(Ref, 5000)),
    ?assertMatch({error, {bad_request, args}}, pyport:await(pyport:async_call(Pool, m, f, x))),
    Self = self(),
    ok = pyport:cast(Pool, erlang, send, [Self, cast_arrived]),
    receive cast_arrived -> ok after 5000 -> ct:fail(no_cast) end,
    {ok, Stream} = pyport:stream(Pool, builtins, range, [5]),
    ?assertEqual([0, 1, 2, 3, 4], pyport_ct:stream_items(Stream)),
    {ok, Env} = pyport:new_env(Pool),
    ok = pyport:exec(Pool, <<"y = 5">>, #{env => Env}),
    [?assertEqual({ok, 5}, pyport:eval(Pool, <<"y">>, #{}, #{env => Env}))
     || _ <- lists:seq(1, 10)],
    {ok, List} = pyport:eval(Pool, <<"[1, 2]">>, #{}, #{return => ref}),
    ?assertEqual({ok, none}, pyport:call_method(List, append, [3])),
    ?assertEqual({ok, [1, 2, 3]}, pyport:to_term(List)),
    ok = pyport:stop_pool(Pool).

least_loaded_dispatch() ->
    [{doc, "A call goes to the member with the fewest requests in flight: while one "
      "member runs a 2 s call, 20 short calls all go to the other and each is answered "
      "in well under the 2 s."}].
least_loaded_dispatch(_Config) ->
    Pool = start(p_load, #{size => 2, mode => main}),
    Slow = pyport:async_call(Pool, '__main__', slow, [2]),
    %% the slow call is in flight on one member
    Busy = busy_member(Pool),
    #{os_pid := BusyPid} = lists:nth(Busy, members(Pool)),
    Times = [begin
                 T0 = erlang:monotonic_time(millisecond),
                 {OsPid, _} = who(Pool),
                 {erlang:monotonic_time(millisecond) - T0, OsPid}
             end || _ <- lists:seq(1, 20)],
    ct:log("short calls while one member is busy (ms, os pid): ~p", [Times]),
    [?assertNotEqual(BusyPid, OsPid) || {_, OsPid} <- Times],
    ?assert(lists:max([Ms || {Ms, _} <- Times]) < 1000),
    {ok, {BusyPid, _}} = pyport:await(Slow, 5000),
    ok = pyport:stop_pool(Pool).

affinity() ->
    [{doc, "Envs and object handles made through a pool stay on their member: 40 uses "
      "alternate with other calls and every one reaches the member that made it."}].
affinity(_Config) ->
    Pool = start(p_aff, #{size => 2, mode => main}),
    {ok, Env} = pyport:new_env(Pool),
    ok = pyport:exec(Pool, <<"import os\nhome = os.getpid()">>, #{env => Env}),
    {ok, Obj} = pyport:eval(Pool, <<"__import__('os').getpid()">>, #{}, #{return => ref}),
    {ok, Home} = pyport:to_term(Obj),
    Seen = [begin
                {ok, H} = pyport:eval(Pool, <<"home == __import__('os').getpid()">>, #{},
                                      #{env => Env}),
                %% a handle in the arguments sends the call to its member, also one
                %% inside a list or a tuple, or among the keyword arguments
                {ok, Same} = pyport:call(Pool, operator, eq, [Obj, Home]),
                {ok, Nested} = pyport:call(Pool, operator, eq, [[{1, Obj}], [{1, Home}]]),
                %% (the keyword is an erlang.Atom, a str, so it comes back an atom)
                {ok, #{x := Kw}} = pyport:call(Pool, builtins, dict, [], #{x => Obj}),
                {OtherPid, _} = who(Pool),
                {H, Same andalso Nested andalso Kw =:= Home, OtherPid}
            end || _ <- lists:seq(1, 20)],
    [?assertMatch({true, true, _}, S) || S <- Seen],
    %% the other calls did spread over both members
    ?assertEqual(2, length(lists:usort([P || {_, _, P} <- Seen]))),
    ok = pyport:stop_pool(Pool).

owngil_mode() ->
    [{doc, "mode => owngil: the members are owngil contexts of one runtime (one OS "
      "process, a thread each), and calls spread over them."}].
owngil_mode(_Config) ->
    Pool = start(p_owngil, #{size => 2, mode => owngil}),
    {ok, #{mode := owngil, members := [#{os_pid := P}, #{os_pid := P}]}} =
        pyport:pool_info(Pool),
    Answers = lists:usort([who(Pool) || _ <- lists:seq(1, 20)]),
    ?assertMatch([{P, _}, {P, _}], Answers),
    ok = pyport:stop_pool(Pool).

owngil_max_requests_and_restart() ->
    [{doc, "An owngil pool with max_requests => 10: 200 calls from 2 processes all "
      "succeed while members are replaced by new contexts; after the runtime's OS "
      "process is killed and restarted, the pool finds its members again (by name) "
      "and serves."}].
owngil_max_requests_and_restart(_Config) ->
    Pool = start(p_owngil_max, #{size => 2, mode => owngil, max_requests => 10}),
    Self = self(),
    Callers = [spawn_link(fun() ->
                              Rs = [pyport:call(Pool, '__main__', who, []) || _ <- lists:seq(1, 100)],
                              Self ! {self(), Rs}
                          end) || _ <- [1, 2]],
    Results = lists:append([receive {C, Rs} -> Rs
        after 60000 -> ct:fail({no_message, ?LINE}) end || C <- Callers]),
    ?assertEqual([], [R || R <- Results, element(1, R) =/= ok]),
    {ok, #{replaced := Replaced, members := [#{os_pid := OsPid} | _]}} = pyport:pool_info(Pool),
    ct:log("200 calls, ~b replacements, ~b threads served",
           [Replaced, length(lists:usort([T || {ok, {_, T}} <- Results]))]),
    ?assert(Replaced >= 10),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    pyport_ct:wait_for(fun() ->
                           case members(Pool) of
                               [#{os_pid := P, status := up}, #{status := up}] when P =/= OsPid ->
                                   {ok, P};
                               Other ->
                                   {not_yet, Other}
                           end
                       end, 1000),
    ?assertEqual([{ok, 3} || _ <- lists:seq(1, 20)],
                 [pyport:call(Pool, operator, add, [1, 2]) || _ <- lists:seq(1, 20)]),
    ok = pyport:stop_pool(Pool).

auto_mode_owngil() ->
    [{doc, "mode => auto with a preload that runs in a sub-interpreter chooses owngil "
      "and says why."}].
auto_mode_owngil(_Config) ->
    Pool = start(p_auto, #{size => 2}),
    {ok, #{mode := owngil, mode_reason := Why}} = pyport:pool_info(Pool),
    ?assertEqual(<<"preload runs in a sub-interpreter">>, Why),
    ok = pyport:stop_pool(Pool).

auto_mode_main() ->
    [{doc, "mode => auto with a preload that a sub-interpreter refuses (readline, a "
      "single-phase init extension of the standard library): main members, one OS "
      "process each, and pool_info/1 gives the ImportError as the reason."}].
auto_mode_main(_Config) ->
    Pool = start(p_auto_main, #{size => 2, preload => <<"import readline\n", ?WHO/binary>>}),
    {ok, #{mode := main, mode_reason := Why, members := [#{os_pid := P1}, #{os_pid := P2}]}} =
        pyport:pool_info(Pool),
    ct:log("reason: ~ts", [Why]),
    ?assertMatch(<<"the preload fails in a sub-interpreter: ImportError", _/binary>>, Why),
    ?assertNotEqual(P1, P2),
    ?assertEqual({ok, true}, pyport:eval(Pool, <<"'readline' in __import__('sys').modules">>)),
    ok = pyport:stop_pool(Pool).

auto_mode_crash_checked_alone() ->
    [{doc, "mode => auto with a preload that crashes the runtime of two sub-interpreters "
      "(as `import readline` in two at once did now and then on CPython 3.12) and fails "
      "with an ImportError in one alone: the pool is main and the reason is the "
      "ImportError found alone, not the crash."}].
auto_mode_crash_checked_alone(Config) ->
    %% each sub-interpreter signs in with its process's pid; one that sees another of
    %% its process within 5 s crashes the process, one left alone raises ImportError; the main interpreter (main members)
    %% imports it
    File = io_lib:format("~p", [filename:join(?config(priv_dir, Config), "signed")]),
    Preload = iolist_to_binary(
                ["import os, signal, time\n"
                 "try:\n"
                 "    import _interpreters as interpreters\n"
                 "except ImportError:\n"
                 "    import _xxsubinterpreters as interpreters\n"
                 "me = interpreters.get_current()\n"
                 "if int(me[0] if isinstance(me, tuple) else me) != 0:\n"
                 "    with open(", File, ", 'a') as f:\n"
                 "        f.write(f'{os.getpid()}\\n')\n"
                 "    deadline = time.monotonic() + 5\n"
                 "    while time.monotonic() < deadline:\n"
                 "        with open(", File, ") as f:\n"
                 "            if f.read().split().count(str(os.getpid())) >= 2:\n"
                 "                os.kill(os.getpid(), signal.SIGSEGV)\n"
                 "        time.sleep(0.01)\n"
                 "    raise ImportError('alone, refused')\n"]),
    {ok, Pool} = pyport:start_pool(p_auto_crash, #{size => 2, preload => Preload}),
    {ok, #{mode := Mode, mode_reason := Why}} = pyport:pool_info(Pool),
    ok = pyport:stop_pool(Pool),
    ?assertEqual(main, Mode),
    ?assertEqual(<<"the preload fails in a sub-interpreter: ImportError: alone, refused">>,
                 Why).

member_crash_restarts_alone() ->
    [{doc, "A member whose OS process dies mid-call: that call gets "
      "{error, {runtime_down, _}}, every call another process makes meanwhile "
      "succeeds, and the pool is back to full size by itself with a new OS process."}].
member_crash_restarts_alone(_Config) ->
    Pool = start(p_crash, #{size => 2, mode => main,
                            restart => #{min_delay => 10, max_delay => 50}}),
    Crash = <<"def crash_soon():\n"
              "    import threading, ctypes, time\n"
              "    threading.Timer(0.3, ctypes.string_at, [0]).start()  # SIGSEGV\n"
              "    time.sleep(10)\n">>,
    [ok = pyport:exec(member_ctx(Pool, I), Crash) || I <- [1, 2]],
    Before = [P || #{os_pid := P} <- members(Pool)],
    Doomed = pyport:async_call(Pool, '__main__', crash_soon, []),
    _ = busy_member(Pool),
    %% one caller, one call at a time: the doomed member (one in flight) is never the
    %% least loaded, so every one of its calls must succeed, before, during and after
    %% (a second such caller could tie with the doomed call and be sent there)
    Self = self(),
    Caller = spawn_link(fun() -> Self ! {self(), call_until_stopped(Pool, [])} end),
    ?assertMatch({error, {runtime_down, _}}, pyport:await(Doomed, 10000)),
    Members = await_full(Pool),
    Caller ! stop,
    Results = receive {Caller, Rs} -> Rs after 60000 -> ct:fail({no_message, ?LINE}) end,
    ct:log("~b calls during the crash and the restart", [length(Results)]),
    ?assert(length(Results) > 0),
    ?assertEqual([], [R || R <- Results, element(1, R) =/= ok]),
    After = [P || #{os_pid := P} <- Members],
    ?assertEqual(1, length(After -- Before)),
    ?assertEqual(2, length(lists:usort(After))),
    ok = pyport:stop_pool(Pool).

call_until_stopped(Pool, Acc) ->
    receive
        stop -> Acc
    after 0 ->
        call_until_stopped(Pool, [pyport:call(Pool, operator, add, [1, 1]) | Acc])
    end.

max_requests_replaces() ->
    [{doc, "max_requests => 25 on 2 members: 400 calls from 4 processes all succeed, "
      "members are drained and replaced (new OS processes) along the way."}].
max_requests_waits_for_work() ->
    [{doc, "A member is replaced once what runs on it is done, whichever request "
      "reached max_requests (3, one member): a cast still running (its message "
      "arrives), a stream still producing (read to its end), a call with an env of "
      "the member (answered). After each, the next call is served by a new OS "
      "process."}].
max_requests_waits_for_work(_Config) ->
    Preload = <<?WHO/binary,
                "def late_send(p):\n"
                "    import erlang, time\n"
                "    time.sleep(0.3)\n"
                "    erlang.send(p, 'cast done')\n"
                "def slow_items(n):\n"
                "    import time\n"
                "    for i in range(n):\n"
                "        time.sleep(0.02)\n"
                "        yield i\n">>,
    Pool = start(p_max_work, #{size => 1, mode => main, max_requests => 3,
                               preload => Preload}),
    %% a cast is the last request: it runs 0.3 s after it is written
    {P1, _} = who(Pool),
    {P1, _} = who(Pool),
    ok = pyport:cast(Pool, '__main__', late_send, [self()]),
    receive <<"cast done">> -> ok after 10000 -> ct:fail(cast_lost) end,
    %% a stream is the last request: 20 items, 20 ms apart
    {P2, _} = who(Pool),
    ?assertNotEqual(P1, P2),
    {P2, _} = who(Pool),
    {ok, S} = pyport:stream(Pool, '__main__', slow_items, [20], #{}, #{window => 4}),
    ?assertEqual(lists:seq(0, 19), pyport_ct:stream_items(S)),
    %% a call with an env of the member is the last request
    {P3, _} = who(Pool),
    ?assertNotEqual(P2, P3),
    {ok, Env} = pyport:new_env(Pool),
    ?assertEqual({ok, none}, pyport:call(Pool, time, sleep, [0.3], #{}, #{env => Env})),
    {P4, _} = who(Pool),
    ?assertNotEqual(P3, P4),
    {ok, #{replaced := 3}} = pyport:pool_info(Pool),
    ok = pyport:stop_pool(Pool).

max_requests_replaces(_Config) ->
    Pool = start(p_max, #{size => 2, mode => main, max_requests => 25}),
    Self = self(),
    Callers = [spawn_link(fun() ->
                              Rs = [pyport:call(Pool, '__main__', who, [])
                                    || _ <- lists:seq(1, 100)],
                              Self ! {self(), Rs}
                          end) || _ <- [1, 2, 3, 4]],
    Results = lists:append([receive {C, Rs} -> Rs
        after 60000 -> ct:fail({no_message, ?LINE}) end || C <- Callers]),
    ?assertEqual([], [R || R <- Results, element(1, R) =/= ok]),
    OsPids = lists:usort([P || {ok, {P, _}} <- Results]),
    {ok, #{replaced := Replaced}} = pyport:pool_info(Pool),
    ct:log("400 calls: ~b OS processes served, ~b replacements", [length(OsPids), Replaced]),
    ?assert(Replaced >= 10),
    ?assert(length(OsPids) >= 10),
    ok = pyport:stop_pool(Pool).

options_on_every_member() ->
    [{doc, "path, env, max_memory and preload apply to every member: each member's OS "
      "process has the address-space bound max_memory sets (4 x 512 MiB + 4 GiB), "
      "which a pool without it lacks."}].
options_on_every_member(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "poolmods"),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    ok = file:write_file(filename:join(Dir, "poolmod.py"), <<"VALUE = 'from path'\n">>),
    Pool = start(p_opts, #{size => 2, mode => main, path => [Dir],
                           env => [{"POOL_VAR", "set"}], max_memory => 512 * 1024 * 1024}),
    [begin
         Ctx = member_ctx(Pool, I),
         ?assertEqual({ok, <<"from path">>}, pyport:eval(Ctx, <<"__import__('poolmod').VALUE">>)),
         ?assertEqual({ok, <<"set">>}, pyport:eval(Ctx, <<"__import__('os').environ['POOL_VAR']">>)),
         ?assertMatch({error, {python, <<"MemoryError">>, _, _}},
                      pyport:eval(Ctx, <<"len(bytearray(10**11))">>)),
         %% the preload ran there: `who' is defined in the member's own context
         {ok, {_, _}} = pyport:call(Ctx, '__main__', who, [])
     end || I <- [1, 2]],
    Bound = integer_to_list(4 * 512 * 1024 * 1024 + (4 bsl 30)),
    ?assertEqual([Bound, Bound], [address_space(P) || #{os_pid := P} <- members(Pool)]),
    ok = pyport:stop_pool(Pool),
    Plain = start(p_opts_plain, #{size => 1, mode => main}),
    ?assertEqual(["unlimited"], [address_space(P) || #{os_pid := P} <- members(Plain)]),
    ok = pyport:stop_pool(Plain).

%% The soft `Max address space' limit of an OS process, as /proc shows it.
address_space(OsPid) ->
    {ok, Limits} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/limits"),
    [Line] = [L || L <- string:split(Limits, "\n", all),
                   string:prefix(L, "Max address space") =/= nomatch],
    [_, _, _, Soft | _] = string:lexemes(Line, " "),
    binary_to_list(Soft).

child_spec_in_own_tree() ->
    [{doc, "pyport_pool:child_spec/1 runs a pool under the user's supervisor; "
      "pyport:pool/1 gives its handle."}].
child_spec_in_own_tree(_Config) ->
    Spec = pyport_pool:child_spec(#{name => p_tree, size => 1, mode => owngil}),
    {ok, Sup} = supervisor:start_link(?MODULE, {own_tree, Spec}),
    unlink(Sup),
    {ok, Pool} = pyport:pool(p_tree),
    ?assertEqual({ok, 3}, pyport:call(Pool, operator, add, [1, 2])),
    Mref = erlang:monitor(process, Sup),
    exit(Sup, shutdown),
    receive {'DOWN', Mref, _, _, _} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end,
    ?assertEqual({error, not_found}, pyport:pool(p_tree)).

%% The user's own supervisor of child_spec_in_own_tree.
init({own_tree, Spec}) ->
    {ok, {#{strategy => one_for_one}, [Spec]}}.

bad_options() ->
    [{doc, "A bad mode or a preload that fails in main mode too: start_pool/2 says why."}].
bad_options(_Config) ->
    ?assertEqual({error, {bad_option, {mode, sideways}}},
                 pyport:start_pool(p_bad, #{mode => sideways})),
    {error, Reason} = pyport:start_pool(p_bad, #{mode => auto, preload => <<"1/0">>}),
    ?assertMatch({context_error, _, _}, Reason),
    ?assertEqual({error, not_found}, pyport:pool(p_bad)).

cpu_scales_like_processes() ->
    [{doc, "CPU-bound pure Python on a 2-member main pool: two calls at once against "
      "one, next to the same for two plain CPython processes in the same round, 9 "
      "rounds. This shared 2-core host often lends its second core away for a while "
      "(single rounds of either side range from 1.0 to 2.3, in runs of low ones), so "
      "the case looks at what the good rounds reach: in at least 3 of the 9 the pool's "
      "speedup is 1.5 or more, where one GIL for both gives about 1.0 in every round. "
      "When the control itself does not reach 1.5 in 3 rounds, the host had no second "
      "core to give and the case is skipped, saying so. The numbers are logged; "
      "`make bench' has the careful ones."}].
cpu_scales_like_processes(_Config) ->
    cpu_scales(p_cpu, main).

owngil_cpu_scales_like_processes() ->
    [{doc, "The same with mode => owngil: the members' interpreters each have their own "
      "GIL, so two calls at once run in parallel inside one OS process."}].
owngil_cpu_scales_like_processes(_Config) ->
    cpu_scales(p_cpu_owngil, owngil).

cpu_scales(Name, Mode) ->
    Pool = start(Name, #{size => 2, mode => Mode}),
    N = 3000000,
    Python = binary_to_list(embedded_python()),
    Code = "x=0\nfor i in range(" ++ integer_to_list(N) ++ "):\n    x+=i\n",
    Rounds = [begin
                  PoolOne = timed(fun() -> {ok, _} = pyport:call(Pool, '__main__', spin, [N]) end),
                  PoolTwo = timed(fun() -> parallel(2, fun() ->
                                      {ok, _} = pyport:call(Pool, '__main__', spin, [N])
                                  end) end),
                  CtlOne = timed(fun() -> run_python(Python, Code) end),
                  CtlTwo = timed(fun() -> parallel(2, fun() -> run_python(Python, Code) end) end),
                  {2 * PoolOne / PoolTwo, 2 * CtlOne / CtlTwo}
              end || _ <- lists:seq(1, 9)],
    ct:log("speedup of 2 calls at once (pool, two CPython processes): ~p", [Rounds]),
    ok = pyport:stop_pool(Pool),
    PoolSpeedup = third_best([P || {P, _} <- Rounds]),
    case third_best([C || {_, C} <- Rounds]) of
        Control when Control < 1.5 ->
            {skip, {no_second_core_free, {control_speedup, Control}}};
        _ ->
            ?assert(PoolSpeedup >= 1.5)
    end.

timed(Fun) ->
    T0 = erlang:monotonic_time(microsecond),
    _ = Fun(),
    erlang:monotonic_time(microsecond) - T0.

parallel(K, Fun) ->
    Self = self(),
    Pids = [spawn_link(fun() -> Fun(), Self ! {done, self()} end) || _ <- lists:seq(1, K)],
    [receive {done, P} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end || P <- Pids].

run_python(Python, Code) ->
    Port = open_port({spawn_executable, Python}, [{args, ["-c", Code]}, exit_status]),
    receive {Port, {exit_status, 0}} -> ok after 60000 -> ct:fail({no_message, ?LINE}) end.

%% the third highest: what a third of the rounds reach
third_best(Xs) ->
    lists:nth(3, lists:reverse(lists:sort(Xs))).

numpy_in_main_pool_and_auto_mode() ->
    [{doc, "A venv with numpy from the package index (made once, cached outside the "
      "repo): mode => auto with preload `import numpy' picks main because numpy refuses "
      "sub-interpreters, says so in pool_info/1, and numpy calls work on every member; "
      "max_memory (1 GiB) makes an 80 GB numpy array a MemoryError on each member."}].
numpy_in_main_pool_and_auto_mode(_Config) ->
    case numpy_venv() of
        {ok, Venv} ->
            {ok, Pool} = pyport:start_pool(p_numpy, #{size => 2, venv => Venv,
                                                      max_memory => 1024 * 1024 * 1024,
                                                      preload => <<"import numpy\n">>}),
            {ok, #{mode := main, mode_reason := Why}} = pyport:pool_info(Pool),
            ct:log("auto chose main: ~ts", [Why]),
            ?assertNotEqual(nomatch, binary:match(Why, <<"subinterpreters">>)),
            [?assertEqual({ok, 285}, pyport:eval(member_ctx(Pool, I),
                                                 <<"int(numpy.arange(10).dot(numpy.arange(10)))">>))
             || I <- [1, 2]],
            %% max_memory holds for numpy's allocations too: 80 GB is refused, and the
            %% member serves on
            [begin
                 {error, {python, Type, _, _}} =
                     pyport:eval(member_ctx(Pool, I), <<"numpy.ones(10**10).sum()">>),
                 ?assertNotEqual(nomatch, binary:match(Type, <<"MemoryError">>)),
                 ?assertEqual({ok, 3.0}, pyport:eval(member_ctx(Pool, I), <<"float(numpy.ones(3).sum())">>))
             end || I <- [1, 2]],
            ok = pyport:stop_pool(Pool);
        {skip, _} = Skip ->
            Skip
    end.

%% A venv of the Python the port program embeds, with numpy, cached outside the repo.
numpy_venv() ->
    Python = embedded_python(),
    {ok, Tag} = pyport:eval(<<"'%d.%d.%d' % __import__('sys').version_info[:3]">>),
    Cache = filename:join([os:getenv("HOME"), ".cache", "pyport",
                           "venv-numpy-" ++ binary_to_list(Tag)]),
    Marker = filename:join(Cache, "pyport-ready"),
    case filelib:is_regular(Marker) of
        true ->
            {ok, Cache};
        false ->
            {Status, Out} = pyport_ct:shell("/tmp", "rm -rf " ++ Cache ++ " && "
                                            ++ binary_to_list(Python)
                                            ++ " -m venv " ++ Cache ++ " && " ++ Cache
                                            ++ "/bin/pip install -q numpy && touch " ++ Marker),
            case Status of
                0 -> {ok, Cache};
                _ -> {skip, {numpy_not_installable, lists:sublist(Out, 500)}}
            end
    end.

%% The python3 executable of the CPython the port program embeds.
embedded_python() ->
    {ok, Python} = pyport:eval(<<"__import__('sysconfig').get_config_var('BINDIR') + '/python3'">>),
    Python.

is_os_pid_alive(OsPid) ->
    os:cmd("kill -0 " ++ integer_to_list(OsPid) ++ " 2>/dev/null && echo yes") =:= "yes\n".

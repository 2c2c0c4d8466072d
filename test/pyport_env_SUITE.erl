%% @doc Process-local environments: new_env/1, drop_env/1 and `#{env => Env}'.
-module(pyport_env_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_env_rt).
-define(CYCLES, 10000).
-define(WORKERS, 8).
%% bytes each env of the owner-exit cycles holds: a leak of them all is ~100 MiB
-define(ENV_BYTES, 10000).
-define(MAX_GROWTH_KIB, 20 * 1024).

all() ->
    [separate_globals, name_error_across_envs, exec_function_called_with_env,
     eval_locals_with_env, env_wrong_context, env_of_other_runtime, drop_env,
     env_used_by_other_process, freed_on_owner_exit, freed_on_owner_exit_10000_cycles,
     env_after_context_stopped, env_after_runtime_restart, envs_see_preload,
     envs_see_pool_preload].

init_per_suite(Config) ->
    ok = pyport_ct:start_runtime_ab(?RUNTIME, #{}),
    Config.

end_per_suite(_Config) ->
    _ = pyport:stop_runtime(?RUNTIME),
    pyport_ct:stop_app().

init_per_testcase(_Case, Config) ->
    pyport_ct:contexts_ab(?RUNTIME, Config).

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

%%% Cases

separate_globals() ->
    [{doc, "Each env is its own globals namespace, apart from __main__ and from each "
           "other."}].
separate_globals(Config) ->
    Ctx = ?config(a, Config),
    {ok, E1} = pyport:new_env(Ctx),
    {ok, E2} = pyport:new_env(Ctx),
    ?assertNotEqual(E1, E2),
    ok = pyport:exec(Ctx, <<"x = 1">>, #{env => E1}),
    ok = pyport:exec(Ctx, <<"x = 2">>, #{env => E2}),
    ok = pyport:exec(Ctx, <<"x = 3">>),
    ?assertEqual({ok, 1}, pyport:eval(Ctx, <<"x">>, #{}, #{env => E1})),
    ?assertEqual({ok, 2}, pyport:eval(Ctx, <<"x">>, #{}, #{env => E2})),
    ?assertEqual({ok, 3}, pyport:eval(Ctx, <<"x">>)),
    ok = pyport:exec(Ctx, <<"x += 10">>, #{env => E1}),
    ?assertEqual({ok, 11}, pyport:eval(Ctx, <<"x">>, #{}, #{env => E1})),
    ?assertEqual({ok, 2}, pyport:eval(Ctx, <<"x">>, #{}, #{env => E2})),
    %% imports are per env too, but modules are shared by the interpreter
    ok = pyport:exec(Ctx, <<"import json">>, #{env => E1}),
    ?assertEqual({ok, <<"[1]">>}, pyport:eval(Ctx, <<"json.dumps([1])">>, #{}, #{env => E1})),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:eval(Ctx, <<"json">>, #{}, #{env => E2})),
    ok = pyport:exec(Ctx, <<"del x">>),
    ok = pyport:drop_env(E1),
    ok = pyport:drop_env(E2).

name_error_across_envs() ->
    [{doc, "A name defined in one env is a NameError in another and in __main__."}].
name_error_across_envs(Config) ->
    Ctx = ?config(a, Config),
    {ok, E1} = pyport:new_env(Ctx),
    {ok, E2} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"only_in_e1 = 5">>, #{env => E1}),
    ?assertEqual({ok, 5}, pyport:eval(Ctx, <<"only_in_e1">>, #{}, #{env => E1})),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:eval(Ctx, <<"only_in_e1">>, #{}, #{env => E2})),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:eval(Ctx, <<"only_in_e1">>)),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:exec(Ctx, <<"print(only_in_e1)">>, #{env => E2})),
    ok = pyport:drop_env(E1),
    ok = pyport:drop_env(E2).

exec_function_called_with_env() ->
    [{doc, "A function defined with exec in an env is callable with call(Ctx, "
           "'__main__', Name, ...) and that env; other envs do not see it."}].
exec_function_called_with_env(Config) ->
    Ctx = ?config(a, Config),
    {ok, E1} = pyport:new_env(Ctx),
    {ok, E2} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"factor = 3\ndef scale(x):\n    return factor * x\n">>,
                     #{env => E1}),
    ok = pyport:exec(Ctx, <<"factor = 5\ndef scale(x):\n    return -factor * x\n">>,
                     #{env => E2}),
    ?assertEqual({ok, 6}, pyport:call(Ctx, '__main__', scale, [2], #{}, #{env => E1})),
    ?assertEqual({ok, -10}, pyport:call(Ctx, '__main__', scale, [2], #{}, #{env => E2})),
    ?assertEqual({ok, 9}, pyport:call(Ctx, <<"__main__">>, <<"scale">>, [], #{x => 3},
                                      #{env => E1})),
    {ok, E3} = pyport:new_env(Ctx),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:call(Ctx, '__main__', scale, [2], #{}, #{env => E3})),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:call(Ctx, '__main__', scale, [2])),
    %% ordinary modules are the same with or without an env
    ?assertEqual({ok, 3}, pyport:call(Ctx, operator, add, [1, 2], #{}, #{env => E3})),
    [ok = pyport:drop_env(E) || E <- [E1, E2, E3]].

eval_locals_with_env() ->
    [{doc, "eval with locals and an env sees both; locals do not leak into the env."}].
eval_locals_with_env(Config) ->
    Ctx = ?config(a, Config),
    {ok, Env} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"base = 100">>, #{env => Env}),
    ?assertEqual({ok, 105}, pyport:eval(Ctx, <<"base + y">>, #{y => 5}, #{env => Env})),
    ?assertMatch({error, {python, <<"NameError">>, _, _}},
                 pyport:eval(Ctx, <<"y">>, #{}, #{env => Env})),
    ok = pyport:drop_env(Env).

env_wrong_context() ->
    [{doc, "An env used with another context of the same runtime, or a term that is "
           "no env, gives {error, {env_wrong_context, Env}} without reaching Python."}].
env_wrong_context(Config) ->
    A = ?config(a, Config),
    B = ?config(b, Config),
    {ok, Env} = pyport:new_env(A),
    ?assertEqual({error, {env_wrong_context, Env}},
                 pyport:eval(B, <<"1">>, #{}, #{env => Env})),
    ?assertEqual({error, {env_wrong_context, Env}},
                 pyport:exec(B, <<"x = 1">>, #{env => Env})),
    ?assertEqual({error, {env_wrong_context, Env}},
                 pyport:call(B, operator, add, [1, 2], #{}, #{env => Env})),
    ?assertEqual({error, {env_wrong_context, not_an_env}},
                 pyport:eval(A, <<"1">>, #{}, #{env => not_an_env})),
    ?assertEqual({ok, 1}, pyport:eval(A, <<"1">>, #{}, #{env => Env})),
    ok = pyport:drop_env(Env).

env_of_other_runtime() ->
    [{doc, "An env used with a context of another runtime (even one with the same "
           "context id) gives {error, {env_wrong_context, Env}}."}].
env_of_other_runtime(Config) ->
    A = ?config(a, Config),
    {ok, Pid} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, OtherA} = pyport:context(Pid, a),
    {ok, Env} = pyport:new_env(OtherA),
    ?assertEqual({error, {env_wrong_context, Env}}, pyport:eval(A, <<"1">>, #{}, #{env => Env})),
    ok = pyport:stop_runtime(Pid),
    %% its runtime is gone: dropping it is still fine
    ?assertEqual(ok, pyport:drop_env(Env)).

drop_env() ->
    [{doc, "After drop_env/1 the env gives {error, not_found}; dropping again is ok."}].
drop_env(Config) ->
    Ctx = ?config(a, Config),
    {ok, Env} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"v = 1">>, #{env => Env}),
    ?assertEqual(ok, pyport:drop_env(Env)),
    ?assertEqual({error, not_found}, pyport:eval(Ctx, <<"1">>, #{}, #{env => Env})),
    ?assertEqual({error, not_found}, pyport:exec(Ctx, <<"v = 2">>, #{env => Env})),
    ?assertEqual({error, not_found}, pyport:call(Ctx, operator, add, [1, 2], #{}, #{env => Env})),
    ?assertEqual(ok, pyport:drop_env(Env)),
    %% and the owner forgot it
    ?assertEqual(0, owned_envs()).

env_used_by_other_process() ->
    [{doc, "Another process may use (and drop) an env while its owner lives."}].
env_used_by_other_process(Config) ->
    Ctx = ?config(a, Config),
    {ok, Env} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"shared = 'yes'">>, #{env => Env}),
    Self = self(),
    Pid = spawn_link(fun() ->
                         Self ! {used, self(), pyport:eval(Ctx, <<"shared">>, #{}, #{env => Env})},
                         Self ! {dropped, self(), pyport:drop_env(Env)}
                     end),
    receive {used, Pid, Used} -> ?assertEqual({ok, <<"yes">>}, Used)
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    receive {dropped, Pid, Dropped} -> ?assertEqual(ok, Dropped)
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    ?assertEqual({error, not_found}, pyport:eval(Ctx, <<"shared">>, #{}, #{env => Env})),
    %% the other process told the owner: no order with this process's messages
    pyport_ct:wait_for(fun() -> case owned_envs() of 0 -> {ok, 0}; N -> N end end, 500).

freed_on_owner_exit() ->
    [{doc, "An env is freed when the process that created it exits."}].
freed_on_owner_exit(Config) ->
    Ctx = ?config(a, Config),
    Self = self(),
    {Pid, Mref} = spawn_monitor(fun() ->
                                    {ok, Env} = pyport:new_env(Ctx),
                                    ok = pyport:exec(Ctx, <<"kept = 1">>, #{env => Env}),
                                    Self ! {env, self(), Env}
                                end),
    Env = receive {env, Pid, E} -> E after 60000 -> ct:fail({no_message, ?LINE}) end,
    receive {'DOWN', Mref, process, Pid, normal} -> ok
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    pyport_ct:wait_for(fun() ->
                           case pyport:eval(Ctx, <<"kept">>, #{}, #{env => Env}) of
                               {error, not_found} -> {ok, freed};
                               Other -> {not_yet, Other}
                           end
                       end, 500),
    ?assertEqual(0, owned_envs()).

freed_on_owner_exit_10000_cycles() ->
    [{doc, "10,000 processes each create an env holding 10 kB and exit: the runtime "
           "frees them all, so its resident size stays flat (< 20 MiB growth)."}].
freed_on_owner_exit_10000_cycles(_Config) ->
    {ok, Pid} = pyport:start_runtime(#{contexts => [#{name => a}]}),
    {ok, Ctx} = pyport:context(Pid, a),
    OsPid = pyport_ct:os_pid(Pid),
    %% warm up allocators and code paths before the first measurement
    run_cycles(Ctx, 500),
    settle(Pid, Ctx),
    Before = pyport_ct:rss_kib(OsPid),
    {Us, ok} = timer:tc(fun() -> run_cycles(Ctx, ?CYCLES) end),
    settle(Pid, Ctx),
    After = pyport_ct:rss_kib(OsPid),
    ct:log("~p cycles in ~p ms; RSS ~p KiB -> ~p KiB (~p KiB growth)",
           [?CYCLES, Us div 1000, Before, After, After - Before]),
    ok = pyport:stop_runtime(Pid),
    ?assert(After - Before < ?MAX_GROWTH_KIB).

env_after_context_stopped() ->
    [{doc, "Stopping a context forgets the envs in it; using one gives an error."}].
env_after_context_stopped(_Config) ->
    {ok, Ctx} = pyport:new_context(?RUNTIME, #{}),
    {ok, Env} = pyport:new_env(Ctx),
    ?assertEqual(1, owned_envs()),
    ok = pyport:stop_context(Ctx),
    ?assertEqual(0, owned_envs()),
    ?assertMatch({error, {context_down, _}}, pyport:eval(Ctx, <<"1">>, #{}, #{env => Env})),
    ?assertEqual(ok, pyport:drop_env(Env)).

env_after_runtime_restart() ->
    [{doc, "After its runtime restarted (same key, same context id) an env gives "
           "{error, not_found}, never an env someone made in the new runtime."}].
env_after_runtime_restart(_Config) ->
    Name = pyport_env_restart_rt,
    {ok, _} = pyport:start_runtime(#{name => Name, contexts => [#{name => a}]}),
    {ok, Ctx} = pyport:context(Name, a),
    {ok, Env} = pyport:new_env(Ctx),
    ok = pyport:exec(Ctx, <<"mine = 1">>, #{env => Env}),
    _ = pyport_ct:kill_and_await_restart(Name),
    Theirs = [begin {ok, E} = pyport:new_env(Ctx), E end || _ <- lists:seq(1, 5)],
    [ok = pyport:exec(Ctx, <<"theirs = 1">>, #{env => E}) || E <- Theirs],
    ?assertEqual({error, not_found}, pyport:eval(Ctx, <<"1">>, #{}, #{env => Env})),
    ?assertEqual(ok, pyport:drop_env(Env)),
    [?assertEqual({ok, 1}, pyport:eval(Ctx, <<"theirs">>, #{}, #{env => E})) || E <- Theirs],
    ok = pyport:stop_runtime(Name).

%%% Helpers

%% ?CYCLES processes over ?WORKERS workers: each creates an env, fills it, and exits.
run_cycles(Ctx, Cycles) ->
    Self = self(),
    Code = iolist_to_binary(["data = bytes(", integer_to_list(?ENV_BYTES), ")"]),
    Workers = [spawn_link(fun() ->
                              [cycle(Ctx, Code) || _ <- lists:seq(1, Cycles div ?WORKERS)],
                              Self ! {cycles_done, self()}
                          end) || _ <- lists:seq(1, ?WORKERS)],
    [receive {cycles_done, W} -> ok
        after 60000 -> ct:fail({no_message, ?LINE}) end || W <- Workers],
    ok.

cycle(Ctx, Code) ->
    {Pid, Mref} = spawn_monitor(fun() ->
                                    {ok, Env} = pyport:new_env(Ctx),
                                    ok = pyport:exec(Ctx, Code, #{env => Env})
                                end),
    receive {'DOWN', Mref, process, Pid, Reason} -> normal = Reason
        after 60000 -> ct:fail({no_message, ?LINE}) end.

%% Waits until the runtime owner has freed everything (it tracks nothing any more),
%% then makes a round trip through the context, which runs after the frees.
settle(Runtime, Ctx) ->
    pyport_ct:wait_for(fun() ->
                           case pyport:info(Runtime) of
                               {ok, #{owned := #{processes := 0, envs := 0}}} -> {ok, done};
                               Other -> {not_yet, Other}
                           end
                       end, 1000),
    {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]),
    ok.

owned_envs() ->
    {ok, #{owned := #{envs := N}}} = pyport:info(?RUNTIME),
    N.

envs_see_preload() ->
    [{doc, "A new env starts with a copy of the names the context's preload bound in "
           "__main__ (both modes): a module it imported, a value it rebound; a name an "
           "env rebinds stays in that env; what exec adds to __main__ later is not in a "
           "new env; without a preload an env has only its builtins."}].
envs_see_preload(_Config) ->
    Preload = <<"import json\ndata = {'n': 1}\n__doc__ = 'preloaded'">>,
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => o, mode => owngil, preload => Preload},
                                                   #{name => m, mode => main, preload => Preload},
                                                   #{name => plain, mode => owngil}]}),
    try
        lists:foreach(
          fun(Name) ->
              {ok, Ctx} = pyport:context(Rt, Name),
              {ok, E1} = pyport:new_env(Ctx),
              ?assertEqual({ok, <<"{\"n\": 1}">>},
                           pyport:eval(Ctx, <<"json.dumps(data)">>, #{}, #{env => E1})),
              ?assertEqual({ok, <<"preloaded">>}, pyport:eval(Ctx, <<"__doc__">>, #{}, #{env => E1})),
              ?assertEqual({ok, <<"__main__">>}, pyport:eval(Ctx, <<"__name__">>, #{}, #{env => E1})),
              %% rebinding in an env is the env's; the objects are shared
              ok = pyport:exec(Ctx, <<"json = None\ndata['m'] = 2">>, #{env => E1}),
              ?assertEqual({ok, <<"json">>}, pyport:eval(Ctx, <<"json.__name__">>)),
              {ok, E2} = pyport:new_env(Ctx),
              ?assertEqual({ok, #{<<"n">> => 1, <<"m">> => 2}},
                           pyport:eval(Ctx, <<"data">>, #{}, #{env => E2})),
              ?assertEqual({ok, <<"json">>}, pyport:eval(Ctx, <<"json.__name__">>, #{}, #{env => E2})),
              %% only the preload's names, not what __main__ gets later
              ok = pyport:exec(Ctx, <<"later = 1">>),
              {ok, E3} = pyport:new_env(Ctx),
              ?assertMatch({error, {python, <<"NameError">>, _, _}},
                           pyport:eval(Ctx, <<"later">>, #{}, #{env => E3}))
          end, [o, m]),
        {ok, Plain} = pyport:context(Rt, plain),
        {ok, E} = pyport:new_env(Plain),
        ?assertEqual({ok, [<<"__builtins__">>, <<"__name__">>]},
                     pyport:eval(Plain, <<"sorted(globals())">>, #{}, #{env => E}))
    after
        ok = pyport:stop_runtime(Rt)
    end.

envs_see_pool_preload() ->
    [{doc, "Issue 20's snippet: an env of a pool sees the module the pool's preload "
           "imported (pools of both modes)."}].
envs_see_pool_preload(_Config) ->
    lists:foreach(
      fun(Mode) ->
          Name = list_to_atom("env_preload_" ++ atom_to_list(Mode)),
          {ok, Pool} = pyport:start_pool(Name, #{mode => Mode, size => 2,
                                                 preload => <<"import json">>}),
          try
              {ok, E} = pyport:new_env(Pool),
              ok = pyport:exec(Pool, <<"a = json.dumps([1, 2])">>, #{env => E}),
              ?assertEqual({ok, <<"[1, 2]">>}, pyport:eval(Pool, <<"a">>, #{}, #{env => E}))
          after
              ok = pyport:stop_pool(Pool)
          end
      end, [main, owngil]).

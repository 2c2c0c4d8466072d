%% @doc Guarantees where features meet (issue 17): options are checked, stops wait
%% for the OS process, a call leaves nothing in the mailbox, the atom budget outlives
%% crashes, a re-opened channel closes the old handle.
-module(pyport_contract_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [unknown_call_option, unknown_runtime_option, unknown_context_option,
     unknown_pool_option, venv_that_does_not_exist, valid_options_still_work,
     context_where_the_module_goes, stop_runtime_waits_for_the_os_process,
     stop_pool_waits_for_the_os_processes, no_down_left_after_the_reply,
     atom_budget_across_restarts, pool_splits_the_atom_budget,
     reopened_channel_closes_the_old_handle].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}, #{name => m, mode => main}]}),
    {ok, Ctx} = pyport:context(Rt, a),
    [{rt, Rt}, {ctx, Ctx} | Config].

end_per_suite(Config) ->
    _ = pyport:stop_runtime(?config(rt, Config)),
    pyport_ct:stop_app().

%%% Options

unknown_call_option() ->
    [{doc, "A misspelt key in a request's Opts is {error, {bad_option, Key}} at once, "
      "and the request does not run: call, eval, exec, async_call, stream, "
      "channel_open, and on a pool."}].
unknown_call_option(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:exec(Ctx, <<"ran = 0">>),
    ?assertEqual({error, {bad_option, timout}},
                 pyport:call(Ctx, time, sleep, [1], #{}, #{timout => 100})),
    ?assertEqual({error, {bad_option, timout}},
                 pyport:exec(Ctx, <<"ran += 1">>, #{timout => 100})),
    ?assertEqual({error, {bad_option, timout}},
                 pyport:eval(Ctx, <<"1">>, #{}, #{timeout => 100, timout => 100})),
    ?assertEqual({error, {bad_option, retrun}},
                 pyport:await(pyport:async_call(Ctx, builtins, exec, [<<"ran += 1">>], #{},
                                                #{retrun => ref}), 5000)),
    ?assertEqual({error, {bad_option, windw}},
                 pyport:stream(Ctx, builtins, range, [3], #{}, #{windw => 2})),
    ?assertEqual({error, {bad_option, capacty}},
                 pyport:channel_open(Ctx, q, #{capacty => 2})),
    ?assertEqual({ok, 0}, pyport:eval(Ctx, <<"ran">>)),
    {ok, Pool} = pyport:start_pool(contract_opts, #{size => 1, mode => owngil}),
    try
        ?assertEqual({error, {bad_option, timout}},
                     pyport:call(Pool, operator, add, [1, 2], #{}, #{timout => 100})),
        {ok, #{members := [#{requests := 0}]}} = pyport:pool_info(Pool)
    after
        pyport:stop_pool(Pool)
    end,
    pyport_ct:assert_no_messages().

unknown_runtime_option() ->
    [{doc, "A runtime's Opts with an unknown key: {error, {bad_option, Key}} from "
      "start_runtime/1 and pyport_runtime:start_link/1."}].
unknown_runtime_option(_Config) ->
    ?assertEqual({error, {bad_option, call_timout}},
                 pyport:start_runtime(#{call_timout => 100})),
    process_flag(trap_exit, true),
    ?assertEqual({error, {bad_option, stuck_afterr}},
                 pyport_runtime:start_link(#{stuck_afterr => 100})),
    process_flag(trap_exit, false),
    pyport_ct:assert_no_messages().

unknown_context_option() ->
    [{doc, "A context spec with an unknown key: {error, {bad_option, Key}} from "
      "new_context/2 and from start_runtime/1 (in `contexts')."}].
unknown_context_option(Config) ->
    ?assertEqual({error, {bad_option, preloaded}},
                 pyport:new_context(?config(rt, Config), #{preloaded => <<"x = 1">>})),
    ?assertEqual({error, {bad_option, mod}},
                 pyport:start_runtime(#{contexts => [#{name => a, mod => main}]})).

unknown_pool_option() ->
    [{doc, "A pool's Opts with an unknown key (or a key only a runtime has, which the "
      "pool sets itself): {error, {bad_option, Key}}."}].
unknown_pool_option(_Config) ->
    ?assertEqual({error, {bad_option, sise}}, pyport:start_pool(contract_p, #{sise => 2})),
    ?assertEqual({error, {bad_option, contexts}},
                 pyport:start_pool(contract_p, #{contexts => []})),
    ?assertEqual({error, not_found}, pyport:pool(contract_p)).

venv_that_does_not_exist() ->
    [{doc, "A venv that does not exist (or has no lib/python*/site-packages) is "
      "{error, {bad_option, {venv, Dir}}} at start, for a runtime and a pool."}].
venv_that_does_not_exist(Config) ->
    Missing = "/nonexistent/pyport-venv",
    ?assertEqual({error, {bad_option, {venv, Missing}}},
                 pyport:start_runtime(#{venv => Missing})),
    Empty = ?config(priv_dir, Config),
    ?assertEqual({error, {bad_option, {venv, Empty}}}, pyport:start_runtime(#{venv => Empty})),
    ?assertEqual({error, {bad_option, {venv, Missing}}},
                 pyport:start_pool(contract_v, #{venv => Missing})).

valid_options_still_work() ->
    [{doc, "Every documented key of call, stream, channel, runtime, context and pool "
      "Opts is accepted."}].
valid_options_still_work(Config) ->
    Ctx = ?config(ctx, Config),
    {ok, Env} = pyport:new_env(Ctx),
    {ok, Ref} = pyport:eval(Ctx, <<"[1]">>, #{}, #{timeout => 5000, env => Env,
                                                  return => ref}),
    ?assertEqual({ok, [1]}, pyport:to_term(Ref)),
    ?assertEqual({ok, 3}, pyport:call(Ctx, operator, add, [1, 2], #{},
                                      #{timeout => infinity, return => term})),
    ?assertEqual({ok, 3}, pyport:await(pyport:async_call(Ctx, operator, add, [1, 2], #{},
                                                         #{timeout => 5000}))),
    {ok, S} = pyport:stream(Ctx, builtins, range, [3], #{}, #{window => 2, timeout => 5000}),
    ?assertEqual([0, 1, 2], pyport_ct:stream_items(S)),
    {ok, Chan} = pyport:channel_open(Ctx, valid, #{capacity => 2}),
    ok = pyport:channel_close(Chan),
    Dir = ?config(priv_dir, Config),
    Venv = filename:join([Dir, "venv", "lib", "python3.13", "site-packages"]),
    ok = filelib:ensure_dir(filename:join(Venv, "x")),
    {ok, Rt} = pyport:start_runtime(
                 #{executable => executable(), path => [Dir], venv => filename:join(Dir, "venv"),
                   env => [{"PYPORT_CONTRACT", "1"}], call_timeout => 5000,
                   start_timeout => 20000, max_frame => 1 bsl 20, queue_capacity => 100,
                   stuck_after => 1000, max_memory => 1 bsl 32, max_atoms => 10,
                   max_reply => 1 bsl 20, max_mailbox => 100, none => none,
                   restart => #{min_delay => 10, max_delay => 100},
                   contexts => [#{name => c, mode => owngil, preload => <<"x = 1">>,
                                  path => [Dir]}]}),
    {ok, C} = pyport:context(Rt, c),
    ?assertEqual({ok, 1}, pyport:eval(C, <<"x">>)),
    ok = pyport:stop_runtime(Rt),
    {ok, Pool} = pyport:start_pool(contract_valid,
                                   #{size => 1, mode => main, preload => <<"y = 2">>,
                                     max_requests => 10, drain_timeout => 1000,
                                     nodes => [node()], call_timeout => 5000}),
    ?assertEqual({ok, 2}, pyport:eval(Pool, <<"y">>)),
    ok = pyport:stop_pool(Pool).

context_where_the_module_goes() ->
    [{doc, "pyport:call(Ctx, len, Args) (a context where call/3 takes the module) and "
      "the like answer {error, {bad_request, What}}, never a function_clause."}].
context_where_the_module_goes(Config) ->
    Ctx = ?config(ctx, Config),
    ?assertEqual({error, {bad_request, module}}, pyport:call(Ctx, len, [[1, 2]])),
    ?assertEqual({error, {bad_request, args}}, pyport:call(Ctx, builtins, len, not_a_list)),
    ?assertEqual({error, {bad_request, module}}, pyport:call(Ctx, 42, len, [[1]])),
    ?assertEqual({error, {bad_request, ctx}}, pyport:call(builtins, len, [[1]], #{})),
    ?assertEqual({error, {bad_request, ctx}}, pyport:call(not_a_ctx, m, f, [])),
    ?assertEqual({error, {bad_request, kwargs}}, pyport:call(Ctx, m, f, [], [], #{})),
    ?assertEqual({error, {bad_request, opts}}, pyport:call(Ctx, m, f, [], #{}, [])),
    ?assertEqual({error, {bad_request, code}}, pyport:eval(Ctx)),
    ?assertEqual({error, {bad_request, ctx}}, pyport:eval(<<"1">>, #{})),
    ?assertEqual({error, {bad_request, locals}}, pyport:eval(Ctx, <<"1">>, [])),
    ?assertEqual({error, {bad_request, ctx}}, pyport:exec(<<"x = 1">>, #{})),
    ?assertEqual({error, {bad_request, code}}, pyport:exec(Ctx, 42)),
    ?assertEqual({error, {bad_request, ctx}}, pyport:new_env(not_a_ctx)),
    ?assertEqual({error, {bad_request, ctx}}, pyport:stop_context(not_a_ctx)),
    ?assertEqual({error, {bad_request, ctx}}, pyport:interrupt(not_a_ctx)),
    ?assertEqual({error, {bad_request, ctx}}, pyport:channel_open(not_a_ctx, q, #{})),
    ?assertEqual({error, {bad_request, ref}}, pyport:getattr(Ctx, real)),
    ?assertEqual({error, {bad_request, ref}}, pyport:call_method(Ctx, m, [])),
    ?assertEqual({error, {bad_request, ref}}, pyport:to_term(Ctx)),
    ?assertEqual({error, {bad_request, ref}}, pyport:release(Ctx)),
    ?assertEqual({error, {bad_request, env}}, pyport:drop_env(Ctx)),
    ?assertEqual({error, {bad_request, channel}}, pyport:channel_send(Ctx, x)),
    ?assertEqual({error, {bad_request, channel}}, pyport:channel_close(Ctx)),
    pyport_ct:assert_no_messages().

%%% Stops

stop_runtime_waits_for_the_os_process() ->
    [{doc, "stop_runtime/1 returns once the OS process is gone, also while a request "
      "is blocked in C (a 30 s select(2) on a pipe nobody writes): it is killed after "
      "a bounded grace."}].
stop_runtime_waits_for_the_os_process(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => c}]}),
    {ok, Ctx} = pyport:context(Rt, c),
    OsPid = pyport_ct:os_pid(Rt),
    block_in_c(Ctx),
    ok = pyport:stop_runtime(Rt),
    ?assertNot(os_process_exists(OsPid)).

stop_pool_waits_for_the_os_processes() ->
    [{doc, "stop_pool/1 returns once its members' OS processes are gone, one of them "
      "blocked in C."}].
stop_pool_waits_for_the_os_processes(_Config) ->
    {ok, Pool} = pyport:start_pool(contract_stop, #{size => 2, mode => main}),
    {ok, #{members := Members}} = pyport:pool_info(Pool),
    OsPids = [P || #{os_pid := P} <- Members],
    ?assertEqual(2, length(lists:usort(OsPids))),
    [#{context := Ctx} | _] = Members,
    block_in_c(Ctx),
    ok = pyport:stop_pool(Pool),
    ?assertEqual([], [P || P <- OsPids, os_process_exists(P)]).

%% A cast that blocks the context in C for 30 s (select(2) on a pipe nobody writes:
%% no interrupt reaches it; ctypes would not import in an owngil context on 3.12);
%% returns once it is about to.
block_in_c(Ctx) ->
    Self = self(),
    Tag = make_ref(),
    ok = pyport:exec(Ctx, <<"import os, select, erlang\n"
                            "def block(pid, tag):\n"
                            "    r, w = os.pipe()\n"
                            "    erlang.send(pid, tag)\n"
                            "    select.select([r], [], [], 30)\n">>),
    ok = pyport:cast(Ctx, '__main__', block, [Self, Tag]),
    receive Tag -> ok after 10000 -> ct:fail(not_blocking) end.

os_process_exists(OsPid) ->
    filelib:is_dir("/proc/" ++ integer_to_list(OsPid)).

%%% The caller's mailbox

no_down_left_after_the_reply() ->
    [{doc, "A call whose runtime exits right after replying (the 'DOWN' of its monitor "
      "queued behind the reply) leaves nothing in the caller's mailbox."}].
no_down_left_after_the_reply(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => c}],
                                      restart => #{min_delay => 10}}),
    {ok, Ctx} = pyport:context(Rt, c),
    OsPid = pyport_ct:os_pid(Rt),
    Self = self(),
    ok = pyport:register_function(contract_hold, fun() ->
                                                        Self ! {holding, self()},
                                                        receive go -> ok end
                                                end),
    {Caller, Mref} =
        spawn_monitor(fun() ->
                          Reply = pyport:call(Ctx, erlang, call, [<<"contract_hold">>]),
                          exit({Reply, erlang:process_info(self(), messages)})
                      end),
    Holder = receive {holding, H} -> H after 10000 -> ct:fail(no_callback) end,
    %% the caller cannot take the reply until both it and the 'DOWN' are queued
    [{_, Owner, _, _, _}] = ets:lookup(pyport_runtimes, runtime_key(Rt)),
    OwnerMref = erlang:monitor(process, Owner),
    true = erlang:suspend_process(Caller),
    Holder ! go,
    pyport_ct:wait_for(fun() -> queued(Caller, 1) end, 500),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    receive {'DOWN', OwnerMref, process, Owner, _} -> ok after 10000 -> ct:fail(alive) end,
    true = erlang:resume_process(Caller),
    receive
        {'DOWN', Mref, process, Caller, Result} ->
            ?assertEqual({{ok, ok}, {messages, []}}, Result)
    after 10000 ->
        ct:fail(caller_stuck)
    end,
    ok = pyport:unregister_function(contract_hold),
    ok = pyport:stop_runtime(Rt).

runtime_key(Rt) ->
    [Key] = [K || [K] <- ets:match(pyport_runtimes, {{pid, Rt}, '$1'})],
    Key.

queued(Pid, N) ->
    case erlang:process_info(Pid, message_queue_len) of
        {message_queue_len, Len} when Len >= N -> {ok, Len};
        Other -> Other
    end.

%%% The atom budget

atom_budget_across_restarts() ->
    [{doc, "max_atoms => 100 is the runtime's budget over its life: 20 rounds of "
      "'return 100 new atoms, then os._exit(3)' make at most 100 atoms in the node."}].
atom_budget_across_restarts(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => c}], max_atoms => 100,
                                      restart => #{min_delay => 1, max_delay => 1}}),
    {ok, Ctx} = pyport:context(Rt, c),
    Prefix = "contract_" ++ integer_to_list(erlang:unique_integer([positive])) ++ "_",
    Before = erlang:system_info(atom_count),
    Replies = [atom_round(Rt, Ctx, Prefix, Round) || Round <- lists:seq(1, 20)],
    Grown = erlang:system_info(atom_count) - Before,
    Made = [N || Round <- lists:seq(1, 20), I <- lists:seq(1, 100),
                 N <- [list_to_binary(Prefix ++ integer_to_list(Round * 1000 + I))],
                 exists(N)],
    ct:log("atom table grew by ~b; names made: ~b", [Grown, length(Made)]),
    ?assertEqual(100, length(Made)),
    ?assertMatch([{ok, [_ | _]} | _], Replies),
    ?assertEqual([{error, {bad_term, {atom_limit, 100}}}], lists:usort(tl(Replies))),
    {ok, #{atoms_spent := 100, max_atoms := 100}} = pyport:info(Rt),
    ok = pyport:stop_runtime(Rt).

%% Asks for 100 new atoms, then crashes the OS process and waits for the next one.
atom_round(Rt, Ctx, Prefix, Round) ->
    Code = iolist_to_binary(["[erlang.atom('", Prefix, "%d' % (", integer_to_list(Round),
                             " * 1000 + i)) for i in range(1, 101)]"]),
    ok = pyport:exec(Ctx, <<"import erlang">>),
    Reply = pyport:eval(Ctx, Code),
    OsPid = pyport_ct:os_pid(Rt),
    ok = pyport:cast(Ctx, os, '_exit', [3]),
    _ = pyport_ct:await_new_os_pid(Rt, OsPid),
    Reply.

exists(Name) ->
    try binary_to_existing_atom(Name, utf8) of
        _ -> true
    catch
        error:badarg -> false
    end.

pool_splits_the_atom_budget() ->
    [{doc, "A main-mode pool's max_atoms is shared out among its members (each its "
      "own runtime), so they do not multiply it: 3 members of max_atoms => 10 get "
      "4, 3 and 3."}].
pool_splits_the_atom_budget(_Config) ->
    {ok, Pool} = pyport:start_pool(contract_atoms, #{size => 3, mode => main,
                                                     max_atoms => 10}),
    try
        {ok, #{members := Members}} = pyport:pool_info(Pool),
        Budgets = [begin
                       {ok, #{max_atoms := Max}} = pyport:info(member_runtime(Key)),
                       Max
                   end || #{runtime := Key} <- Members],
        ?assertEqual([4, 3, 3], Budgets)
    after
        pyport:stop_pool(Pool)
    end.

%% The handle of a pool member's runtime (its key is not a registered name).
member_runtime(Key) ->
    [Pid] = [P || [P] <- ets:match(pyport_runtimes, {{pid, '$1'}, Key})],
    Pid.

%%% Channels

reopened_channel_closes_the_old_handle() ->
    [{doc, "channel_open of a name already open: the first handle answers "
      "{error, closed} from then on (never ok for an item that is dropped, never "
      "busy); items sent before are still taken by a reader of the first channel."}].
reopened_channel_closes_the_old_handle(Config) ->
    Ctx = ?config(ctx, Config),
    {ok, First} = pyport:channel_open(Ctx, q, #{capacity => 5}),
    ok = pyport:exec(Ctx, <<"import erlang\nold = erlang.channel('q')">>),
    ok = pyport:channel_send(First, before),
    {ok, Second} = pyport:channel_open(Ctx, q, #{capacity => 5}),
    ?assertEqual([{error, closed} || _ <- lists:seq(1, 10)],
                 [pyport:channel_send(First, I) || I <- lists:seq(1, 10)]),
    ok = pyport:channel_send(Second, 'after'),
    ?assertEqual({ok, [before, 'after']},
                 pyport:eval(Ctx, <<"[old.receive(timeout=5), "
                                    "erlang.channel('q').receive(timeout=5)]">>)),
    ok = pyport:channel_close(Second).

executable() ->
    case os:getenv("PYPORT_EXECUTABLE") of
        Exe when is_list(Exe), Exe =/= "" -> Exe;
        _ -> filename:join(code:priv_dir(pyport), "pyport")
    end.

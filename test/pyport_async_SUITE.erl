%% @doc Asynchronous calls: async_call/4,5,6, await/1,2 and cast/4.
-module(pyport_async_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_async_rt).
-define(HELPERS, <<"import erlang, time\n"
                   "def nap(s, v):\n"
                   "    time.sleep(s)\n"
                   "    return v\n"
                   "def me():\n"
                   "    return erlang.self()\n"
                   "def tell(pid, msg):\n"
                   "    erlang.send(pid, msg)\n"
                   "class Box:\n"
                   "    def __init__(self, v): self.v = v\n">>).

all() ->
    [result_message, await_result, calls_run_in_parallel, self_is_the_caller,
     await_timeout_leaves_call_running, handle_owned_by_caller, cast_runs, cast_error_logged].

init_per_suite(Config) ->
    ok = pyport_ct:start_runtime_ab(?RUNTIME, #{preload => ?HELPERS}),
    Config.

end_per_suite(_Config) ->
    _ = pyport:stop_runtime(?RUNTIME),
    pyport_ct:stop_app().

init_per_testcase(_Case, Config) ->
    pyport_ct:contexts_ab(?RUNTIME, Config).

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

%%% Cases

result_message() ->
    [{doc, "async_call returns a reference; the result arrives as {pyport, Ref, Result}."}].
result_message(Config) ->
    Ref = pyport:async_call(?config(a, Config), operator, add, [1, 2]),
    ?assert(is_reference(Ref)),
    ?assertEqual({ok, 3}, receive {pyport, Ref, R} -> R
        after 60000 -> ct:fail({no_message, ?LINE}) end).

await_result() ->
    [{doc, "await/1 returns the result, errors included, as call/6 would."}].
await_result(Config) ->
    A = ?config(a, Config),
    ?assertEqual({ok, 5}, pyport:await(pyport:async_call(A, operator, add, [2, 3], #{}))),
    ?assertMatch({error, {python, <<"ZeroDivisionError">>, _, _}},
                 pyport:await(pyport:async_call(A, operator, truediv, [1, 0]))).

calls_run_in_parallel() ->
    [{doc, "Calls started on two contexts run at the same time (0.5 s naps each)."}].
calls_run_in_parallel(Config) ->
    {Us, Results} =
        timer:tc(fun() ->
                     Refs = [pyport:async_call(?config(C, Config), '__main__', nap, [0.5, C])
                             || C <- [a, b]],
                     [pyport:await(R) || R <- Refs]
                 end),
    ?assertEqual([{ok, a}, {ok, b}], Results),
    %% serially it would take 1 s
    ?assert(Us < 900000).

self_is_the_caller() ->
    [{doc, "erlang.self() in code started by async_call is the calling process."}].
self_is_the_caller(Config) ->
    Self = self(),
    ?assertEqual({ok, Self}, pyport:await(pyport:async_call(?config(a, Config), '__main__', me, []))).

await_timeout_leaves_call_running() ->
    [{doc, "await/2 may give up; the call goes on and its result message still comes."}].
await_timeout_leaves_call_running(Config) ->
    Ref = pyport:async_call(?config(a, Config), '__main__', nap, [0.3, done]),
    ?assertEqual({error, timeout}, pyport:await(Ref, 10)),
    ?assertEqual({ok, done}, pyport:await(Ref)).

handle_owned_by_caller() ->
    [{doc, "A handle returned by async_call with return => ref belongs to the caller, "
           "not to the short-lived process that waited for the reply."}].
handle_owned_by_caller(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = pyport:await(pyport:async_call(A, '__main__', 'Box', [7], #{},
                                               #{return => ref})),
    %% the waiting process has exited by now; the handle still works
    ?assertEqual({ok, 7}, pyport:getattr(Ref, v)),
    ok = pyport:release(Ref).

cast_runs() ->
    [{doc, "cast/4 returns ok at once and the call runs (it tells this process)."}].
cast_runs(Config) ->
    Self = self(),
    ?assertEqual(ok, pyport:cast(?config(a, Config), '__main__', tell, [Self, hello])),
    ?assertEqual(hello, receive hello -> hello after 5000 -> timeout end).

cast_error_logged() ->
    [{doc, "A cast that fails is logged (domain [pyport, python]), nobody gets a reply."}].
cast_error_logged(Config) ->
    pyport_ct:forward_logs(),
    try
        ok = pyport:cast(?config(a, Config), operator, truediv, [1, 0]),
        Msg = receive {pyport_log, warning, M} -> M after 5000 -> ct:fail(no_log) end,
        ?assertNotEqual(nomatch, binary:match(Msg, <<"ZeroDivisionError">>))
    after
        pyport_ct:stop_forwarding_logs()
    end.

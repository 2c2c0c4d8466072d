%% @doc Object handles: `return => ref', getattr, call_method, to_term, release, and
%% handles passed back as arguments.
-module(pyport_ref_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_ref_rt).

%% Boxes count themselves in a WeakSet, so a case can see that Python freed them.
-define(HELPERS, <<"
import gc
import weakref

alive = weakref.WeakSet()

class Box:
    def __init__(self, v):
        self.v = v
        self.inner = Inner(v)
        alive.add(self)

    def get(self, k=1, extra=0):
        return self.v * k + extra

    def add(self, other):
        return self.v + other.v

    def me(self):
        return self

class Inner:
    def __init__(self, v):
        self.w = v + 1

def n_alive():
    gc.collect()
    return len(alive)

def is_box(x):
    return isinstance(x, Box)

def same(a, b):
    return a is b

def boxes(n):
    return [Box(i) for i in range(n)]
">>).

all() ->
    [return_ref_call, return_ref_eval, getattr, call_method, call_method_kwargs,
     return_ref_from_getattr_and_call_method, to_term, handle_as_argument,
     handle_in_nested_arguments, handle_to_other_context, handle_to_other_runtime,
     release, released_handle_errors, freed_on_owner_exit, many_freed_on_owner_exit,
     handle_used_by_other_process, handle_after_context_stopped,
     handle_after_runtime_restart].

init_per_suite(Config) ->
    ok = pyport_ct:start_runtime_ab(?RUNTIME, #{preload => ?HELPERS}),
    Config.

end_per_suite(_Config) ->
    _ = pyport:stop_runtime(?RUNTIME),
    pyport_ct:stop_app().

init_per_testcase(_Case, Config) ->
    pyport_ct:contexts_ab(?RUNTIME, Config).

%% Every case releases what it made: no Box is left alive in either context.
end_per_testcase(_Case, Config) ->
    [?assertEqual({ok, 0}, pyport:call(?config(C, Config), '__main__', n_alive, []))
     || C <- [a, b]],
    pyport_ct:assert_no_messages().

%%% Cases

return_ref_call() ->
    [{doc, "call with return => ref answers {ok, {pyport_ref, Key, CtxId, RefId, Node}}."}].
return_ref_call(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    ?assertMatch({pyport_ref, _, _, RefId, Home} when is_integer(RefId) andalso node(Home) =:= node(), Ref),
    ?assertEqual({ok, 1}, n_alive(Ctx)),
    ok = pyport:release(Ref),
    ?assertEqual({ok, 0}, n_alive(Ctx)).

return_ref_eval() ->
    [{doc, "eval with return => ref."}].
return_ref_eval(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = pyport:eval(Ctx, <<"Box(x)">>, #{x => 7}, #{return => ref}),
    ?assertEqual({ok, 7}, pyport:getattr(Ref, v)),
    %% a convertible value is still a handle when asked for one
    {ok, ListRef} = pyport:eval(Ctx, <<"[1, 2, 3]">>, #{}, #{return => ref}),
    ?assertMatch({pyport_ref, _, _, _, _}, ListRef),
    ?assertEqual({ok, 3}, pyport:call_method(ListRef, '__len__', [])),
    ok = pyport:release(Ref),
    ok = pyport:release(ListRef).

getattr() ->
    [{doc, "getattr/2 converts the attribute; a missing one is an AttributeError."}].
getattr(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    ?assertEqual({ok, 5}, pyport:getattr(Ref, v)),
    ?assertEqual({ok, 5}, pyport:getattr(Ref, <<"v">>)),
    ?assertMatch({error, {python, <<"AttributeError">>, _, _}}, pyport:getattr(Ref, nope)),
    %% an attribute with no Erlang form
    ?assertMatch({error, {bad_term, _}}, pyport:getattr(Ref, inner)),
    ok = pyport:release(Ref).

call_method() ->
    [{doc, "call_method/3 calls a method with positional arguments."}].
call_method(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    ?assertEqual({ok, 5}, pyport:call_method(Ref, get, [])),
    ?assertEqual({ok, 15}, pyport:call_method(Ref, get, [3])),
    ?assertEqual({ok, 17}, pyport:call_method(Ref, <<"get">>, [3, 2])),
    ?assertMatch({error, {python, <<"TypeError">>, _, _}},
                 pyport:call_method(Ref, get, [1, 2, 3, 4])),
    ?assertMatch({error, {python, <<"AttributeError">>, _, _}},
                 pyport:call_method(Ref, nope, [])),
    ok = pyport:release(Ref).

call_method_kwargs() ->
    [{doc, "call_method/4 passes keyword arguments."}].
call_method_kwargs(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    ?assertEqual({ok, 10}, pyport:call_method(Ref, get, [], #{k => 2})),
    ?assertEqual({ok, 11}, pyport:call_method(Ref, get, [2], #{<<"extra">> => 1})),
    ok = pyport:release(Ref).

return_ref_from_getattr_and_call_method() ->
    [{doc, "getattr/3 and call_method/5 with return => ref give handles too."}].
return_ref_from_getattr_and_call_method(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    {ok, Inner} = pyport:getattr(Ref, inner, #{return => ref}),
    ?assertEqual({ok, 6}, pyport:getattr(Inner, w)),
    {ok, Me} = pyport:call_method(Ref, me, [], #{}, #{return => ref}),
    ?assertEqual({ok, true}, pyport:call(Ctx, '__main__', same, [Ref, Me])),
    [ok = pyport:release(R) || R <- [Inner, Me, Ref]].

to_term() ->
    [{doc, "to_term/1 converts the object, or says why it cannot."}].
to_term(Config) ->
    Ctx = ?config(a, Config),
    {ok, ListRef} = pyport:eval(Ctx, <<"[1, 'two', {'three': 3.0}]">>, #{}, #{return => ref}),
    ?assertEqual({ok, [1, <<"two">>, #{<<"three">> => 3.0}]}, pyport:to_term(ListRef)),
    {ok, Ref} = box(Ctx, 5),
    ?assertMatch({error, {bad_term, _}}, pyport:to_term(Ref)),
    ok = pyport:release(ListRef),
    ok = pyport:release(Ref).

handle_as_argument() ->
    [{doc, "A handle passed as an argument to its own context is the object itself."}].
handle_as_argument(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    {ok, Other} = box(Ctx, 6),
    ?assertEqual({ok, true}, pyport:call(Ctx, '__main__', is_box, [Ref])),
    ?assertEqual({ok, true}, pyport:call(Ctx, '__main__', same, [Ref, Ref])),
    ?assertEqual({ok, false}, pyport:call(Ctx, '__main__', same, [Ref, Other])),
    ?assertEqual({ok, 11}, pyport:call_method(Ref, add, [Other])),
    ?assertEqual({ok, 5}, pyport:eval(Ctx, <<"b.v">>, #{b => Ref})),
    %% in keyword arguments too
    ?assertEqual({ok, true}, pyport:call(Ctx, '__main__', same, [], #{a => Ref, b => Ref})),
    [ok = pyport:release(R) || R <- [Ref, Other]].

handle_in_nested_arguments() ->
    [{doc, "Handles inside lists, tuples and maps of arguments are the objects too."}].
handle_in_nested_arguments(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    ?assertEqual({ok, [true, true, true]},
                 pyport:eval(Ctx, <<"[isinstance(x, Box) for x in (l[0], t[1], m['k'])]">>,
                             #{l => [Ref], t => {0, Ref}, m => #{<<"k">> => Ref}})),
    ?assertEqual({ok, true}, pyport:eval(Ctx, <<"l[0] is l[1]">>, #{l => [Ref, Ref]})),
    ok = pyport:release(Ref).

handle_to_other_context() ->
    [{doc, "A handle sent to another context is {error, {bad_term, "
           "{ref_wrong_context, CtxId}}}."}].
handle_to_other_context(Config) ->
    A = ?config(a, Config),
    B = ?config(b, Config),
    {ok, Ref} = box(A, 5),
    {pyport_ref, _, CtxId, _, _} = Ref,
    ?assertEqual({error, {bad_term, {ref_wrong_context, CtxId}}},
                 pyport:call(B, '__main__', is_box, [Ref])),
    ?assertEqual({error, {bad_term, {ref_wrong_context, CtxId}}},
                 pyport:eval(B, <<"x">>, #{x => [Ref]})),
    %% it still works where it belongs
    ?assertEqual({ok, true}, pyport:call(A, '__main__', is_box, [Ref])),
    ok = pyport:release(Ref).

handle_to_other_runtime() ->
    [{doc, "A handle sent to a context of another runtime that has the same context "
           "id is an error, never some other object of that runtime."}].
handle_to_other_runtime(Config) ->
    A = ?config(a, Config),
    {ok, Ref} = box(A, 5),
    {ok, Pid} = pyport:start_runtime(#{contexts => [#{name => a, preload => ?HELPERS}]}),
    {ok, OtherA} = pyport:context(Pid, a),
    %% that runtime has live objects of its own (ids start at a random base per
    %% context, so they cannot be Ref's)
    Theirs = [begin {ok, T} = box(OtherA, I), T end || I <- lists:seq(1, 10)],
    Result = pyport:call(OtherA, '__main__', is_box, [Ref]),
    ct:log("handle ~p of another runtime: ~p", [Ref, Result]),
    ok = pyport:stop_runtime(Pid),
    ok = pyport:release(Ref),
    [ok = pyport:release(T) || T <- Theirs],
    ?assertMatch({error, {bad_term, _}}, Result).

release() ->
    [{doc, "release/1 frees the object; releasing again is ok."}].
release(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    ?assertEqual({ok, 1}, n_alive(Ctx)),
    ?assertEqual(ok, pyport:release(Ref)),
    ?assertEqual({ok, 0}, n_alive(Ctx)),
    ?assertEqual(ok, pyport:release(Ref)),
    ?assertEqual(0, owned_refs()).

released_handle_errors() ->
    [{doc, "A released handle gives clean errors: {error, not_found} for its own "
           "operations, {bad_term, {ref_not_found, RefId}} as an argument."}].
released_handle_errors(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    {pyport_ref, _, _, RefId, _} = Ref,
    ok = pyport:release(Ref),
    ?assertEqual({error, not_found}, pyport:getattr(Ref, v)),
    ?assertEqual({error, not_found}, pyport:call_method(Ref, get, [])),
    ?assertEqual({error, not_found}, pyport:call_method(Ref, get, [], #{k => 1})),
    ?assertEqual({error, not_found}, pyport:to_term(Ref)),
    ?assertEqual({error, {bad_term, {ref_not_found, RefId}}},
                 pyport:call(Ctx, '__main__', is_box, [Ref])),
    ?assertEqual({ok, 3}, pyport:call(Ctx, operator, add, [1, 2])).

freed_on_owner_exit() ->
    [{doc, "A handle is freed when the process that made it exits."}].
freed_on_owner_exit(Config) ->
    Ctx = ?config(a, Config),
    Self = self(),
    {Pid, Mref} = spawn_monitor(fun() ->
                                    {ok, Ref} = box(Ctx, 5),
                                    Self ! {ref, self(), Ref}
                                end),
    Ref = receive {ref, Pid, R} -> R after 60000 -> ct:fail({no_message, ?LINE}) end,
    receive {'DOWN', Mref, process, Pid, normal} -> ok
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    pyport_ct:wait_for(fun() ->
                           case pyport:getattr(Ref, v) of
                               {error, not_found} -> {ok, freed};
                               Other -> {not_yet, Other}
                           end
                       end, 500),
    ?assertEqual({ok, 0}, n_alive(Ctx)),
    ?assertEqual(0, owned_refs()).

many_freed_on_owner_exit() ->
    [{doc, "All 1000 handles of a process are freed when it exits."}].
many_freed_on_owner_exit(Config) ->
    Ctx = ?config(a, Config),
    {Pid, Mref} = spawn_monitor(fun() -> [{ok, _} = box(Ctx, I) || I <- lists:seq(1, 1000)] end),
    receive {'DOWN', Mref, process, Pid, normal} -> ok
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    pyport_ct:wait_for(fun() ->
                           case n_alive(Ctx) of
                               {ok, 0} -> {ok, freed};
                               Other -> {not_yet, Other}
                           end
                       end, 500),
    ?assertEqual(0, owned_refs()).

handle_used_by_other_process() ->
    [{doc, "Another process may use and release a handle while its owner lives."}].
handle_used_by_other_process(Config) ->
    Ctx = ?config(a, Config),
    {ok, Ref} = box(Ctx, 5),
    Self = self(),
    Pid = spawn_link(fun() ->
                         Self ! {used, self(), pyport:call_method(Ref, get, [2])},
                         Self ! {released, self(), pyport:release(Ref)}
                     end),
    receive {used, Pid, Used} -> ?assertEqual({ok, 10}, Used)
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    receive {released, Pid, Released} -> ?assertEqual(ok, Released)
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    ?assertEqual({error, not_found}, pyport:getattr(Ref, v)),
    pyport_ct:wait_for(fun() -> case owned_refs() of 0 -> {ok, 0}; N -> N end end, 500).

handle_after_context_stopped() ->
    [{doc, "Stopping a context forgets its handles; using one is an error."}].
handle_after_context_stopped(_Config) ->
    {ok, Ctx} = pyport:new_context(?RUNTIME, #{preload => ?HELPERS}),
    {ok, Ref} = box(Ctx, 1),
    ?assertEqual(1, owned_refs()),
    ok = pyport:stop_context(Ctx),
    ?assertEqual(0, owned_refs()),
    ?assertMatch({error, {context_down, _}}, pyport:getattr(Ref, v)),
    ?assertEqual(ok, pyport:release(Ref)).

handle_after_runtime_restart() ->
    [{doc, "After its runtime restarted (same key, same context id) a handle gives an "
           "error, never an object someone made in the new runtime."}].
handle_after_runtime_restart(_Config) ->
    Name = pyport_ref_restart_rt,
    {ok, _} = pyport:start_runtime(#{name => Name, contexts => [#{name => a, preload => ?HELPERS}]}),
    {ok, Ctx} = pyport:context(Name, a),
    {ok, Ref} = box(Ctx, 5),
    _ = pyport_ct:kill_and_await_restart(Name),
    %% the new runtime has live objects of its own (ids start at a random base)
    Theirs = [begin {ok, T} = box(Ctx, 100 + I), T end || I <- lists:seq(1, 10)],
    Results = [pyport:getattr(Ref, v), pyport:call(Ctx, '__main__', is_box, [Ref])],
    ct:log("handle ~p after a restart: ~p", [Ref, Results]),
    [ok = pyport:release(T) || T <- Theirs],
    ok = pyport:stop_runtime(Name),
    ?assertMatch([{error, not_found}, {error, {bad_term, _}}], Results).

%%% Helpers

box(Ctx, V) ->
    pyport:call(Ctx, '__main__', 'Box', [V], #{}, #{return => ref}).

n_alive(Ctx) ->
    pyport:call(Ctx, '__main__', n_alive, []).

owned_refs() ->
    {ok, #{owned := #{refs := N}}} = pyport:info(?RUNTIME),
    N.

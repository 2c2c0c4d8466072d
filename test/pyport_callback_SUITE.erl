%% @doc Python calling Erlang: erlang.call (registered functions), erlang.send,
%% erlang.self, erlang.whereis, erlang.atom and the Pid/Ref/Atom types.
-module(pyport_callback_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% Defined in every case's context.
-define(HELPERS, <<"
import erlang

def attempt(name, *args):
    try:
        return ('ok', erlang.call(name, *args))
    except erlang.Error as e:
        return ('error', e.args[0])

def down(n):
    if n > 0:
        return erlang.call('pyport_ct_down', n - 1) + 1
    return 0

def from_threads(threads, calls):
    import threading
    out = [None] * threads
    def work(i):
        out[i] = [erlang.call('pyport_ct_double', i * 1000 + j) for j in range(calls)]
    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out

def from_pool(n):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda i: erlang.call('pyport_ct_double', i), range(n)))

def tagged(tag, n):
    return [erlang.call('pyport_ct_tag', tag, i) for i in range(n)]

def burst(n):
    me = erlang.self()
    for i in range(n):
        erlang.send(me, ('burst', i))
    return n

def selves():
    before = erlang.self()
    inner = erlang.call('pyport_ct_inner_self')
    after = erlang.self()
    return (before, inner, after)

async def async_double(x):
    return await erlang.async_call('pyport_ct_double', x)
">>).

all() ->
    [register_unregister, call_returns_results, module_function_pair, callback_errors,
     uncaught_callback_error, reentrant_50_deep, callbacks_from_threads,
     callbacks_from_thread_pool, async_call, callbacks_from_two_contexts,
     callback_never_returns, callback_during_preload, send_to_self_in_order,
     send_to_registered_name, self_is_caller, self_in_nested_calls, whereis,
     atom_round_trip, types_hashable_and_comparable].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_testcase(_Case, Config) ->
    {ok, Ctx} = pyport:new_context(pyport, #{preload => ?HELPERS}),
    [{ctx, Ctx} | Config].

end_per_testcase(_Case, Config) ->
    ok = pyport:stop_context(?config(ctx, Config)),
    [ok = pyport:unregister_function(Name) || [Name] <- ets:match(pyport_functions,
                                                                   {'$1', '_'})],
    ok.

%%% Cases

register_unregister() ->
    [{doc, "register_function/2 makes a fun callable by name (atom or binary, stored "
           "as a binary); registering again replaces it; unregister_function/1 removes "
           "it."}].
register_unregister(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_echo, fun(X) -> X end),
    ?assertEqual({ok, [<<"ok">>, 42]}, attempt(Ctx, <<"pyport_ct_echo">>, [42])),
    ?assertMatch([{<<"pyport_ct_echo">>, _}], ets:lookup(pyport_functions,
                                                         <<"pyport_ct_echo">>)),
    ok = pyport:register_function(<<"pyport_ct_echo">>, fun(X) -> {X, X} end),
    ?assertEqual({ok, [<<"ok">>, [1, 1]]}, attempt(Ctx, <<"pyport_ct_echo">>, [1])),
    ok = pyport:register_function("pyport_ct_string_name", fun() -> 7 end),
    ?assertEqual({ok, [<<"ok">>, 7]}, attempt(Ctx, <<"pyport_ct_string_name">>, [])),
    ok = pyport:unregister_function(pyport_ct_echo),
    ?assertEqual({ok, [<<"error">>, [not_registered, <<"pyport_ct_echo">>]]},
                 attempt(Ctx, <<"pyport_ct_echo">>, [1])),
    ok = pyport:unregister_function(pyport_ct_echo),
    ?assertError(function_clause, pyport:register_function(x, not_a_function)).

call_returns_results() ->
    [{doc, "erlang.call passes its arguments to the fun (arity = number of arguments) "
           "and returns the converted result."}].
call_returns_results(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_none, fun() -> nothing_here end),
    ok = pyport:register_function(pyport_ct_add, fun(A, B) -> A + B end),
    ok = pyport:register_function(pyport_ct_info,
                                  fun(Map, List, Bin) ->
                                      #{keys => lists:sort(maps:keys(Map)),
                                        length => length(List),
                                        size => byte_size(Bin),
                                        tuple => {1, 2.5, <<"x">>},
                                        big => 1 bsl 100}
                                  end),
    ?assertEqual({ok, nothing_here}, pyport:eval(Ctx, <<"erlang.call('pyport_ct_none')">>)),
    ?assertEqual({ok, 5}, pyport:eval(Ctx, <<"erlang.call('pyport_ct_add', 2, 3)">>)),
    ?assertEqual({ok, true},
                 pyport:eval(Ctx, <<"erlang.call('pyport_ct_info', {'a': 1, 'b': 2}, [1, 2, 3],"
                                    " b'\\x00\\xff') == {'keys': ['a', 'b'], 'length': 3,"
                                    " 'size': 2, 'tuple': (1, 2.5, 'x'), 'big': 2 ** 100}">>)).

module_function_pair() ->
    [{doc, "A {Module, Function} pair is applied to the arguments."}].
module_function_pair(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_reverse, {lists, reverse}),
    ok = pyport:register_function(pyport_ct_max, {erlang, max}),
    ?assertEqual({ok, [3, 2, 1]}, pyport:eval(Ctx, <<"erlang.call('pyport_ct_reverse', [1, 2, 3])">>)),
    ?assertEqual({ok, 9}, pyport:eval(Ctx, <<"erlang.call('pyport_ct_max', 4, 9)">>)).

callback_errors() ->
    [{doc, "A failing callback raises erlang.Error carrying the Erlang reason: unknown "
           "name, error, throw, exit, wrong arity, undefined function."}].
callback_errors(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_error, fun() -> error(boom) end),
    ok = pyport:register_function(pyport_ct_throw, fun() -> throw({thrown, 1}) end),
    ok = pyport:register_function(pyport_ct_exit, fun() -> exit(bye) end),
    ok = pyport:register_function(pyport_ct_one, fun(X) -> X end),
    ok = pyport:register_function(pyport_ct_undef, {pyport_ct_no_such_module, f}),
    ?assertEqual({ok, [<<"error">>, [not_registered, <<"pyport_ct_nobody">>]]},
                 attempt(Ctx, <<"pyport_ct_nobody">>, [])),
    ?assertEqual({ok, [<<"error">>, [error, boom]]}, attempt(Ctx, <<"pyport_ct_error">>, [])),
    ?assertEqual({ok, [<<"error">>, [throw, [thrown, 1]]]},
                 attempt(Ctx, <<"pyport_ct_throw">>, [])),
    ?assertEqual({ok, [<<"error">>, [exit, bye]]}, attempt(Ctx, <<"pyport_ct_exit">>, [])),
    ?assertMatch({ok, [<<"error">>, [error, [badarity | _]]]},
                 attempt(Ctx, <<"pyport_ct_one">>, [1, 2])),
    ?assertEqual({ok, [<<"error">>, [error, undef]]}, attempt(Ctx, <<"pyport_ct_undef">>, [])),
    %% the runtime and the context are fine
    ?assertEqual({ok, [<<"ok">>, 3]}, attempt(Ctx, <<"pyport_ct_one">>, [3])).

uncaught_callback_error() ->
    [{doc, "An erlang.Error nobody catches is the reply's {python, <<\"erlang.Error\">>, "
           "Message, Traceback}, the message showing the reason."}].
uncaught_callback_error(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_error, fun() -> error(boom) end),
    {error, {python, Type, Message, _Tb}} = pyport:eval(Ctx, <<"erlang.call('pyport_ct_error')">>),
    ?assertEqual(<<"erlang.Error">>, Type),
    ?assertMatch({_, _}, binary:match(Message, <<"boom">>)).

reentrant_50_deep() ->
    [{doc, "Python -> Erlang -> Python into the same context, 50 levels deep."}].
reentrant_50_deep(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_down,
                                  fun(N) ->
                                      {ok, R} = pyport:call(Ctx, '__main__', down, [N]),
                                      R
                                  end),
    ?assertEqual({ok, 50}, pyport:call(Ctx, '__main__', down, [50])),
    %% and the context is still in order afterwards
    ?assertEqual({ok, 3}, pyport:call(Ctx, '__main__', down, [3])),
    ?assertEqual({ok, 3}, pyport:call(Ctx, operator, add, [1, 2])).

callbacks_from_threads() ->
    [{doc, "erlang.call from threading.Thread threads of the interpreter."}].
callbacks_from_threads(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_double, fun(X) -> 2 * X end),
    Threads = 16,
    Calls = 20,
    Expected = [[2 * (I * 1000 + J) || J <- lists:seq(0, Calls - 1)]
                || I <- lists:seq(0, Threads - 1)],
    ?assertEqual({ok, Expected}, pyport:call(Ctx, '__main__', from_threads, [Threads, Calls])).

callbacks_from_thread_pool() ->
    [{doc, "erlang.call from concurrent.futures.ThreadPoolExecutor workers."}].
callbacks_from_thread_pool(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_double, fun(X) -> 2 * X end),
    ?assertEqual({ok, [2 * I || I <- lists:seq(0, 199)]},
                 pyport:call(Ctx, '__main__', from_pool, [200])).

async_call() ->
    [{doc, "await erlang.async_call(...) in a coroutine the context awaits."}].
async_call(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_double, fun(X) -> 2 * X end),
    ?assertEqual({ok, 42}, pyport:call(Ctx, '__main__', async_double, [21])).

callbacks_from_two_contexts() ->
    [{doc, "Two contexts call into Erlang at the same time; each gets its own answers."}].
callbacks_from_two_contexts(Config) ->
    A = ?config(ctx, Config),
    {ok, B} = pyport:new_context(pyport, #{preload => ?HELPERS}),
    ok = pyport:register_function(pyport_ct_tag, fun(Tag, I) -> [Tag, I] end),
    N = 500,
    Self = self(),
    Callers = [spawn_link(fun() ->
                              Self ! {done, self(), Tag,
                                      pyport:call(Ctx, '__main__', tagged, [Tag, N])}
                          end) || {Ctx, Tag} <- [{A, <<"a">>}, {B, <<"b">>}]],
    [receive
         {done, Caller, Tag, Result} ->
             ?assertEqual({ok, [[Tag, I] || I <- lists:seq(0, N - 1)]}, Result)
     end || Caller <- Callers],
    ok = pyport:stop_context(B).

callback_never_returns() ->
    [{doc, "A callback that never returns blocks only its Python caller: the Erlang "
           "caller's timeout holds, other contexts and the runtime keep working, past "
           "the deadline its own context serves again, and the late result is dropped."}].
callback_never_returns(Config) ->
    Other = ?config(ctx, Config),
    {ok, Stuck} = pyport:new_context(pyport, #{preload => ?HELPERS}),
    Self = self(),
    ok = pyport:register_function(pyport_ct_block,
                                  fun() ->
                                      Self ! {blocked, self()},
                                      receive release -> released end
                                  end),
    {Us, Result} = timer:tc(pyport, eval, [Stuck, <<"erlang.call('pyport_ct_block')">>, #{},
                                           #{timeout => 300}]),
    ?assertEqual({error, timeout}, Result),
    ?assert(Us < 3000000),
    Blocked = receive {blocked, Pid} -> Pid after 5000 -> ct:fail(callback_not_started) end,
    ?assert(is_process_alive(Blocked)),
    %% the runtime owner did not wait for the callback
    ?assertEqual({ok, 3}, pyport:call(Other, operator, add, [1, 2])),
    ?assertMatch({ok, #{os_pid := _}}, pyport:info(pyport)),
    ok = pyport:register_function(pyport_ct_seven, fun() -> 7 end),
    ?assertEqual({ok, [<<"ok">>, 7]}, attempt(Other, <<"pyport_ct_seven">>, [])),
    %% past the deadline the waiting Python code gives up (erlang.CallTimeout), so the
    %% context serves again while the callback still runs
    ?assertEqual({ok, 3}, pyport:call(Stuck, operator, add, [1, 2], #{}, #{timeout => 5000})),
    ?assert(is_process_alive(Blocked)),
    %% let it return: its late result is dropped
    Blocked ! release,
    ?assertEqual({ok, 3}, pyport:call(Stuck, operator, add, [1, 2], #{}, #{timeout => 10000})),
    pyport_ct:assert_no_messages(),
    ok = pyport:stop_context(Stuck).

callback_during_preload() ->
    [{doc, "Preload code may call Erlang and send messages, for contexts made with "
           "new_context/2 and for those of a starting runtime."}].
callback_during_preload(_Config) ->
    ok = pyport:register_function(pyport_ct_seed, fun() -> 1234 end),
    Preload = <<"import erlang\n"
                "SEED = erlang.call('pyport_ct_seed')\n"
                "erlang.send('pyport_ct_preload_inbox', ('loaded', SEED))\n">>,
    true = register(pyport_ct_preload_inbox, self()),
    try
        {ok, Ctx} = pyport:new_context(pyport, #{preload => Preload}),
        ?assertEqual({ok, 1234}, pyport:eval(Ctx, <<"SEED">>)),
        receive {<<"loaded">>, 1234} -> ok after 5000 -> ct:fail(no_preload_message) end,
        ok = pyport:stop_context(Ctx),
        {ok, Pid} = pyport:start_runtime(#{contexts => [#{name => a, preload => Preload}]}),
        {ok, A} = pyport:context(Pid, a),
        ?assertEqual({ok, 1234}, pyport:eval(A, <<"SEED">>)),
        receive {<<"loaded">>, 1234} -> ok after 5000 -> ct:fail(no_preload_message) end,
        ok = pyport:stop_runtime(Pid)
    after
        unregister(pyport_ct_preload_inbox)
    end.

send_to_self_in_order() ->
    [{doc, "erlang.send to erlang.self(): 1000 messages arrive in order, all before "
           "the reply."}].
send_to_self_in_order(Config) ->
    Ctx = ?config(ctx, Config),
    N = 1000,
    ?assertEqual({ok, N}, pyport:call(Ctx, '__main__', burst, [N])),
    [receive
         Msg -> ?assertEqual({<<"burst">>, I}, Msg)
     after 0 ->
         ct:fail({missing, I})
     end || I <- lists:seq(0, N - 1)],
    pyport_ct:assert_no_messages().

send_to_registered_name() ->
    [{doc, "erlang.send to a registered name (str or erlang.Atom); names that are "
           "not registered, or not even atoms, drop the message."}].
send_to_registered_name(Config) ->
    Ctx = ?config(ctx, Config),
    true = register(pyport_ct_inbox, self()),
    try
        ok = pyport:exec(Ctx, <<"erlang.send('pyport_ct_inbox', 'by name')\n"
                                "erlang.send(erlang.atom('pyport_ct_inbox'), 'by atom')\n"
                                "erlang.send('pyport_ct_never_an_atom_x9q', 'lost')\n"
                                "erlang.send(erlang.atom('pyport_ct_unregistered'), 'lost')\n"
                                "erlang.send('pyport_ct_inbox', {'last': [1, 2]})\n">>),
        receive M1 -> ?assertEqual(<<"by name">>, M1) after 0 -> ct:fail(no_message) end,
        receive M2 -> ?assertEqual(<<"by atom">>, M2) after 0 -> ct:fail(no_message) end,
        receive M3 -> ?assertEqual(#{<<"last">> => [1, 2]}, M3) after 0 -> ct:fail(no_message) end,
        pyport_ct:assert_no_messages(),
        %% a str never becomes an atom on the Erlang side
        ?assertError(badarg, binary_to_existing_atom(<<"pyport_ct_never_an_atom_x9q">>, utf8))
    after
        unregister(pyport_ct_inbox)
    end.

self_is_caller() ->
    [{doc, "erlang.self() is the pid of the process that made the request."}].
self_is_caller(Config) ->
    Ctx = ?config(ctx, Config),
    Self = self(),
    ?assertEqual({ok, Self}, pyport:eval(Ctx, <<"erlang.self()">>)),
    ?assertEqual({ok, Self}, pyport:call(Ctx, erlang, self, [])),
    Other = spawn_link(fun() -> Self ! {other, self(), pyport:eval(Ctx, <<"erlang.self()">>)} end),
    receive {other, Other, Result} -> ?assertEqual({ok, Other}, Result)
        after 60000 -> ct:fail({no_message, ?LINE}) end,
    ok = pyport:exec(Ctx, <<"SEEN = erlang.self()">>),
    ?assertEqual({ok, Self}, pyport:eval(Ctx, <<"SEEN">>)).

self_in_nested_calls() ->
    [{doc, "Inside a callback's nested request erlang.self() is the callback process; "
           "back in the outer request it is the outer caller again."}].
self_in_nested_calls(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_inner_self,
                                  fun() ->
                                      {ok, Seen} = pyport:eval(Ctx, <<"erlang.self()">>),
                                      [Seen, self()]
                                  end),
    Self = self(),
    {ok, {Before, [Inner, CallbackPid], After}} = pyport:call(Ctx, '__main__', selves, []),
    ?assertEqual(Self, Before),
    ?assertEqual(Self, After),
    ?assertEqual(CallbackPid, Inner),
    ?assertNotEqual(Self, Inner).

whereis() ->
    [{doc, "erlang.whereis(name): the registered pid, or None (also for names that are "
           "no atom)."}].
whereis(Config) ->
    Ctx = ?config(ctx, Config),
    true = register(pyport_ct_whereis, self()),
    try
        ?assertEqual({ok, self()}, pyport:eval(Ctx, <<"erlang.whereis('pyport_ct_whereis')">>)),
        ?assertEqual({ok, true},
                     pyport:eval(Ctx, <<"erlang.whereis(erlang.atom('pyport_ct_whereis'))"
                                        " == erlang.self()">>)),
        ?assertEqual({ok, true},
                     pyport:eval(Ctx, <<"isinstance(erlang.whereis('init'), erlang.Pid)">>)),
        ?assertEqual({ok, true},
                     pyport:eval(Ctx, <<"erlang.whereis('pyport_ct_no_such_name_k2') is None">>)),
        ?assertError(badarg, binary_to_existing_atom(<<"pyport_ct_no_such_name_k2">>, utf8)),
        ?assertEqual({ok, none}, pyport:eval(Ctx, <<"erlang.whereis('erlang')">>))
    after
        unregister(pyport_ct_whereis)
    end.

atom_round_trip() ->
    [{doc, "erlang.atom creates an atom; atoms cross both ways as erlang.Atom."}].
atom_round_trip(Config) ->
    Ctx = ?config(ctx, Config),
    ok = pyport:register_function(pyport_ct_echo, fun(X) -> X end),
    ok = pyport:register_function(pyport_ct_is_atom, fun(X) -> is_atom(X) end),
    ?assertEqual({ok, pyport_ct_made_in_python}, pyport:eval(Ctx, <<"erlang.atom('pyport_ct_made_in_python')">>)),
    ?assertEqual({ok, true}, pyport:eval(Ctx, <<"erlang.call('pyport_ct_is_atom', erlang.atom('abc'))">>)),
    ?assertEqual({ok, false}, pyport:eval(Ctx, <<"erlang.call('pyport_ct_is_atom', 'abc')">>)),
    ?assertEqual({ok, [true, true, <<"hello">>]},
                 pyport:eval(Ctx, <<"[isinstance(a, erlang.Atom), a == 'hello', str(a)]">>,
                             #{a => hello})),
    ?assertEqual({ok, [true, xyz]},
                 pyport:eval(Ctx, <<"(lambda r: [isinstance(r, erlang.Atom), r])"
                                    "(erlang.call('pyport_ct_echo', erlang.atom('xyz')))">>)).

types_hashable_and_comparable() ->
    [{doc, "erlang.Pid, erlang.Ref and erlang.Atom are hashable and comparable in "
           "Python, with Erlang's equality."}].
types_hashable_and_comparable(Config) ->
    Ctx = ?config(ctx, Config),
    Other = spawn(fun() -> ok end),
    Ref = make_ref(),
    Locals = #{p1 => self(), p1b => self(), p2 => Other,
               r1 => Ref, r1b => Ref, r2 => make_ref(), a => apple, b => banana},
    Checks = <<"{"
               "'pid eq': p1 == p1b and p1 != p2,"
               "'pid hash': hash(p1) == hash(p1b) and len({p1, p1b, p2}) == 2,"
               "'pid dict': {p1: 'x'}[p1b] == 'x',"
               "'pid order': (p1 < p2) != (p2 < p1) and len(sorted([p2, p1, p1b])) == 3,"
               "'ref eq': r1 == r1b and r1 != r2,"
               "'ref hash': hash(r1) == hash(r1b) and len({r1, r1b, r2}) == 2,"
               "'ref order': (r1 < r2) != (r2 < r1),"
               "'atom eq': a == erlang.atom('apple') and a != b,"
               "'atom hash': len({a, erlang.atom('apple'), b}) == 2,"
               "'atom order': a < b and sorted([b, a]) == [a, b],"
               "'self in set': erlang.self() in {p1, p2},"
               "}">>,
    {ok, Result} = pyport:eval(Ctx, Checks, Locals),
    ?assertEqual([], [Name || {Name, Ok} <- maps:to_list(Result), Ok =/= true]),
    ?assertEqual(11, map_size(Result)),
    %% and they come back as the same terms
    ?assertEqual({ok, [self(), Ref, apple]}, pyport:eval(Ctx, <<"[p1, r1, a]">>, Locals)).

%%% Helpers

%% attempt(Name, *Args) in Python, with every tuple of the answer made a list:
%% {ok, [<<"ok">>, Result]} or {ok, [<<"error">>, Reason]}.
attempt(Ctx, Name, Args) ->
    case pyport:call(Ctx, '__main__', attempt, [Name | Args]) of
        {ok, {Tag, Value}} -> {ok, [Tag, untuple(Value)]};
        Other -> Other
    end.

untuple(T) when is_tuple(T) -> [untuple(E) || E <- tuple_to_list(T)];
untuple(L) when is_list(L) -> [untuple(E) || E <- L];
untuple(X) -> X.

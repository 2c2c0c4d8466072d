%% @doc The isolation boundary: what Python sends back cannot exhaust the node's atoms.
-module(pyport_boundary_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(MAX_ATOMS, 100).

all() ->
    [atom_budget].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

end_per_testcase(_Case, _Config) ->
    pyport_ct:assert_no_messages().

atom_budget() ->
    [{doc, "max_atoms 100: Python's first new atoms decode; once the budget is used up "
           "a reply of 300,000 new atoms is {error, {bad_term, {atom_limit, 100}}} and "
           "the node's atom count does not grow; atoms the node has still decode; a "
           "send holding a new atom is dropped, a callback with one raises in Python, a "
           "stream item with one ends the stream with the error."}].
atom_budget(_Config) ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}], max_atoms => ?MAX_ATOMS}),
    {ok, C} = pyport:context(Rt, a),
    ok = pyport:register_function(pyport_boundary_echo, fun(X) -> X end),
    ok = pyport:exec(C, <<"import erlang\n"
                          "def fresh(prefix, n):\n"
                          "    return [erlang.atom(f'{prefix}{i}') for i in range(n)]\n"
                          "def send_fresh(pid):\n"
                          "    erlang.send(pid, erlang.atom('pyport_boundary_never_made'))\n"
                          "    erlang.send(pid, 'after')\n"
                          "def call_fresh():\n"
                          "    try:\n"
                          "        erlang.call('pyport_boundary_echo',\n"
                          "                    erlang.atom('pyport_boundary_never_made_2'))\n"
                          "        return 'no error'\n"
                          "    except erlang.Error as e:\n"
                          "        return e.args[0]\n"
                          "def stream_fresh():\n"
                          "    yield 1\n"
                          "    yield erlang.atom('pyport_boundary_never_made_3')\n">>),
    Count0 = erlang:system_info(atom_count),
    %% within the budget: new atoms are made
    {ok, First} = pyport:call(C, '__main__', fresh, [<<"pyport_boundary_a">>, 60]),
    ?assertEqual(60, length(First)),
    ?assert(lists:all(fun is_atom/1, First)),
    Count1 = erlang:system_info(atom_count),
    ct:log("atom count ~b -> ~b", [Count0, Count1]),
    ?assert(Count1 - Count0 >= 59),  % pyport_boundary_a7 is in this module already
    %% past it: refused, and the table does not grow
    ?assertEqual({error, {bad_term, {atom_limit, ?MAX_ATOMS}}},
                 pyport:call(C, '__main__', fresh, [<<"pyport_boundary_b">>, 300000])),
    Count2 = erlang:system_info(atom_count),
    ct:log("atom count: ~b at start, ~b after 60 new, ~b after 300,000 refused",
           [Count0, Count1, Count2]),
    ?assert(Count2 - Count1 < 50),
    %% atoms the node has always decode
    ?assertEqual({ok, [kernel, ok, pyport_boundary_a7]},
                 pyport:eval(C, <<"[erlang.atom(n) for n in ('kernel', 'ok', "
                                  "'pyport_boundary_a7')]">>)),
    %% a send with a new atom is dropped; the next one arrives
    {ok, none} = pyport:call(C, '__main__', send_fresh, [self()]),
    receive Msg -> ?assertEqual(<<"after">>, Msg) end,
    %% a callback with one raises erlang.Error in Python
    ?assertEqual({ok, {atom_limit, ?MAX_ATOMS}}, pyport:call(C, '__main__', call_fresh, [])),
    %% a stream item with one ends the stream
    {ok, S} = pyport:stream(C, '__main__', stream_fresh, []),
    ?assertEqual({data, 1}, pyport:stream_next(S, 5000)),
    ?assertEqual({error, {bad_term, {atom_limit, ?MAX_ATOMS}}}, pyport:stream_next(S, 5000)),
    %% none of the refused names became an atom
    ?assertEqual([], existing([<<"pyport_boundary_never_made">>,
                               <<"pyport_boundary_never_made_2">>,
                               <<"pyport_boundary_never_made_3">>,
                               <<"pyport_boundary_b299999">>])),
    Count3 = erlang:system_info(atom_count),
    ?assert(Count3 - Count1 < 50),
    ok = pyport:unregister_function(pyport_boundary_echo),
    ok = pyport:stop_runtime(Rt).

%% The names among these that are atoms of the node.
existing(Names) ->
    [N || N <- Names, try binary_to_existing_atom(N) of _ -> true catch error:badarg -> false end].

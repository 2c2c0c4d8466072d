%% @doc The type mapping of docs/api.md, every row in both directions.
-module(pyport_types_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_types_rt).

%% Helpers every case uses, defined in the context's __main__.
-define(HELPERS, <<"
def identity(x):
    return x

def type_name(x):
    return type(x).__name__

def is_str(x):
    return isinstance(x, str)

def type_names(xs):
    return [type(x).__name__ for x in xs]

def key_types(d):
    return sorted(type(k).__name__ for k in d)

def nested(n):
    x = []
    for _ in range(n):
        x = [x]
    return x

def depth(x):
    d = 0
    while isinstance(x, list) and x:
        x = x[0]
        d += 1
    return d
">>).

all() ->
    [small_ints, negative_ints_in_lists, bignums, floats, float_specials, booleans,
     none_atoms, none_as_nil, none_option_checked, other_atoms, latin1_atom, utf8_binary_is_str, non_utf8_binary_is_bytes,
     bytes_tuple, bytes_like_from_python, charlists, long_byte_list, small_int_lists,
     tuples, maps_with_any_keys, pids_and_refs, opaque_terms, sets_become_lists,
     unconvertible_result, erlang_nesting_too_deep, python_nesting_too_deep,
     nesting_under_limit, large_binary_echo].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    {ok, _} = pyport:start_runtime(#{name => ?RUNTIME, contexts => [#{name => types}]}),
    {ok, Ctx} = pyport:context(?RUNTIME, types),
    ok = pyport:exec(Ctx, ?HELPERS),
    [{ctx, Ctx} | Config].

end_per_suite(_Config) ->
    _ = pyport:stop_runtime(?RUNTIME),
    pyport_ct:stop_app().

%% Helpers

call(Config, Function, Args) ->
    pyport:call(?config(ctx, Config), '__main__', Function, Args).

echo(Config, Term) ->
    call(Config, identity, [Term]).

type_name(Config, Term) ->
    {ok, Name} = call(Config, type_name, [Term]),
    Name.

assert_round_trip(Config, Term) ->
    ?assertEqual({ok, Term}, echo(Config, Term)),
    %% =:= tells 1 from 1.0 and 0.0 from -0.0, which assertEqual's match does too
    {ok, Back} = echo(Config, Term),
    ?assert(Back =:= Term).

eval(Config, Code) ->
    pyport:eval(?config(ctx, Config), Code).

%%% Cases

small_ints() ->
    [{doc, "Small integers go to int and back."}].
small_ints(Config) ->
    [assert_round_trip(Config, I) || I <- [0, 1, -1, 255, 256, -256, 1 bsl 27,
                                           (1 bsl 31) - 1, -(1 bsl 31), 1 bsl 40]],
    ?assertEqual(<<"int">>, type_name(Config, 42)),
    ?assertEqual({ok, 42}, eval(Config, <<"6 * 7">>)).

negative_ints_in_lists() ->
    [{doc, "Lists of small ints with negatives stay ints ([-1, 2] is not [255, 2])."}].
negative_ints_in_lists(Config) ->
    assert_round_trip(Config, [-1, 2]),
    assert_round_trip(Config, [-128, 0, 127, 255, -255]),
    ?assertEqual({ok, 1}, pyport:call(?config(ctx, Config), builtins, sum, [[-1, 2]])),
    ?assertEqual({ok, [-1, 2]}, eval(Config, <<"[-1, 2]">>)).

bignums() ->
    [{doc, "Integers of any size, both ways, exact."}].
bignums(Config) ->
    Big = 1 bsl 200,
    [assert_round_trip(Config, I) || I <- [Big, -Big, 1 bsl 64, (1 bsl 64) - 1, -(1 bsl 64),
                                           1 bsl 63, Big * Big + 12345]],
    ?assertEqual({ok, Big}, eval(Config, <<"2 ** 200">>)),
    ?assertEqual({ok, -Big}, eval(Config, <<"-(2 ** 200)">>)),
    ?assertEqual({ok, 1 bsl 64}, eval(Config, <<"2 ** 64">>)),
    ?assertEqual({ok, Big + 1}, pyport:call(?config(ctx, Config), operator, add, [Big, 1])).

floats() ->
    [{doc, "Floats go to float and back exactly."}].
floats(Config) ->
    [assert_round_trip(Config, F) || F <- [0.0, 1.5, -2.25, 1.0e300, -1.0e-300,
                                           3.141592653589793, 5.0e-324]],
    ?assertEqual(<<"float">>, type_name(Config, 1.5)),
    ?assertEqual({ok, 0.1 + 0.2}, eval(Config, <<"0.1 + 0.2">>)).

float_specials() ->
    [{doc, "NaN and infinities from Python become nan, infinity and neg_infinity."}].
float_specials(Config) ->
    ?assertEqual({ok, nan}, eval(Config, <<"float('nan')">>)),
    ?assertEqual({ok, infinity}, eval(Config, <<"float('inf')">>)),
    ?assertEqual({ok, neg_infinity}, eval(Config, <<"float('-inf')">>)),
    ?assertEqual({ok, [1.0, infinity]}, eval(Config, <<"[1.0, float('inf')]">>)).

booleans() ->
    [{doc, "true/false are True/False and come back as true/false."}].
booleans(Config) ->
    assert_round_trip(Config, true),
    assert_round_trip(Config, false),
    ?assertEqual(<<"bool">>, type_name(Config, true)),
    ?assertEqual({ok, [true, false]}, eval(Config, <<"[1 == 1, 1 == 2]">>)).

none_atoms() ->
    [{doc, "none, nil and undefined are None; None comes back as none."}].
none_atoms(Config) ->
    [?assertEqual(<<"NoneType">>, type_name(Config, A)) || A <- [none, nil, undefined]],
    [?assertEqual({ok, none}, echo(Config, A)) || A <- [none, nil, undefined]],
    ?assertEqual({ok, none}, eval(Config, <<"None">>)).

none_as_nil() ->
    [{doc, "With the runtime option none => nil, None comes back as nil (for Elixir), "
      "nested too, and nil still goes in as None."}].
none_as_nil(_Config) ->
    {ok, R} = pyport:start_runtime(#{contexts => [#{name => c}], none => nil}),
    try
        {ok, Ctx} = pyport:context(R, c),
        ?assertEqual({ok, nil}, pyport:eval(Ctx, <<"None">>)),
        ?assertEqual({ok, [nil, #{<<"k">> => nil}, {nil}]},
                     pyport:eval(Ctx, <<"[None, {'k': None}, (None,)]">>)),
        ?assertEqual({ok, true}, pyport:eval(Ctx, <<"x is None">>, #{x => nil})),
        ?assertEqual({ok, true}, pyport:eval(Ctx, <<"x is None">>, #{x => none})),
        %% the atom none is None in Python, so it comes back as nil
        ?assertEqual({ok, nil}, pyport:eval(Ctx, <<"x">>, #{x => none}))
    after
        pyport:stop_runtime(R)
    end.

none_option_checked() ->
    [{doc, "Any other value of none is refused at start with an error that names it."}].
none_option_checked(_Config) ->
    {error, {start_error, Reason}} = pyport:start_runtime(#{none => null}),
    ?assertNotEqual(nomatch, binary:match(iolist_to_binary(io_lib:format("~p", [Reason])),
                                          <<"--none-as">>)).

other_atoms() ->
    [{doc, "Other atoms are erlang.Atom (a str subclass) and come back as atoms."}].
other_atoms(Config) ->
    ?assertEqual(<<"Atom">>, type_name(Config, hello)),
    ?assertEqual({ok, true}, call(Config, is_str, [hello])),
    ?assertEqual({ok, true}, pyport:eval(?config(ctx, Config), <<"x == 'hello'">>,
                                         #{x => hello})),
    assert_round_trip(Config, hello),
    assert_round_trip(Config, 'with space'),
    assert_round_trip(Config, [a, b, {c, d}]),
    ?assertEqual({ok, made_in_python}, eval(Config, <<"__import__('erlang').atom('made_in_python')">>)),
    %% a plain str stays a binary
    ?assertEqual({ok, <<"hello">>}, eval(Config, <<"'hello'">>)).

latin1_atom() ->
    [{doc, "Latin-1 atoms ('café', as OTP 25 encodes it) round-trip."}].
latin1_atom(Config) ->
    Cafe = list_to_atom([99, 97, 102, 233]),
    assert_round_trip(Config, Cafe),
    ?assertEqual({ok, true}, pyport:eval(?config(ctx, Config), <<"x == 'caf\\u00e9'">>,
                                         #{x => Cafe})),
    Unicode = list_to_atom([$a, 16#3bb]),
    assert_round_trip(Config, Unicode).

utf8_binary_is_str() ->
    [{doc, "A UTF-8 binary is a str, and a str comes back as a binary."}].
utf8_binary_is_str(Config) ->
    Text = <<"héllo wörld ☃"/utf8>>,
    ?assertEqual(<<"str">>, type_name(Config, Text)),
    assert_round_trip(Config, Text),
    assert_round_trip(Config, <<>>),
    ?assertEqual({ok, 13}, pyport:call(?config(ctx, Config), builtins, len, [Text])),
    ?assertEqual({ok, <<"é"/utf8>>}, eval(Config, <<"'\\u00e9'">>)).

non_utf8_binary_is_bytes() ->
    [{doc, "A binary that is not UTF-8 is bytes, and comes back as the same binary."}].
non_utf8_binary_is_bytes(Config) ->
    Bin = <<255, 0, 254, 1>>,
    ?assertEqual(<<"bytes">>, type_name(Config, Bin)),
    assert_round_trip(Config, Bin),
    ?assertEqual({ok, 4}, pyport:call(?config(ctx, Config), builtins, len, [Bin])).

bytes_tuple() ->
    [{doc, "{bytes, Bin} is bytes even when Bin is valid UTF-8."}].
bytes_tuple(Config) ->
    ?assertEqual(<<"bytes">>, type_name(Config, {bytes, <<"abc">>})),
    ?assertEqual({ok, <<"abc">>}, echo(Config, {bytes, <<"abc">>})),
    ?assertEqual({ok, <<"ABC">>}, pyport:call(?config(ctx, Config), '__main__',
                                              'identity', [{bytes, <<"ABC">>}])).

bytes_like_from_python() ->
    [{doc, "bytes, bytearray and memoryview come back as binaries."}].
bytes_like_from_python(Config) ->
    ?assertEqual({ok, <<"abc">>}, eval(Config, <<"b'abc'">>)),
    ?assertEqual({ok, <<1, 2, 255>>}, eval(Config, <<"bytearray([1, 2, 255])">>)),
    ?assertEqual({ok, <<"xyz">>}, eval(Config, <<"memoryview(b'xyz')">>)),
    ?assertEqual({ok, <<>>}, eval(Config, <<"b''">>)).

charlists() ->
    [{doc, "A charlist is a list of ints, not a str."}].
charlists(Config) ->
    ?assertEqual(<<"list">>, type_name(Config, "abc")),
    ?assertEqual({ok, [<<"int">>, <<"int">>, <<"int">>]}, call(Config, type_names, ["abc"])),
    assert_round_trip(Config, "abc"),
    ?assertEqual({ok, [97, 98, 99]}, eval(Config, <<"[97, 98, 99]">>)).

long_byte_list() ->
    [{doc, "Lists of bytes longer than 65535 elements round-trip exactly."}].
long_byte_list(Config) ->
    List = [I rem 256 || I <- lists:seq(1, 70000)],
    assert_round_trip(Config, List),
    ?assertEqual({ok, 70000}, pyport:call(?config(ctx, Config), builtins, len, [List])),
    ?assertEqual({ok, lists:duplicate(65536, 7)}, eval(Config, <<"[7] * 65536">>)).

small_int_lists() ->
    [{doc, "Lists of small ints are lists both ways."}].
small_int_lists(Config) ->
    assert_round_trip(Config, [1, 2, 3]),
    assert_round_trip(Config, []),
    ?assertEqual({ok, 6}, pyport:call(?config(ctx, Config), builtins, sum, [[1, 2, 3]])),
    ?assertEqual({ok, [0, 1, 2]}, eval(Config, <<"list(range(3))">>)).

tuples() ->
    [{doc, "Tuples are tuples both ways."}].
tuples(Config) ->
    ?assertEqual(<<"tuple">>, type_name(Config, {1, 2})),
    [assert_round_trip(Config, T) || T <- [{}, {1}, {1, <<"a">>, [2], {3, 4.5}}]],
    ?assertEqual({ok, {1, <<"a">>}}, eval(Config, <<"(1, 'a')">>)).

maps_with_any_keys() ->
    [{doc, "Maps are dicts with keys of any hashable type, and come back as maps."}].
maps_with_any_keys(Config) ->
    Map = #{1 => one, {1, 2} => <<"tuple">>, <<"k">> => 3, ak => 4, 2.5 => [5],
            -(1 bsl 100) => big},
    ?assertEqual(<<"dict">>, type_name(Config, Map)),
    assert_round_trip(Config, Map),
    assert_round_trip(Config, #{}),
    assert_round_trip(Config, #{nested => #{<<"deep">> => #{1 => 2}}}),
    ?assertEqual({ok, [<<"Atom">>, <<"float">>, <<"int">>, <<"int">>, <<"str">>,
                       <<"tuple">>]}, call(Config, key_types, [Map])),
    ?assertEqual({ok, #{<<"a">> => 1, 2 => [3]}}, eval(Config, <<"{'a': 1, 2: [3]}">>)).

pids_and_refs() ->
    [{doc, "Pids and references are erlang.Pid / erlang.Ref and come back unchanged."}].
pids_and_refs(Config) ->
    Ref = make_ref(),
    ?assertEqual(<<"Pid">>, type_name(Config, self())),
    ?assertEqual(<<"Ref">>, type_name(Config, Ref)),
    assert_round_trip(Config, self()),
    assert_round_trip(Config, Ref),
    assert_round_trip(Config, [self(), Ref, {self()}]),
    %% hashable and comparable
    ?assertEqual({ok, true}, pyport:eval(?config(ctx, Config),
                                         <<"len({p, q}) == 1 and p == q">>,
                                         #{p => self(), q => self()})).

opaque_terms() ->
    [{doc, "Ports, funs, bitstrings and improper lists come back unchanged."}].
opaque_terms(Config) ->
    [Port | _] = erlang:ports(),
    Fun = fun() -> ok end,
    ExtFun = fun lists:reverse/1,
    [assert_round_trip(Config, T) || T <- [Port, Fun, ExtFun, <<1:3>>, <<255, 1:1>>,
                                           [1 | 2], [a, b | c]]],
    assert_round_trip(Config, {Port, [Fun, <<1:3>>], #{k => [1 | 2]}}).

sets_become_lists() ->
    [{doc, "Python sets and frozensets come back as lists."}].
sets_become_lists(Config) ->
    {ok, Set} = eval(Config, <<"{1, 2, 3}">>),
    ?assertEqual([1, 2, 3], lists:sort(Set)),
    {ok, Frozen} = eval(Config, <<"frozenset(['a', 'b'])">>),
    ?assertEqual([<<"a">>, <<"b">>], lists:sort(Frozen)),
    ?assertEqual({ok, []}, eval(Config, <<"set()">>)).

unconvertible_result() ->
    [{doc, "A result with no Erlang form gives {error, {bad_term, _}}."}].
unconvertible_result(Config) ->
    ?assertMatch({error, {bad_term, _}}, eval(Config, <<"object()">>)),
    ?assertMatch({error, {bad_term, _}}, eval(Config, <<"[1, object()]">>)),
    ?assertMatch({error, {bad_term, _}}, eval(Config, <<"{'k': lambda: 1}">>)),
    ?assertEqual({ok, 1}, eval(Config, <<"1">>)).

erlang_nesting_too_deep() ->
    [{doc, "A list nested 1,000,000 deep gives {bad_term, too_deep}; the context lives."}].
erlang_nesting_too_deep(Config) ->
    Deep = lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, 1000000)),
    ?assertEqual({error, {bad_term, too_deep}}, echo(Config, Deep)),
    DeepTuple = lists:foldl(fun(_, Acc) -> {Acc} end, {}, lists:seq(1, 100000)),
    ?assertEqual({error, {bad_term, too_deep}}, echo(Config, DeepTuple)),
    DeepMap = lists:foldl(fun(_, Acc) -> #{k => Acc} end, #{}, lists:seq(1, 100000)),
    ?assertEqual({error, {bad_term, too_deep}}, echo(Config, DeepMap)),
    ?assertEqual({ok, 3}, pyport:call(?config(ctx, Config), operator, add, [1, 2])).

python_nesting_too_deep() ->
    [{doc, "A Python result nested deeper than the limit gives {bad_term, too_deep}."}].
python_nesting_too_deep(Config) ->
    ?assertEqual({error, {bad_term, too_deep}}, call(Config, nested, [5000])),
    ?assertEqual({error, {bad_term, too_deep}}, call(Config, nested, [200000])),
    ?assertEqual({ok, 3}, pyport:call(?config(ctx, Config), operator, add, [1, 2])).

nesting_under_limit() ->
    [{doc, "Nesting well under the limit (500 levels) works both ways."}].
nesting_under_limit(Config) ->
    Nested = lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, 500)),
    ?assertEqual({ok, 500}, call(Config, depth, [Nested])),
    assert_round_trip(Config, Nested),
    ?assertEqual({ok, Nested}, call(Config, nested, [500])).

large_binary_echo() ->
    [{doc, "A 16 MiB binary comes back exactly."}].
large_binary_echo(Config) ->
    Bin = rand:bytes(16 * 1024 * 1024),
    {ok, Back} = echo(Config, Bin),
    ?assertEqual(byte_size(Bin), byte_size(Back)),
    ?assert(Bin =:= Back),
    Text = binary:copy(<<"abcdefgh">>, 2 * 1024 * 1024),
    {ok, TextBack} = echo(Config, Text),
    ?assert(Text =:= TextBack).

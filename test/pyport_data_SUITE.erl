%% @doc Python's data as users have it (issue 19), in both modes: numbers with
%% `__index__' and numpy's scalars, numpy arrays (nested lists, or
%% `{ndarray, DType, Shape, Data}' with `arrays => binary'), the standard library's
%% types (datetime, date, time, timedelta, Decimal, UUID, paths, enum members, complex,
%% range) and the conversion protocol (`erlang.register_encoder', `__erlang__',
%% `erlang.register_decoder'); the bounds hold for converted values.
%%
%% numpy is installed from the package index into a venv of the Python under test
%% (cached under _build, so reruns are fast); the suite fails if it cannot be. numpy
%% does not import in an owngil sub-interpreter (its C extension refuses them): there
%% the cases check the clear error instead, and say so in the log.
-module(pyport_data_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(HELPERS, <<"
import dataclasses, datetime, enum, pathlib, sys, uuid
import erlang

def subinterpreter_312():
    if sys.version_info >= (3, 13):
        return False
    import _xxsubinterpreters as interpreters
    return interpreters.get_current() != interpreters.get_main()

# CPython 3.12's sub-interpreters: decimal aborts the process when a second one imports
# it, zoneinfo does not import
LIMITED = subinterpreter_312()
if not LIMITED:
    import decimal, zoneinfo

def identity(x):
    return x

def type_name(x):
    t = type(x)
    return t.__module__ + '.' + t.__qualname__

class Color(enum.Enum):
    RED = 1
    GREEN = 'g'

UTC = datetime.timezone.utc
SAMPLES = {
    'dt_naive': datetime.datetime(2024, 5, 1, 12, 30, 15, 123456),
    'dt_utc': datetime.datetime(2024, 5, 1, 12, 30, 15, 1, tzinfo=UTC),
    'dt_offset': datetime.datetime(1969, 7, 20, 20, 17, 40, 0, tzinfo=datetime.timezone(
        datetime.timedelta(hours=-5, minutes=-30))),
    'date': datetime.date(1999, 12, 31),
    'time': datetime.time(23, 59, 58, 999999),
    'time_tz': datetime.time(1, 2, 3, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    'timedelta': datetime.timedelta(days=-1, seconds=5, microseconds=7),
    'uuid': uuid.UUID('12345678-1234-5678-1234-567812345678'),
    'enum_stdlib': uuid.SafeUUID.unknown,
    'enum_main': Color.GREEN,
    'complex': complex(1.5, -2.0),
    'range': range(1, 10, 3),
}
if not LIMITED:
    SAMPLES['dt_zone'] = datetime.datetime(2024, 10, 27, 2, 30, 0, 5,
                                           tzinfo=zoneinfo.ZoneInfo('Europe/Paris'))
    SAMPLES['decimal'] = decimal.Decimal('3.14159265358979323846264338327950288')
    SAMPLES['decimal_exp'] = decimal.Decimal('-1.10E-30')

def sample(name):
    return SAMPLES[name]

def equals_sample(name, x):
    v = SAMPLES[name]
    return type(x) is type(v) and x == v and getattr(x, 'tzinfo', None) == getattr(v, 'tzinfo', None)

class IndexOnly:
    def __init__(self, n):
        self.n = n
    def __index__(self):
        return self.n

@dataclasses.dataclass
class Point:
    x: int
    y: int

@dataclasses.dataclass
class Point3(Point):
    z: int = 0

class Celsius:
    def __init__(self, degrees):
        self.degrees = degrees
    def __erlang__(self):
        return {erlang.atom('celsius'): self.degrees}

class Unknown:
    pass

class Raises:
    pass

def fail(obj):
    raise ValueError('no Erlang form for ' + type(obj).__name__)

class Recursive:
    pass

def numpy_imports():
    try:
        import numpy
        return True
    except ImportError:
        return False
">>).

all() ->
    [{group, owngil}, {group, main}].

groups() ->
    Cases = [index_objects, numpy_scalars, stdlib_shapes, stdlib_round_trips, paths,
             decimal_where_it_cannot_load,
             tagged_tuples_of_wrong_shape_stay_tuples, encoders, encoder_for_subclass,
             erlang_method, encoder_raises, unknown_stays_unsupported, decoders,
             decoder_raises, registrations_per_context, arrays_as_lists,
             arrays_as_binary_call_option, arrays_as_binary_runtime_option,
             arrays_made_contiguous_little_endian, ndarray_in, ndarray_in_bad_size,
             arrays_option_checked, bounds_max_reply, bounds_nesting, bounds_atoms],
    [{owngil, [], Cases}, {main, [], Cases}].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    [{venv, numpy_venv()} | Config].

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    Runtime = list_to_atom("pyport_data_" ++ atom_to_list(Mode)),
    Spec = #{mode => Mode, preload => ?HELPERS},
    {ok, _} = pyport:start_runtime(#{name => Runtime, venv => ?config(venv, Config),
                                     contexts => [Spec#{name => a}, Spec#{name => b}]}),
    {ok, A} = pyport:context(Runtime, a),
    {ok, B} = pyport:context(Runtime, b),
    {ok, NumPy} = pyport:call(A, '__main__', numpy_imports, []),
    ct:log("numpy imports in a ~p context: ~p", [Mode, NumPy]),
    %% main always loads numpy; owngil does where numpy supports sub-interpreters
    Mode =:= main andalso not NumPy andalso ct:fail("numpy does not import in main"),
    [{runtime, Runtime}, {mode, Mode}, {numpy, NumPy}, {a, A}, {b, B} | Config].

end_per_group(_Mode, Config) ->
    _ = pyport:stop_runtime(?config(runtime, Config)),
    ok.

%% The venv with numpy for the Python under test, made once and kept under _build.
numpy_venv() ->
    Python = case os:getenv("PYPORT_PYTHON") of
                 false -> ct:fail("PYPORT_PYTHON is not set");
                 P -> P
             end,
    Tag = re:replace(Python, "[^A-Za-z0-9.]+", "_", [global, {return, list}]),
    Venv = filename:join([pyport_ct:repo_root(), "_build", "pyport_data_venv", Tag]),
    VenvPython = filename:join([Venv, "bin", "python"]),
    Check = VenvPython ++ " -c 'import numpy; print(numpy.__version__)'",
    case pyport_ct:shell("/", Check) of
        {0, Version} ->
            ct:log("numpy ~s in ~s", [string:trim(Version), Venv]);
        _ ->
            {0, _} = pyport_ct:shell("/", Python ++ " -m venv --clear " ++ Venv),
            case pyport_ct:shell("/", VenvPython ++ " -m pip install -q numpy") of
                {0, _} -> ok;
                {_, Out} -> ct:fail({numpy_not_installed, Out})
            end,
            {0, _} = pyport_ct:shell("/", Check)
    end,
    Venv.

%% Helpers

call(Config, Function, Args) ->
    call(Config, Function, Args, #{}).

call(Config, Function, Args, Opts) ->
    pyport:call(?config(a, Config), '__main__', Function, Args, #{}, Opts).

eval(Config, Code) ->
    eval(Config, Code, #{}).

eval(Config, Code, Opts) ->
    pyport:eval(?config(a, Config), Code, #{}, Opts).

exec(Config, Code) ->
    ok = pyport:exec(?config(a, Config), Code).

%% Where numpy does not import: what a numpy case gets instead (the import's error).
no_numpy(Config, Fun) ->
    case ?config(numpy, Config) of
        true ->
            Fun();
        false ->
            ct:log("numpy does not import in this ~p context", [?config(mode, Config)]),
            ?assertMatch({error, {python, <<"ImportError">>, _, _}},
                         eval(Config, <<"__import__('numpy')">>))
    end.

%% Cases

index_objects() ->
    [{doc, "An object with __index__ comes back as its integer (any size)."}].
index_objects(Config) ->
    ?assertEqual({ok, 7}, eval(Config, <<"IndexOnly(7)">>)),
    ?assertEqual({ok, [-1, 1 bsl 70]}, eval(Config, <<"[IndexOnly(-1), IndexOnly(2**70)]">>)).

numpy_scalars() ->
    [{doc, "numpy's integer scalars are integers, its bool true/false, its floating "
           "scalars floats (float16 and float32 too), its complex {complex, Re, Im}."}].
numpy_scalars(Config) ->
    no_numpy(Config, fun() ->
        ?assertEqual({ok, [7, 255, -128, 18446744073709551615, 9223372036854775807]},
                     eval(Config, <<"[__import__('numpy').int64(7), __import__('numpy').uint8(255), "
                                    "__import__('numpy').int8(-128), __import__('numpy').uint64(2**64-1), "
                                    "__import__('numpy').int64(2**63-1)]">>)),
        ?assertEqual({ok, [true, false]},
                     eval(Config, <<"[__import__('numpy').bool_(True), __import__('numpy').bool_(False)]">>)),
        {ok, [F16, F32, F64]} =
            eval(Config, <<"[__import__('numpy').float16(1.5), __import__('numpy').float32(0.25), "
                           "__import__('numpy').float64(2.5)]">>),
        ?assert(F16 =:= 1.5 andalso F32 =:= 0.25 andalso F64 =:= 2.5),
        ?assertEqual({ok, {complex, 1.0, -2.0}},
                     eval(Config, <<"__import__('numpy').complex128(1-2j)">>)),
        %% what numpy's reductions return
        ?assertEqual({ok, [15, 2]},
                     eval(Config, <<"[__import__('numpy').arange(6).sum(), "
                                    "__import__('numpy').argmax([1, 5, 9, 3])]">>))
    end).

stdlib_shapes() ->
    [{doc, "The standard library's types come back in the shapes of docs/api.md."}].
stdlib_shapes(Config) ->
    Expected =
        [{dt_naive, {datetime, {{2024, 5, 1}, {12, 30, 15}}, 123456, none}},
         {dt_utc, {datetime, {{2024, 5, 1}, {12, 30, 15}}, 1, 0}},
         {dt_offset, {datetime, {{1969, 7, 20}, {20, 17, 40}}, 0, -19800}},
         {dt_zone, {datetime, {{2024, 10, 27}, {2, 30, 0}}, 5, <<"Europe/Paris">>}},
         {date, {date, {1999, 12, 31}}},
         {time, {time, {23, 59, 58}, 999999, none}},
         {time_tz, {time, {1, 2, 3}, 0, 7200}},
         {timedelta, {timedelta, -86400000000 + 5000007}},
         {decimal, {decimal, <<"3.14159265358979323846264338327950288">>}},
         {decimal_exp, {decimal, <<"-1.10E-30">>}},
         {uuid, {uuid, <<"12345678-1234-5678-1234-567812345678">>}},
         {enum_stdlib, {enum, <<"uuid.SafeUUID">>, <<"unknown">>}},
         {enum_main, {enum, <<"__main__.Color">>, <<"GREEN">>}},
         {complex, {complex, 1.5, -2.0}},
         {range, {range, 1, 10, 3}}],
    {ok, Names} = eval(Config, <<"list(SAMPLES)">>),
    Limited = limited(Config),
    Left = [N || {N, _} <- Expected, not lists:member(atom_to_binary(N), Names)],
    ?assertEqual(case Limited of
                     true -> [dt_zone, decimal, decimal_exp];
                     false -> []
                 end, Left),
    [?assertEqual({Name, {ok, Term}}, {Name, call(Config, sample, [Name])})
     || {Name, Term} <- Expected, not lists:member(Name, Left)],
    ok.

%% Whether the context is a sub-interpreter of CPython 3.12 (no decimal, no zoneinfo).
limited(Config) ->
    {ok, Limited} = eval(Config, <<"LIMITED">>),
    Limited andalso ct:log("a CPython 3.12 sub-interpreter: no decimal, no zoneinfo"),
    Limited.

decimal_where_it_cannot_load() ->
    [{doc, "{decimal, Text} in a CPython 3.12 sub-interpreter that has not imported "
           "decimal is a clear ImportError (importing it there may abort the process); "
           "elsewhere a Decimal."}].
decimal_where_it_cannot_load(Config) ->
    case limited(Config) of
        true ->
            {error, {python, <<"ImportError">>, Message, _}} =
                call(Config, type_name, [{decimal, <<"1.5">>}]),
            ?assertMatch({match, _}, re:run(Message, "cannot load safely in an owngil")),
            ?assertEqual({ok, 2}, eval(Config, <<"1 + 1">>));
        false ->
            ?assertEqual({ok, <<"decimal.Decimal">>},
                         call(Config, type_name, [{decimal, <<"1.5">>}]))
    end.

stdlib_round_trips() ->
    [{doc, "Each standard library value goes to Erlang and back to an equal Python value "
           "of the same type (and tzinfo)."}].
stdlib_round_trips(Config) ->
    {ok, Names} = eval(Config, <<"list(SAMPLES)">>),
    ?assertEqual(case limited(Config) of true -> 12; false -> 15 end, length(Names)),
    [begin
         {ok, Term} = call(Config, sample, [Name]),
         ?assertEqual({Name, {ok, true}}, {Name, call(Config, equals_sample, [Name, Term])})
     end || Name <- Names],
    %% and from Erlang: what an Erlang user writes
    ?assertEqual({ok, true},
                 pyport:eval(?config(a, Config), <<"type(x) is datetime.datetime">>,
                             #{x => {datetime, {{2024, 1, 2}, {3, 4, 5}}, 0, 0}})),
    ?assertEqual({ok, <<"2024-01-02T03:04:05.000006+00:00">>},
                 pyport:eval(?config(a, Config), <<"x.isoformat()">>,
                             #{x => {datetime, {{2024, 1, 2}, {3, 4, 5}}, 6, 0}})),
    ?assertEqual({ok, 1.5},
                 pyport:eval(?config(a, Config), <<"x.real">>, #{x => {complex, 1.5, nan}})),
    ?assertEqual({ok, true},
                 pyport:eval(?config(a, Config), <<"x != x">>, #{x => {complex, nan, 0.0}})).

paths() ->
    [{doc, "pathlib paths come back as binaries (their os.fspath)."}].
paths(Config) ->
    ?assertEqual({ok, [<<"/tmp/x y">>, <<"rel/a.txt">>]},
                 eval(Config, <<"[pathlib.PurePosixPath('/tmp/x y'), pathlib.Path('rel/a.txt')]">>)).

tagged_tuples_of_wrong_shape_stay_tuples() ->
    [{doc, "A tuple whose tag has a decoder but whose shape is not the documented one "
           "arrives as a tuple, as before."}].
tagged_tuples_of_wrong_shape_stay_tuples(Config) ->
    Terms = [{date, foo}, {datetime, 1}, {complex, a, b}, {uuid, 1, 2}, {timedelta, 1.5},
             {range, 1}, {ndarray, 1, 2}, {enum, 1, 2}],
    [?assertEqual({ok, T}, call(Config, identity, [T])) || T <- Terms],
    ?assertEqual({ok, <<"builtins.tuple">>}, call(Config, type_name, [{date, foo}])).

encoders() ->
    [{doc, "erlang.register_encoder(Type, fn): fn's result, converted, is the object's "
           "Erlang form; a decoder makes it a Point again (a dataclass round trip)."}].
encoders(Config) ->
    exec(Config, <<"erlang.register_encoder(Point, lambda p: (erlang.atom('point'), p.x, p.y))\n"
                   "erlang.register_decoder('point', lambda t: Point(t[1], t[2]))\n">>),
    ?assertEqual({ok, {point, 1, 2}}, eval(Config, <<"Point(1, 2)">>)),
    ?assertEqual({ok, [{point, 3, 4}]}, eval(Config, <<"[Point(3, 4)]">>)),
    ?assertEqual({ok, <<"__main__.Point">>}, call(Config, type_name, [{point, 1, 2}])),
    ?assertEqual({ok, {point, 5, 6}}, call(Config, identity, [{point, 5, 6}])).

encoder_for_subclass() ->
    [{doc, "An encoder registered for a class serves its subclasses; one registered for "
           "the subclass wins there."}].
encoder_for_subclass(Config) ->
    exec(Config, <<"erlang.register_encoder(Point, lambda p: ('point', p.x, p.y))\n">>),
    ?assertEqual({ok, {<<"point">>, 1, 2}}, eval(Config, <<"Point3(1, 2, 3)">>)),
    exec(Config, <<"erlang.register_encoder(Point3, lambda p: ('point3', p.x, p.y, p.z))\n">>),
    ?assertEqual({ok, [{<<"point3">>, 1, 2, 3}, {<<"point">>, 1, 2}]},
                 eval(Config, <<"[Point3(1, 2, 3), Point(1, 2)]">>)).

erlang_method() ->
    [{doc, "A class's __erlang__(self) gives its Erlang form."}].
erlang_method(Config) ->
    ?assertEqual({ok, #{celsius => 21.5}}, eval(Config, <<"Celsius(21.5)">>)).

encoder_raises() ->
    [{doc, "An encoder that raises gives its exception as the call's error; the context "
           "serves the next call."}].
encoder_raises(Config) ->
    exec(Config, <<"erlang.register_encoder(Raises, fail)\n">>),
    ?assertMatch({error, {python, <<"ValueError">>, <<"no Erlang form for Raises">>, _}},
                 eval(Config, <<"[1, Raises()]">>)),
    ?assertEqual({ok, 2}, eval(Config, <<"1 + 1">>)).

unknown_stays_unsupported() ->
    [{doc, "An object with no conversion is still {bad_term, {unsupported, TypeName}}."}].
unknown_stays_unsupported(Config) ->
    ?assertEqual({error, {bad_term, {unsupported, <<"__main__.Unknown">>}}},
                 eval(Config, <<"Unknown()">>)),
    ?assertEqual({error, {bad_term, {unsupported, <<"object">>}}},
                 eval(Config, <<"object()">>)).

decoders() ->
    [{doc, "erlang.register_decoder(Tag, fn): a tuple tagged Tag arrives as fn(tuple); "
           "removed with fn=None; a decoder may replace a built-in tag."}].
decoders(Config) ->
    exec(Config, <<"erlang.register_decoder('money', lambda t: t[1] / 100)\n">>),
    ?assertEqual({ok, <<"12.34">>}, pyport:eval(?config(a, Config), <<"str(x)">>,
                                                #{x => {money, 1234}})),
    exec(Config, <<"erlang.register_decoder('money', None)\n">>),
    ?assertEqual({ok, <<"builtins.tuple">>}, call(Config, type_name, [{money, 1234}])),
    exec(Config, <<"erlang.register_decoder('date', lambda t: 'mine')\n">>),
    ?assertEqual({ok, <<"mine">>}, call(Config, identity, [{date, {2024, 1, 1}}])),
    exec(Config, <<"erlang.register_decoder('date', None)\n">>),
    ?assertEqual({ok, true}, pyport:eval(?config(a, Config), <<"type(x) is datetime.date">>,
                                         #{x => {date, {2024, 1, 1}}})).

decoder_raises() ->
    [{doc, "A decoder that raises gives its exception as the call's error."}].
decoder_raises(Config) ->
    exec(Config, <<"erlang.register_decoder('bad', fail)\n">>),
    ?assertMatch({error, {python, <<"ValueError">>, <<"no Erlang form for tuple">>, _}},
                 call(Config, identity, [[1, {bad, 2}]])),
    ?assertEqual({ok, 2}, eval(Config, <<"1 + 1">>)),
    exec(Config, <<"erlang.register_decoder('bad', None)\n">>).

registrations_per_context() ->
    [{doc, "Encoders and decoders belong to the interpreter: another owngil context does "
           "not see them; main contexts share one interpreter, so they do."}].
registrations_per_context(Config) ->
    exec(Config, <<"erlang.register_encoder(Unknown, lambda u: 'known')\n"
                   "erlang.register_decoder('only_a', lambda t: 'decoded')\n">>),
    ?assertEqual({ok, <<"known">>}, eval(Config, <<"Unknown()">>)),
    B = ?config(b, Config),
    case ?config(mode, Config) of
        owngil ->
            ?assertEqual({error, {bad_term, {unsupported, <<"__main__.Unknown">>}}},
                         pyport:eval(B, <<"Unknown()">>)),
            ?assertEqual({ok, {only_a, 1}}, pyport:call(B, '__main__', identity, [{only_a, 1}]));
        main ->
            ?assertEqual({ok, <<"known">>}, pyport:eval(B, <<"Unknown()">>)),
            ?assertEqual({ok, <<"decoded">>},
                         pyport:call(B, '__main__', identity, [{only_a, 1}]))
    end,
    %% an encoder registered for object itself does not reach the built-in types
    exec(Config, <<"erlang._encoders.pop(Unknown)\nerlang._encoder_cache.clear()\n"
                   "erlang.register_decoder('only_a', None)\n">>).

arrays_as_lists() ->
    [{doc, "An ndarray comes back as nested lists of its shape; a 0-d one as its scalar."}].
arrays_as_lists(Config) ->
    no_numpy(Config, fun() ->
        exec(Config, <<"import numpy as np\n">>),
        ?assertEqual({ok, [[0, 1, 2], [3, 4, 5]]}, eval(Config, <<"np.arange(6).reshape(2, 3)">>)),
        ?assertEqual({ok, [[[true], [false]]]},
                     eval(Config, <<"np.array([[[True], [False]]])">>)),
        {ok, Floats} = eval(Config, <<"np.linspace(0, 1, 3, dtype=np.float32)">>),
        ?assert(Floats =:= [0.0, 0.5, 1.0]),
        ?assertEqual({ok, 42}, eval(Config, <<"np.array(42)">>)),
        ?assertEqual({ok, []}, eval(Config, <<"np.zeros(0)">>))
    end).

arrays_as_binary_call_option() ->
    [{doc, "With the call option arrays => binary an ndarray comes back as {ndarray, "
           "DType, Shape, Data}: little-endian C-order bytes."}].
arrays_as_binary_call_option(Config) ->
    no_numpy(Config, fun() ->
        exec(Config, <<"import numpy as np\n">>),
        Bin = #{arrays => binary},
        Data = << <<I:64/little-signed>> || I <- lists:seq(0, 5) >>,
        ?assertEqual({ok, {ndarray, <<"int64">>, [2, 3], Data}},
                     eval(Config, <<"np.arange(6, dtype=np.int64).reshape(2, 3)">>, Bin)),
        ?assertEqual({ok, {ndarray, <<"float64">>, [2], <<1.5:64/little-float, -2.0:64/little-float>>}},
                     eval(Config, <<"np.array([1.5, -2.0])">>, Bin)),
        ?assertEqual({ok, {ndarray, <<"uint8">>, [3], <<1, 2, 255>>}},
                     eval(Config, <<"np.array([1, 2, 255], dtype=np.uint8)">>, Bin)),
        ?assertEqual({ok, {ndarray, <<"bool">>, [2], <<1, 0>>}},
                     eval(Config, <<"np.array([True, False])">>, Bin)),
        ?assertEqual({ok, {ndarray, <<"int32">>, [], <<7:32/little>>}},
                     eval(Config, <<"np.array(7, dtype=np.int32)">>, Bin)),
        %% nested in other data, and the plain form without the option
        ?assertEqual({ok, #{<<"a">> => {ndarray, <<"int16">>, [1], <<5, 0>>}}},
                     eval(Config, <<"{'a': np.array([5], dtype=np.int16)}">>, Bin)),
        ?assertEqual({ok, [5]}, eval(Config, <<"np.array([5], dtype=np.int16)">>)),
        %% arrays => lists is the default spelled out
        ?assertEqual({ok, [5]}, eval(Config, <<"np.array([5], dtype=np.int16)">>,
                                     #{arrays => lists}))
    end).

arrays_as_binary_runtime_option() ->
    [{doc, "The runtime option arrays => binary makes it the default; the call option "
           "arrays => lists overrides it."}].
arrays_as_binary_runtime_option(Config) ->
    Mode = ?config(mode, Config),
    {ok, Rt} = pyport:start_runtime(#{venv => ?config(venv, Config), arrays => binary,
                                      contexts => [#{name => c, mode => Mode}]}),
    {ok, C} = pyport:context(Rt, c),
    case ?config(numpy, Config) of
        true ->
            ?assertEqual({ok, {ndarray, <<"uint8">>, [2], <<1, 2>>}},
                         pyport:eval(C, <<"__import__('numpy').array([1, 2], dtype='uint8')">>)),
            ?assertEqual({ok, [1, 2]},
                         pyport:eval(C, <<"__import__('numpy').array([1, 2], dtype='uint8')">>,
                                     #{}, #{arrays => lists}));
        false ->
            ?assertMatch({error, {python, <<"ImportError">>, _, _}},
                         pyport:eval(C, <<"__import__('numpy')">>))
    end,
    ok = pyport:stop_runtime(Rt).

arrays_made_contiguous_little_endian() ->
    [{doc, "Non-contiguous and big-endian arrays come back as contiguous little-endian "
           "bytes of their logical order."}].
arrays_made_contiguous_little_endian(Config) ->
    no_numpy(Config, fun() ->
        exec(Config, <<"import numpy as np\n">>),
        Bin = #{arrays => binary},
        %% the transpose of [[0,1,2],[3,4,5]] is [[0,3],[1,4],[2,5]]
        ?assertEqual({ok, {ndarray, <<"int32">>, [3, 2],
                           << <<I:32/little>> || I <- [0, 3, 1, 4, 2, 5] >>}},
                     eval(Config, <<"np.arange(6, dtype=np.int32).reshape(2, 3).T">>, Bin)),
        ?assertEqual({ok, {ndarray, <<"int32">>, [2], <<1:32/little, 256:32/little>>}},
                     eval(Config, <<"np.array([1, 256], dtype='>i4')">>, Bin)),
        ?assertEqual({ok, {ndarray, <<"float64">>, [2], <<0.0:64/little-float, 2.0:64/little-float>>}},
                     eval(Config, <<"np.arange(4, dtype=np.float64)[::2]">>, Bin))
    end).

ndarray_in() ->
    [{doc, "{ndarray, DType, Shape, Data} sent to Python arrives as an equal, writable "
           "ndarray; where numpy does not import, the call's error says so."}].
ndarray_in(Config) ->
    Data = << <<I:64/little-float>> || I <- [0.5, 1.5, 2.5, 3.5, 4.5, 5.5] >>,
    Term = {ndarray, <<"float64">>, [2, 3], Data},
    exec(Config, <<"def describe(a):\n"
                   "    a[0, 0] = 9\n"
                   "    return [type_name(a), a.dtype.name, list(a.shape), a.tolist()]\n">>),
    case ?config(numpy, Config) of
        true ->
            ?assertEqual({ok, [<<"numpy.ndarray">>, <<"float64">>, [2, 3],
                               [[9.0, 1.5, 2.5], [3.5, 4.5, 5.5]]]},
                         call(Config, describe, [Term])),
            %% and back, unchanged, in either form
            ?assertEqual({ok, Term}, call(Config, identity, [Term], #{arrays => binary})),
            ?assertEqual({ok, [[0.5, 1.5, 2.5], [3.5, 4.5, 5.5]]}, call(Config, identity, [Term])),
            ?assertEqual({ok, {ndarray, <<"bool">>, [], <<1>>}},
                         call(Config, identity, [{ndarray, <<"bool">>, [], <<1>>}],
                              #{arrays => binary})),
            %% data that happens to be valid UTF-8 is still the array's bytes
            ?assertEqual({ok, [97, 98]},
                         call(Config, identity, [{ndarray, <<"uint8">>, [2], <<"ab">>}]));
        false ->
            {error, {python, <<"ImportError">>, Message, _}} = call(Config, describe, [Term]),
            ct:log("~s", [Message]),
            ?assertMatch({match, _}, re:run(Message, "needs numpy, which does not import "
                                                     "in this context"))
    end.

ndarray_in_bad_size() ->
    [{doc, "Data whose size does not fit DType and Shape is a ValueError."}].
ndarray_in_bad_size(Config) ->
    no_numpy(Config, fun() ->
        ?assertMatch({error, {python, <<"ValueError">>, _, _}},
                     call(Config, identity, [{ndarray, <<"float64">>, [2], <<1, 2, 3>>}]))
    end).

arrays_option_checked() ->
    [{doc, "arrays takes binary or lists, as a call option (bad_request) and as a "
           "runtime option (start_error)."}].
arrays_option_checked(Config) ->
    ?assertEqual({error, {bad_request, <<"arrays must be binary or lists">>}},
                 eval(Config, <<"1">>, #{arrays => yes})),
    %% the runtime option: refused at start, naming it
    {error, {start_error, Reason}} = pyport:start_runtime(#{arrays => yes}),
    ?assertNotEqual(nomatch, binary:match(iolist_to_binary(io_lib:format("~p", [Reason])),
                                          <<"--arrays takes binary or lists, not yes">>)),
    {error, {start_error, _}} = pyport:start_runtime(#{arrays => <<"binary">>}).

bounds_max_reply() ->
    [{doc, "max_reply holds for converted values: a big array in list form is refused "
           "before it is built, in binary form before it is copied."}].
bounds_max_reply(Config) ->
    Mode = ?config(mode, Config),
    {ok, Rt} = pyport:start_runtime(#{venv => ?config(venv, Config), max_reply => 10000,
                                      contexts => [#{name => c, mode => Mode}]}),
    {ok, C} = pyport:context(Rt, c),
    ok = pyport:exec(C, <<"import datetime\n">>),
    ?assertMatch({error, {reply_too_large, _, 10000}},
                 pyport:eval(C, <<"[datetime.date(2000, 1, 1)] * 2000">>)),
    case ?config(numpy, Config) of
        true ->
            ?assertEqual({error, {reply_too_large, 2000000000, 10000}},
                         pyport:eval(C, <<"__import__('numpy').zeros(10**9, dtype='uint8')">>)),
            ?assertEqual({error, {reply_too_large, 80000, 10000}},
                         pyport:eval(C, <<"__import__('numpy').zeros(10**4)">>, #{},
                                     #{arrays => binary})),
            ?assertEqual({ok, [0, 0]},
                         pyport:eval(C, <<"__import__('numpy').zeros(2, dtype='uint8')">>));
        false ->
            ok
    end,
    ok = pyport:stop_runtime(Rt).

bounds_nesting() ->
    [{doc, "An encoder whose result needs the encoder again counts as nesting: past the "
           "limit it is {bad_term, too_deep}, without a crash."}].
bounds_nesting(Config) ->
    exec(Config, <<"erlang.register_encoder(Recursive, lambda r: [r])\n">>),
    ?assertEqual({error, {bad_term, too_deep}}, eval(Config, <<"Recursive()">>)),
    ?assertEqual({ok, 2}, eval(Config, <<"1 + 1">>)).

bounds_atoms() ->
    [{doc, "max_atoms holds for atoms an encoder makes."}].
bounds_atoms(Config) ->
    Mode = ?config(mode, Config),
    {ok, Rt} = pyport:start_runtime(#{max_atoms => 10,
                                      contexts => [#{name => c, mode => Mode}]}),
    {ok, C} = pyport:context(Rt, c),
    ok = pyport:exec(C, <<"import erlang\n"
                          "class Tagged:\n"
                          "    def __init__(self, n): self.n = n\n"
                          "    def __erlang__(self):\n"
                          "        return erlang.atom('pyport_data_never_made_%d' % self.n)\n">>),
    ?assertEqual({error, {bad_term, {atom_limit, 10}}},
                 pyport:eval(C, <<"[Tagged(i) for i in range(100)]">>)),
    ok = pyport:stop_runtime(Rt).

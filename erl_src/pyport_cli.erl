%% @doc The `pyport' command line (an escript built by `make' into
%% _build/default/bin/pyport):
%%
%%   pyport eval EXPR               prints the value of a Python expression
%%   pyport run FILE.py [ARG...]    runs a file as __main__ with sys.argv set; its output
%%                                  is shown as it comes
%%   pyport call MOD FUN [ARG...]   prints MOD.FUN(*ARGS); each ARG is a Python literal
%%                                  if it parses as one, else a string
%%   pyport doctor [MODULE...]      the Python found, OWN_GIL support, and whether each
%%                                  module (default: those installed) imports in a
%%                                  sub-interpreter or only in `main' mode
%%   pyport bench                   headline numbers of this machine
%%
%% Options (before the command): `--port-binary PATH' (else $PYPORT_EXECUTABLE, else the
%% binary built next to this escript). Exit status: 0 success, 1 a Python error, 2 usage.
-module(pyport_cli).

-export([main/1]).
-export([log/2]).

-define(USAGE,
        "usage: pyport [--port-binary PATH] COMMAND\n"
        "  eval EXPR | run FILE.py [ARG...] | call MOD FUN [ARG...] | doctor [MODULE...] | bench\n").

%% Python helpers of the command line, run in the context it uses.
-define(HELPERS, <<"
import ast, importlib, sys, runpy

def cli_show(value):
    return value if isinstance(value, str) else repr(value)

def cli_eval(expr):
    return cli_show(eval(expr, {}))

def cli_call(mod, fun, args):
    def parse(a):
        try:
            return ast.literal_eval(a)
        except Exception:
            return a
    f = importlib.import_module(mod)
    for part in fun.split('.'):
        f = getattr(f, part)
    return cli_show(f(*[parse(a) for a in args]))

def cli_run(path, args):
    sys.argv = [path] + list(args)
    try:
        runpy.run_path(path, run_name='__main__')
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0

def cli_installed():
    import pkgutil, site, sysconfig
    dirs = set(site.getsitepackages() + [site.getusersitepackages()])
    names = sorted({m.name for m in pkgutil.iter_modules() if m.module_finder.path in dirs
                    and not m.name.startswith('_')})
    return names or ['json', 'decimal', 'sqlite3', 'ssl', 'ctypes', 'readline']

def cli_try_import(name):
    try:
        importlib.import_module(name)
        return 'ok'
    except BaseException as e:
        return '%s: %s' % (type(e).__name__, str(e).splitlines()[0] if str(e) else '')
">>).

-spec main([string()]) -> no_return().
main(Args) ->
    case options(Args, #{}) of
        {ok, Opts, Command} ->
            setup(Opts),
            halt(command(Command));
        usage ->
            io:put_chars(standard_error, ?USAGE),
            halt(2)
    end.

options(["--port-binary", Path | Rest], Opts) ->
    options(Rest, Opts#{executable => Path});
options(["eval", Expr], Opts) -> {ok, Opts, {eval, Expr}};
options(["run", File | Args], Opts) -> {ok, Opts, {run, File, Args}};
options(["call", Mod, Fun | Args], Opts) -> {ok, Opts, {call, Mod, Fun, Args}};
options(["doctor" | Modules], Opts) -> {ok, Opts, {doctor, Modules}};
options(["bench"], Opts) -> {ok, Opts, bench};
options(_, _) -> usage.

%% Starts pyport without its default runtime; the port binary comes from the options,
%% the environment, or next to this escript (_build/default/{bin,lib/pyport/priv}).
setup(Opts) ->
    Exe = case Opts of
              #{executable := E} -> E;
              #{} ->
                  case os:getenv("PYPORT_EXECUTABLE") of
                      E when is_list(E), E =/= "" -> E;
                      _ -> beside_escript()
                  end
          end,
    filelib:is_regular(Exe) orelse fail(2, "pyport: no port binary at ~ts (use --port-binary)~n", [Exe]),
    os:putenv("PYPORT_EXECUTABLE", Exe),
    ok = application:load(pyport),
    ok = application:set_env(pyport, default_runtime, false),
    {ok, _} = application:ensure_all_started(pyport),
    ok.

beside_escript() ->
    Bin = filename:dirname(filename:absname(escript:script_name())),
    filename:join([filename:dirname(Bin), "lib", "pyport", "priv", "pyport"]).

context(Mode) ->
    case pyport:start_runtime(#{contexts => [#{name => cli, mode => Mode, preload => ?HELPERS}],
                                call_timeout => infinity}) of
        {ok, Rt} ->
            {ok, C} = pyport:context(Rt, cli),
            {Rt, C};
        {error, Reason} ->
            fail(1, "pyport: the runtime did not start: ~p~n", [Reason])
    end.

command({eval, Expr}) ->
    {_, C} = context(owngil),
    show(pyport:call(C, '__main__', cli_eval, [unicode:characters_to_binary(Expr)]));
command({call, Mod, Fun, Args}) ->
    {_, C} = context(owngil),
    show(pyport:call(C, '__main__', cli_call,
                     [unicode:characters_to_binary(Mod), unicode:characters_to_binary(Fun),
                      [unicode:characters_to_binary(A) || A <- Args]]));
command({run, File, Args}) ->
    filelib:is_regular(File) orelse fail(2, "pyport: no file ~ts~n", [File]),
    print_python_output(),
    {_, C} = context(main),
    Result = pyport:call(C, '__main__', cli_run,
                         [unicode:characters_to_binary(filename:absname(File)),
                          [unicode:characters_to_binary(A) || A <- Args]]),
    logger_drain(),
    case Result of
        {ok, Code} when is_integer(Code) -> Code;
        Error -> show(Error)
    end;
command({doctor, Modules}) ->
    doctor(Modules);
command(bench) ->
    bench().

%% Prints a result: 0 on success, 1 (with the traceback) for a Python error.
show({ok, Text}) when is_binary(Text) ->
    io:format("~ts~n", [Text]),
    0;
show({error, {python, Type, Message, Traceback}}) ->
    io:format(standard_error, "~ts~ts: ~ts~n", [Traceback, Type, Message]),
    1;
show({error, Reason}) ->
    io:format(standard_error, "pyport: ~p~n", [Reason]),
    1.

-spec fail(non_neg_integer(), io:format(), [term()]) -> no_return().
fail(Code, Format, Args) ->
    io:format(standard_error, Format, Args),
    halt(Code).

%%% run: Python's output, as it comes

%% Python's print and sys.stderr reach Erlang's logger (domain [pyport, python]); here
%% they go to this process's stdout and stderr instead, line by line.
print_python_output() ->
    _ = logger:remove_handler(default),
    ok = logger:set_primary_config(level, info),  % print() is logged at info
    ok = logger:add_handler(pyport_cli_output, ?MODULE,
                            #{filter_default => stop,
                              filters => [{python, {fun logger_filters:domain/2,
                                                    {log, sub, [pyport, python]}}}]}).

%% @private logger handler callback: the line itself, nothing around it.
-spec log(logger:log_event(), logger:handler_config()) -> ok.
log(#{level := Level, msg := Msg}, _Config) ->
    Device = case Level of
                 info -> standard_io;
                 _ -> standard_error
             end,
    Text = case Msg of
               {Format, Args} when is_list(Format) -> io_lib:format(Format, Args);
               {string, S} -> S;
               Other -> io_lib:format("~p", [Other])
           end,
    io:put_chars(Device, [strip_prefix(lists:flatten(Text)), $\n]).

%% "python (context cli): LINE" -> LINE
strip_prefix(Line) ->
    case string:split(Line, "): ") of
        ["python (context " ++ _, Rest] -> Rest;
        _ -> Line
    end.

%% The logger handler runs in the logging process; this waits until it has written all.
logger_drain() ->
    _ = logger:remove_handler(pyport_cli_output),
    ok.

%%% doctor

doctor(Modules0) ->
    {Rt, Main} = context(main),
    {ok, Info} = pyport:info(Rt),
    {ok, Exe} = pyport:eval(Main, <<"sys.executable">>),
    io:format("Python      ~ts (~ts)~n", [maps:get(python_version, Info), Exe]),
    OwnGil = maps:get(owngil, Info),
    io:format("OWN_GIL     ~ts~n", [yes_no(OwnGil)]),
    Modules = case Modules0 of
                  [] -> {ok, Ms} = pyport:call(Main, '__main__', cli_installed, []), Ms;
                  _ -> [unicode:characters_to_binary(M) || M <- Modules0]
              end,
    io:format("~n~-28s ~-12s ~ts~n", ["module", "main", "owngil (sub-interpreter)"]),
    Results = [doctor_module(Rt, Main, M, OwnGil) || M <- Modules],
    case lists:all(fun(R) -> R end, Results) of
        true -> 0;
        false -> 1
    end.

doctor_module(Rt, Main, Module, OwnGil) ->
    {ok, InMain} = pyport:call(Main, '__main__', cli_try_import, [Module]),
    InSub = case OwnGil of
                true ->
                    %% a fresh sub-interpreter per module: nothing imported before
                    {ok, C} = pyport:new_context(Rt, #{mode => owngil, preload => ?HELPERS}),
                    {ok, R} = pyport:call(C, '__main__', cli_try_import, [Module]),
                    ok = pyport:stop_context(C),
                    R;
                false ->
                    <<"(no OWN_GIL)">>
            end,
    io:format("~-28ts ~-12ts ~ts~n", [Module, short(InMain), InSub]),
    InMain =:= <<"ok">>.

short(<<"ok">>) -> <<"ok">>;
short(_) -> <<"fails">>.

yes_no(true) -> "yes (contexts run in parallel)";
yes_no(false) -> "no (Python < 3.12: main mode only)".

%%% bench

bench() ->
    {ok, Rt} = pyport:start_runtime(#{contexts => [#{name => a}, #{name => b}]}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    _ = [{ok, 3} = pyport:call(A, operator, add, [1, 2]) || _ <- lists:seq(1, 1000)],
    Times = lists:sort([timed(fun() -> {ok, 3} = pyport:call(A, operator, add, [1, 2]) end)
                        || _ <- lists:seq(1, 5000)]),
    io:format("sync call latency, median   ~.1f us~n", [lists:nth(2500, Times) / 1000]),
    Self = self(),
    Per = 1000,
    T0 = erlang:monotonic_time(nanosecond),
    _ = [spawn_link(fun() ->
                    C = case I rem 2 of 0 -> A; 1 -> B end,
                    _ = [{ok, 3} = pyport:call(C, operator, add, [1, 2]) || _ <- lists:seq(1, Per)],
                    Self ! done
                end) || I <- lists:seq(1, 50)],
    [receive done -> ok end || _ <- lists:seq(1, 50)],
    Secs = (erlang:monotonic_time(nanosecond) - T0) / 1.0e9,
    io:format("calls/s, 50 callers, 2 ctx  ~b~n", [round(50 * Per / Secs)]),
    Work = <<"def work(n):\n    t = 0\n    for i in range(n):\n        t += i * i\n    return t\n">>,
    ok = pyport:exec(A, Work),
    ok = pyport:exec(B, Work),
    One = timed(fun() -> {ok, _} = pyport:call(A, '__main__', work, [2000000]) end),
    Two = timed(fun() ->
                    [spawn_link(fun() ->
                                    {ok, _} = pyport:call(C, '__main__', work, [2000000]),
                                    Self ! done
                                end) || C <- [A, B]],
                    [receive done -> ok end || _ <- [1, 2]]
                end),
    io:format("CPU speedup, 2 contexts     ~.2fx~n", [2 * One / Two]),
    0.

timed(Fun) ->
    T0 = erlang:monotonic_time(nanosecond),
    _ = Fun(),
    erlang:monotonic_time(nanosecond) - T0.

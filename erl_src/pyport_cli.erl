%% @doc The `pyport' command line (an escript built by `make' into
%% _build/default/bin/pyport):
%%
%%   pyport eval EXPR               prints the value of a Python expression
%%   pyport run FILE.py [ARG...]    runs a file as __main__ with sys.argv set; its output
%%                                  is shown as it comes
%%   pyport call MOD FUN [ARG...]   prints MOD.FUN(*ARGS); each ARG is a Python literal
%%                                  if it parses as one, else a string
%%   pyport doctor [MODULE...]      the Python found, OWN_GIL support, and whether each
%%                                  module imports in a sub-interpreter or only in
%%                                  `main' mode
%%   pyport bench                   headline numbers of this machine
%%
%% `doctor' without module names tries the installed ones: the top-level modules of
%% the installed distributions (importlib.metadata), then the standard library's
%% extension modules in lib-dynload, by the name one imports (`ssl' for `_ssl'; test
%% and private-only ones left out). Those are what may refuse a sub-interpreter; the
%% pure-Python standard library fails only through them. Each module gets a fresh
%% sub-interpreter, so this takes a few seconds, plus the packages' own import times.
%%
%% Options (before the command): `--port-binary PATH', else $PYPORT_EXECUTABLE, else
%% the binary a rebar3 build puts beside this escript (_build/PROFILE/bin/pyport and
%% _build/PROFILE/lib/pyport/priv/pyport; a symlink to the escript is followed first);
%% `--venv DIR', a virtualenv whose packages the commands see (the runtime's `venv').
%% Exit status: 0 success, 1 a Python error, 2 usage (or no port binary).
%%
%% The same commands run inside another tool's VM through run/1, which returns the
%% exit status instead of halting: `rebar3 pyport doctor' (the rebar3_pyport plugin)
%% and `mix pyport.doctor' (lib/mix/tasks/pyport.ex) pass the app's own port program
%% and venv.
-module(pyport_cli).

-export([main/1]).
-export([run/1]).
-export([log/2]).

-define(USAGE,
        "usage: pyport [--port-binary PATH] [--venv DIR] COMMAND\n"
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
    import importlib.machinery, importlib.metadata, os, sysconfig
    def public(name):
        return name.isidentifier() and not name.startswith('_')
    packages = sorted(n for n in importlib.metadata.packages_distributions() if public(n))
    dynload = sysconfig.get_config_var('DESTSHARED') or ''
    files = os.listdir(dynload) if os.path.isdir(dynload) else []
    extensions = {f.split('.')[0] for f in files
                  if f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))}
    def imported_as(name):
        return name[1:] if name.startswith('_') and name[1:] in sys.stdlib_module_names else name
    stdlib = sorted({n for n in map(imported_as, extensions)
                     if public(n) and not n.startswith('xx')})  # xx*: CPython's examples
    return [packages, stdlib]

def cli_try_import(name):
    try:
        importlib.import_module(name)
        return 'ok'
    except BaseException as e:
        # the message's last line that says something: a long message (numpy's)
        # ends with the cause, as a pool's mode_reason shows it too
        said = [l.strip() for l in str(e).splitlines() if l.strip()]
        return '%s: %s' % (type(e).__name__, said[-1] if said else '')
">>).

%% @doc The escript's entry point: runs one command (see the module doc) and halts
%% with its exit code (0 done, 1 the Python side failed, 2 a usage or set-up error).
-spec main([string()]) -> no_return().
main(Args) ->
    halt(run(Args)).

%% @doc Runs one command (see the module doc) in this VM and returns its exit status.
-spec run([string()]) -> non_neg_integer().
run(Args) ->
    try
        case options(Args, #{}) of
            {ok, Opts, Command} ->
                setup(Opts),
                command(Command, maps:with([venv], Opts));
            usage ->
                io:put_chars(standard_error, ?USAGE),
                2
        end
    catch
        throw:{?MODULE, exit, Code} -> Code
    end.

options(["--port-binary", Path | Rest], Opts) ->
    options(Rest, Opts#{executable => Path});
options(["--venv", Dir | Rest], Opts) ->
    options(Rest, Opts#{venv => Dir});
options(["eval", Expr], Opts) -> {ok, Opts, {eval, Expr}};
options(["run", File | Args], Opts) -> {ok, Opts, {run, File, Args}};
options(["call", Mod, Fun | Args], Opts) -> {ok, Opts, {call, Mod, Fun, Args}};
options(["doctor" | Modules], Opts) -> {ok, Opts, {doctor, Modules}};
options(["bench"], Opts) -> {ok, Opts, bench};
options(_, _) -> usage.

%% Starts pyport without its default runtime, on the port binary port_binary/1 finds.
setup(Opts) ->
    Exe = port_binary(Opts),
    os:putenv("PYPORT_EXECUTABLE", Exe),
    case application:load(pyport) of
        ok -> ok;
        {error, {already_loaded, pyport}} -> ok
    end,
    ok = application:set_env(pyport, default_runtime, false),
    {ok, _} = application:ensure_all_started(pyport),
    ok.

%% --port-binary, else $PYPORT_EXECUTABLE, else beside this escript; a path given that
%% holds nothing is an error naming where it came from, not a fall-through.
port_binary(#{executable := Exe}) ->
    exists(Exe, "given by --port-binary");
port_binary(#{}) ->
    case os:getenv("PYPORT_EXECUTABLE") of
        Exe when is_list(Exe), Exe =/= "" -> exists(Exe, "given by PYPORT_EXECUTABLE");
        _ -> exists(beside_escript(), "beside this escript; use --port-binary or PYPORT_EXECUTABLE")
    end.

exists(Exe, From) ->
    filelib:is_regular(Exe) orelse fail(2, "pyport: no port binary at ~ts (~ts)~n", [Exe, From]),
    Exe.

%% rebar3 puts the escript in _build/PROFILE/bin and pyport's priv in
%% _build/PROFILE/lib/pyport/priv. The escript may be run through a symlink (from a
%% bin directory on the PATH), so the layout is taken from where the link points.
beside_escript() ->
    Script = resolve_links(filename:absname(escript:script_name()), 40),
    Bin = filename:dirname(Script),
    filename:join([filename:dirname(Bin), "lib", "pyport", "priv", "pyport"]).

resolve_links(Path, 0) ->
    Path;
resolve_links(Path, N) ->
    case file:read_link(Path) of
        {ok, Target} -> resolve_links(filename:absname(Target, filename:dirname(Path)), N - 1);
        {error, _} -> Path
    end.

context(Mode, RtOpts) ->
    case pyport:start_runtime(RtOpts#{contexts => [#{name => cli, mode => Mode, preload => ?HELPERS}],
                                      call_timeout => infinity}) of
        {ok, Rt} ->
            {ok, C} = pyport:context(Rt, cli),
            {Rt, C};
        {error, Reason} ->
            fail(1, "pyport: the runtime did not start: ~p~n", [Reason])
    end.

command({eval, Expr}, RtOpts) ->
    {_, C} = context(owngil, RtOpts),
    show(pyport:call(C, '__main__', cli_eval, [unicode:characters_to_binary(Expr)]));
command({call, Mod, Fun, Args}, RtOpts) ->
    {_, C} = context(owngil, RtOpts),
    show(pyport:call(C, '__main__', cli_call,
                     [unicode:characters_to_binary(Mod), unicode:characters_to_binary(Fun),
                      [unicode:characters_to_binary(A) || A <- Args]]));
command({run, File, Args}, RtOpts) ->
    filelib:is_regular(File) orelse fail(2, "pyport: no file ~ts~n", [File]),
    print_python_output(),
    {_, C} = context(main, RtOpts),
    Result = pyport:call(C, '__main__', cli_run,
                         [unicode:characters_to_binary(filename:absname(File)),
                          [unicode:characters_to_binary(A) || A <- Args]]),
    logger_drain(),
    case Result of
        {ok, Code} when is_integer(Code) -> Code;
        Error -> show(Error)
    end;
command({doctor, Modules}, RtOpts) ->
    doctor(Modules, RtOpts);
command(bench, _RtOpts) ->
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

%% Ends the command with exit status Code (run/1 returns it).
-spec fail(non_neg_integer(), io:format(), [term()]) -> no_return().
fail(Code, Format, Args) ->
    io:format(standard_error, Format, Args),
    throw({?MODULE, exit, Code}).

%%% run: Python's output, as it comes

%% Python's print and sys.stderr reach Erlang's logger (domain [pyport, python]); here
%% they go to this process's stdout and stderr instead, line by line, and nowhere else
%% (in Mix's VM Elixir's handler would print them again).
print_python_output() ->
    _ = [logger:remove_handler(Id) || Id <- logger:get_handler_ids()],
    ok = logger:set_primary_config(level, info),  % logging.info() records too
    ok = logger:add_handler(pyport_cli_output, ?MODULE,
                            #{filter_default => stop,
                              filters => [{python, {fun logger_filters:domain/2,
                                                    {log, sub, [pyport, python]}}}]}).

%% @private logger handler callback: the line itself, nothing around it.
-spec log(logger:log_event(), logger:handler_config()) -> ok.
log(#{level := Level, msg := Msg}, _Config) ->
    Device = case Level of
                 notice -> standard_io;  % print() and sys.stdout
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

doctor(Modules, RtOpts) ->
    {Rt, Main} = context(main, RtOpts),
    {ok, Info} = pyport:info(Rt),
    {ok, Exe} = pyport:eval(Main, <<"sys.executable">>),
    io:format("Python      ~ts (~ts)~n", [maps:get(python_version, Info), Exe]),
    io:format("chosen      ~ts~n", [chosen(os:getenv("PYPORT_EXECUTABLE"))]),
    OwnGil = maps:get(owngil, Info),
    io:format("OWN_GIL     ~ts~n", [yes_no(OwnGil)]),
    Sections = case Modules of
                   [] ->
                       {ok, [Packages, Stdlib]} = pyport:call(Main, '__main__', cli_installed, []),
                       [{"installed packages", Packages},
                        {"standard library extension modules", Stdlib}];
                   _ ->
                       [{"", [unicode:characters_to_binary(M) || M <- Modules]}]
               end,
    Results = [doctor_section(Rt, Main, Title, Names, OwnGil) || {Title, Names} <- Sections],
    case lists:all(fun(R) -> R end, lists:append(Results)) of
        true -> 0;
        false -> 1
    end.

%% Why the port program links this Python: the record its build left beside it
%% (scripts/build-port.sh writes priv/pyport.build).
chosen(Binary) ->
    Record = filename:absname(filename:join(filename:dirname(Binary), "pyport.build")),
    case file:read_file(Record) of
        {ok, Text} ->
            Lines = string:lexemes(unicode:characters_to_list(Text), "\n"),
            Why = case [W || "why=" ++ W <- Lines] of
                      [W | _] -> W;
                      [] -> "not said"
                  end,
            io_lib:format("~ts (recorded in ~ts; later builds and the apps' venvs take "
                          "it until PYPORT_PYTHON names another)", [Why, Record]);
        {error, _} ->
            io_lib:format("not recorded (no ~ts: a port program built by hand)", [Record])
    end.

doctor_section(Rt, Main, Title, Names, OwnGil) ->
    io:format("~n~ts~-28s ~-12s ~ts~n",
              [[[Title, $\n] || Title =/= ""], "module", "main", "owngil (sub-interpreter)"]),
    case Names of
        [] -> io:format("(none)~n");
        _ -> ok
    end,
    [doctor_module(Rt, Main, M, OwnGil) || M <- Names].

doctor_module(Rt, Main, Module, OwnGil) ->
    InMain = try_import(Main, Module),
    InSub = case OwnGil of
                true ->
                    %% a fresh sub-interpreter per module: nothing imported before
                    case pyport:new_context(Rt, #{mode => owngil, preload => ?HELPERS}) of
                        {ok, C} ->
                            R = try_import(C, Module),
                            _ = pyport:stop_context(C),
                            R;
                        {error, Reason} ->
                            iolist_to_binary(io_lib:format("no context: ~0p", [Reason]))
                    end;
                false ->
                    <<"(no OWN_GIL)">>
            end,
    %% padded, not cut: a long package name stays whole (its row just runs longer)
    io:format("~ts ~ts ~ts~n", [string:pad(Module, 28), string:pad(short(InMain), 12), InSub]),
    InMain =:= <<"ok">>.

%% <<"ok">> or what went wrong, in one line; a module that takes its context (or the
%% runtime) down with it is reported, not a crash of the whole table.
try_import(Context, Module) ->
    case pyport:call(Context, '__main__', cli_try_import, [Module]) of
        {ok, Result} -> Result;
        {error, Reason} -> iolist_to_binary(io_lib:format("error: ~0p", [Reason]))
    end.

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

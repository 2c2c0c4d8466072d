%% @doc Helpers shared by the pyport Common Test suites.
-module(pyport_ct).

-export([start_app/0]).
-export([stop_app/0]).
-export([wait_for/2]).
-export([assert_no_messages/0]).
-export([os_pid/1]).
-export([kill_and_await_restart/1]).
-export([await_new_os_pid/2]).
-export([init_mode_group/4]).
-export([repo_root/0]).
-export([head_commit/0]).
-export([shell/2]).
-export([path_without/2]).
-export([end_mode_group/1]).
-export([start_runtime_ab/2]).
-export([contexts_ab/2]).
-export([runtime_port/1]).
-export([forward_logs/0]).
-export([forward_logs_with_meta/0]).
-export([rss_kib/1]).
-export([peak_rss_kib/1]).
-export([stream_items/1]).
-export([stop_forwarding_logs/0]).
-export([log/2]).
-export([start_distribution/0]).
-export([code_path/0]).

-define(LOG_HANDLER, pyport_ct_logs).

%% Starts pyport with its default runtime; fails loudly when the port program is missing.
-spec start_app() -> ok.
start_app() ->
    Exe = case os:getenv("PYPORT_EXECUTABLE") of
              false -> filename:join(code:priv_dir(pyport), "pyport");
              "" -> filename:join(code:priv_dir(pyport), "pyport");
              Path -> Path
          end,
    filelib:is_regular(Exe) orelse ct:fail({port_program_missing, Exe, "run `make build`"}),
    {ok, _} = application:ensure_all_started(pyport),
    ok.

-spec stop_app() -> ok.
stop_app() ->
    _ = application:stop(pyport),
    ok.

%% Calls Fun until it returns {ok, Value}, at most Tries times; the `receive after' is
%% only the back-off between tries, never the thing waited for.
-spec wait_for(fun(() -> {ok, T} | term()), non_neg_integer()) -> T.
wait_for(Fun, 0) ->
    ct:fail({gave_up_waiting, Fun()});
wait_for(Fun, Tries) ->
    case Fun() of
        {ok, Value} -> Value;
        _ -> receive after 10 -> wait_for(Fun, Tries - 1) end
    end.

-spec assert_no_messages() -> ok.
assert_no_messages() ->
    receive
        Msg -> ct:fail({unexpected_message, Msg})
    after 0 ->
        ok
    end.

-spec os_pid(pyport:runtime()) -> integer().
%% Starts the app and a runtime `Name' with contexts `a' and `b' made from `Spec'.
start_runtime_ab(Name, Spec) ->
    ok = start_app(),
    {ok, _} = pyport:start_runtime(#{name => Name,
                                     contexts => [Spec#{name => a}, Spec#{name => b}]}),
    ok.

%% Adds the handles of contexts `a' and `b' of runtime `Name' to a CT Config.
contexts_ab(Name, Config) ->
    {ok, A} = pyport:context(Name, a),
    {ok, B} = pyport:context(Name, b),
    [{a, A}, {b, B} | Config].

%% Kills the named runtime's OS process and waits (bounded retries on pyport:info)
%% until its supervisor has started a new one; returns the new OS pid.
kill_and_await_restart(Name) ->
    OsPid = os_pid(Name),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    await_new_os_pid(Name, OsPid).

%% Waits (bounded retries on pyport:info) until the runtime runs another OS process
%% than OsPid; returns the new one.
-spec await_new_os_pid(pyport:runtime(), integer()) -> integer().
await_new_os_pid(Runtime, OsPid) ->
    wait_for(fun() ->
                 case pyport:info(Runtime) of
                     {ok, #{os_pid := New}} when New =/= OsPid -> {ok, New};
                     Other -> {not_yet, Other}
                 end
             end, 1000).

%% This repository (the tests' pyport is _build/test/lib/pyport, four levels down).
-spec repo_root() -> file:filename().
repo_root() ->
    filename:absname(filename:join([code:lib_dir(pyport), "..", "..", "..", ".."])).

%% The commit this repository's checkout is at: dependency tests take pyport at it
%% (not at main), so a branch tests its own code.
-spec head_commit() -> string().
head_commit() ->
    {0, Out} = shell(repo_root(), "git rev-parse HEAD"),
    string:trim(Out).

%% Runs a shell command in Dir; returns its exit status and output (also logged).
-spec shell(file:filename(), string()) -> {non_neg_integer(), string()}.
shell(Dir, Command) ->
    Out = os:cmd("cd " ++ Dir ++ " && " ++ Command ++ " 2>&1; echo \"exit=$?\""),
    ct:log("~s:~n~s", [Command, Out]),
    {match, [Text, Code]} = re:run(Out, "^(.*)exit=([0-9]+)\\s*$",
                                   [dotall, {capture, all_but_first, list}]),
    {list_to_integer(Code), Text}.

%% Fills the empty directory Bin to stand for this machine's PATH less the names Drop
%% matches (a symlink to the first of each other name on the PATH); returns Bin.
-spec path_without(file:filename(), fun((string()) -> boolean())) -> file:filename().
path_without(Bin, Drop) ->
    Dirs = [D || D <- string:lexemes(os:getenv("PATH"), ":"), filelib:is_dir(D)],
    lists:foreach(
      fun(Dir) ->
          {ok, Names} = file:list_dir(Dir),
          [link(filename:join(Dir, N), filename:join(Bin, N)) || N <- Names, not Drop(N)]
      end, Dirs),
    Bin.

link(Target, Link) ->
    case file:make_symlink(Target, Link) of
        ok -> ok;
        {error, eexist} -> ok  % an earlier PATH entry has this name
    end.

%% For suites whose cases run in groups `owngil' and `main': starts the runtime
%% `<Prefix>_<Mode>' with contexts `a' and `b' of that mode and `Preload'.
-spec init_mode_group(atom(), owngil | main, binary(), list()) -> list().
init_mode_group(Prefix, Mode, Preload, Config) ->
    Runtime = list_to_atom(atom_to_list(Prefix) ++ "_" ++ atom_to_list(Mode)),
    ok = start_runtime_ab(Runtime, #{mode => Mode, preload => Preload}),
    [{runtime, Runtime}, {mode, Mode} | Config].

-spec end_mode_group(list()) -> ok.
end_mode_group(Config) ->
    _ = pyport:stop_runtime(proplists:get_value(runtime, Config)),
    ok.

os_pid(Runtime) ->
    {ok, #{os_pid := OsPid}} = pyport:info(Runtime),
    OsPid.

%% The port of a runtime, from the table the callers read.
-spec runtime_port(atom()) -> port().
runtime_port(Name) ->
    [{Name, _Pid, Port, _CallTimeout, _MaxFrame}] = ets:lookup(pyport_runtimes, Name),
    Port.

%% Sends every logger event of domain [pyport | _] to the calling process as
%% {pyport_log, Level, Message}.
-spec forward_logs() -> ok.
forward_logs() ->
    ok = logger:add_handler(?LOG_HANDLER, ?MODULE,
                            #{config => #{pid => self()},
                              filter_default => stop,
                              filters => [{pyport, {fun logger_filters:domain/2,
                                                    {log, sub, [pyport]}}}]}).

%% Like forward_logs/0, but sends {pyport_log, Level, Message, Metadata}.
-spec forward_logs_with_meta() -> ok.
forward_logs_with_meta() ->
    ok = logger:add_handler(?LOG_HANDLER, ?MODULE,
                            #{config => #{pid => self(), meta => true},
                              filter_default => stop,
                              filters => [{pyport, {fun logger_filters:domain/2,
                                                    {log, sub, [pyport]}}}]}).

-spec stop_forwarding_logs() -> ok.
stop_forwarding_logs() ->
    _ = logger:remove_handler(?LOG_HANDLER),
    ok.

%% logger handler callback
-spec log(logger:log_event(), logger:handler_config()) -> ok.
log(#{level := Level, msg := Msg} = Event, #{config := #{pid := Pid} = Config}) ->
    Text = case Msg of
               {string, S} -> S;
               {report, R} -> io_lib:format("~p", [R]);
               {Format, Args} -> io_lib:format(Format, Args)
           end,
    Message = unicode:characters_to_binary(Text),
    case Config of
        #{meta := true} -> Pid ! {pyport_log, Level, Message, maps:get(meta, Event, #{})};
        #{} -> Pid ! {pyport_log, Level, Message}
    end,
    ok.

%% The resident set size of an OS process, in KiB.
-spec rss_kib(integer()) -> non_neg_integer().
rss_kib(OsPid) ->
    status_kib(OsPid, <<"VmRSS:">>).

%% The peak resident memory of OS process OsPid (KiB) over its life so far.
-spec peak_rss_kib(integer()) -> non_neg_integer().
peak_rss_kib(OsPid) ->
    status_kib(OsPid, <<"VmHWM:">>).

%% A "Field:  N kB" line of /proc/OsPid/status, as N.
status_kib(OsPid, Field) ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    [Kib] = [binary_to_integer(hd(binary:split(string:trim(Rest), <<" ">>)))
             || <<F:(byte_size(Field))/binary, Rest/binary>>
                    <- binary:split(Status, <<"\n">>, [global]),
                F =:= Field],
    Kib.

%% The items of a stream up to its end (each within 5 s).
-spec stream_items(pyport:stream()) -> [term()].
stream_items(Stream) ->
    case pyport:stream_next(Stream, 5000) of
        {data, Item} -> [Item | stream_items(Stream)];
        done -> []
    end.

%% Distribution for this node (for peer nodes), with epmd started if needed.
start_distribution() ->
    case node() of
        nonode@nohost ->
            _ = case os:find_executable("epmd") of
                    false -> ok;
                    Epmd -> os:cmd(Epmd ++ " -daemon")
                end,
            case net_kernel:start(pyport_ct, #{name_domain => shortnames}) of
                {ok, _} -> ok;
                {error, _} = Error -> Error
            end;
        _ ->
            ok
    end.

%% This node's code path as arguments of a peer node (peer:start_link/1's args).
code_path() ->
    lists:append([["-pa", P] || P <- code:get_path(), filelib:is_dir(P)]).

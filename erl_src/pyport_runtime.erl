%% @doc One pyport runtime: the stable process behind a runtime handle.
%%
%% A runtime's OS process may crash (a segfault in Python) and be replaced many times;
%% this process lives on through all of that. It starts the port owner
%% (`pyport_port', one per OS process incarnation), and when that exits for any reason
%% but a stop, it marks the runtime down (callers get `{error, {runtime_down, Reason}}'
%% at once) and starts a new one after a back-off delay: at once after a run that
%% lasted, then doubling from `restart => #{min_delay => Ms}' (default 100) up to
%% `max_delay' (default 5000; both in `pyport_opts') while the OS process keeps
%% crashing. Python crashing
%% therefore never makes a supervisor give up: not pyport's own, nor the user's when the
%% runtime runs under it through child_spec/1.
%%
%% Its pid (or its registered `name') is the handle `pyport:start_runtime/1' returns:
%% valid for context/2, info/1, new_context/2 and stop_runtime/1 across restarts.
%%
%% It writes the runtime's rows of the table `pyport_runtimes' (its pid, `down' while no
%% OS process serves, the restart count) through `pyport_table', and removes all the
%% runtime's rows when it stops.
-module(pyport_runtime).
-behaviour(gen_server).

-export([start_link/1]).
-export([child_spec/1]).
-export([restarts/1]).
-export([is_up/1]).
-export([key/1]).
-export([recycle/1]).
-export([context_id/2]).
-export([port_owner/1]).
-export([init/1]).
-export([handle_call/3]).
-export([handle_cast/2]).
-export([handle_info/2]).
-export([terminate/2]).

-export_type([opts/0]).
-export_type([key/0]).
-export_type([context_spec/0]).

%% A run at least this long counts as healthy: the next crash restarts at once.
-define(STABLE_MS, 10000).
%% How long it may take to stop (pyport_linked waits that long for its port owner).
-define(STOP_WAIT, 5000).
%% The exit status of a port program over its max_memory (src/memory.rs).
-define(MEMORY_EXIT, 76).

-type key() :: pyport_table:key().
-type context_spec() :: pyport_opts:context_spec().
-type opts() :: pyport_opts:opts().

-record(state, {
    key :: key(),
    opts :: opts(),
    %% the port owner serving now, if any
    port_owner :: pid() | undefined,
    started_at = 0 :: integer(),
    %% crashes since the last healthy run
    crashes = 0 :: non_neg_integer(),
    restarts = 0 :: non_neg_integer(),
    %% the `watch' option's scanner (pyport_watch), if any
    watcher :: pid() | undefined
}).

%%% API

%% @doc Starts a runtime linked to the caller. Returns `{error, Reason}' when its first
%% OS process cannot start, does not say hello within `start_timeout', or a context from
%% Opts cannot be created (later failures are restarted with back-off instead).
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(#{name := Name} = Opts) when is_atom(Name) ->
    pyport_linked:quiet_start(gen_server:start_link({local, Name}, ?MODULE, Opts, []));
start_link(Opts) when is_map(Opts) ->
    pyport_linked:quiet_start(gen_server:start_link(?MODULE, Opts, [])).

%% @doc A child spec for the user's own supervision tree. The runtime key (its
%% registered name, else a reference made here) is fixed in the spec, so handles of
%% contexts from Opts stay valid across restarts of that child.
-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(Opts0) when is_map(Opts0) ->
    %% issue 20: made in the caller, whose application's venv the runtime uses
    Opts = pyport_app_env:with_caller_app(Opts0),
    Key = runtime_key(Opts),
    #{id => {?MODULE, Key},
      start => {?MODULE, start_link, [Opts#{key => Key}]},
      restart => permanent,
      shutdown => ?STOP_WAIT + 1000,
      type => worker,
      modules => [?MODULE]}.

%% @doc How many times the runtime's OS process was replaced.
-spec restarts(key()) -> non_neg_integer().
restarts(Key) ->
    pyport_table:count({restarts, Key}).

%% @doc Whether an OS process serves the runtime now (its port owner is alive: a
%% caller told `runtime_down' by its monitor never finds it up a moment later).
-spec is_up(key()) -> boolean().
is_up(Key) ->
    case port_owner(Key) of
        {ok, Pid, _} -> is_process_alive(Pid);
        {error, _} -> false
    end.

%% @doc The key of the runtime behind that handle.
-spec key(pid()) -> {ok, key()} | {error, not_found}.
key(Pid) ->
    case pyport_table:lookup({pid, Pid}) of
        [{_, Key}] -> {ok, Key};
        [] -> {error, not_found}
    end.

%% @doc The id of the runtime's context with that name.
-spec context_id(key(), atom()) -> {ok, pos_integer()} | {error, not_found}.
context_id(Key, Name) ->
    case pyport_table:lookup({ctx, Key, Name}) of
        [{_, Id}] -> {ok, Id};
        [] -> {error, not_found}
    end.

%% @doc The port owner serving the runtime now, and its call timeout.
-spec port_owner(key()) -> {ok, pid(), timeout()} | {error, term()}.
port_owner(Key) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, _Port, Timeout, _MaxFrame}} -> {ok, Pid, Timeout};
        {error, _} = Error -> Error
    end.

%% @doc Replaces the runtime's OS process at once (no back-off, not counted as a
%% crash): a pool's `max_requests'. Requests in flight get `runtime_down', so the
%% caller drains first. Handles of the Opts contexts stay valid.
-spec recycle(pid()) -> ok | {error, term()}.
recycle(Pid) ->
    gen_server:call(Pid, recycle, infinity).

%%% gen_server callbacks

%% @private gen_server callback.
-spec init(opts()) -> {ok, #state{}} | {stop, term()}.
init(Opts0) ->
    process_flag(trap_exit, true),
    Key = runtime_key(Opts0),
    Opts = Opts0#{key => Key, runtime => self()},
    case pyport_opts:check(Opts0) of
        ok -> start_first(Key, Opts);
        {error, Reason} -> {stop, {shutdown, Reason}}
    end.

start_first(Key, Opts) ->
    case pyport_port:start_link(Opts) of
        {ok, Pid} ->
            true = pyport_table:runtime_started(self(), Key),
            {ok, #state{key = Key, opts = Opts, port_owner = Pid, started_at = now_ms(),
                        watcher = start_watch(Key, pyport_opts:watch_dirs(Opts))}};
        {error, Reason} ->
            {stop, {shutdown, Reason}}
    end.

%% @private gen_server callback.
-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(recycle, _From, #state{key = Key, port_owner = Pid} = S) ->
    true = pyport_table:runtime_down(Key, recycling),
    pyport_linked:stop([Pid]),
    S1 = restart(S#state{port_owner = undefined}),
    Reply = case S1#state.port_owner of
                undefined -> {error, restart_failed};
                _ -> ok
            end,
    {reply, Reply, S1};
handle_call(_Request, _From, S) ->
    {reply, {error, {bad_request, unknown_call}}, S}.

%% @private gen_server callback.
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, S) ->
    {noreply, S}.

%% @private gen_server callback.
-spec handle_info(term(), #state{}) -> {noreply, #state{}} | {stop, term(), #state{}}.
handle_info({'EXIT', Pid, Reason}, #state{port_owner = Pid} = S) ->
    {noreply, port_owner_down(Reason, S#state{port_owner = undefined})};
handle_info(restart, #state{port_owner = undefined} = S) ->
    {noreply, restart(S)};
handle_info(_Msg, S) ->
    {noreply, S}.

%% @private gen_server callback.
-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{key = Key, port_owner = Pid, watcher = Watcher}) ->
    %% the port owner stops its OS process; this returns once that is gone
    pyport_linked:stop([Watcher, Pid]),
    true = pyport_table:runtime_stopped(self(), Key),
    ok.

%% The `watch' option's scanner lives with this process, across restarts of the OS
%% process. Should it fail (a bug: it is logged as a crash), the runtime goes on
%% without it.
start_watch(_Key, []) ->
    undefined;
start_watch(Key, Dirs) ->
    {ok, Pid} = pyport_watch:start_link(Key, Dirs),
    Pid.

%%% Restarts

runtime_key(#{key := Key}) -> Key;
runtime_key(#{name := Name}) when is_atom(Name) -> Name;
runtime_key(_) -> make_ref().

%% The OS process is gone: callers are told at once, and a new one comes after the
%% back-off delay.
port_owner_down(Reason, #state{key = Key, started_at = Started, crashes = Crashes} = S) ->
    true = pyport_table:runtime_down(Key, Reason),
    Crashes1 = case now_ms() - Started >= ?STABLE_MS of
                   true -> 0;
                   false -> Crashes
               end,
    schedule_restart({exited, Reason}, S#state{crashes = Crashes1}).

%% A crash pyport contains is one warning line (the port owner leaves no crash report:
%% pyport_port), saying what happened and when the runtime comes back.
schedule_restart(Why, #state{key = Key, crashes = Crashes, opts = Opts} = S) ->
    Delay = delay(Crashes, pyport_opts:restart_delays(Opts)),
    logger:warning("~ts: ~ts; restarting it in ~b ms", [who(Key), why(Why), Delay],
                   #{domain => [pyport], pyport_runtime => Key}),
    _ = erlang:send_after(Delay, self(), restart),
    S#state{crashes = Crashes + 1}.

who({pyport_pool, Pool}) -> io_lib:format("pyport pool ~p", [Pool]);
who({pyport_pool, Pool, I}) -> io_lib:format("pyport pool ~p (member ~b)", [Pool, I]);
who(Key) -> io_lib:format("pyport runtime ~p", [Key]).

why({exited, {port_exit, Status}}) when Status > 128 ->
    io_lib:format("its Python process was killed by signal ~b~ts (exit status ~b)",
                  [Status - 128, signal_name(Status - 128), Status]);
why({exited, {port_exit, ?MEMORY_EXIT}}) ->
    io_lib:format("its Python process went over max_memory (exit status ~b)", [?MEMORY_EXIT]);
why({exited, {port_exit, Status}}) ->
    io_lib:format("its Python process exited (exit status ~b)", [Status]);
why({exited, Reason}) ->
    io_lib:format("its Python process is gone (~0p)", [Reason]);
why({not_started, Reason}) ->
    io_lib:format("its Python process did not start again (~0p)", [Reason]).

signal_name(4) -> " (SIGILL)";
signal_name(6) -> " (SIGABRT)";
signal_name(7) -> " (SIGBUS)";
signal_name(8) -> " (SIGFPE)";
signal_name(9) -> " (SIGKILL)";
signal_name(11) -> " (SIGSEGV)";
signal_name(15) -> " (SIGTERM)";
signal_name(_) -> "".

%% No wait after a healthy run; then min_delay, doubling up to max_delay.
delay(0, _) ->
    0;
delay(Crashes, {Min, Max}) ->
    min(Max, Min bsl min(Crashes - 1, 20)).

restart(#state{key = Key, opts = Opts, restarts = N} = S) ->
    true = pyport_table:restarted(Key, N + 1),
    S1 = S#state{restarts = N + 1, started_at = now_ms()},
    case pyport_port:start_link(Opts) of
        {ok, Pid} ->
            S1#state{port_owner = Pid};
        {error, Reason} ->
            %% It did not even start (a preload that crashes, say): down, try again.
            true = pyport_table:runtime_down(Key, Reason),
            schedule_restart({not_started, Reason}, S1)
    end.

now_ms() ->
    erlang:monotonic_time(millisecond).

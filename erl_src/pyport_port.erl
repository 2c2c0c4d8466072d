%% @doc The owner of one `pyport' OS process (one incarnation of a runtime): the
%% gen_server that owns its port. `pyport_runtime', the runtime's stable process,
%% starts it, and starts a new one (with back-off) when it exits.
%%
%% The wire protocol is described in docs/protocol.md. This process
%% - starts the port program and waits for its `hello' event (no sleeping),
%% - creates the contexts given in Opts (ids 1..N, again after every restart),
%% - publishes `{Key, Pid, Port, CallTimeout, MaxFrame}' in the ETS table
%%   `pyport_runtimes', so callers write their requests to the port themselves,
%% - routes each reply to the alias found in its header without decoding the payload,
%% - turns `log' events into `logger' calls (domain `[pyport, python]'),
%% - hands each `erlang.call' from Python (kind 2) to a new process, which runs the
%%   registered function and writes the `callback_result' to the port itself, so this
%%   process never waits for a callback,
%% - delivers each `erlang.send' (kind 3) itself, so messages from one Python sender
%%   arrive in the order they were sent,
%% - frees the envs and object handles of processes that exit: the facade casts
%%   `{own, Pid, CtxId, Item}' after creating one, this process monitors each owning
%%   process once and, when it goes down, writes a fire-and-forget `drop_env' or
%%   `release' for each of its items,
%% - serves control requests (new_context, stop_context, info) asynchronously, so a
%%   slow interpreter creation never delays the routing of replies.
%%
%% It keeps no table of pending calls: every caller monitors this process (with an
%% alias), so a crash of the port program fails them through their monitors.
%%
%% ETS rows written here (the first removed in terminate/2, the others replaced at the
%% next start and removed by `pyport_runtime' when the runtime stops):
%%   {Key, Pid, Port, CallTimeout, MaxFrame}   this incarnation
%%   {{ctx, Key, Name}, Id}                      named contexts
%%   {{contexts, Key}, {Id1, ..., IdN}}          the contexts from Opts, in order
-module(pyport_port).
-behaviour(gen_server).

-export([start_link/1]).
-export([quiet_start/1]).
-export([check_opts/1]).
-export([stop_linked/1]).
-export([atoms_spent/1]).
-export([runtime_options/0]).
-export([unknown_key/2]).
-export([max_atoms/1]).
-export([call_timeout/1]).
-export([restarts/1]).
-export_type([key/0, context_spec/0, opts/0]).
-export([new_context/3]).
-export([stop_context/3]).
-export([info/2]).
-export([channel_opened/5]).
-export([init/1]).
-export([handle_call/3]).
-export([handle_cast/2]).
-export([handle_info/2]).
-export([terminate/2]).


-define(TABLE, pyport_runtimes).
-define(FUNCTIONS, pyport_functions).
-define(DEFAULT_CALL_TIMEOUT, 30000).
-define(DEFAULT_START_TIMEOUT, 10000).
-define(DEFAULT_MAX_FRAME, 1073741824).
-define(DEFAULT_MAX_ATOMS, 5000).
-define(MAX_CALLBACKS, 100).
-define(DEFAULT_MAX_MAILBOX, 10000).
%% How long the OS process may take to exit when asked to before it is killed, and how
%% long a process stopped with stop_linked/1 may take to end before it is killed. The
%% first (twice: the exit after the kill too) stays well within the second, and the
%% second within the supervisors' shutdown time (pyport_runtime, pyport_pool).
-define(EXIT_GRACE, 1500).
-define(STOP_WAIT, 5000).
%% How often a destination refused for a full mailbox is looked at again.
-define(BUSY_CHECK_MS, 10).
-define(PROTOCOL_VERSION, 1).
%% Ids of contexts made with new_context start above this, ids 1..N are the Opts ones.
-define(DYNAMIC_ID_BASE, 1000000).
%% The keys of a runtime's Opts (`key' and `handle' are set by `pyport_runtime') and of
%% a context spec. Any other key is `{error, {bad_option, Key}}' at start.
-define(RUNTIME_OPTIONS, [name, key, handle, executable, path, venv, app, env, contexts,
                          call_timeout, start_timeout, max_frame, queue_capacity,
                          stuck_after, max_memory, max_atoms, max_reply, max_mailbox,
                          none, arrays, restart]).
-define(CONTEXT_OPTIONS, [name, mode, preload, path]).

%% a registered name, a reference, or a pool's `{pyport_pool, Name, ...}'
-type key() :: atom() | reference() | tuple().
-type context_spec() :: #{name => atom(),
                          mode => owngil | main,
                          preload => iodata(),
                          path => [file:filename_all()]}.
-type opts() :: #{name => atom(),
                  key => key(),
                  %% set by pyport_runtime for its port owner: the runtime's own pid
                  handle => pid(),
                  executable => file:filename_all(),
                  path => [file:filename_all()],
                  venv => file:filename_all(),
                  %% issue 20: whose priv/python/.venv (pyport_app_env)
                  app => atom(),
                  env => [{string(), string() | false}],
                  contexts => [context_spec()],
                  call_timeout => timeout(),
                  start_timeout => non_neg_integer(),
                  max_frame => pos_integer(),
                  queue_capacity => pos_integer(),
                  stuck_after => pos_integer() | infinity,
                  max_memory => pos_integer(),
                  max_atoms => non_neg_integer(),
                  max_reply => pos_integer(),
                  max_mailbox => pos_integer(),
                  none => none | nil | undefined,
                  arrays => lists | binary,
                  restart => #{min_delay => non_neg_integer(),
                               max_delay => non_neg_integer()}}.
-type ctx_id() :: pos_integer().
-type ctx_info() :: #{id := ctx_id(), name := atom(), mode := owngil | main}.
-type action() :: {new_context, ctx_id(), ctx_info()}
                | {stop_context, ctx_id()}
                | info.
%% An env or an object handle in a context, freed when the process owning it exits.
-type item() :: {env | ref, non_neg_integer()} | {stream, binary()}.
-type owned() :: {ctx_id(), item()}.

-record(state, {
    key :: key(),
    %% the runtime's stable process (`pyport_runtime'), the handle users hold
    handle :: pid(),
    port :: port(),
    hello :: map(),
    contexts = #{} :: #{ctx_id() => ctx_info()},
    %% names taken by ready contexts and by contexts being created
    names = #{} :: #{atom() => ctx_id()},
    %% control requests sent by this process, by the alias in their header
    pending = #{} :: #{reference() => {gen_server:from(), action()}},
    max_frame = ?DEFAULT_MAX_FRAME :: pos_integer(),
    %% atoms Python may create in the node (from hello), and whether that is used up
    max_atoms = ?DEFAULT_MAX_ATOMS :: non_neg_integer(),
    atom_limit_logged = false :: boolean(),
    %% callback processes running (by monitor), and the callbacks waiting for a turn
    callbacks = #{} :: #{reference() => true},
    %% messages a process may have queued before Python's sends to it are refused; the
    %% destinations refused now, by context and Python's number for them; and how many
    %% sends were dropped
    max_mailbox = ?DEFAULT_MAX_MAILBOX :: pos_integer(),
    busy = #{} :: #{{ctx_id(), non_neg_integer()} => pid()},
    sends_dropped = 0 :: non_neg_integer(),
    callback_queue = queue:new() :: queue:queue({binary(), {boolean(), non_neg_integer()}}),
    %% processes owning envs and handles: their monitor and their items
    owners = #{} :: #{pid() => {reference(), #{owned() => true}}},
    %% each item's owner
    owned = #{} :: #{owned() => pid()},
    %% open channels: the counters their handles share (items untaken, closed flag)
    channels = #{} :: #{{ctx_id(), pos_integer()} => counters:counters_ref()},
    %% the open channel of each name, by context
    channel_names = #{} :: #{{ctx_id(), binary()} => pos_integer()}
}).

%%% API

%% @doc Starts the port program linked to the caller (a `pyport_runtime'), which gives
%% the runtime's key in Opts. Returns `{error, Reason}' when the port program cannot
%% start, does not say hello within `start_timeout', or a context from Opts cannot be
%% created.
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(#{key := _} = Opts) ->
    quiet_start(gen_server:start_link(?MODULE, Opts, [])).

%% @private A process that fails to start exits with `{shutdown, Reason}' (no crash
%% report for a failure its starter is told of); the starter gets `{error, Reason}'.
%% A starter that traps exits also has the failed process's exit taken out of its
%% mailbox when it has come: only that one (same reason), never another linked
%% process's, which the starter must still see. One that comes later is the starter's
%% to ignore.
-spec quiet_start({ok, pid()} | {error, term()}) -> {ok, pid()} | {error, term()}.
quiet_start({error, {shutdown, Reason}}) ->
    receive {'EXIT', _, {shutdown, Reason}} -> ok after 0 -> ok end,
    {error, Reason};
quiet_start({error, Reason} = Error) ->
    receive {'EXIT', _, Reason} -> ok after 0 -> ok end,
    Error;
quiet_start(Started) ->
    Started.

%% @doc Checks a runtime's Opts before anything starts: `{error, {bad_option, Key}}'
%% for a key no runtime knows (a misspelt `call_timout' would otherwise be ignored),
%% `{error, {bad_option, {venv, Dir}}}' for a `venv' that is no virtualenv (no
%% `lib/python*/site-packages' under it), and `{error, {bad_option, Key}}' for a
%% context spec in `contexts' with an unknown key.
-spec check_opts(map()) -> ok | {error, {bad_option, term()}}.
check_opts(Opts) ->
    case unknown_key(Opts, ?RUNTIME_OPTIONS) of
        none when is_map_key(venv, Opts) -> check_venv(Opts);
        none -> pyport_app_env:check(Opts);  % issue 20: the app's venv
        Key -> {error, {bad_option, Key}}
    end.

%% @private The keys a runtime's Opts may have (for a pool, which passes them on).
-spec runtime_options() -> [atom()].
runtime_options() ->
    ?RUNTIME_OPTIONS.

check_venv(#{venv := Dir}) ->
    case venv_site_packages(Dir) of
        [] -> {error, {bad_option, {venv, Dir}}};
        _ -> ok
    end;
check_venv(_) ->
    ok.

venv_site_packages(Dir) ->
    try
        filelib:wildcard(filename:join([to_list(Dir), "lib", "python*", "site-packages"]))
    catch
        error:_ -> []
    end.

%% @doc The first key of an Opts map that is not in Known, or `none'.
-spec unknown_key(map(), [atom()]) -> term().
unknown_key(Map, Known) ->
    case [K || K <- maps:keys(Map), not lists:member(K, Known)] of
        [] -> none;
        [Key | _] -> Key
    end.

%% @doc Creates a context; replies `{ok, Id}' once its interpreter is ready.
-spec new_context(pid(), context_spec(), timeout()) -> {ok, ctx_id()} | {error, term()}.
new_context(Pid, Spec, Timeout) ->
    gen_call(Pid, {new_context, Spec}, Timeout).

%% @doc Ends a context; `{error, not_found}' when the runtime does not know it.
-spec stop_context(pid(), ctx_id(), timeout()) -> ok | {error, term()}.
stop_context(Pid, Id, Timeout) ->
    gen_call(Pid, {stop_context, Id}, Timeout).

%% @doc What the port program reports, plus the contexts with their names and modes.
-spec info(pid(), timeout()) -> {ok, map()} | {error, term()}.
info(Pid, Timeout) ->
    gen_call(Pid, info, Timeout).

%% @doc A channel was opened: its handles share Counters. A channel of the same name in
%% that context is replaced (the port program closed it): its handles answer
%% `{error, closed}' from the moment this returns.
-spec channel_opened(pid(), ctx_id(), pos_integer(), binary(), counters:counters_ref()) -> ok.
channel_opened(Pid, CtxId, ChanId, Name, Counters) ->
    case gen_call(Pid, {channel, CtxId, ChanId, Name, Counters}, infinity) of
        ok -> ok;
        {error, _} -> counters:put(Counters, 2, 1)  % the runtime is gone, and the channel
    end,
    ok.

gen_call(Pid, Request, Timeout) ->
    try
        gen_server:call(Pid, Request, Timeout)
    catch
        exit:{timeout, _} -> {error, timeout};
        exit:{Reason, _} -> {error, {runtime_down, Reason}}
    end.

%%% gen_server callbacks

%% @private gen_server callback.
-spec init(opts()) -> {ok, #state{}} | {stop, term()}.
init(Opts) ->
    process_flag(trap_exit, true),
    %% A router: replies must not wait behind busy callers, and a long queue of port
    %% data must not make its garbage collections expensive.
    process_flag(priority, high),
    process_flag(message_queue_data, off_heap),
    case ets:whereis(?TABLE) of
        undefined -> {stop, {shutdown, pyport_not_started}};
        _ -> init_runtime(maps:get(key, Opts), Opts)
    end.

init_runtime(Key, Opts) ->
    Deadline = erlang:monotonic_time(millisecond)
        + maps:get(start_timeout, Opts, ?DEFAULT_START_TIMEOUT),
    case opts_contexts(maps:get(contexts, Opts, [])) of
        {error, Reason} ->
            {stop, {shutdown, Reason}};
        {ok, Contexts} ->
            case open(Opts) of
                {error, Reason} ->
                    {stop, {shutdown, Reason}};
                {ok, Port} ->
                    case start_port(Key, Port, Contexts, max_atoms(Opts), Deadline) of
                        {ok, Hello} ->
                            S = #state{key = Key, port = Port, hello = Hello,
                                       handle = maps:get(handle, Opts, self()),
                                       max_atoms = max_atoms(Opts),
                                       max_mailbox = maps:get(max_mailbox, Opts,
                                                              ?DEFAULT_MAX_MAILBOX),
                                       max_frame = maps:get(max_frame, Hello,
                                                            max_frame(Opts))},
                            {ok, publish(Opts, Contexts, Hello, S)};
                        {error, Reason} ->
                            close(Port),
                            {stop, {shutdown, Reason}}
                    end
            end
    end.

%% @private gen_server callback.
-spec handle_call(term(), gen_server:from(), #state{}) -> {noreply, #state{}}
                                                         | {reply, term(), #state{}}.
handle_call({new_context, Spec}, From, S) ->
    case context_body(Spec) of
        {ok, Body} -> start_context(Body, From, S);
        {error, _} = Error -> {reply, Error, S}
    end;
handle_call({stop_context, Id}, From, S) when is_integer(Id) ->
    {noreply, control({stop_context, Id}, {stop_context, Id}, From, S)};
handle_call(info, From, S) ->
    {noreply, control(info, info, From, S)};
handle_call({channel, CtxId, ChanId, Name, Counters}, _From,
            #state{channels = Channels, channel_names = Names} = S) ->
    Channels1 = case Names of
                    #{{CtxId, Name} := Old} -> close_channel({CtxId, Old}, Channels);
                    #{} -> Channels
                end,
    {reply, ok, S#state{channels = Channels1#{{CtxId, ChanId} => Counters},
                        channel_names = Names#{{CtxId, Name} => ChanId}}};
handle_call(_Request, _From, S) ->
    {reply, {error, {bad_request, unknown_call}}, S}.

%% @private gen_server callback.
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast({own, Pid, CtxId, Item}, S) when is_pid(Pid) ->
    {noreply, own(Pid, {CtxId, Item}, S)};
handle_cast({disown, CtxId, Item}, S) ->
    {noreply, disown({CtxId, Item}, S)};
handle_cast({channel_closed, CtxId, ChanId}, #state{channels = Channels,
                                                   channel_names = Names} = S) ->
    {noreply, S#state{channels = maps:remove({CtxId, ChanId}, Channels),
                      channel_names = maps:filter(fun({C, _}, Id) ->
                                                                not (C =:= CtxId andalso Id =:= ChanId)
                                                        end, Names)}};
handle_cast(_Msg, S) ->
    {noreply, S}.

%% @private gen_server callback.
-spec handle_info(term(), #state{}) -> {noreply, #state{}} | {stop, term(), #state{}}.
handle_info({Port, {data, <<Kind, HLen:16, H:HLen/binary, Payload/binary>>}},
            #state{port = Port} = S) ->
    %% The top bit of the kind: the frame holds atoms past the max_atoms budget and is
    %% decoded with `[safe]' (see the port program's `atoms').
    Safe = Kind band 16#80 =/= 0,
    S1 = case Safe of
             true -> atom_limit_reached(S);
             false -> S
         end,
    frame(Kind band 16#7f, H, Payload, Safe, S1);
handle_info({Port, {data, Frame}}, #state{port = Port, key = Key} = S) ->
    logger:warning("pyport runtime ~p: unexpected frame from the port: ~P",
                   [Key, Frame, 20], #{domain => [pyport]}),
    {noreply, S};
handle_info({Port, {exit_status, Status}}, #state{port = Port} = S) ->
    {stop, {port_exit, Status}, S};
handle_info({'EXIT', Port, Reason}, #state{port = Port} = S) ->
    {stop, {port_closed, Reason}, S};
handle_info({Alias, Payload}, #state{pending = Pending} = S)
  when is_map_key(Alias, Pending) ->
    {{From, Action}, Rest} = maps:take(Alias, Pending),
    _ = unalias(Alias),
    {noreply, complete(Action, From, binary_to_term(Payload), S#state{pending = Rest})};
handle_info(check_busy, S) ->
    {noreply, check_busy(S)};
handle_info({'DOWN', Mref, process, _Pid, _Reason}, #state{callbacks = Running} = S)
  when is_map_key(Mref, Running) ->
    {noreply, callback_done(Mref, S)};
handle_info({'DOWN', _Mref, process, Pid, _Reason}, #state{owners = Owners} = S)
  when is_map_key(Pid, Owners) ->
    {noreply, owner_down(Pid, S)};
handle_info(_Msg, S) ->
    {noreply, S}.

frame(Kind, H, Payload, Safe, S) when Kind =:= 0; Kind =:= 4 ->
    route(H, Payload, Safe, S),
    {noreply, S};
frame(1, _H, Payload, _Safe,
      #state{key = Key, contexts = Contexts, channels = Channels} = S) ->
    event(Payload, Key, Contexts, Channels),
    {noreply, S};
frame(2, _H, Payload, Safe, #state{max_atoms = Max} = S) ->
    {noreply, start_callback({Payload, {Safe, Max}}, S)};
frame(3, _H, Payload, Safe, S) ->
    {noreply, deliver(Payload, Safe, S)};
frame(Kind, _H, _Payload, _Safe, #state{key = Key} = S) ->
    logger:warning("pyport runtime ~p: a frame of unknown kind ~p from the port",
                   [Key, Kind], #{domain => [pyport]}),
    {noreply, S}.

%% At most `?MAX_CALLBACKS' callback processes run at once; the others wait in turn
%% (Python threads calling Erlang all at once cannot make the node spawn without bound).
start_callback(Call, #state{callbacks = Running, callback_queue = Queue} = S)
  when map_size(Running) >= ?MAX_CALLBACKS ->
    S#state{callback_queue = queue:in(Call, Queue)};
start_callback({Payload, Safe}, #state{key = Key, port = Port, max_frame = MaxFrame,
                                       callbacks = Running} = S) ->
    {_, Mref} = spawn_monitor(fun() -> run_callback(Key, Port, MaxFrame, Payload, Safe) end),
    S#state{callbacks = Running#{Mref => true}}.

callback_done(Mref, #state{callbacks = Running, callback_queue = Queue} = S) ->
    S1 = S#state{callbacks = maps:remove(Mref, Running)},
    case queue:out(Queue) of
        {{value, Call}, Rest} -> start_callback(Call, S1#state{callback_queue = Rest});
        {empty, _} -> S1
    end.

%% Logged once per OS process: Python has used up its atom budget.
atom_limit_reached(#state{atom_limit_logged = true} = S) ->
    S;
atom_limit_reached(#state{key = Key, max_atoms = Max} = S) ->
    logger:warning("pyport runtime ~p: Python used up its budget of ~b new atoms "
                   "(max_atoms); results with atoms the node does not have yet are "
                   "refused from now on", [Key, Max], #{domain => [pyport]}),
    S#state{atom_limit_logged = true}.

%% Decodes a payload; with `{true, Max}' safely: `{error, {atom_limit, Max}}' when it
%% holds an atom the node does not have.
decode(Payload, {false, _}) ->
    {ok, decode(Payload)};
decode(Payload, {true, Max}) ->
    try
        {ok, binary_to_term(Payload, [safe])}
    catch
        error:badarg -> {error, {atom_limit, Max}}
    end.

%% @private gen_server callback.
-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{key = Key, port = Port, channels = Channels}) ->
    stop_os_process(Port),
    maps:foreach(fun(_, Counters) -> counters:put(Counters, 2, 1) end, Channels),
    unpublish(Key, self()),
    ok.

%%% Start-up

%% The contexts from Opts, with ids 1..N in order.
opts_contexts(Specs) when is_list(Specs) ->
    Numbered = lists:zip(lists:seq(1, length(Specs)), Specs),
    Bodies = [{Id, context_body(Spec)} || {Id, Spec} <- Numbered],
    case [Spec || {_, {error, _}} = Spec <- Bodies] of
        [{_, Error} | _] ->
            Error;
        [] ->
            Contexts = [{Id, Body} || {Id, {ok, Body}} <- Bodies],
            Names = [Name || {_, #{name := Name}} <- Contexts],
            case Names -- lists:usort(Names) of
                [] -> {ok, Contexts};
                [Dup | _] -> {error, {duplicate_context_name, Dup}}
            end
    end;
opts_contexts(Other) ->
    {error, {bad_context_spec, Other}}.

open(Opts) ->
    Exe = executable(Opts),
    Args = path_args(Opts) ++ ["--max-frame", integer_to_list(max_frame(Opts))]
        ++ queue_args(Opts) ++ stuck_args(Opts) ++ memory_args(Opts) ++ atom_args(Opts)
        ++ reply_args(Opts) ++ none_args(Opts) ++ arrays_args(Opts),
    PortOpts = [{packet, 4}, binary, exit_status, use_stdio,
                {args, Args}, {env, maps:get(env, Opts, [])}],
    try
        {ok, open_port({spawn_executable, Exe}, PortOpts)}
    catch
        error:Reason -> {error, {open_port, Reason, Exe}}
    end.

executable(#{executable := Exe}) ->
    Exe;
executable(_) ->
    case os:getenv("PYPORT_EXECUTABLE") of
        Exe when is_list(Exe), Exe =/= "" -> Exe;
        _ -> filename:join(priv_dir(), "pyport")
    end.

priv_dir() ->
    case code:priv_dir(pyport) of
        {error, bad_name} -> filename:join(filename:dirname(filename:dirname(
                                           code:which(?MODULE))), "priv");
        Dir -> Dir
    end.

max_frame(Opts) ->
    maps:get(max_frame, Opts, ?DEFAULT_MAX_FRAME).

%% Requests a context queues beyond the one it runs; more get {error, overloaded}.
queue_args(#{queue_capacity := N}) when is_integer(N), N > 0 -> ["--queue", integer_to_list(N)];
queue_args(_) -> [].

%% Bytes of one reply or stream item.
reply_args(#{max_reply := Bytes}) when is_integer(Bytes), Bytes > 0 ->
    ["--max-reply", integer_to_list(Bytes)];
reply_args(_) -> [].

%% New atoms Python may create in the node over the runtime's life: this OS process
%% gets what the runtime's earlier ones left (atoms_spent/1).
atom_args(#{key := Key} = Opts) ->
    ["--max-atoms", integer_to_list(max(0, max_atoms(Opts) - atoms_spent(Key)))].

%% @doc A runtime's `max_atoms' (its default when Opts has none).
-spec max_atoms(map()) -> non_neg_integer().
max_atoms(#{max_atoms := N}) when is_integer(N), N >= 0 -> N;
max_atoms(_) -> ?DEFAULT_MAX_ATOMS.

%% @doc A runtime's `call_timeout' (its default when Opts has none).
-spec call_timeout(map()) -> timeout().
call_timeout(Opts) ->
    maps:get(call_timeout, Opts, ?DEFAULT_CALL_TIMEOUT).

%% @doc New atoms the runtime's Python made in the node so far, over all its OS
%% processes (the row `{{atoms, Key}, N}', removed by `pyport_runtime' when it stops).
-spec atoms_spent(key()) -> non_neg_integer().
atoms_spent(Key) ->
    row_count({atoms, Key}).

%% The port program counted a name it is about to send as an atom: it spends the
%% runtime's budget if the node does not have that atom yet (the frame that makes it
%% comes after this event).
atom_admitted(Key, Name) ->
    try binary_to_existing_atom(Name, utf8) of
        _ -> ok
    catch
        error:badarg ->
            _ = ets:update_counter(?TABLE, {atoms, Key}, 1, {{atoms, Key}, 0}),
            ok
    end.

%% The atom Python's None comes back as (`nil' for Elixir); none, nil and undefined
%% all go in as None whatever this is. The port program rejects other atoms at start.
none_args(#{none := Atom}) when is_atom(Atom) -> ["--none-as", atom_to_list(Atom)];
none_args(_) -> [].

%% The form numpy arrays come back in (issue 19): `lists' (the default) or `binary'
%% (`{ndarray, DType, Shape, Data}'). The port program rejects other values at start.
arrays_args(#{arrays := Form}) when is_atom(Form) -> ["--arrays", atom_to_list(Form)];
arrays_args(#{arrays := _}) -> ["--arrays", "?"];
arrays_args(_) -> [].

%% Resident bytes the OS process may use; past them it restarts (exit status 76).
memory_args(#{max_memory := Bytes}) when is_integer(Bytes), Bytes > 0 ->
    ["--max-memory", integer_to_list(Bytes)];
memory_args(_) -> [].

%% How long a request may stay blocked past its deadline (in C, where no interrupt
%% reaches it) before its context is replaced; `infinity' never.
stuck_args(#{stuck_after := infinity}) -> ["--stuck-after", "0"];
stuck_args(#{stuck_after := Ms}) when is_integer(Ms), Ms > 0 ->
    ["--stuck-after", integer_to_list(Ms)];
stuck_args(_) -> [].

%% `--path' for each entry of `path', then the site-packages of `venv'.
path_args(Opts) ->
    Venv = case maps:find(venv, Opts) of
               {ok, Dir} -> venv_site_packages(Dir);
               %% issue 20: else the venv of the runtime's application
               error -> lists:flatmap(fun venv_site_packages/1, pyport_app_env:venvs(Opts))
           end,
    lists:append([["--path", to_list(P)] || P <- maps:get(path, Opts, []) ++ Venv]).

to_list(P) when is_binary(P) -> unicode:characters_to_list(P);
to_list(P) -> P.

%% Waits for hello, then creates the contexts (all requested at once). Their
%% preload code may already call Erlang (kind 2), which is served here; the messages
%% it sends (kind 3) stay queued until the gen_server loop delivers them.
start_port(Key, Port, Contexts, MaxAtoms, Deadline) ->
    case await_hello(Key, Port, Deadline) of
        {ok, Hello} ->
            lists:foreach(fun({Id, Body}) ->
                              send_control(Port, {pyport_init, Id}, {new_context, Id, Body})
                          end, Contexts),
            Names = maps:from_list([{Id, ctx_info(Id, Body)} || {Id, Body} <- Contexts]),
            MaxFrame = maps:get(max_frame, Hello, ?DEFAULT_MAX_FRAME),
            case await_contexts({Key, Names, MaxFrame, MaxAtoms}, Port,
                                Contexts, Deadline) of
                ok -> {ok, Hello};
                {error, _} = Error -> Error
            end;
        {error, _} = Error ->
            Error
    end.

await_hello(Key, Port, Deadline) ->
    receive
        {Port, {data, <<1, HLen:16, _:HLen/binary, Payload/binary>>}} ->
            case decode(Payload) of
                {hello, #{protocol := ?PROTOCOL_VERSION} = Hello} -> {ok, Hello};
                {hello, Hello} -> {error, {protocol_mismatch, Hello}};
                {start_error, Reason} -> {error, {start_error, Reason}};
                {log, _, _, _} = Log -> log(Key, #{}, Log), await_hello(Key, Port, Deadline);
                Other -> {error, {bad_hello, Other}}
            end;
        {Port, {data, Frame}} ->
            {error, {bad_hello, Frame}};
        {Port, {exit_status, Status}} ->
            {error, {port_exit, Status}};
        {'EXIT', Port, Reason} ->
            {error, {port_closed, Reason}}
    after remaining(Deadline) ->
        {error, start_timeout}
    end.

await_contexts(_Known, _Port, [], _Deadline) ->
    ok;
await_contexts({Key, Names, MaxFrame, MaxAtoms} = Known, Port, Waiting,
               Deadline) ->
    receive
        {Port, {data, <<0, HLen:16, H:HLen/binary, Payload/binary>>}} ->
            {pyport_init, Id} = binary_to_term(H),
            {value, {Id, Body}, Rest} = lists:keytake(Id, 1, Waiting),
            case decode(Payload) of
                ok -> await_contexts(Known, Port, Rest, Deadline);
                Error -> {error, {context_error, Body, Error}}
            end;
        {Port, {data, <<1, HLen:16, _:HLen/binary, Payload/binary>>}} ->
            event(Payload, Key, Names, #{}),
            await_contexts(Known, Port, Waiting, Deadline);
        {Port, {data, <<Kind, HLen:16, _:HLen/binary, Payload/binary>>}}
          when Kind band 16#7f =:= 2 ->
            callback(Key, Port, MaxFrame, Payload, {Kind band 16#80 =/= 0, MaxAtoms}),
            await_contexts(Known, Port, Waiting, Deadline);
        {Port, {exit_status, Status}} ->
            {error, {port_exit, Status}};
        {'EXIT', Port, Reason} ->
            {error, {port_closed, Reason}}
    after remaining(Deadline) ->
        {error, {start_timeout, {contexts, [Body || {_, Body} <- Waiting]}}}
    end.

remaining(Deadline) ->
    max(0, Deadline - erlang:monotonic_time(millisecond)).

%% Makes the runtime visible to callers, replacing whatever a killed predecessor left
%% (its context names, and the `down' row of `pyport_runtime').
publish(Opts, Contexts, Hello, #state{key = Key, port = Port} = S) ->
    forget_names(Key),
    Infos = maps:from_list([{Id, ctx_info(Id, Body)} || {Id, Body} <- Contexts]),
    Names = maps:from_list([{Name, Id} || {Id, #{name := Name}} <- Contexts]),
    true = ets:insert(?TABLE, [{{ctx, Key, Name}, Id} || {Name, Id} <- maps:to_list(Names)]),
    true = ets:insert(?TABLE, {{contexts, Key}, list_to_tuple([Id || {Id, _} <- Contexts])}),
    MaxFrame = maps:get(max_frame, Hello, max_frame(Opts)),
    CallTimeout = call_timeout(Opts),
    true = ets:insert(?TABLE, {Key, self(), Port, CallTimeout, MaxFrame}),
    S#state{contexts = Infos, names = Names}.

%% Withdraws this incarnation's row; `pyport_runtime' then marks the runtime down (or,
%% when it stops, removes the rest). Context names stay: those of the Opts contexts
%% name the same contexts after the restart.
unpublish(Key, Pid) ->
    try
        true = ets:match_delete(?TABLE, {Key, Pid, '_', '_', '_'})
    catch
        error:badarg -> true  % the table is gone: the application is stopping
    end.

forget_names(Key) ->
    true = ets:match_delete(?TABLE, {{ctx, Key, '_'}, '_'}),
    true = ets:delete(?TABLE, {contexts, Key}).

%% Asks the port program to exit (`shutdown') and waits for its exit status: a stop
%% returns once the OS process is gone. One that has not exited after ?EXIT_GRACE (a
%% thread blocked in C that the exit waits for, a process that does not read) is
%% killed (SIGKILL) by its OS pid. A port that is already closed has exited.
stop_os_process(Port) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, OsPid} ->
            _ = pyport_call:cast_request(Port, 0, shutdown),
            receive
                {Port, {exit_status, _}} -> ok
            after ?EXIT_GRACE ->
                _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
                receive {Port, {exit_status, _}} -> ok after ?EXIT_GRACE -> ok end
            end,
            close(Port);
        undefined ->
            ok
    end.

%% @doc Stops linked processes that trap exits (port owners, runtimes): asks each to
%% stop (`shutdown') at once, then waits for their exits; one that takes longer than
%% ?STOP_WAIT is killed. Returns once all are gone. The caller traps exits.
-spec stop_linked([pid()]) -> ok.
stop_linked(Pids) ->
    lists:foreach(fun(Pid) -> exit(Pid, shutdown) end, Pids),
    Deadline = erlang:monotonic_time(millisecond) + ?STOP_WAIT,
    lists:foreach(fun(Pid) ->
                      receive
                          {'EXIT', Pid, _} -> ok
                      after remaining(Deadline) ->
                          exit(Pid, kill),
                          receive {'EXIT', Pid, _} -> ok end
                      end
                  end, Pids).

close(Port) ->
    try
        port_close(Port)
    catch
        error:badarg -> true
    end.

%%% Contexts and control requests

%% Validates a context spec and turns it into the body map of `new_context'.
context_body(Spec) when is_map(Spec) ->
    case unknown_key(Spec, ?CONTEXT_OPTIONS) of
        none -> context_body_checked(Spec);
        Key -> {error, {bad_option, Key}}
    end;
context_body(Spec) ->
    {error, {bad_context_spec, Spec}}.

context_body_checked(Spec) ->
    try
        Mode = maps:get(mode, Spec, owngil),
        true = Mode =:= owngil orelse Mode =:= main,
        Body0 = #{mode => Mode},
        Body1 = case maps:find(name, Spec) of
                    {ok, undefined} -> Body0;
                    {ok, Name} when is_atom(Name) -> Body0#{name => Name};
                    error -> Body0
                end,
        Body2 = case maps:find(preload, Spec) of
                    {ok, Code} -> Body1#{preload => text(Code)};
                    error -> Body1
                end,
        Body = case maps:find(path, Spec) of
                   {ok, Path} when is_list(Path) -> Body2#{path => [text(P) || P <- Path]};
                   error -> Body2
               end,
        {ok, Body}
    catch
        error:_ -> {error, {bad_context_spec, Spec}}
    end.

text(Text) ->
    case unicode:characters_to_binary(Text) of
        Bin when is_binary(Bin) -> Bin;
        _ -> error(badarg)
    end.

ctx_info(Id, Body) ->
    #{id => Id, name => maps:get(name, Body, undefined), mode => maps:get(mode, Body)}.

start_context(Body, From, #state{names = Names} = S) ->
    Id = erlang:unique_integer([positive]) + ?DYNAMIC_ID_BASE,
    case maps:find(name, Body) of
        {ok, Name} when is_map_key(Name, Names) ->
            {reply, {error, {already_exists, Name}}, S};
        {ok, Name} ->
            S1 = S#state{names = Names#{Name => Id}},
            {noreply, control({new_context, Id, Body}, {new_context, Id, ctx_info(Id, Body)},
                              From, S1)};
        error ->
            {noreply, control({new_context, Id, Body}, {new_context, Id, ctx_info(Id, Body)},
                              From, S)}
    end.

%% Sends a control request whose reply comes back to this process through an alias.
control(Request, Action, From, #state{port = Port, pending = Pending} = S) ->
    Alias = alias(),
    case send_control(Port, Alias, Request) of
        ok ->
            S#state{pending = Pending#{Alias => {From, Action}}};
        {error, _} = Error ->
            _ = unalias(Alias),
            complete(Action, From, Error, S)
    end.

send_control(Port, Dest, Request) ->
    H = term_to_binary(Dest),
    try
        Frame = pyport_call:request_frame(0, H, term_to_binary(Request)),
        true = erlang:port_command(Port, Frame),
        ok
    catch
        error:badarg -> {error, {runtime_down, port_closed}}
    end.

complete({new_context, Id, Info}, From, ok, #state{key = Key, contexts = Contexts} = S) ->
    case Info of
        #{name := undefined} -> ok;
        #{name := Name} -> true = ets:insert(?TABLE, {{ctx, Key, Name}, Id})
    end,
    gen_server:reply(From, {ok, Id}),
    S#state{contexts = Contexts#{Id => Info}};
complete({new_context, Id, _Info}, From, Error, S) ->
    gen_server:reply(From, normalize_error(Error)),
    forget_context(Id, S);
complete({stop_context, Id}, From, Reply, S) ->
    gen_server:reply(From, normalize_error(Reply)),
    case Reply of
        ok -> forget_context(Id, S);
        {error, not_found} -> forget_context(Id, S);
        _ -> S
    end;
complete(info, From, {ok, Info}, S) when is_map(Info) ->
    gen_server:reply(From, {ok, info_map(Info, S)}),
    S;
complete(info, From, Reply, S) ->
    gen_server:reply(From, normalize_error(Reply)),
    S.

normalize_error(ok) -> ok;
normalize_error({error, _} = Error) -> Error;
normalize_error(Other) -> {error, {bad_reply, Other}}.

%% A stopped context of the Opts ones also leaves the set the default calls pick from
%% (until the next restart creates it again).
forget_context(Id, #state{key = Key, contexts = Contexts, names = Names} = S) ->
    Named = [Name || {Name, NameId} <- maps:to_list(Names), NameId =:= Id],
    lists:foreach(fun(Name) -> ets:delete_object(?TABLE, {{ctx, Key, Name}, Id}) end, Named),
    case ets:lookup(?TABLE, {contexts, Key}) of
        [{_, Ids}] when Id < ?DYNAMIC_ID_BASE ->
            Left = [Other || Other <- tuple_to_list(Ids), Other =/= Id],
            true = ets:insert(?TABLE, {{contexts, Key}, list_to_tuple(Left)});
        _ ->
            true
    end,
    forget_owned(Id, forget_channels(Id, S#state{contexts = maps:remove(Id, Contexts),
                                                 names = maps:without(Named, Names)})).

%% The handles of a channel that is gone answer `{error, closed}'.
close_channel(Chan, Channels) ->
    case maps:take(Chan, Channels) of
        {Counters, Rest} -> counters:put(Counters, 2, 1), Rest;
        error -> Channels
    end.

%% A stopped context closed its channels: their handles answer `{error, closed}'.
forget_channels(Id, #state{channels = Channels} = S) ->
    {Gone, Left} = maps:fold(fun({Ctx, _}, C, {G, L}) when Ctx =:= Id -> {[C | G], L};
                                (K, C, {G, L}) -> {G, L#{K => C}}
                             end, {[], #{}}, Channels),
    lists:foreach(fun(C) -> counters:put(C, 2, 1) end, Gone),
    Names = maps:filter(fun({Ctx, _}, _) -> Ctx =/= Id end, S#state.channel_names),
    S#state{channels = Left, channel_names = Names}.

%% The port program's info, with each context described by what this process knows.
info_map(Info, #state{hello = Hello, contexts = Contexts} = S) ->
    Ids = case maps:find(contexts, Info) of
              {ok, List} when is_list(List) -> List;
              _ -> lists:sort(maps:keys(Contexts))
          end,
    Stats = maps:get(context_stats, Info, #{}),
    %% open streams per context (a pool drains a member until they end)
    Streams = lists:foldl(fun({Ctx, {stream, _}}, Acc) ->
                                  maps:update_with(Ctx, fun(N) -> N + 1 end, 1, Acc);
                             (_, Acc) ->
                                  Acc
                          end, #{}, maps:keys(S#state.owned)),
    Described = [maps:merge(maps:get(Id, Contexts, #{id => Id, name => undefined,
                                                     mode => unknown}),
                            (maps:get(Id, Stats, #{}))#{streams => maps:get(Id, Streams, 0)})
                 || Id <- Ids],
    Base = maps:with([protocol, max_frame, capabilities], Hello),
    (maps:remove(context_stats, maps:merge(Base, Info)))#{
        contexts => Described, runtime => S#state.handle,
                              restarts => restarts(S#state.key),
                              sends_dropped => S#state.sends_dropped,
                              max_atoms => S#state.max_atoms,
                              atoms_spent => atoms_spent(S#state.key),
                              owned => owned_counts(S)}.

%% How many processes own envs, handles and streams, and how many of each are tracked.
owned_counts(#state{owners = Owners, owned = Owned}) ->
    Items = maps:keys(Owned),
    #{processes => map_size(Owners),
      envs => length([E || {_, {env, _}} = E <- Items]),
      refs => length([R || {_, {ref, _}} = R <- Items]),
      streams => length([T || {_, {stream, _}} = T <- Items])}.

%%% Routing

%% A reply goes to the alias (or pid) in its header; the payload is not decoded here.
%% Frames of a stream (header `{pyport_stream, Alias}': its items, kind 4, and its
%% final reply, kind 0) are delivered as `{pyport_stream, Alias, Msg}', the shape the
%% consumer receives, so they are decoded.
route(H, Payload, Safe, #state{key = Key, max_atoms = Max}) ->
    try binary_to_term(H, [safe]) of
        Dest when (is_reference(Dest) orelse is_pid(Dest)), Safe ->
            %% the caller decodes it, safely (pyport_call:decode/1)
            Dest ! {Dest, {pyport_safe, Max, Payload}},
            ok;
        Dest when is_reference(Dest); is_pid(Dest) ->
            Dest ! {Dest, Payload},
            ok;
        {pyport_stream, Dest} when is_reference(Dest) ->
            Msg = case decode(Payload, {Safe, Max}) of
                      {ok, Term} -> Term;
                      {error, Limit} -> {error, {bad_term, Limit}}
                  end,
            Dest ! {pyport_stream, Dest, Msg},
            ok;
        Other ->
            logger:warning("pyport runtime ~p: reply with a header that is no alias: ~P",
                           [Key, Other, 20], #{domain => [pyport]})
    catch
        error:badarg ->
            logger:warning("pyport runtime ~p: reply with an undecodable header: ~P",
                           [Key, H, 20], #{domain => [pyport]})
    end.

event(Payload, Key, Contexts, Channels) ->
    case decode(Payload) of
        {log, _, _, _} = Log ->
            log(Key, Contexts, Log);
        {atom_admitted, Name} when is_binary(Name) ->
            atom_admitted(Key, Name);
        {channel_ack, Ctx, ChanId, N} ->
            case Channels of
                #{{Ctx, ChanId} := Counters} -> counters:sub(Counters, 1, N);
                #{} -> ok
            end;
        Other ->
            logger:notice("pyport runtime ~p: unexpected event: ~P", [Key, Other, 20],
                          #{domain => [pyport]})
    end.

%% Events come from the port program itself, which creates atoms only for the keys of
%% hello and info and for `erlang.Atom' values, so they are decoded without `safe'.
decode(Payload) ->
    try
        binary_to_term(Payload)
    catch
        error:badarg -> {undecodable, Payload}
    end.

%% Python output and the port program's own reports. The metadata names the runtime and
%% the context (its id, and its name when it has one).
log(Key, Contexts, {log, Level, Ctx, Message}) ->
    Name = case Contexts of
               #{Ctx := #{name := CtxName}} -> CtxName;
               #{} -> undefined
           end,
    Meta = #{domain => [pyport, python], pyport_runtime => Key, pyport_context => Ctx,
             pyport_context_name => Name},
    Label = case Name of
                undefined -> Ctx;
                _ -> Name
            end,
    Format = case is_binary(Message) andalso unicode:characters_to_binary(Message) of
                 Message -> "python (context ~p): ~ts";
                 _ -> "python (context ~p): ~p"
             end,
    logger:log(log_level(Level), Format, [Label, Message], Meta).

log_level(Level) ->
    case lists:member(Level, [emergency, alert, critical, error, warning, notice, info,
                              debug]) of
        true -> Level;
        false -> notice
    end.

%%% Python calling Erlang

%% Kind 2: `erlang.call(Name, *Args)'. A new process (not linked: a crashing callback
%% must not take the runtime down) decodes it, runs the function and answers the
%% context itself, so this process never waits for a callback.
callback(Key, Port, MaxFrame, Payload, Safe) ->
    _ = spawn(fun() -> run_callback(Key, Port, MaxFrame, Payload, Safe) end),
    ok.

run_callback(Key, Port, MaxFrame, Payload, Safe) ->
    case decode(Payload, Safe) of
        {error, Limit} ->
            %% its arguments hold atoms past the budget: Python gets the error
            {CbId, Ctx} = callback_ids(Payload),
            answer_callback(Port, MaxFrame, Ctx, CbId, {error, Limit});
        {ok, {CbId, Ctx, Name, Args, _Caller}} when is_integer(CbId), is_integer(Ctx),
                                                    is_list(Args) ->
            %% Requests this process makes to the waiting context are re-entrant: the
            %% context serves them however deep it is nested (see pyport:call/6).
            put(pyport_reentrant, {Key, Ctx}),
            Result = invoke(Name, Args),
            answer_callback(Port, MaxFrame, Ctx, CbId, Result);
        {ok, Other} ->
            logger:warning("pyport runtime ~p: malformed callback from the port: ~P",
                           [Key, Other, 20], #{domain => [pyport]})
    end.

%% The callback and context ids at the head of a callback payload that cannot be
%% decoded safely: `{CbId, Ctx, ...}' with two integers first (as the port writes it).
callback_ids(<<131, 104, 5, Rest/binary>>) ->
    {CbId, Rest1} = etf_integer(Rest),
    {Ctx, _} = etf_integer(Rest1),
    {CbId, Ctx}.

etf_integer(<<97, I, Rest/binary>>) -> {I, Rest};
etf_integer(<<98, I:32/signed, Rest/binary>>) -> {I, Rest};
etf_integer(<<110, N, 0, Digits:N/binary, Rest/binary>>) ->
    {binary:decode_unsigned(Digits, little), Rest}.

%% `$whereis' is reserved: `erlang.whereis(Name)' in Python.
invoke(<<"$whereis">>, [Name]) ->
    {ok, whereis_name(Name)};
invoke(Name, Args) ->
    case registered_function(Name) of
        {ok, Fun} ->
            try
                {ok, apply_function(Fun, Args)}
            catch
                Class:Reason -> {error, {Class, Reason}}
            end;
        error ->
            {error, {not_registered, Name}}
    end.

registered_function(Name) when is_binary(Name) ->
    try ets:lookup(?FUNCTIONS, Name) of
        [{_, Fun}] -> {ok, Fun};
        [] -> error
    catch
        error:badarg -> error  % the application is stopping
    end;
registered_function(_) ->
    error.

apply_function({Module, Function}, Args) -> apply(Module, Function, Args);
apply_function(Fun, Args) -> apply(Fun, Args).

%% `erlang.whereis(Name)': the pid registered under that name (an atom or a binary),
%% or `none'.
whereis_name(Name) when is_atom(Name); is_binary(Name) ->
    case destination(Name) of
        undefined -> none;
        Pid -> Pid
    end;
whereis_name(_) ->
    none.

%% A result too large for one frame would be discarded by the port program and leave
%% the Python caller waiting forever, so it is answered with an error instead.
answer_callback(Port, MaxFrame, Ctx, CbId, Result) ->
    Body = case term_to_binary({callback_result, CbId, Result}) of
               Small when 10 + byte_size(Small) =< MaxFrame ->
                   Small;
               Large ->
                   TooLarge = {frame_too_large, 10 + byte_size(Large), MaxFrame},
                   term_to_binary({callback_result, CbId, {error, TooLarge}})
           end,
    %% a false result: the port is gone, and the Python caller with it
    pyport_call:cast_request(Port, Ctx, Body).

%% Kind 3: `erlang.send(Dest, Msg)', delivered by this process so that messages from
%% one sender keep their order. A name that is not registered (or not even an atom)
%% drops the message, as `!' to a dead pid would. Python numbers its destinations
%% (DestId). A local process with `max_mailbox' messages queued is busy: the message is
%% dropped (and counted), the context is told once (`send_busy'), and its sends to
%% that destination raise `erlang.Busy' until check_busy/1 clears it (`send_clear');
%% sends already on their way meanwhile are dropped and counted.
deliver(Payload, Safe, #state{key = Key, port = Port, max_atoms = Max,
                              max_mailbox = MaxMailbox, busy = Busy,
                              sends_dropped = Dropped} = S) ->
    case decode(Payload, {Safe, Max}) of
        {error, _} ->
            S;  % atoms past the budget: dropped (logged once by atom_limit_reached/1)
        {ok, {Ctx, DestId, Dest, Msg}} when is_integer(Ctx), is_integer(DestId) ->
            case destination(Dest) of
                undefined ->
                    S;
                _ when is_map_key({Ctx, DestId}, Busy) ->
                    S#state{sends_dropped = Dropped + 1};
                To ->
                    case mailbox_len(To) >= MaxMailbox of
                        true ->
                            _ = pyport_call:cast_request(Port, Ctx, {send_busy, DestId}),
                            map_size(Busy) =:= 0 andalso
                                erlang:send_after(?BUSY_CHECK_MS, self(), check_busy),
                            S#state{busy = Busy#{{Ctx, DestId} => To},
                                    sends_dropped = Dropped + 1};
                        false ->
                            send_message(To, Msg),
                            S
                    end
            end;
        {ok, Other} ->
            logger:warning("pyport runtime ~p: malformed send from the port: ~P",
                           [Key, Other, 20], #{domain => [pyport]}),
            S
    end.

%% Every ?BUSY_CHECK_MS while some destination is busy: one whose queue is down to half
%% the bound, or whose process is gone, is cleared.
check_busy(#state{port = Port, busy = Busy, max_mailbox = MaxMailbox} = S) ->
    Still = maps:filter(fun({Ctx, DestId}, To) ->
                                case mailbox_len(To) > MaxMailbox div 2 of
                                    true ->
                                        true;
                                    false ->
                                        _ = pyport_call:cast_request(Port, Ctx,
                                                                     {send_clear, DestId}),
                                        false
                                end
                        end, Busy),
    map_size(Still) > 0 andalso erlang:send_after(?BUSY_CHECK_MS, self(), check_busy),
    S#state{busy = Still}.

%% A pid, or the pid registered under an existing atom (a name never makes an atom).
destination(Dest) when is_pid(Dest) ->
    Dest;
destination(Dest) when is_atom(Dest) ->
    whereis(Dest);
destination(Dest) when is_binary(Dest) ->
    try binary_to_existing_atom(Dest, utf8) of
        Name -> whereis(Name)
    catch
        error:badarg -> undefined
    end;
destination(_) ->
    undefined.

%% The queue of a local process (0 once it is gone, and for a remote one: its node
%% bounds what it takes in).
mailbox_len(Pid) when node(Pid) =:= node() ->
    case erlang:process_info(Pid, message_queue_len) of
        {message_queue_len, N} -> N;
        undefined -> 0
    end;
mailbox_len(_Pid) ->
    0.

send_message(Dest, Msg) ->
    try
        _ = erlang:send(Dest, Msg, [noconnect]),
        ok
    catch
        error:badarg -> ok
    end.

%%% Envs and object handles owned by processes

own(Pid, Item, #state{owners = Owners, owned = Owned} = S) ->
    {Mref, Items} = case Owners of
                        #{Pid := Known} -> Known;
                        #{} -> {erlang:monitor(process, Pid), #{}}
                    end,
    %% an item that changes hands (it cannot in practice: ids are not reused)
    S1 = case Owned of
             #{Item := Pid} -> S;
             #{Item := _Other} -> disown(Item, S);
             #{} -> S
         end,
    S1#state{owners = (S1#state.owners)#{Pid => {Mref, Items#{Item => true}}},
             owned = (S1#state.owned)#{Item => Pid}}.

%% The item was dropped or released by a user (or its context is gone).
disown(Item, #state{owners = Owners, owned = Owned} = S) ->
    case maps:take(Item, Owned) of
        {Pid, Rest} ->
            Owners1 = case maps:get(Pid, Owners) of
                          {Mref, #{Item := _} = Items} when map_size(Items) =:= 1 ->
                              erlang:demonitor(Mref, [flush]),
                              maps:remove(Pid, Owners);
                          {Mref, Items} ->
                              Owners#{Pid => {Mref, maps:remove(Item, Items)}}
                      end,
            S#state{owners = Owners1, owned = Rest};
        error ->
            S
    end.

%% Frees everything the process owned, with frames that want no reply.
owner_down(Pid, #state{owners = Owners, owned = Owned, port = Port} = S) ->
    {{_Mref, Items}, Rest} = maps:take(Pid, Owners),
    lists:foreach(fun(Item) -> free(Port, Item) end, maps:keys(Items)),
    S#state{owners = Rest, owned = maps:without(maps:keys(Items), Owned)}.

free(Port, {Ctx, {env, EnvId}}) ->
    pyport_call:cast_request(Port, Ctx, {drop_env, EnvId, #{}});
free(Port, {Ctx, {ref, RefId}}) ->
    pyport_call:cast_request(Port, Ctx, {release, RefId, #{}});
free(Port, {Ctx, {stream, H}}) ->
    pyport_call:cast_request(Port, Ctx, {stream_cancel, H, #{}}).

%% @doc How many times the runtime's OS process was replaced (the row its
%% `pyport_runtime' keeps).
-spec restarts(key()) -> non_neg_integer().
restarts(Key) ->
    row_count({restarts, Key}).

%% The count in a `{Row, N}' row of the runtimes' table; 0 without the row (or the
%% table, when the application is not running).
row_count(Row) ->
    try ets:lookup(?TABLE, Row) of
        [{_, N}] -> N;
        [] -> 0
    catch
        error:badarg -> 0
    end.

%% A stopped context took its envs and handles with it.
forget_owned(Ctx, #state{owned = Owned} = S) ->
    lists:foldl(fun disown/2, S, [Item || {ItemCtx, _} = Item <- maps:keys(Owned),
                                          ItemCtx =:= Ctx]).

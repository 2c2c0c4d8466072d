%% @doc The owner of one `pyport' OS process (one incarnation of a runtime): the
%% gen_server that owns its port and routes what comes out of it. `pyport_runtime',
%% the runtime's stable process, starts it, and starts a new one (with back-off) when
%% it exits.
%%
%% The wire protocol is described in docs/protocol.md. This process
%% - starts the port program (its command line from `pyport_opts', which carries every
%%   limit) and waits for its `hello' event (no sleeping),
%% - creates the contexts given in Opts (ids 1..N, again after every restart),
%% - publishes `{Key, Pid, Port, CallTimeout, MaxFrame}' in the ETS table
%%   `pyport_runtimes' (see `pyport_table'), so callers write their requests to the
%%   port themselves,
%% - routes each reply to the alias found in its header without decoding the payload,
%% - serves control requests (new_context, stop_context, info) asynchronously, so a
%%   slow interpreter creation never delays the routing of replies,
%% - hands every other frame to the module of its role, whose state it keeps (each
%%   lives exactly as long as the port, and each gets its frames from the port without
%%   a hop): `log' events to `pyport_pylog', `erlang.call' (kind 2) to
%%   `pyport_callback', `erlang.send' (kind 3) to `pyport_send', the envs, handles and
%%   streams that processes own (`{own, ...}', `{disown, ...}' casts and their owners'
%%   `DOWN') to `pyport_owners', channel counters to `pyport_channels', the atom budget
%%   to `pyport_atoms'.
%%
%% It keeps no table of pending calls: every caller monitors this process (with an
%% alias), so a crash of the port program fails them through their monitors.
-module(pyport_port).
-behaviour(gen_server).

-export([start_link/1]).
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
%% How long the OS process may take to exit when asked to before it is killed (twice:
%% the exit after the kill too stays well within pyport_linked's stop wait).
-define(EXIT_GRACE, 1500).
%% the start of the keeper's event `{exited, Status}' as the port program encodes it
-define(EXITED, 131, 104, 2, 119, 6, "exited").
-define(PROTOCOL_VERSION, 2).
%% Ids of contexts made with new_context start above this, ids 1..N are the Opts ones.
-define(DYNAMIC_ID_BASE, 1000000).

-type ctx_id() :: pos_integer().
-type ctx_info() :: #{id := ctx_id(), name := atom(), mode := owngil | main}.
-type action() :: {new_context, ctx_id(), ctx_info()}
                | {stop_context, ctx_id()}
                | info.

-record(state, {
    key :: pyport_table:key(),
    %% the runtime's stable process (`pyport_runtime'), the handle users hold
    runtime :: pid(),
    port :: port(),
    hello :: map(),
    max_frame :: pos_integer(),
    contexts = #{} :: #{ctx_id() => ctx_info()},
    %% names taken by ready contexts and by contexts being created
    names = #{} :: #{atom() => ctx_id()},
    %% control requests sent by this process, by the alias in their header
    pending = #{} :: #{reference() => {gen_server:from(), action()}},
    %% atoms Python may create in the node (the runtime's max_atoms), and whether this
    %% OS process used that up (logged once)
    max_atoms :: non_neg_integer(),
    atoms_used_up = false :: boolean(),
    callbacks = pyport_callback:new() :: pyport_callback:limiter(),
    sends :: pyport_send:sends(),
    owners = pyport_owners:new() :: pyport_owners:owners(),
    channels = pyport_channels:new() :: pyport_channels:channels(),
    %% how the OS process ended, as its keeper said (`{exited, Status}'), while the
    %% port's own exit status is on its way
    exited :: undefined | integer()
}).

%%% API

%% @doc Starts the port program linked to the caller (a `pyport_runtime'), which gives
%% the runtime's key in Opts. Returns `{error, Reason}' when the port program cannot
%% start, does not say hello within `start_timeout', or a context from Opts cannot be
%% created.
-spec start_link(pyport_opts:opts()) -> {ok, pid()} | {error, term()}.
start_link(#{key := _} = Opts) ->
    pyport_linked:quiet_start(gen_server:start_link(?MODULE, Opts, [])).

%% @doc Creates a context; replies `{ok, Id}' once its interpreter is ready.
-spec new_context(pid(), pyport_opts:context_spec(), timeout()) ->
          {ok, ctx_id()} | {error, term()}.
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
-spec init(pyport_opts:opts()) -> {ok, #state{}} | {stop, term()}.
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
    Deadline = erlang:monotonic_time(millisecond) + pyport_opts:start_timeout(Opts),
    MaxAtoms = pyport_opts:max_atoms(Opts),
    case pyport_opts:contexts(maps:get(contexts, Opts, [])) of
        {error, Reason} ->
            {stop, {shutdown, Reason}};
        {ok, Contexts} ->
            case open(Key, Opts, MaxAtoms) of
                {error, Reason} ->
                    {stop, {shutdown, Reason}};
                {ok, Port} ->
                    case start_port(Key, Port, Contexts, Opts, Deadline) of
                        {ok, Hello} ->
                            S = #state{key = Key, port = Port, hello = Hello,
                                       runtime = maps:get(runtime, Opts, self()),
                                       max_atoms = MaxAtoms,
                                       sends = pyport_send:new(pyport_opts:max_mailbox(Opts)),
                                       max_frame = max_frame(Hello, Opts)},
                            {ok, publish(Opts, Contexts, S)};
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
    case pyport_opts:context_body(Spec) of
        {ok, Body} -> start_context(Body, From, S);
        {error, _} = Error -> {reply, Error, S}
    end;
handle_call({stop_context, Id}, From, S) when is_integer(Id) ->
    {noreply, control({stop_context, Id}, {stop_context, Id}, From, S)};
handle_call(info, From, S) ->
    {noreply, control(info, info, From, S)};
handle_call({channel, CtxId, ChanId, Name, Counters}, _From, #state{channels = Chans} = S) ->
    {reply, ok, S#state{channels = pyport_channels:opened(CtxId, ChanId, Name, Counters,
                                                          Chans)}};
handle_call(_Request, _From, S) ->
    {reply, {error, {bad_request, unknown_call}}, S}.

%% @private gen_server callback.
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast({own, Pid, CtxId, Item}, #state{owners = Owners} = S) when is_pid(Pid) ->
    {noreply, S#state{owners = pyport_owners:own(Pid, {CtxId, Item}, Owners)}};
handle_cast({disown, CtxId, Item}, #state{owners = Owners} = S) ->
    {noreply, S#state{owners = pyport_owners:disown({CtxId, Item}, Owners)}};
handle_cast({channel_closed, CtxId, ChanId}, #state{channels = Chans} = S) ->
    {noreply, S#state{channels = pyport_channels:closed(CtxId, ChanId, Chans)}};
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
             true -> atoms_used_up(S);
             false -> S
         end,
    frame(Kind band 16#7f, H, Payload, Safe, S1);
handle_info({Port, {data, Frame}}, #state{port = Port, key = Key} = S) ->
    logger:warning("pyport runtime ~p: unexpected frame from the port: ~P",
                   [Key, Frame, 20], #{domain => [pyport]}),
    {noreply, S};
handle_info({Port, {exit_status, Status}}, #state{port = Port} = S) ->
    os_process_gone({port_exit, Status}, S);
handle_info({'EXIT', Port, Reason}, #state{port = Port, exited = Exited} = S) ->
    %% a write after the keeper's exit closes the port (EPIPE) before its exit status
    %% comes: the keeper has told the status already
    case Exited of
        undefined -> os_process_gone({port_closed, Reason}, S);
        Status -> os_process_gone({port_exit, Status}, S)
    end;
handle_info({Alias, Payload}, #state{pending = Pending} = S)
  when is_map_key(Alias, Pending) ->
    {{From, Action}, Rest} = maps:take(Alias, Pending),
    _ = unalias(Alias),
    {noreply, complete(Action, From, binary_to_term(Payload), S#state{pending = Rest})};
handle_info(check_busy, #state{port = Port, sends = Sends} = S) ->
    {noreply, S#state{sends = pyport_send:check_busy(Port, Sends)}};
handle_info({'DOWN', Mref, process, Pid, _Reason},
            #state{callbacks = Callbacks, owners = Owners, port = Port} = S) ->
    case pyport_callback:done(Mref, target(S), Callbacks) of
        {ok, Callbacks1} ->
            {noreply, S#state{callbacks = Callbacks1}};
        error ->
            case pyport_owners:down(Pid, Port, Owners) of
                {ok, Owners1} -> {noreply, S#state{owners = Owners1}};
                error -> {noreply, S}
            end
    end;
handle_info(_Msg, S) ->
    {noreply, S}.

frame(Kind, H, Payload, Safe, S) when Kind =:= 0; Kind =:= 4 ->
    route(H, Payload, Safe, S),
    {noreply, S};
frame(1, _H, Payload, _Safe, #state{key = Key, contexts = Contexts, channels = Chans,
                                   port = Port} = S) ->
    case exited(Port, Payload) of
        {exited, Status} ->
            {noreply, S#state{exited = Status}};
        none ->
            event(Payload, Key, Contexts, Chans),
            {noreply, S}
    end;
frame(2, _H, Payload, Safe, #state{max_atoms = Max, callbacks = Callbacks} = S) ->
    {noreply, S#state{callbacks = pyport_callback:start({Payload, {Safe, Max}}, target(S),
                                                        Callbacks)}};
frame(3, _H, Payload, Safe, #state{key = Key, port = Port, max_atoms = Max,
                                   sends = Sends} = S) ->
    {noreply, S#state{sends = pyport_send:deliver(Payload, {Safe, Max}, Key, Port, Sends)}};
frame(Kind, _H, _Payload, _Safe, #state{key = Key} = S) ->
    logger:warning("pyport runtime ~p: a frame of unknown kind ~p from the port",
                   [Key, Kind], #{domain => [pyport]}),
    {noreply, S}.

%% Where callbacks run and answer.
target(#state{key = Key, port = Port, max_frame = MaxFrame}) ->
    {Key, Port, MaxFrame}.

%% Logged once per OS process: Python has used up its atom budget.
atoms_used_up(#state{atoms_used_up = true} = S) ->
    S;
atoms_used_up(#state{key = Key, max_atoms = Max} = S) ->
    pyport_atoms:log_used_up(Key, Max),
    S#state{atoms_used_up = true}.

%% The OS process is gone (a segfault in Python, say): a crash pyport contains, which
%% the runtime logs in one line and restarts. This process ends with Reason, as callers,
%% streams and the runtime see it (`{runtime_down, Reason}'), but without the error
%% report and crash report of a gen_server that stops with it, which are for bugs in
%% pyport's own processes: after terminate/2's clean-up it lets the exit signal it sends
%% itself end it, as a process that does not trap exits.
-spec os_process_gone({port_exit, integer()} | {port_closed, term()}, #state{}) ->
          no_return().
os_process_gone(Reason, S) ->
    terminate(Reason, S),
    process_flag(trap_exit, false),
    exit(self(), Reason),
    receive after infinity -> exit(Reason) end.

%% @private gen_server callback.
-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{key = Key, channels = Chans} = S) ->
    stop_os_process(S),
    pyport_channels:close_all(Chans),
    pyport_table:unpublish(Key, self()),
    ok.

%%% Start-up

open(Key, Opts, MaxAtoms) ->
    Exe = pyport_opts:executable(Opts),
    %% this OS process gets what the runtime's earlier ones left of the atom budget
    Args = pyport_opts:port_args(Opts, pyport_atoms:left(Key, MaxAtoms)),
    PortOpts = [{packet, 4}, binary, exit_status, use_stdio,
                {args, Args}, {env, maps:get(env, Opts, [])}],
    try
        {ok, open_port({spawn_executable, Exe}, PortOpts)}
    catch
        error:Reason -> {error, {open_port, Reason, Exe}}
    end.

%% Waits for hello, then creates the contexts (all requested at once). Their
%% preload code may already call Erlang (kind 2), which is served here; the messages
%% it sends (kind 3) stay queued until the gen_server loop delivers them.
start_port(Key, Port, Contexts, Opts, Deadline) ->
    case await_hello(Key, Port, Deadline) of
        {ok, Hello} ->
            lists:foreach(fun({Id, Body}) ->
                              send_control(Port, {pyport_init, Id}, {new_context, Id, Body})
                          end, Contexts),
            Names = maps:from_list([{Id, ctx_info(Id, Body)} || {Id, Body} <- Contexts]),
            Target = {Key, Port, max_frame(Hello, Opts)},
            case await_contexts({Names, Target, pyport_opts:max_atoms(Opts)}, Port,
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
            case decode_event(Payload) of
                {hello, #{protocol := ?PROTOCOL_VERSION} = Hello} -> {ok, Hello};
                {hello, Hello} -> {error, {protocol_mismatch, Hello}};
                {start_error, Reason} -> {error, {start_error, Reason}};
                {exited, Status} ->
                    _ = pyport_call:cast_request(Port, 0, exited_seen),
                    {error, {port_exit, Status}};
                {log, _, _, _} = Log ->
                    pyport_pylog:log(Key, #{}, Log),
                    await_hello(Key, Port, Deadline);
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
await_contexts({Names, {Key, _, _} = Target, MaxAtoms} = Known, Port, Waiting,
               Deadline) ->
    receive
        {Port, {data, <<0, HLen:16, H:HLen/binary, Payload/binary>>}} ->
            {pyport_init, Id} = binary_to_term(H),
            {value, {Id, Body}, Rest} = lists:keytake(Id, 1, Waiting),
            case decode_event(Payload) of
                ok -> await_contexts(Known, Port, Rest, Deadline);
                Error -> {error, {context_error, Body, Error}}
            end;
        {Port, {data, <<1, HLen:16, _:HLen/binary, Payload/binary>>}} ->
            case exited(Port, Payload) of
                {exited, Status} ->
                    {error, {port_exit, Status}};
                none ->
                    event(Payload, Key, Names, pyport_channels:new()),
                    await_contexts(Known, Port, Waiting, Deadline)
            end;
        {Port, {data, <<Kind, HLen:16, _:HLen/binary, Payload/binary>>}}
          when Kind band 16#7f =:= 2 ->
            pyport_callback:run_now(Target, Payload, {Kind band 16#80 =/= 0, MaxAtoms}),
            await_contexts(Known, Port, Waiting, Deadline);
        {Port, {exit_status, Status}} ->
            {error, {port_exit, Status}};
        {'EXIT', Port, Reason} ->
            {error, {port_closed, Reason}}
    after remaining(Deadline) ->
        {error, {start_timeout, {contexts, [Body || {_, Body} <- Waiting]}}}
    end.

%% The largest frame: the port program says it in hello.
max_frame(Hello, Opts) ->
    maps:get(max_frame, Hello, pyport_opts:max_frame(Opts)).

remaining(Deadline) ->
    max(0, Deadline - erlang:monotonic_time(millisecond)).

%% Makes the runtime visible to callers (pyport_table:publish/6).
publish(Opts, Contexts, #state{key = Key, port = Port, max_frame = MaxFrame} = S) ->
    Infos = maps:from_list([{Id, ctx_info(Id, Body)} || {Id, Body} <- Contexts]),
    Names = maps:from_list([{Name, Id} || {Id, #{name := Name}} <- Contexts]),
    true = pyport_table:publish(Key, self(), Port, pyport_opts:call_timeout(Opts), MaxFrame,
                                [{Id, maps:get(name, Body, undefined)}
                                 || {Id, Body} <- Contexts]),
    S#state{contexts = Infos, names = Names}.

%% Asks the port program to exit (`shutdown') and waits for its exit status: a stop
%% returns once the OS process, and its keeper, are gone. One that has not exited after
%% ?EXIT_GRACE (a thread blocked in C that the exit waits for, a process that does not
%% read) is killed (SIGKILL) by its OS pid, the keeper with it. A port that is already
%% closed has exited.
stop_os_process(#state{port = Port, hello = Hello}) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, Keeper} ->
            _ = pyport_call:cast_request(Port, 0, shutdown),
            case await_exit(Port, ?EXIT_GRACE) of
                ok ->
                    ok;
                timeout ->
                    Pids = [P || P <- [maps:get(os_pid, Hello, undefined), Keeper],
                                 is_integer(P)],
                    _ = os:cmd(["kill -9" | [[$\s | integer_to_list(P)] || P <- Pids]]),
                    await_exit(Port, ?EXIT_GRACE)
            end,
            close(Port);
        undefined ->
            ok
    end.

%% The port's exit status, once the keeper's `exited' has been answered.
await_exit(Port, Timeout) ->
    receive
        {Port, {exit_status, _}} ->
            ok;
        {Port, {data, <<1, HLen:16, _:HLen/binary, ?EXITED, _/binary>> = Frame}} ->
            <<1, HLen:16, _:HLen/binary, Payload/binary>> = Frame,
            _ = exited(Port, Payload),
            await_exit(Port, Timeout);
        {'EXIT', Port, _} ->
            ok
    after Timeout ->
        timeout
    end.

%% The keeper's event `{exited, Status}' (src/keeper.rs): the OS process has ended;
%% answered with `exited_seen', after which the keeper exits with that status.
exited(Port, <<?EXITED, _/binary>> = Payload) ->
    {exited, Status} = binary_to_term(Payload),
    _ = pyport_call:cast_request(Port, 0, exited_seen),
    {exited, Status};
exited(_Port, _Payload) ->
    none.

close(Port) ->
    try
        port_close(Port)
    catch
        error:badarg -> true
    end.

%%% Contexts and control requests

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
        true = erlang:port_command(Port, pyport_call:request_frame(0, H, term_to_binary(Request))),
        ok
    catch
        error:badarg -> {error, {runtime_down, port_closed}}
    end.

complete({new_context, Id, Info}, From, ok, #state{key = Key, contexts = Contexts} = S) ->
    case Info of
        #{name := undefined} -> ok;
        #{name := Name} -> true = pyport_table:name_context(Key, Name, Id)
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
    true = pyport_table:forget_context(Key, Named, Id, Id < ?DYNAMIC_ID_BASE),
    S#state{contexts = maps:remove(Id, Contexts), names = maps:without(Named, Names),
            owners = pyport_owners:forget_context(Id, S#state.owners),
            channels = pyport_channels:forget_context(Id, S#state.channels)}.

%% The port program's info, with each context described by what this process knows.
info_map(Info, #state{hello = Hello, contexts = Contexts} = S) ->
    Ids = case maps:find(contexts, Info) of
              {ok, List} when is_list(List) -> List;
              _ -> lists:sort(maps:keys(Contexts))
          end,
    Stats = maps:get(context_stats, Info, #{}),
    %% open streams per context (a pool drains a member until they end)
    Streams = pyport_owners:streams(S#state.owners),
    Described = [maps:merge(maps:get(Id, Contexts, #{id => Id, name => undefined,
                                                     mode => unknown}),
                            (maps:get(Id, Stats, #{}))#{streams => maps:get(Id, Streams, 0)})
                 || Id <- Ids],
    Base = maps:with([protocol, max_frame, capabilities], Hello),
    (maps:remove(context_stats, maps:merge(Base, Info)))#{
        contexts => Described,
        runtime => S#state.runtime,
        restarts => pyport_table:count({restarts, S#state.key}),
        sends_dropped => pyport_send:dropped(S#state.sends),
        max_atoms => S#state.max_atoms,
        atoms_spent => pyport_atoms:spent(S#state.key),
        owned => pyport_owners:counts(S#state.owners)}.

%%% Routing

%% A reply goes to the alias (or pid) in its header; the payload is not decoded here.
%% Frames of a stream (header `{pyport_stream, Alias}': its items, kind 4, and its
%% final reply, kind 0) are delivered as `{pyport_stream, Alias, Msg}', the shape the
%% consumer receives, so they are decoded.
route(H, Payload, Safe, #state{key = Key, max_atoms = Max}) ->
    try binary_to_term(H, [safe]) of
        Dest when (is_reference(Dest) orelse is_pid(Dest)), Safe ->
            %% the caller decodes it, safely (pyport_atoms:decode/2)
            Dest ! {Dest, {pyport_safe, Max, Payload}},
            ok;
        Dest when is_reference(Dest); is_pid(Dest) ->
            Dest ! {Dest, Payload},
            ok;
        {pyport_stream, Dest} when is_reference(Dest) ->
            Msg = case pyport_atoms:decode(Payload, {Safe, Max}) of
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

event(Payload, Key, Contexts, Chans) ->
    case decode_event(Payload) of
        {log, _, _, _} = Log ->
            pyport_pylog:log(Key, Contexts, Log);
        {atom_admitted, Name} when is_binary(Name) ->
            pyport_atoms:admitted(Key, Name);
        {channel_ack, Ctx, ChanId, N} when is_integer(N) ->
            pyport_channels:acked(Ctx, ChanId, N, Chans);
        Other ->
            logger:notice("pyport runtime ~p: unexpected event: ~P", [Key, Other, 20],
                          #{domain => [pyport]})
    end.

%% Events come from the port program itself, which creates atoms only for the keys of
%% hello and info and for `erlang.Atom' values, so they are decoded without `safe'.
decode_event(Payload) ->
    {ok, Event} = pyport_atoms:decode(Payload, {false, 0}),
    Event.


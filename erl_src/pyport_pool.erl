%% @doc A pool: several interpreters behind one handle, each call sent to the member
%% with the fewest requests in flight.
%%
%% Modes: `main' gives each member a runtime (an OS process) of its own with one
%% main-mode context, so libraries that refuse sub-interpreters (numpy, pydantic...)
%% still use every core; `owngil' makes the members owngil contexts of one runtime;
%% `auto' (the default) is `owngil' when `preload' runs cleanly in a sub-interpreter,
%% else `main', and says why in the log and in info/1.
%%
%% This process starts the members' runtimes linked to itself and restarts a runtime
%% process that dies (a member's crashed OS process is restarted by its own runtime,
%% with back-off, while the other members serve). Dispatch needs no message to it: the
%% pool's row in the `pyport_runtimes' table (pyport_pool.hrl) holds the members and
%% three atomics arrays (requests in flight, member state, requests served), and each
%% caller picks its member itself (pyport_dispatch).
%%
%% `nodes' (default `[node()]'): `size' members on each of these nodes. The members on
%% another node are a pool of that node's own (`Name@ThisNode', under its pyport
%% supervisor, so pyport must be running there), whose members' contexts this pool
%% calls directly (over distribution). A node that goes down takes its members out
%% (their calls in flight get `{error, {nodedown, Node}}'); when it is up again, they
%% are started there again. `max_requests' applies to the members on this node.
%%
%% `max_requests': the caller whose request is the member's last takes the member out
%% of dispatch and tells this process, which waits until the member's requests in
%% flight are answered, replaces its interpreter, and gives it work again. Callers that
%% find every member being replaced wait for the first one back. No call fails for it.
-module(pyport_pool).
-behaviour(gen_server).

-export([start/2]).
-export([stop/1]).
-export([start_link/1]).
-export([child_spec/1]).
-export([info/1]).
-export([start_part/2]).
-export([stop_part/1]).
-export([os_pid/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([opts/0]).
-export_type([member/0]).

-define(TABLE, pyport_runtimes).
-include("pyport_pool.hrl").

-define(STOP_WAIT, 5000).
%% how often a draining member's requests in flight are looked at
-define(DRAIN_POLL_MS, 5).
%% how often a node that is up but whose members could not start is tried again
-define(NODE_RETRY_MS, 500).

-type opts() :: #{name := atom(),
                  nodes => [node()],
                  size => pos_integer(),
                  mode => main | owngil | auto,
                  preload => iodata(),
                  max_requests => pos_integer() | infinity,
                  drain_timeout => non_neg_integer(),
                  atom() => term()}.

%% A member's context as `{RuntimeKey, ContextId, Home}' (`pyport' makes it a handle;
%% Home is a process of the member's node, as in pyport's handles).
-type member() :: {pyport_runtime:key(), pos_integer(), pid()}.

-record(state, {name :: atom(),
                opts :: opts(),
                mode :: main | owngil,
                mode_reason :: binary(),
                %% the runtime processes: one per member (main) or one (owngil)
                runtimes :: #{pid() => non_neg_integer()},
                row :: #row{},
                replaced = 0 :: non_neg_integer(),
                %% callers waiting while every member is being replaced
                waiting = [] :: [gen_server:from()],
                %% the other nodes of `nodes', each running a part of the pool
                remote_nodes = [] :: [node()]}).

%%% API

%% @doc Starts a pool linked to the caller. Opts: `name' (required), `size' (default:
%% schedulers online), `mode', `preload', `max_requests', and any runtime option
%% (`venv', `path', `env', `max_memory', `call_timeout'...), which applies to every
%% member.
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(#{name := Name} = Opts) when is_atom(Name) ->
    pyport_linked:quiet_start(gen_server:start_link(?MODULE, Opts, [])).

%% @doc Starts a pool under pyport's supervisor: `{ok, Pid}', or `{error, Reason}'
%% (`{already_started, Name}' for a name taken).
-spec start(atom(), map()) -> {ok, pid()} | {error, term()}.
start(Name, Opts) ->
    %% issue 20: the caller's application, whose venv the members use
    case pyport_sup:start_child(child_spec(pyport_app_env:with_caller_app(Opts#{name => Name}))) of
        {error, {already_started, _}} -> {error, {already_started, Name}};
        Result -> Result
    end.

%% @doc Stops a pool started with start/2 and all its members.
-spec stop(atom()) -> ok | {error, not_found}.
stop(Name) ->
    pyport_sup:stop_child({?MODULE, Name}).

%% @doc A child spec for the user's own supervision tree; the handle is then
%% `pyport:pool(Name)'.
-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(#{name := Name} = Opts) when is_atom(Name) ->
    #{id => {?MODULE, Name},
      start => {?MODULE, start_link, [Opts]},
      restart => permanent,
      shutdown => 2 * ?STOP_WAIT + 1000,
      type => worker,
      modules => [?MODULE]}.

%% @doc The pool's mode (and why), size and members.
-spec info(atom()) -> {ok, map()} | {error, term()}.
info(Name) ->
    case pyport_dispatch:row(Name) of
        {ok, #row{pid = Pid}} ->
            try
                gen_server:call(Pid, info)
            catch
                exit:_ -> {error, not_found}
            end;
        {error, _} = Error ->
            Error
    end.

%%% gen_server callbacks

%% @private gen_server callback.
-spec init(opts()) -> {ok, #state{}} | {stop, term()}.
init(#{name := Name} = Opts0) ->
    process_flag(trap_exit, true),
    case pyport_opts:check_pool(Opts0) of
        ok -> init_pool(Name, Opts0);
        {error, Reason} -> {stop, {shutdown, Reason}}
    end.

init_pool(Name, Opts0) ->
    Size = maps:get(size, Opts0, erlang:system_info(schedulers_online)),
    Opts = Opts0#{size => Size},
    Nodes = maps:get(nodes, Opts, [node()]),
    Local = case lists:member(node(), Nodes) of
                true -> start_members(maps:get(mode, Opts, auto), Size, Opts);
                false -> {ok, maps:get(mode, Opts, auto), <<"no member on this node">>, #{}, []}
            end,
    case Local of
        {ok, Mode, Why, Runtimes, LocalMembers} ->
            Remote = [N || N <- Nodes, N =/= node()],
            ok = net_kernel:monitor_nodes(Remote =/= [], [{node_type, all}]),
            _ = [self() ! {connect, N} || N <- Remote],
            RemoteMembers = [{remote, N, I, undefined} || N <- Remote, I <- lists:seq(1, Size)],
            Members = LocalMembers ++ RemoteMembers,
            Total = length(Members),
            logger:notice("pyport pool ~p: ~b members on ~b node(s), mode ~p (~ts)",
                          [Name, Total, length(Nodes), Mode, Why], #{domain => [pyport]}),
            Row = #row{name = Name,
                       members = list_to_tuple(Members),
                       load = atomics:new(Total + 1, [{signed, true}]),
                       state = atomics:new(Total, []),
                       served = atomics:new(Total, []),
                       max_requests = maps:get(max_requests, Opts, infinity),
                       call_timeout = pyport_opts:call_timeout(Opts),
                       pid = self()},
            [atomics:put(Row#row.state, I, ?DOWN)
             || I <- lists:seq(length(LocalMembers) + 1, Total)],
            true = ets:insert_new(?TABLE, {{pool, Name}, Row})
                orelse error({already_started, Name}),
            S = #state{name = Name, opts = Opts#{mode => Mode}, mode = Mode,
                       mode_reason = Why, runtimes = Runtimes, row = Row,
                       remote_nodes = Remote},
            {ok, lists:foldl(fun join_node/2, S, Remote)};
        {error, Reason} ->
            {stop, {shutdown, Reason}}
    end.

%% @private gen_server callback.
-spec handle_call(term(), gen_server:from(), #state{}) ->
          {reply, term(), #state{}} | {noreply, #state{}}.
handle_call(info, _From, S) ->
    {reply, {ok, describe(S)}, S};
handle_call(await_ready, From, #state{row = #row{state = St, members = Ms}} = S) ->
    case lists:member(?READY, [atomics:get(St, I) || I <- lists:seq(1, tuple_size(Ms))]) of
        true -> {reply, ok, S};
        false -> {noreply, S#state{waiting = [From | S#state.waiting]}}
    end;
handle_call(_Request, _From, S) ->
    {reply, {error, {bad_request, unknown_call}}, S}.

%% @private gen_server callback.
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, S) ->
    {noreply, S}.

%% @private gen_server callback.
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info(Msg, S) ->
    {noreply, S1} = member_event(Msg, S),
    {noreply, wake_waiting(S1)}.

%% Callers waiting in await_ready are answered once a member is ready, and also once no
%% member is being replaced any more (all down: they are told so); whatever changed
%% the members' states (a replacement, a remote member back, a node gone).
wake_waiting(#state{waiting = []} = S) ->
    S;
wake_waiting(#state{waiting = Waiting, row = #row{state = St, members = Ms}} = S) ->
    States = [atomics:get(St, I) || I <- lists:seq(1, tuple_size(Ms))],
    case lists:member(?READY, States) orelse not lists:member(?DRAINING, States) of
        true ->
            [gen_server:reply(From, ok) || From <- Waiting],
            S#state{waiting = []};
        false ->
            S
    end.

member_event({replace, I}, #state{row = #row{members = Ms} = Row} = S)
  when element(1, element(I, Ms)) =:= remote ->
    %% max_requests applies to the members of this node only (see the module doc)
    atomics:put(Row#row.served, I, 0),
    atomics:put(Row#row.state, I, ?READY),
    {noreply, S};
member_event({replace, I}, S) ->
    {noreply, drain(I, erlang:monotonic_time(millisecond), S)};
member_event({nodeup, Node, _Info}, S) ->
    {noreply, join_node(Node, S)};
member_event({retry_node, Node}, S) ->
    {noreply, join_node(Node, S)};
member_event({nodedown, Node, _Info}, #state{row = Row} = S) ->
    [atomics:put(Row#row.state, I, ?DOWN) || I <- node_members(Node, Row)],
    self() ! {connect, Node},
    {noreply, S};
member_event({connect, Node}, S) ->
    connect(Node),
    {noreply, S};
member_event({drain, I, Since}, S) ->
    {noreply, drain(I, Since, S)};
member_event({'EXIT', Pid, Reason}, #state{runtimes = Runtimes} = S)
  when is_map_key(Pid, Runtimes) ->
    {noreply, runtime_exited(Pid, Reason, S)};
member_event({'EXIT', _Pid, _Reason}, S) ->
    {noreply, S};
member_event(_Msg, S) ->
    {noreply, S}.

%% @private gen_server callback.
-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{name = Name, runtimes = Runtimes, remote_nodes = Remote}) ->
    _ = try ets:delete(?TABLE, {pool, Name}) catch error:badarg -> true end,
    _ = [catch erpc:call(N, pyport_pool, stop_part, [part_name(Name)], ?STOP_WAIT)
         || N <- Remote, connected(N)],
    pyport_linked:stop(maps:keys(Runtimes)).

%%% Members on other nodes

%% The part of pool Name that runs on another node is a pool of that node's own
%% (`Name@HomeNode', under its pyport supervisor); this pool sends calls straight to
%% its members. A node that is down (or has no pyport running) has its members marked
%% down; when it is up again they are started there again.
join_node(Node, #state{name = Name, opts = Opts, row = Row, remote_nodes = Remote} = S) ->
    case lists:member(Node, Remote) andalso connected(Node) of
        false ->
            S;
        true ->
            Part = part_name(Name),
            PartOpts = maps:without([nodes, name], Opts),
            Started = try
                          erpc:call(Node, pyport_pool, start_part, [Part, PartOpts], 60000)
                      catch
                          Class:Reason -> {error, {Class, Reason}}
                      end,
            case Started of
                {ok, Members} ->
                    %% a part left from an earlier run of this pool may have another
                    %% size: the members beyond the shorter list stay down
                    Slots = node_members(Node, Row),
                    N = min(length(Slots), length(Members)),
                    Changes = [{I, {remote, Node, J, Member}}
                               || {I, {J, Member}} <- lists:zip(lists:sublist(Slots, N),
                                                                lists:sublist(Members, N))],
                    Row1 = set_members(Name, Row, Changes),
                    [atomics:put(Row1#row.state, I, ?READY) || {I, _} <- Changes],
                    S#state{row = Row1};
                {error, Why} ->
                    logger:warning("pyport pool ~p: no members on ~p yet: ~0p",
                                   [Name, Node, Why], #{domain => [pyport]}),
                    _ = erlang:send_after(?NODE_RETRY_MS, self(), {retry_node, Node}),
                    S
            end
    end.

%% The pool connects to its nodes itself, and tries again ?NODE_RETRY_MS after each
%% failed attempt (made by a process of its own: one can take seconds); the nodeup that
%% follows starts the node's members.
connect(Node) ->
    Pool = self(),
    case connected(Node) of
        true ->
            ok;
        false ->
            _ = spawn(fun() ->
                          _ = net_kernel:connect_node(Node),
                          erlang:send_after(?NODE_RETRY_MS, Pool, {connect, Node})
                      end),
            ok
    end.

%% Whether this node is connected to Node (hidden nodes too).
connected(Node) ->
    pyport_remote:connected(Node).

node_members(Node, #row{members = Ms}) ->
    [I || I <- lists:seq(1, tuple_size(Ms)), is_member_of(Node, element(I, Ms))].

is_member_of(Node, {remote, Node, _, _}) -> true;
is_member_of(_, _) -> false.

part_name(Name) ->
    list_to_atom(atom_to_list(Name) ++ "@" ++ atom_to_list(node())).

%% @private On the other node: starts (or finds) the part of a pool, and lists its
%% members as `{Index, Member}'.
-spec start_part(atom(), map()) -> {ok, [{pos_integer(), member()}]} | {error, term()}.
start_part(Part, Opts) ->
    case start(Part, Opts) of
        {ok, _} -> part_members(Part);
        {error, {already_started, _}} -> part_members(Part);
        {error, _} = Error -> Error
    end.

part_members(Part) ->
    case info(Part) of
        {ok, #{members := Ms}} -> {ok, [{I, M} || #{index := I, context := M} <- Ms]};
        {error, _} = Error -> Error
    end.

%% @private On the other node: stops the part of a pool.
-spec stop_part(atom()) -> ok | {error, not_found}.
stop_part(Part) ->
    stop(Part).

%% @private The OS pid serving a runtime of this node (for pool_info on another node).
-spec os_pid(pyport_runtime:key()) -> integer() | undefined.
os_pid(Key) ->
    case pyport_runtime:port_owner(Key) of
        {ok, Owner, _} ->
            try pyport_port:info(Owner, 1000) of
                {ok, #{os_pid := OsPid}} -> OsPid;
                _ -> undefined
            catch
                exit:_ -> undefined
            end;
        {error, _} ->
            undefined
    end.

%%% Members

start_members(owngil, Size, Opts) ->
    start_owngil(Size, Opts, <<"mode => owngil">>);
start_members(main, Size, Opts) ->
    start_main(Size, Opts, <<"mode => main">>);
start_members(auto, Size, Opts) ->
    case start_owngil(Size, Opts, <<"preload runs in a sub-interpreter">>) of
        {ok, _, _, _, _} = Ok ->
            Ok;
        {error, Reason} ->
            Why = iolist_to_binary(["the preload fails in a sub-interpreter: ",
                                    failure(alone(Reason, Size, Opts))]),
            start_main(Size, Opts, Why)
    end;
start_members(Mode, _Size, _Opts) ->
    {error, {bad_option, {mode, Mode}}}.

%% The preload crashed the runtime of Size sub-interpreters: the reason it gives in one
%% of them alone. A single-phase init extension runs its init in a sub-interpreter
%% before CPython refuses it; CPython 3.12 crashed now and then when several ran one at
%% once (`import readline' in two: 6 runs in 300 died of SIGSEGV or SIGABRT, none in
%% one, none on 3.13), where the reason is the `ImportError'.
alone({port_exit, Status} = Crash, Size, Opts) when Size > 1, Status > 128 ->
    case start_owngil(1, Opts, <<>>) of
        {ok, _, _, Runtimes, _} ->
            pyport_linked:stop(maps:keys(Runtimes)),
            Crash;
        {error, Reason} ->
            Reason
    end;
alone(Reason, _Size, _Opts) ->
    Reason.

%% `Type: the last line of the message' for a Python exception, else the term.
failure({context_error, _Spec, {error, {python, Type, Message, _Traceback}}}) ->
    Lines = [L || L <- binary:split(Message, <<"\n">>, [global]), string:trim(L) =/= <<>>],
    Last = case Lines of
               [] -> <<>>;
               _ -> string:trim(lists:last(Lines))
           end,
    [Type, ": ", string:slice(Last, 0, 300)];
failure(Reason) ->
    io_lib:format("~0p", [Reason]).

%% One runtime, Size owngil contexts.
start_owngil(Size, #{name := Name} = Opts, Why) ->
    Specs = [member_spec(I, owngil, Opts) || I <- lists:seq(1, Size)],
    case start_runtime(Opts#{key => {pyport_pool, Name}, contexts => Specs}) of
        {ok, Pid} ->
            Members = [{{pyport_pool, Name}, member_name(I)} || I <- lists:seq(1, Size)],
            {ok, owngil, Why, #{Pid => 0}, Members};
        {error, _} = Error ->
            Error
    end.

%% A runtime per member, each with one main context.
start_main(Size, Opts, Why) ->
    start_main(1, Size, Opts, Why, #{}, []).

start_main(I, Size, _Opts, Why, Runtimes, Members) when I > Size ->
    {ok, main, Why, Runtimes, lists:reverse(Members)};
start_main(I, Size, Opts, Why, Runtimes, Members) ->
    case start_main_member(I, Opts) of
        {ok, Pid, Member} ->
            start_main(I + 1, Size, Opts, Why, Runtimes#{Pid => I}, [Member | Members]);
        {error, _} = Error ->
            pyport_linked:stop(maps:keys(Runtimes)),
            Error
    end.

start_main_member(I, #{name := Name} = Opts) ->
    Key = {pyport_pool, Name, I},
    case start_runtime(Opts#{key => Key, contexts => [member_spec(I, main, Opts)],
                             max_atoms => atom_share(I, Opts)}) of
        {ok, Pid} -> {ok, Pid, {Key, member_name(I)}};
        {error, _} = Error -> Error
    end.

%% The pool's `max_atoms' (default that of a runtime) is the budget of all its members
%% on this node together: a member runtime of its own (mode `main') gets its share, so
%% the members do not multiply it. (An `owngil' pool is one runtime: it has it all.)
atom_share(I, #{size := Size} = Opts) ->
    Max = pyport_opts:max_atoms(Opts),
    Max div Size + case I =< Max rem Size of
                       true -> 1;
                       false -> 0
                   end.

member_spec(I, Mode, Opts) ->
    Spec = #{name => member_name(I), mode => Mode},
    case maps:find(preload, Opts) of
        {ok, Code} -> Spec#{preload => Code};
        error -> Spec
    end.

member_name(I) ->
    list_to_atom("member_" ++ integer_to_list(I)).

start_runtime(Opts) ->
    RuntimeOpts = maps:without(pyport_opts:pool_keys(), Opts),
    %% a failed start's exit, and no other, is taken out of the mailbox there
    %% (pyport_linked:quiet_start/1)
    pyport_runtime:start_link(RuntimeOpts).


%% A runtime process died (its OS process crashing is handled inside it; this is the
%% process itself): start it again under the same key and context names, which is all
%% the row holds of its members, so the row stands as it is.
runtime_exited(Pid, Reason, #state{name = Name, runtimes = Runtimes, opts = Opts,
                                   mode = Mode} = S) ->
    logger:warning("pyport pool ~p: a member runtime exited (~0p); starting it again",
                   [Name, Reason], #{domain => [pyport]}),
    {I, Runtimes1} = maps:take(Pid, Runtimes),
    case restart_runtime(Mode, I, maps:get(size, Opts), Opts) of
        {ok, NewPid} ->
            S#state{runtimes = Runtimes1#{NewPid => I}};
        {error, Why} ->
            logger:error("pyport pool ~p: the runtime did not start again: ~0p", [Name, Why],
                         #{domain => [pyport]}),
            exit({member_start_failed, Why})
    end.

restart_runtime(main, I, _Size, Opts) ->
    case start_main_member(I, Opts) of
        {ok, Pid, _Member} -> {ok, Pid};
        {error, _} = Error -> Error
    end;
restart_runtime(owngil, _I, Size, Opts) ->
    case start_owngil(Size, Opts, <<>>) of
        {ok, _, _, Runtimes, _Members} -> {ok, hd(maps:keys(Runtimes))};
        {error, _} = Error -> Error
    end.

set_members(Name, #row{members = Members} = Row, Changes) ->
    New = lists:foldl(fun({I, M}, Acc) -> setelement(I, Acc, M) end, Members, Changes),
    Row1 = Row#row{members = New},
    true = ets:insert(?TABLE, {{pool, Name}, Row1}),
    Row1.

%%% max_requests: drain, then replace

%% The member is out of dispatch; it is replaced once nothing runs on it: no request
%% counted in flight, and its context neither runs nor queues anything (a cast, or a
%% call another process made with an env of it) nor has a stream open. One that takes
%% longer than `drain_timeout' is replaced anyway, and that is logged.
drain(I, Since, #state{name = Name, opts = Opts, row = #row{load = Load}} = S) ->
    Waited = erlang:monotonic_time(millisecond) - Since,
    Limit = pyport_opts:drain_timeout(Opts),
    case atomics:get(Load, I) =:= 0 andalso idle(element(I, S#state.row#row.members)) of
        true ->
            replace(I, S);
        false when Waited >= Limit ->
            logger:warning("pyport pool ~p: member ~b still busy after ~b ms; replaced",
                           [Name, I, Waited], #{domain => [pyport]}),
            replace(I, S);
        false ->
            _ = erlang:send_after(?DRAIN_POLL_MS, self(), {drain, I, Since}),
            S
    end.

%% Whether a member's context runs, queues or streams nothing (a runtime that is down
%% runs nothing either).
idle({Key, Context}) ->
    case {pyport_runtime:port_owner(Key), pyport_runtime:context_id(Key, Context)} of
        {{ok, Owner, Timeout}, {ok, Id}} ->
            case pyport_port:info(Owner, Timeout) of
                {ok, #{contexts := Contexts}} ->
                    [] =:= [C || #{id := CId} = C <- Contexts, CId =:= Id,
                                 maps:get(queued, C, 0) > 0 orelse maps:get(running, C, false)
                                 orelse maps:get(streams, C, 0) > 0];
                {error, _} ->
                    true
            end;
        _ ->
            true
    end.

%% A replacement that fails to start is logged; the member's runtime keeps retrying
%% with back-off, and callers pass over it while it is down.
replace(I, #state{name = Name, mode = Mode, row = Row, runtimes = Runtimes,
                  replaced = N, waiting = Waiting} = S) ->
    {Key, Context} = element(I, Row#row.members),
    Result =
        case Mode of
            main ->
                [Pid] = [P || {P, J} <- maps:to_list(Runtimes), J =:= I],
                pyport_runtime:recycle(Pid);
            owngil ->
                %% a new context of that name: callers find it by name
                case {pyport_runtime:port_owner(Key), pyport_runtime:context_id(Key, Context)} of
                    {{ok, Owner, Timeout}, {ok, Id}} ->
                        _ = pyport_port:stop_context(Owner, Id, Timeout),
                        case pyport_port:new_context(Owner, member_spec(I, owngil, S#state.opts),
                                                     Timeout) of
                            {ok, _} -> ok;
                            {error, _} = Error -> Error
                        end;
                    Other ->
                        {error, Other}
                end
        end,
    Result =:= ok orelse logger:error("pyport pool ~p: member ~b was not replaced: ~0p",
                                      [Name, I, Result], #{domain => [pyport]}),
    atomics:put(Row#row.served, I, 0),
    atomics:put(Row#row.state, I, ?READY),
    [gen_server:reply(From, ok) || From <- Waiting],
    S#state{replaced = N + 1, waiting = []}.

%%% info

describe(#state{name = Name, mode = Mode, mode_reason = Why, row = Row, replaced = N,
                runtimes = Runtimes}) ->
    #row{members = Members, load = Load, state = St, served = Served,
         max_requests = Max} = Row,
    Size = tuple_size(Members),
    OsPids = os_pids(Runtimes),
    #{name => Name, mode => Mode, mode_reason => Why, size => Size, node => node(),
      max_requests => Max, replaced => N,
      members => [member_info(I, element(I, Members), Load, St, Served, OsPids)
                  || I <- lists:seq(1, Size)]}.

member_info(I, {remote, Node, _J, Member}, Load, St, Served, _OsPids) ->
    Status = case atomics:get(St, I) of
                 ?READY -> up;
                 ?DRAINING -> draining;
                 ?DOWN -> down
             end,
    #{index => I, node => Node, context => Member, status => Status,
      in_flight => atomics:get(Load, I), requests => atomics:get(Served, I),
      os_pid => remote_os_pid(Node, Member)};
member_info(I, {Key, Context}, Load, St, Served, OsPids) ->
    Member = case pyport_runtime:context_id(Key, Context) of
                 {ok, Id} -> {Key, Id, whereis(init)};
                 {error, _} -> undefined
             end,
    Status = case {pyport_runtime:is_up(Key), atomics:get(St, I)} of
                 {false, _} -> down;
                 {true, ?READY} -> up;
                 {true, _} -> draining
             end,
    #{index => I, node => node(), runtime => Key, context => Member, status => Status,
      in_flight => atomics:get(Load, I), requests => atomics:get(Served, I),
      os_pid => maps:get(Key, OsPids, undefined)}.

os_pids(Runtimes) ->
    maps:from_list([{Key, os_pid(Key)} || Pid <- maps:keys(Runtimes),
                                          {ok, Key} <- [pyport_runtime:key(Pid)]]).

%% The OS pid behind a context of another node (undefined when it cannot be told).
remote_os_pid(_Node, undefined) ->
    undefined;
remote_os_pid(Node, {Key, _Id, _}) ->
    try
        erpc:call(Node, ?MODULE, os_pid, [Key], 2000)
    catch
        _:_ -> undefined
    end.


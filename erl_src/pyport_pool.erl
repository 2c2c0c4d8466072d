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
%% pool's row in the `pyport_runtimes' table holds the members and three atomics
%% arrays (requests in flight, member state, requests served), and each caller picks
%% its member itself (checkout/2, checkin/2).
%%
%% `max_requests': the caller whose request is the member's last takes the member out
%% of dispatch and tells this process, which waits until the member's requests in
%% flight are answered, replaces its interpreter, and gives it work again. Callers that
%% find every member being replaced wait for the first one back. No call fails for it.
-module(pyport_pool).
-behaviour(gen_server).

-export([start_link/1]).
-export([child_spec/1]).
-export([checkout/1]).
-export([checkin/2]).
-export([info/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([opts/0]).

-define(TABLE, pyport_runtimes).
-define(STOP_WAIT, 5000).
%% how often a draining member's requests in flight are looked at
-define(DRAIN_POLL_MS, 5).
-define(READY, 0).
-define(DRAINING, 1).

-type opts() :: #{name := atom(),
                  size => pos_integer(),
                  mode => main | owngil | auto,
                  preload => iodata(),
                  max_requests => pos_integer() | infinity,
                  atom() => term()}.

%% The row callers read: members as a tuple of `{RuntimeKey, Ctx}', and atomics arrays
%% indexed by member: in flight, state, served (slot Size + 1 of `load' rotates ties).
-record(row, {name :: atom(),
              members :: tuple(),
              load :: atomics:atomics_ref(),
              state :: atomics:atomics_ref(),
              served :: atomics:atomics_ref(),
              max_requests :: pos_integer() | infinity,
              pid :: pid()}).

-record(state, {name :: atom(),
                opts :: opts(),
                mode :: main | owngil,
                mode_reason :: binary(),
                %% the runtime processes: one per member (main) or one (owngil)
                runtimes :: #{pid() => non_neg_integer()},
                row :: #row{},
                replaced = 0 :: non_neg_integer(),
                %% callers waiting while every member is being replaced
                waiting = [] :: [gen_server:from()]}).

%%% API

%% @doc Starts a pool linked to the caller. Opts: `name' (required), `size' (default:
%% schedulers online), `mode', `preload', `max_requests', and any runtime option
%% (`venv', `path', `env', `max_memory', `call_timeout'...), which applies to every
%% member.
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(#{name := Name} = Opts) when is_atom(Name) ->
    gen_server:start_link(?MODULE, Opts, []).

%% @doc A child spec for the user's own supervision tree; the handle is then
%% `pyport:pool(Name)'.
-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(#{name := Name} = Opts) when is_atom(Name) ->
    #{id => {?MODULE, Name},
      start => {?MODULE, start_link, [Opts]},
      restart => permanent,
      shutdown => ?STOP_WAIT + 1000,
      type => worker,
      modules => [?MODULE]}.

%% @doc Takes the ready member with the fewest requests in flight and counts one more
%% request on it: `{ok, Index, Ctx}' or `{error, Reason}'. Members whose runtime is
%% down are passed over while another is up.
-spec checkout(atom()) -> {ok, pos_integer(), pyport:ctx()} | {error, term()}.
checkout(Name) ->
    case row(Name) of
        {ok, Row} -> checkout(Row, tuple_size(Row#row.members), []);
        {error, _} = Error -> Error
    end.

%% @doc The request taken with checkout/1 is answered.
-spec checkin(atom(), pos_integer()) -> ok.
checkin(Name, Index) ->
    case row(Name) of
        {ok, #row{load = Load}} -> atomics:sub(Load, Index, 1);
        {error, _} -> ok
    end.

%% @doc The pool's mode (and why), size and members.
-spec info(atom()) -> {ok, map()} | {error, term()}.
info(Name) ->
    case row(Name) of
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

-spec init(opts()) -> {ok, #state{}} | {stop, term()}.
init(#{name := Name} = Opts) ->
    process_flag(trap_exit, true),
    Size = maps:get(size, Opts, erlang:system_info(schedulers_online)),
    case start_members(maps:get(mode, Opts, auto), Size, Opts) of
        {ok, Mode, Why, Runtimes, Members} ->
            logger:notice("pyport pool ~p: ~b members, mode ~p (~ts)", [Name, Size, Mode, Why],
                          #{domain => [pyport]}),
            Row = #row{name = Name,
                       members = list_to_tuple(Members),
                       load = atomics:new(Size + 1, [{signed, true}]),
                       state = atomics:new(Size, []),
                       served = atomics:new(Size, []),
                       max_requests = maps:get(max_requests, Opts, infinity),
                       pid = self()},
            true = ets:insert_new(?TABLE, {{pool, Name}, Row})
                orelse error({already_started, Name}),
            {ok, #state{name = Name, opts = Opts, mode = Mode, mode_reason = Why,
                        runtimes = Runtimes, row = Row}};
        {error, Reason} ->
            {stop, Reason}
    end.

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

-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, S) ->
    {noreply, S}.

-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info({replace, I}, S) ->
    {noreply, drain(I, S)};
handle_info({drain, I}, S) ->
    {noreply, drain(I, S)};
handle_info({'EXIT', Pid, Reason}, #state{runtimes = Runtimes} = S)
  when is_map_key(Pid, Runtimes) ->
    {noreply, runtime_exited(Pid, Reason, S)};
handle_info({'EXIT', _Pid, _Reason}, S) ->
    {noreply, S};
handle_info(_Msg, S) ->
    {noreply, S}.

-spec terminate(term(), #state{}) -> ok.
terminate(_Reason, #state{name = Name, runtimes = Runtimes}) ->
    _ = try ets:delete(?TABLE, {pool, Name}) catch error:badarg -> true end,
    lists:foreach(fun stop_runtime/1, maps:keys(Runtimes)).

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
                                    failure(Reason)]),
            start_main(Size, Opts, Why)
    end;
start_members(Mode, _Size, _Opts) ->
    {error, {bad_option, {mode, Mode}}}.

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
            Members = [{{pyport_pool, Name}, member_ctx(Pid, I)} || I <- lists:seq(1, Size)],
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
            lists:foreach(fun stop_runtime/1, maps:keys(Runtimes)),
            Error
    end.

start_main_member(I, #{name := Name} = Opts) ->
    Key = {pyport_pool, Name, I},
    case start_runtime(Opts#{key => Key, contexts => [member_spec(I, main, Opts)]}) of
        {ok, Pid} -> {ok, Pid, {Key, member_ctx(Pid, I)}};
        {error, _} = Error -> Error
    end.

member_spec(I, Mode, Opts) ->
    Spec = #{name => member_name(I), mode => Mode},
    case maps:find(preload, Opts) of
        {ok, Code} -> Spec#{preload => Code};
        error -> Spec
    end.

member_name(I) ->
    list_to_atom("member_" ++ integer_to_list(I)).

member_ctx(Pid, I) ->
    {ok, Ctx} = pyport:context(Pid, member_name(I)),
    Ctx.

start_runtime(Opts) ->
    RuntimeOpts = maps:without([name, size, mode, preload, max_requests], Opts),
    case pyport_runtime:start_link(RuntimeOpts) of
        {ok, Pid} ->
            {ok, Pid};
        {error, _} = Error ->
            receive {'EXIT', _, _} -> ok after 0 -> ok end,
            Error
    end.

stop_runtime(Pid) ->
    exit(Pid, shutdown),
    receive
        {'EXIT', Pid, _} -> ok
    after ?STOP_WAIT ->
        exit(Pid, kill),
        receive {'EXIT', Pid, _} -> ok end
    end.

%% A runtime process died (its OS process crashing is handled inside it; this is the
%% process itself): start it again under the same key, so the members' handles hold.
runtime_exited(Pid, Reason, #state{name = Name, runtimes = Runtimes, opts = Opts,
                                   mode = Mode, row = Row} = S) ->
    logger:warning("pyport pool ~p: a member runtime exited (~0p); starting it again",
                   [Name, Reason], #{domain => [pyport]}),
    {I, Runtimes1} = maps:take(Pid, Runtimes),
    Size = tuple_size(Row#row.members),
    case restart_runtime(Mode, I, Size, Opts) of
        {ok, NewPid, Members} ->
            S#state{runtimes = Runtimes1#{NewPid => I}, row = set_members(Name, Row, Members)};
        {error, Why} ->
            logger:error("pyport pool ~p: the runtime did not start again: ~0p", [Name, Why],
                         #{domain => [pyport]}),
            exit({member_start_failed, Why})
    end.

restart_runtime(main, I, _Size, Opts) ->
    case start_main_member(I, Opts) of
        {ok, Pid, Member} -> {ok, Pid, [{I, Member}]};
        {error, _} = Error -> Error
    end;
restart_runtime(owngil, _I, Size, Opts) ->
    case start_owngil(Size, Opts, <<>>) of
        {ok, _, _, Runtimes, Members} ->
            [Pid] = maps:keys(Runtimes),
            {ok, Pid, lists:zip(lists:seq(1, Size), Members)};
        {error, _} = Error ->
            Error
    end.

set_members(Name, #row{members = Members} = Row, Changes) ->
    New = lists:foldl(fun({I, M}, Acc) -> setelement(I, Acc, M) end, Members, Changes),
    Row1 = Row#row{members = New},
    true = ets:insert(?TABLE, {{pool, Name}, Row1}),
    Row1.

%%% max_requests: drain, then replace

drain(I, #state{row = #row{load = Load}} = S) ->
    case atomics:get(Load, I) of
        0 ->
            replace(I, S);
        _ ->
            _ = erlang:send_after(?DRAIN_POLL_MS, self(), {drain, I}),
            S
    end.

%% A replacement that fails to start is logged; the member's runtime keeps retrying
%% with back-off, and callers pass over it while it is down.
replace(I, #state{name = Name, mode = Mode, row = Row, runtimes = Runtimes,
                  replaced = N, waiting = Waiting} = S) ->
    {Key, Ctx} = element(I, Row#row.members),
    {Result, Row1} =
        case Mode of
            main ->
                [Pid] = [P || {P, J} <- maps:to_list(Runtimes), J =:= I],
                {pyport_runtime:recycle(Pid), Row};
            owngil ->
                _ = pyport:stop_context(Ctx),
                case pyport:new_context(runtime_pid(Runtimes),
                                        member_spec(I, owngil, S#state.opts)) of
                    {ok, NewCtx} -> {ok, set_members(Name, Row, [{I, {Key, NewCtx}}])};
                    {error, _} = Error -> {Error, Row}
                end
        end,
    Result =:= ok orelse logger:error("pyport pool ~p: member ~b was not replaced: ~0p",
                                      [Name, I, Result], #{domain => [pyport]}),
    atomics:put(Row1#row.served, I, 0),
    atomics:put(Row1#row.state, I, ?READY),
    [gen_server:reply(From, ok) || From <- Waiting],
    S#state{row = Row1, replaced = N + 1, waiting = []}.

runtime_pid(Runtimes) ->
    [Pid] = maps:keys(Runtimes),
    Pid.

%%% Dispatch (in the caller)

row(Name) ->
    try ets:lookup(?TABLE, {pool, Name}) of
        [{_, Row}] -> {ok, Row};
        [] -> {error, {pool_down, Name}}
    catch
        error:badarg -> {error, {pool_down, Name}}
    end.

%% Tries members from the least loaded up; Skip holds those found down.
checkout(#row{members = Members} = Row, Size, Skip) ->
    case least_loaded(Row, Size, Skip) of
        none ->
            await_ready(Row, Size, Skip);
        I ->
            {Key, Ctx} = element(I, Members),
            case pyport_runtime:is_up(Key) of
                true -> take(Row, I, Ctx, Size, Skip);
                false -> checkout(Row, Size, [I | Skip])
            end
    end.

%% No member is ready and up. While some are being replaced (max_requests), wait for
%% one rather than fail the call; when all are down, say so at once.
await_ready(#row{name = Name, state = St, pid = Pid}, Size, Skip) ->
    Replacing = [I || I <- lists:seq(1, Size), atomics:get(St, I) =/= ?READY,
                      not lists:member(I, Skip)],
    case Replacing of
        [] ->
            {error, {runtime_down, no_member_up}};
        _ ->
            try gen_server:call(Pid, await_ready, infinity) of
                ok -> checkout(Name)
            catch
                exit:_ -> {error, {runtime_down, no_member_up}}
            end
    end.

%% Counts the request, then looks at the state again: a member being drained that was
%% ready a moment ago is given back, so the drain never misses a request.
take(#row{load = Load, state = St, served = Served, max_requests = Max, pid = Pid} = Row,
     I, Ctx, Size, Skip) ->
    atomics:add(Load, I, 1),
    case atomics:get(St, I) of
        ?READY ->
            case atomics:add_get(Served, I, 1) =:= Max of
                true ->
                    %% the member's last request: no more go to it from now on
                    atomics:put(St, I, ?DRAINING),
                    Pid ! {replace, I};
                false ->
                    ok
            end,
            {ok, I, Ctx};
        _ ->
            atomics:sub(Load, I, 1),
            checkout(Row, Size, [I | Skip])
    end.

%% The ready member with the fewest requests in flight, ties broken round-robin.
least_loaded(#row{load = Load, state = St}, Size, Skip) ->
    Start = atomics:add_get(Load, Size + 1, 1) rem Size,
    least_loaded(Load, St, Size, Skip, Start, 0, none, infinity).

least_loaded(_Load, _St, Size, _Skip, _Start, Size, Best, _BestLoad) ->
    Best;
least_loaded(Load, St, Size, Skip, Start, N, Best, BestLoad) ->
    I = (Start + N) rem Size + 1,
    case atomics:get(St, I) =:= ?READY andalso not lists:member(I, Skip) of
        true ->
            case atomics:get(Load, I) of
                L when L < BestLoad -> least_loaded(Load, St, Size, Skip, Start, N + 1, I, L);
                _ -> least_loaded(Load, St, Size, Skip, Start, N + 1, Best, BestLoad)
            end;
        false ->
            least_loaded(Load, St, Size, Skip, Start, N + 1, Best, BestLoad)
    end.

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

member_info(I, {Key, Ctx}, Load, St, Served, OsPids) ->
    Status = case {pyport_runtime:is_up(Key), atomics:get(St, I)} of
                 {false, _} -> down;
                 {true, ?READY} -> up;
                 {true, _} -> draining
             end,
    #{index => I, node => node(), runtime => Key, context => Ctx, status => Status,
      in_flight => atomics:get(Load, I), requests => atomics:get(Served, I),
      os_pid => maps:get(Key, OsPids, undefined)}.

os_pids(Runtimes) ->
    maps:from_list(
      [{Key, OsPid} || Pid <- maps:keys(Runtimes),
                       {ok, #{os_pid := OsPid}} <- [catch_info(Pid)],
                       {ok, Key} <- [pyport_runtime:key(Pid)]]).

catch_info(Pid) ->
    try pyport:info(Pid) catch _:_ -> error end.

%% @doc Python calling Erlang: `erlang.call(Name, *Args)' (frames of kind 2). Each
%% callback runs in a new process (not linked: a crashing callback must not take the
%% runtime down) that decodes it, runs the registered function and writes the
%% `callback_result' to the port itself, so the port owner never waits for a callback.
%%
%% At most ?MAX_RUNNING callback processes run at once per runtime; the others wait in
%% turn (Python threads calling Erlang all at once cannot make the node spawn without
%% bound). That limit is the `limiter()' this module keeps; it lives in the port
%% owner's state (the port owner gets the frames and the callback processes' `DOWN'
%% messages, so a process of its own would only add a hop). No process of its own.
-module(pyport_callback).

-export([new/0]).
-export([start/3]).
-export([done/3]).
-export([run_now/3]).

-export_type([limiter/0]).
-export_type([target/0]).

-define(FUNCTIONS, pyport_functions).
-define(MAX_RUNNING, 100).

%% Where a callback runs and answers: the runtime's key, the port, the port's max frame.
-type target() :: {pyport_table:key(), port(), pos_integer()}.
%% A callback's payload, and whether to decode it safely (past the atom budget, Max).
-type call() :: {binary(), {boolean(), non_neg_integer()}}.
-record(limiter, {
    %% callback processes running, by monitor
    running = #{} :: #{reference() => true},
    %% the callbacks waiting for a turn
    queue = queue:new() :: queue:queue(call())
}).
-opaque limiter() :: #limiter{}.

%% @doc No callback running.
-spec new() -> limiter().
new() ->
    #limiter{}.

%% @doc Runs a callback now, or once one running ends when ?MAX_RUNNING run already.
-spec start(call(), target(), limiter()) -> limiter().
start(Call, _Target, #limiter{running = Running, queue = Queue} = L)
  when map_size(Running) >= ?MAX_RUNNING ->
    L#limiter{queue = queue:in(Call, Queue)};
start({Payload, Safe}, Target, #limiter{running = Running} = L) ->
    {_, Mref} = spawn_monitor(fun() -> run(Target, Payload, Safe) end),
    L#limiter{running = Running#{Mref => true}}.

%% @doc A `DOWN' message: `error' when it is not of a callback process; else the next
%% waiting callback starts.
-spec done(reference(), target(), limiter()) -> {ok, limiter()} | error.
done(Mref, Target, #limiter{running = Running, queue = Queue} = L) ->
    case maps:take(Mref, Running) of
        {true, Rest} ->
            L1 = L#limiter{running = Rest},
            case queue:out(Queue) of
                {{value, Call}, Left} -> {ok, start(Call, Target, L1#limiter{queue = Left})};
                {empty, _} -> {ok, L1}
            end;
        error ->
            error
    end.

%% @doc Runs a callback now, outside the limit (while the port owner starts: the
%% contexts' preload code may call Erlang).
-spec run_now(target(), binary(), {boolean(), non_neg_integer()}) -> ok.
run_now(Target, Payload, Safe) ->
    _ = spawn(fun() -> run(Target, Payload, Safe) end),
    ok.

run({Key, Port, MaxFrame}, Payload, Safe) ->
    case pyport_atoms:decode(Payload, Safe) of
        {error, Limit} ->
            %% its arguments hold atoms past the budget: Python gets the error
            {CbId, Ctx} = callback_ids(Payload),
            answer(Port, MaxFrame, Ctx, CbId, {error, Limit});
        {ok, {CbId, Ctx, Name, Args, _Caller}} when is_integer(CbId), is_integer(Ctx),
                                                    is_list(Args) ->
            %% Requests this process makes to the waiting context are re-entrant: the
            %% context serves them however deep it is nested (see pyport:call/6).
            put(pyport_reentrant, {Key, Ctx}),
            Result = invoke(Name, Args),
            answer(Port, MaxFrame, Ctx, CbId, Result);
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
    case pyport_send:destination(Name) of
        undefined -> none;
        Pid -> Pid
    end;
whereis_name(_) ->
    none.

%% A result too large for one frame would be discarded by the port program and leave
%% the Python caller waiting forever, so it is answered with an error instead.
answer(Port, MaxFrame, Ctx, CbId, Result) ->
    Body = case term_to_binary({callback_result, CbId, Result}) of
               Small when 10 + byte_size(Small) =< MaxFrame ->
                   Small;
               Large ->
                   TooLarge = {frame_too_large, 10 + byte_size(Large), MaxFrame},
                   term_to_binary({callback_result, CbId, {error, TooLarge}})
           end,
    %% a false result: the port is gone, and the Python caller with it
    _ = pyport_call:cast_request(Port, Ctx, Body),
    ok.

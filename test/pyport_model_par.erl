%% @doc The parallel half of the model (proper_statem:parallel_commands): three contexts
%% of one runtime (two `owngil', one `main'), each holding a list that requests append
%% to. Every append answers the whole list after it, so the linearizability check
%% PropEr makes is a check of per-context order: each reply must fit one order of all
%% the requests the parallel callers made. Every command also checks its caller's view:
%% exactly one reply, nothing else left in its mailbox.
-module(pyport_model_par).

-export([initial_state/0, command/1, precondition/2, postcondition/3, next_state/3]).
-export([prop_parallel/0, par/2, run/1]).

-define(RT, pyport_model_par_rt).

-record(s, {lists = #{a => [], b => [], m => []} :: #{atom() => [integer()]}}).

preload() ->
    <<"import erlang\n"
      "L = []\n"
      "def app(x):\n"
      "    L.append(x)\n"
      "    return list(L)\n"
      "def app_cb(x):\n"
      "    y = erlang.call('pyport_model_echo', x)\n"
      "    L.append(y)\n"
      "    return list(L)\n"
      "def get():\n"
      "    return list(L)\n">>.

initial_state() ->
    #s{}.

command(_S) ->
    Ctx = proper_types:elements([a, b, m]),
    X = proper_types:integer(0, 10000),
    proper_types:frequency(
      [{4, {call, ?MODULE, par, [app, [Ctx, X]]}},
       {2, {call, ?MODULE, par, [app_async, [Ctx, X]]}},
       {2, {call, ?MODULE, par, [app_cb, [Ctx, X]]}},
       {2, {call, ?MODULE, par, [get, [Ctx]]}},
       {1, {call, ?MODULE, par, [add, [Ctx, X, X]]}}]).

precondition(_, _) ->
    true.

next_state(#s{lists = Ls} = S, _Res, {call, _, par, [Op, [C, X]]})
  when Op =:= app; Op =:= app_async; Op =:= app_cb ->
    S#s{lists = Ls#{C => maps:get(C, Ls) ++ [X]}};
next_state(S, _, _) ->
    S.

postcondition(#s{lists = Ls}, {call, _, par, [Op, [C, X]]}, {Reply, Stray})
  when Op =:= app; Op =:= app_async; Op =:= app_cb ->
    Reply =:= {ok, maps:get(C, Ls) ++ [X]} andalso Stray =:= [];
postcondition(#s{lists = Ls}, {call, _, par, [get, [C]]}, {Reply, Stray}) ->
    Reply =:= {ok, maps:get(C, Ls)} andalso Stray =:= [];
postcondition(_, {call, _, par, [add, [_, X, Y]]}, {Reply, Stray}) ->
    Reply =:= {ok, X + Y} andalso Stray =:= [];
postcondition(_, _, _) ->
    false.

%% One request from the calling process; its reply and whatever else reached the
%% caller's mailbox by the time the reply came (a round trip to the same context
%% later would catch a late message too: the mailbox is looked at again after a call
%% to the default runtime).
par(Op, Args) ->
    ets:update_counter(pyport_model_stats, commands, 1),
    {ok, Ctx} = pyport:context(?RT, hd(Args)),
    Reply = case {Op, Args} of
                {app, [_, X]} -> pyport:call(Ctx, '__main__', app, [X]);
                {app_async, [_, X]} ->
                    pyport:await(pyport:async_call(Ctx, '__main__', app, [X]), 10000);
                {app_cb, [_, X]} -> pyport:call(Ctx, '__main__', app_cb, [X]);
                {get, [_]} -> pyport:call(Ctx, '__main__', get, []);
                {add, [_, X, Y]} -> pyport:call(Ctx, operator, add, [X, Y])
            end,
    {ok, 3} = pyport:call(operator, add, [1, 2]),
    {messages, Stray} = process_info(self(), messages),
    {Reply, Stray}.

prop_parallel() ->
    proper:forall(
      proper_statem:parallel_commands(?MODULE),
      fun(Cmds) -> pyport_model:guarded(fun() -> run(Cmds) end) end).

run(Cmds) ->
              Spec = #{preload => preload()},
              {ok, Rt} = pyport:start_runtime(#{name => ?RT,
                                                contexts => [Spec#{name => a},
                                                             Spec#{name => b},
                                                             Spec#{name => m, mode => main}]}),
              {Seq, Par, Result} = proper_statem:run_parallel_commands(?MODULE, Cmds),
              ok = pyport:stop_runtime(Rt),
              proper:whenfail(
                fun() ->
                        io:format("~nsequential: ~p~nparallel: ~p~nresult: ~p~n",
                                  [Seq, Par, Result])
                end,
                fun() -> Result =:= ok end).

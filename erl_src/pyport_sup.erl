%% @doc Top supervisor of pyport.
%%
%% It owns the public ETS tables `pyport_runtimes' and `pyport_functions' (the functions
%% Python may call with `erlang.call', by name as a binary), so they live exactly as long
%% as the application. It starts the default runtime registered as `pyport' unless the
%% application env says `{default_runtime, false}', and hosts the runtimes started with
%% `pyport:start_runtime/1'.
-module(pyport_sup).
-behaviour(supervisor).

-export([start_link/0]).
-export([start_child/1]).
-export([stop_child/1]).
-export([init/1]).

-define(TABLE, pyport_runtimes).
-define(FUNCTIONS, pyport_functions).

%% @doc Starts pyport's top supervisor, registered as `pyport_sup'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @private Supervisor callback: one_for_one, with the default runtime when configured.
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    ?TABLE = ets:new(?TABLE, [named_table, public, set, {read_concurrency, true}]),
    ?FUNCTIONS = ets:new(?FUNCTIONS, [named_table, public, set, {read_concurrency, true}]),
    Flags = #{strategy => one_for_one, intensity => 5, period => 10},
    {ok, {Flags, default_runtime()}}.

%% @doc Starts a child (a runtime or a pool) under this supervisor: `{ok, Pid}' or
%% `{error, Reason}' as the child's start gave it (without the child record the
%% supervisor adds).
-spec start_child(supervisor:child_spec()) -> {ok, pid()} | {error, term()}.
start_child(Spec) ->
    case supervisor:start_child(?MODULE, Spec) of
        {ok, Pid} ->
            {ok, Pid};
        {error, {Reason, Child}} when is_tuple(Child), element(1, Child) =:= child ->
            {error, Reason};
        {error, _} = Error ->
            Error
    end.

%% @doc Stops the child with that id and forgets it.
-spec stop_child(term()) -> ok | {error, not_found}.
stop_child(Id) ->
    case supervisor:terminate_child(?MODULE, Id) of
        ok -> _ = supervisor:delete_child(?MODULE, Id), ok;
        {error, not_found} -> {error, not_found}
    end.

%% The default runtime: `{default_runtime, true | false | Opts}' in the application env.
default_runtime() ->
    case application:get_env(pyport, default_runtime, true) of
        false ->
            [];
        true ->
            default_runtime(#{});
        Opts when is_map(Opts) ->
            default_runtime(Opts)
    end.

default_runtime(Opts) ->
    Contexts = maps:get(contexts, Opts, default_contexts()),
    %% issue 20: the venv of the app that has one (pyport_app_env)
    [pyport_runtime:child_spec(pyport_app_env:default_app(Opts#{name => pyport, contexts => Contexts}))].

%% `auto' is one owngil context per online scheduler; an integer asks for that many;
%% a list gives the context specs themselves.
default_contexts() ->
    case application:get_env(pyport, default_contexts, auto) of
        auto -> default_contexts(erlang:system_info(schedulers_online));
        N when is_integer(N), N > 0 -> default_contexts(N);
        Specs when is_list(Specs) -> Specs
    end.

default_contexts(N) ->
    [#{name => list_to_atom("default_" ++ integer_to_list(I)), mode => owngil}
     || I <- lists:seq(1, N)].

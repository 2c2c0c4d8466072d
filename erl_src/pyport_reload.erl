%% @private Reloading a Python module in contexts (pyport:reload/3, and a runtime's
%% `watch' option through pyport_watch), on the caller's side: each context runs
%% `erlang._reload(Module, OnlyIfImported)' (priv/python/erlang.py) as an ordinary
%% call, so a busy context answers as any call does (`{error, timeout}' past the
%% request's timeout, the runtime's `call_timeout' by default), and all of them are
%% asked at once, one short-lived process each: the whole takes as long as the
%% slowest context, not their sum.
%%
%% The `main' contexts of one runtime share one interpreter (one `sys.modules'): the
%% module is reloaded there once, by the first of them, and each answers with that
%% outcome (a second reload would run the module's code again for nothing).
-module(pyport_reload).

-export([runtime/4]).
-export([contexts/4]).

-export_type([outcome/0]).

-include("pyport_handles.hrl").

%% `not_imported': the module was not imported in that context (only when asked to
%% reload it only where it is).
-type outcome() :: reloaded | not_imported | {error, term()}.

%% @doc Reloads Module in every context of runtime Key (its Opts contexts and those made
%% with new_context/2), or only where it is imported.
-spec runtime(pyport_table:key(), binary(), map(), boolean()) ->
          {ok, [{#pyport_ctx{}, outcome()}]} | {error, term()}.
runtime(Key, Module, Opts, OnlyIfImported) ->
    case pyport_table:port_row(Key) of
        {ok, {_, PortOwner, _Port, Timeout, _MaxFrame}} ->
            case pyport_port:info(PortOwner, maps:get(timeout, Opts, Timeout)) of
                {ok, #{contexts := Contexts}} ->
                    Ctx = fun(Id) -> #pyport_ctx{key = Key, id = Id} end,
                    Main = [Ctx(Id) || #{id := Id, mode := main} <- Contexts],
                    Others = [[Ctx(Id)] || #{id := Id, mode := Mode} <- Contexts,
                                           Mode =/= main],
                    Groups = Others ++ [Main || Main =/= []],
                    Answers = run(Groups, Module, Opts, OnlyIfImported),
                    {ok, lists:keysort(1, Answers)};
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% @doc Reloads Module in each of these contexts (of this node or others), in their
%% order, or only where it is imported.
-spec contexts([#pyport_ctx{}], binary(), map(), boolean()) -> [{#pyport_ctx{}, outcome()}].
contexts(Ctxs, Module, Opts, OnlyIfImported) ->
    run([[Ctx] || Ctx <- Ctxs], Module, Opts, OnlyIfImported).

%% Each group's first context reloads; the group's contexts answer with its outcome.
%% (The spawned fun ends by exit/1 on purpose: its exit reason is the answer.)
-dialyzer({no_return, run/4}).
run(Groups, Module, Opts, OnlyIfImported) ->
    Started = [{spawn_monitor(fun() -> answer(Ctx, Module, Opts, OnlyIfImported) end), Group}
               || [Ctx | _] = Group <- Groups],
    lists:append([begin
                      Outcome = await(Monitor),  % one 'DOWN' per group
                      [{Ctx, Outcome} || Ctx <- Group]
                  end || {Monitor, Group} <- Started]).

%% The reply is the process's exit reason: no message of it can stray into the
%% caller's mailbox. It ends once its call is answered (at worst at the call's
%% timeout).
await({Pid, Monitor}) ->
    receive
        {'DOWN', Monitor, process, Pid, {reload, Outcome}} -> Outcome;
        {'DOWN', Monitor, process, Pid, Reason} -> {error, Reason}
    end.

-spec answer(#pyport_ctx{}, binary(), map(), boolean()) -> no_return().
answer(Ctx, Module, Opts, OnlyIfImported) ->
    exit({reload, one(Ctx, Module, Opts, OnlyIfImported)}).

one(#pyport_ctx{home = Home} = Ctx, Module, Opts, OnlyIfImported) when node(Home) =/= node() ->
    outcome(pyport_remote:request(Ctx, call, [Ctx, erlang, '_reload',
                                              [Module, OnlyIfImported], #{}], Opts));
one(#pyport_ctx{key = Key, id = Id}, Module, Opts, OnlyIfImported) ->
    outcome(pyport_call:request(Key, Id, {call, <<"erlang">>, <<"_reload">>,
                                          [Module, OnlyIfImported], #{}}, Opts)).

outcome({ok, true}) -> reloaded;
outcome({ok, false}) -> not_imported;
outcome({error, _} = Error) -> Error.

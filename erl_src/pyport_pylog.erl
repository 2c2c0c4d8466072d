%% @doc The logger of Python's output and of the port program's own reports (`log'
%% events, kind 1): each becomes a `logger' call in domain `[pyport, python]' whose
%% metadata names the runtime and the context (its id, and its name when it has one).
%% No process: it runs in the port owner.
-module(pyport_pylog).

-export([log/3]).

-define(LEVELS, [emergency, alert, critical, error, warning, notice, info, debug]).

%% @doc Logs one `{log, Level, Ctx, Message}' event of the runtime Key; Contexts gives
%% the contexts' names (by id).
-spec log(pyport_table:key(), #{pos_integer() => #{name := atom(), _ => _}},
          {log, term(), term(), term()}) -> ok.
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
    logger:log(level(Level), Format, [Label, Message], Meta).

level(Level) ->
    case lists:member(Level, ?LEVELS) of
        true -> Level;
        false -> notice
    end.

%% @doc pyport: call Python from Erlang.
%%
%% A runtime is one `pyport' OS process with its own CPython (see `pyport_runtime');
%% a context is one interpreter inside it. Calls go straight from the calling process
%% to the port: the caller monitors the runtime with an alias, writes its request frame
%% with `erlang:port_command/2', and decodes its own reply. The wire protocol is in
%% docs/protocol.md.
%%
%% A context handle (`ctx()') is opaque. Handles of contexts given in a runtime's Opts
%% stay valid across restarts of that runtime (when it was started under a supervisor,
%% or with a name); handles of contexts made with new_context/2 do not.
%%
%% Every request carries `caller => self()' in its Opts (`erlang.self()' in Python) and
%% its effective `timeout'. Envs (new_env/1) and object handles (`return => ref') belong
%% to the process that made them: the runtime frees them when that process exits.
%% Python calls the functions registered with register_function/2 by `erlang.call'.
%%
%% This module is the public API and only checks arguments and delegates: the call
%% path is pyport_call, streams pyport_stream, channels pyport_channel, handles of
%% other nodes pyport_remote, the member of a pool a request goes to pyport_affinity
%% (docs/architecture.md).
-module(pyport).

-export([start_runtime/1]).
-export([stop_runtime/1]).
-export([info/1]).
-export([new_context/2]).
-export([context/2]).
-export([stop_context/1]).
-export([interrupt/1]).
-export([call/3]).
-export([call/4]).
-export([call/5]).
-export([call/6]).
-export([eval/1]).
-export([eval/2]).
-export([eval/3]).
-export([eval/4]).
-export([exec/1]).
-export([exec/2]).
-export([exec/3]).
-export([async_call/4]).
-export([async_call/5]).
-export([async_call/6]).
-export([await/1]).
-export([await/2]).
-export([cast/4]).
-export([cast_as/5]).
-export([stream/4]).
-export([stream/5]).
-export([stream/6]).
-export([stream_next/1]).
-export([stream_next/2]).
-export([stream_ack/1]).
-export([stream_cancel/1]).
-export([channel_open/3]).
-export([channel_send/2]).
-export([channel_close/1]).
-export([new_env/1]).
-export([new_env_owned/2]).
-export([runtime_row/1]).
-export([pool_member/1]).
-export([encode/2]).
-export([drop_env/1]).
-export([getattr/2]).
-export([getattr/3]).
-export([call_method/3]).
-export([call_method/4]).
-export([call_method/5]).
-export([to_term/1]).
-export([release/1]).
-export([register_function/2]).
-export([unregister_function/1]).
-export([start_pool/2]).
-export([stop_pool/1]).
-export([pool/1]).
-export([pool_info/1]).
-export([reload/2]).
-export([reload/3]).

-export_type([runtime/0]).
-export_type([ctx/0]).
-export_type([error/0]).
-export_type([call_opts/0]).
-export_type([env/0]).
-export_type([pyref/0]).
-export_type([stream/0]).
-export_type([channel/0]).
-export_type([pool/0]).
-export_type([target/0]).

-include("pyport_handles.hrl").

-define(FUNCTIONS, pyport_functions).
-define(DEFAULT_RUNTIME, pyport).
%% Expr inside a telemetry span when the telemetry module is loaded; otherwise Expr
%% alone, with no metadata map or closure built.
-define(TRACED(Meta, Expr),
        case pyport_telemetry:enabled() of
            false -> Expr;
            true -> pyport_telemetry:span(Meta, fun() -> Expr end)
        end).

-opaque ctx() :: #pyport_ctx{}.
-opaque pool() :: #pyport_pool{}.
-type target() :: ctx() | pool().
-opaque env() :: #pyport_env{}.
-opaque pyref() :: #pyport_ref{}.
-opaque channel() :: #pyport_channel{}.
%% A stream is the alias its messages carry: `{pyport_stream, Stream, Msg}'.
-type stream() :: reference().
-type stream_msg() :: {data, term()} | done | {error, error()}.
-type runtime() :: pid() | atom().
-type name() :: atom() | binary() | string().
-type code() :: unicode:chardata().
-type call_opts() :: #{timeout => timeout(),
                       env => env(),
                       return => ref | term,
                       arrays => binary | lists,
                       atom() => term()}.
-type function_name() :: atom() | binary() | string().
-type error() :: {python, Type :: binary(), Message :: binary(), Traceback :: binary()}
               | timeout
               | {runtime_down, term()}
               | {context_down, term()}
               | {bad_term, term()}
               | {bad_request, term()}
               | {frame_too_large, non_neg_integer(), pos_integer()}
               | overloaded
               | not_found
               | {env_wrong_context, term()}
               | term().

%%% Runtimes

%% @doc Starts a runtime under pyport's supervisor. Opts are those of
%% `pyport_runtime:start_link/1'.
-spec start_runtime(pyport_runtime:opts()) -> {ok, pid()} | {error, term()}.
start_runtime(Opts) when is_map(Opts) ->
    pyport_sup:start_child(pyport_runtime:child_spec(Opts)).

%% @doc Stops a runtime started with start_runtime/1 (its port program exits).
-spec stop_runtime(runtime()) -> ok | {error, not_found}.
stop_runtime(Runtime) when is_pid(Runtime), node(Runtime) =/= node() ->
    pyport_remote:call(node(Runtime), stop_runtime, [Runtime]);
stop_runtime(Runtime) ->
    case runtime_key(Runtime) of
        {ok, Key} ->
            pyport_sup:stop_child({pyport_runtime, Key});
        {error, _} ->
            {error, not_found}
    end.

%% @doc Describes a runtime: `python_version', `owngil', `os_pid', and `contexts' as a
%% list of `#{id, name, mode}' maps (name is `undefined' for unnamed contexts).
-spec info(runtime()) -> {ok, #{python_version := binary(), owngil := boolean(),
                                os_pid := integer(), contexts := [map()],
                                atom() => term()}}
                       | {error, error()}.
info(Runtime) when is_pid(Runtime), node(Runtime) =/= node() ->
    pyport_remote:call(node(Runtime), info, [Runtime]);
info(Runtime) ->
    case with_runtime(Runtime, fun(_Key, Pid, Timeout) -> pyport_port:info(Pid, Timeout) end) of
        {ok, Info} -> {ok, Info#{node => node()}};
        {error, _} = Error -> Error
    end.

%%% Contexts

%% @doc Creates a context: Opts are `name' (atom), `mode' (`owngil', the default, or
%% `main'), `preload' (code run at creation) and `path' (extra sys.path entries).
-spec new_context(runtime(), pyport_runtime:context_spec()) -> {ok, ctx()} | {error, error()}.
new_context(Runtime, Opts) when is_pid(Runtime), node(Runtime) =/= node() ->
    pyport_remote:call(node(Runtime), new_context, [Runtime, Opts]);
new_context(Runtime, Opts) when is_map(Opts) ->
    with_runtime(Runtime,
                 fun(Key, Pid, Timeout) ->
                     case pyport_port:new_context(Pid, Opts, Timeout) of
                         {ok, Id} -> {ok, #pyport_ctx{key = Key, id = Id}};
                         {error, _} = Error -> Error
                     end
                 end).

%% @doc The context of that runtime with that name.
-spec context(runtime(), atom()) -> {ok, ctx()} | {error, not_found}.
context(Runtime, Name) when is_pid(Runtime), node(Runtime) =/= node() ->
    case pyport_remote:call(node(Runtime), context, [Runtime, Name]) of
        {error, {nodedown, _}} -> {error, not_found};
        Reply -> Reply
    end;
context(Runtime, Name) when is_atom(Name) ->
    case runtime_key(Runtime) of
        {ok, Key} ->
            case pyport_runtime:context_id(Key, Name) of
                {ok, Id} -> {ok, #pyport_ctx{key = Key, id = Id}};
                {error, _} = Error -> Error
            end;
        {error, _} ->
            {error, not_found}
    end.

%% @doc Ends a context. Stopping an unknown (or already stopped) context is `ok'.
-spec stop_context(ctx()) -> ok | {error, error()}.
stop_context(#pyport_ctx{home = Home} = Ctx) when node(Home) =/= node() ->
    pyport_remote:call(node(Home), stop_context, [Ctx]);
stop_context(#pyport_ctx{key = Key, id = Id}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, _Port, Timeout, _MaxFrame}} ->
            case pyport_port:stop_context(Pid, Id, Timeout) of
                {error, not_found} -> ok;
                Reply -> Reply
            end;
        {error, _} = Error ->
            Error
    end;
stop_context(_NotACtx) ->
    {error, {bad_request, ctx}}.

%% @doc Stops the request the context is running now: `erlang.Interrupted' (a
%% `BaseException') is raised in it at its next bytecode boundary, or at once when it
%% waits in `time.sleep', `erlang.call' or a channel receive, and its caller gets
%% `{error, interrupted}'. An idle context is left alone. Code blocked inside C sees
%% it only when it returns to Python.
-spec interrupt(ctx()) -> ok | {error, error()}.
interrupt(#pyport_ctx{home = Home} = Ctx) when node(Home) =/= node() ->
    pyport_remote:call(node(Home), interrupt, [Ctx]);
interrupt(#pyport_ctx{key = Key, id = Id}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, _Pid, Port, _, _}} ->
            _ = pyport_call:cast_request(Port, Id, {interrupt}),
            ok;
        {error, _} = Error ->
            Error
    end;
interrupt(_NotACtx) ->
    {error, {bad_request, ctx}}.

%%% Calls

%% @doc `Module.Function(*Args)' in a context of the default runtime (chosen by the
%% caller's scheduler).
%% A context or pool given where the module goes (`call(Ctx, len, Args)', meant as
%% `call(Ctx, builtins, len, Args)') is `{error, {bad_request, module}}'.
-spec call(name(), name(), list()) -> {ok, term()} | {error, error()}.
call(Module, Function, Args) when not ?IS_NAME(Module); not ?IS_NAME(Function);
                                  not is_list(Args) ->
    bad_call(Module, Function, Args, #{}, #{});
call(Module, Function, Args) ->
    case default_context() of
        {ok, Ctx} -> call(Ctx, Module, Function, Args, #{}, #{});
        {error, _} = Error -> Error
    end.

%% @doc `Module.Function(*Args)' in that context.
-spec call(target(), name(), name(), list()) -> {ok, term()} | {error, error()}.
call(Ctx, Module, Function, Args) ->
    call(Ctx, Module, Function, Args, #{}, #{}).

%% @doc `Module.Function(*Args, **Kwargs)' in that context.
-spec call(target(), name(), name(), list(), map()) -> {ok, term()} | {error, error()}.
call(Ctx, Module, Function, Args, Kwargs) ->
    call(Ctx, Module, Function, Args, Kwargs, #{}).

%% @doc `Module.Function(*Args, **Kwargs)' with Opts (`timeout' in ms or `infinity';
%% other keys go to the port program). A coroutine result is awaited.
-spec call(target(), name(), name(), list(), map(), call_opts()) ->
          {ok, term()} | {error, error()}.
call(Target, Module, Function, Args, Kwargs, Opts)
  when ?REMOTE(Target), is_list(Args), is_map(Kwargs),
       is_map(Opts) ->
    pyport_remote:request(Target, call, [Target, Module, Function, Args, Kwargs], Opts);
call(#pyport_pool{} = Pool, Module, Function, Args, Kwargs, Opts)
  when is_list(Args), is_map(Kwargs), is_map(Opts) ->
    pyport_affinity:on_pool(Pool, [Args, Kwargs], Opts,
            fun(Ctx) -> call(Ctx, Module, Function, Args, Kwargs, Opts) end);
call(#pyport_ctx{key = Key, id = Id}, Module, Function, Args, Kwargs, Opts)
  when ?IS_NAME(Module), ?IS_NAME(Function), is_list(Args), is_map(Kwargs), is_map(Opts) ->
    ?TRACED(#{runtime => Key, context => Id, op => call, module => Module,
              function => Function},
            pyport_call:request(Key, Id, {call, pyport_call:name(Module),
                                          pyport_call:name(Function), Args, Kwargs},
                                Opts));
call(Target, Module, Function, Args, Kwargs, Opts) ->
    bad_call(Target, Module, Function, Args, Kwargs, Opts).

%% What is wrong with the arguments of a call no clause took (call/3 has no target:
%% any stands in for the default runtime's).
bad_call(Module, Function, Args, Kwargs, Opts) ->
    bad_call(#pyport_ctx{key = ?DEFAULT_RUNTIME, id = 1}, Module, Function, Args, Kwargs, Opts).

bad_call(Target, Module, Function, Args, Kwargs, Opts) ->
    case check_call(Target, Module, Function, Args, Kwargs, Opts) of
        ok -> {error, {bad_request, module}};
        {error, _} = Error -> Error
    end.

%% @doc Evaluates an expression in a context of the default runtime.
-spec eval(code()) -> {ok, term()} | {error, error()}.
eval(Code) ->
    case default_context() of
        {ok, Ctx} -> eval(Ctx, Code, #{}, #{});
        {error, _} = Error -> Error
    end.

%% @doc Evaluates an expression in that context.
-spec eval(target(), code()) -> {ok, term()} | {error, error()}.
eval(Ctx, Code) ->
    eval(Ctx, Code, #{}, #{}).

%% @doc Evaluates an expression with local variables (a map of name => value).
-spec eval(target(), code(), map()) -> {ok, term()} | {error, error()}.
eval(Ctx, Code, Locals) ->
    eval(Ctx, Code, Locals, #{}).

%% @doc Evaluates an expression with local variables and Opts (see call/6).
-spec eval(target(), code(), map(), call_opts()) -> {ok, term()} | {error, error()}.
eval(Target, Code, Locals, Opts)
  when ?REMOTE(Target), is_map(Locals), is_map(Opts) ->
    pyport_remote:request(Target, eval, [Target, Code, Locals], Opts);
eval(#pyport_pool{} = Pool, Code, Locals, Opts) when is_map(Locals), is_map(Opts) ->
    pyport_affinity:on_pool(Pool, Locals, Opts, fun(Ctx) -> eval(Ctx, Code, Locals, Opts) end);
eval(#pyport_ctx{key = Key, id = Id}, Code, Locals, Opts)
  when ?IS_CODE(Code), is_map(Locals), is_map(Opts) ->
    ?TRACED(#{runtime => Key, context => Id, op => eval},
            pyport_call:request(Key, Id, {eval, code(Code), Locals}, Opts));
eval(Target, Code, Locals, Opts) ->
    bad_request([{ctx, ?IS_TARGET(Target)}, {code, ?IS_CODE(Code)},
                 {locals, is_map(Locals)}, {opts, is_map(Opts)}]).

%% @doc Runs statements in the `__main__' namespace of a context of the default runtime.
-spec exec(code()) -> ok | {error, error()}.
exec(Code) ->
    case default_context() of
        {ok, Ctx} -> exec(Ctx, Code, #{});
        {error, _} = Error -> Error
    end.

%% @doc Runs statements in the `__main__' namespace of that context.
-spec exec(target(), code()) -> ok | {error, error()}.
exec(Ctx, Code) ->
    exec(Ctx, Code, #{}).

%% @doc Runs statements with Opts (see call/6).
-spec exec(target(), code(), call_opts()) -> ok | {error, error()}.
exec(Target, Code, Opts) when ?REMOTE(Target), is_map(Opts) ->
    pyport_remote:request(Target, exec, [Target, Code], Opts);
exec(#pyport_pool{} = Pool, Code, Opts) when is_map(Opts) ->
    pyport_affinity:on_pool(Pool, [], Opts, fun(Ctx) -> exec(Ctx, Code, Opts) end);
exec(#pyport_ctx{key = Key, id = Id}, Code, Opts) when ?IS_CODE(Code), is_map(Opts) ->
    ?TRACED(#{runtime => Key, context => Id, op => exec},
            pyport_call:request(Key, Id, {exec, code(Code)}, Opts));
exec(Target, Code, Opts) ->
    bad_request([{ctx, ?IS_TARGET(Target)}, {code, ?IS_CODE(Code)}, {opts, is_map(Opts)}]).

%% `{error, {bad_request, What}}' for the first check that failed.
bad_request(Checks) ->
    case [What || {What, false} <- Checks] of
        [] -> {error, {bad_request, ctx}};
        [What | _] -> {error, {bad_request, What}}
    end.

%%% Process-local environments

%% @doc A fresh globals namespace in that context, for `#{env => Env}' in the Opts of
%% call, eval and exec. It is freed by drop_env/1 or when the calling process exits.
-spec new_env(target()) -> {ok, env()} | {error, error()}.
new_env(Target) ->
    new_env_owned(Target, self()).

%% @private new_env/1 for Owner, which may be a process of another node.
-spec new_env_owned(target(), pid()) -> {ok, env()} | {error, error()}.
new_env_owned(Target, Owner) when ?REMOTE(Target) ->
    pyport_remote:call(pyport_remote:node_of(Target), new_env_owned, [Target, Owner]);
new_env_owned(#pyport_pool{} = Pool, Owner) ->
    pyport_affinity:on_pool(Pool, [], #{}, fun(Ctx) -> new_env_owned(Ctx, Owner) end);
new_env_owned(#pyport_ctx{key = Key, id = Id}, Owner) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, _, _, _} = Runtime} ->
            case pyport_call:new_id(Runtime, Id, {new_env}) of
                {ok, EnvId} ->
                    pyport_call:own(Pid, Owner, Id, {env, EnvId}),
                    {ok, #pyport_env{key = Key, ctx = Id, id = EnvId, port_owner = Pid}};
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end;
new_env_owned(_NotATarget, _Owner) ->
    {error, {bad_request, ctx}}.

%% @doc Frees an env (from any process). Dropping it again, or after its runtime or
%% context is gone, is `ok' too. Returns at once: the context drops the env in its
%% turn (before any later request of the caller to that context), also when its queue
%% is full.
-spec drop_env(env()) -> ok | {error, {bad_request, env}}.
drop_env(#pyport_env{port_owner = Pid} = Env) when node(Pid) =/= node() ->
    _ = pyport_remote:call(node(Pid), drop_env, [Env]),
    ok;
drop_env(#pyport_env{key = Key, ctx = Id, id = EnvId, port_owner = Pid}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, Port, _, _}} ->
            %% no reply wanted: a reply could be refused (a full queue) or dropped
            %% unrun (a deadline passed in the queue), and the env would live on
            _ = pyport_call:cast_request(Port, Id, {drop_env, EnvId, #{}}),
            pyport_call:disown(Pid, Id, {env, EnvId});
        _ ->
            ok  % the runtime (and the env with it) is gone
    end;
drop_env(_NotAnEnv) ->
    {error, {bad_request, env}}.

%%% Object handles

%% @doc The attribute `Name' of the object. See getattr/3.
-spec getattr(pyref(), name()) -> {ok, term()} | {error, error()}.
getattr(Ref, Name) ->
    getattr(Ref, Name, #{}).

%% @doc The attribute `Name' of the object, with Opts (`timeout', `return => ref').
-spec getattr(pyref(), name(), call_opts()) -> {ok, term()} | {error, error()}.
getattr(#pyport_ref{home = Home} = Ref, Name, Opts) when node(Home) =/= node(), is_map(Opts) ->
    pyport_remote:request(Ref, getattr, [Ref, Name], Opts);
getattr(#pyport_ref{key = Key, ctx = Id, id = RefId}, Name, Opts)
  when ?IS_NAME(Name), is_map(Opts) ->
    pyport_call:request(Key, Id, {getattr, RefId, pyport_call:name(Name)}, Opts);
getattr(Ref, Name, Opts) ->
    bad_request([{ref, is_record(Ref, pyport_ref)}, {name, ?IS_NAME(Name)},
                 {opts, is_map(Opts)}]).

%% @doc `Object.Name(*Args)'.
-spec call_method(pyref(), name(), list()) -> {ok, term()} | {error, error()}.
call_method(Ref, Name, Args) ->
    call_method(Ref, Name, Args, #{}, #{}).

%% @doc `Object.Name(*Args, **Kwargs)'.
-spec call_method(pyref(), name(), list(), map()) -> {ok, term()} | {error, error()}.
call_method(Ref, Name, Args, Kwargs) ->
    call_method(Ref, Name, Args, Kwargs, #{}).

%% @doc `Object.Name(*Args, **Kwargs)' with Opts (`timeout', `return => ref').
-spec call_method(pyref(), name(), list(), map(), call_opts()) ->
          {ok, term()} | {error, error()}.
call_method(#pyport_ref{home = Home} = Ref, Name, Args, Kwargs, Opts)
  when node(Home) =/= node(), is_list(Args), is_map(Kwargs), is_map(Opts) ->
    pyport_remote:request(Ref, call_method, [Ref, Name, Args, Kwargs], Opts);
call_method(#pyport_ref{key = Key, ctx = Id, id = RefId}, Name, Args, Kwargs, Opts)
  when ?IS_NAME(Name), is_list(Args), is_map(Kwargs), is_map(Opts) ->
    pyport_call:request(Key, Id, {call_method, RefId, pyport_call:name(Name), Args, Kwargs},
                        Opts);
call_method(Ref, Name, Args, Kwargs, Opts) ->
    bad_request([{ref, is_record(Ref, pyport_ref)}, {name, ?IS_NAME(Name)},
                 {args, is_list(Args)}, {kwargs, is_map(Kwargs)}, {opts, is_map(Opts)}]).

%% @doc The object converted to a term (`{error, {bad_term, _}}' if it has no Erlang form).
-spec to_term(pyref()) -> {ok, term()} | {error, error()}.
to_term(#pyport_ref{home = Home} = Ref) when node(Home) =/= node() ->
    pyport_remote:call(node(Home), to_term, [Ref]);
to_term(#pyport_ref{key = Key, ctx = Id, id = RefId}) ->
    pyport_call:request(Key, Id, {to_term, RefId}, #{});
to_term(_NotARef) ->
    {error, {bad_request, ref}}.

%% @doc Lets go of the object (from any process). Later uses of the handle give
%% `{error, not_found}'; releasing it again is `ok'. Returns at once, like drop_env/1.
-spec release(pyref()) -> ok | {error, {bad_request, ref}}.
release(#pyport_ref{home = Home} = Ref) when node(Home) =/= node() ->
    _ = pyport_remote:call(node(Home), release, [Ref]),
    ok;
release(#pyport_ref{key = Key, ctx = Id, id = RefId}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, Port, _, _}} ->
            _ = pyport_call:cast_request(Port, Id, {release, RefId, #{}}),
            pyport_call:disown(Pid, Id, {ref, RefId});
        {error, _} ->
            ok
    end;
release(_NotARef) ->
    {error, {bad_request, ref}}.

%%% Python calling Erlang

%% @doc Makes `Fun' (or `Module:Function') callable from Python as
%% `erlang.call(Name, *Args)', node-wide: it is applied to the Python arguments, in a
%% process of its own, and its result goes back to Python. An exception in it raises
%% `erlang.Error((Class, Reason))' in Python. Registering a name again replaces it.
-spec register_function(function_name(), fun() | {module(), atom()}) ->
          ok | {error, not_started}.
register_function(Name, Fun) when is_function(Fun);
                                  is_tuple(Fun), tuple_size(Fun) =:= 2,
                                  is_atom(element(1, Fun)), is_atom(element(2, Fun)) ->
    try ets:insert(?FUNCTIONS, {pyport_call:name(Name), Fun}) of
        true -> ok
    catch
        error:badarg -> {error, not_started}
    end.

%% @doc Removes a function registered with register_function/2 (`ok' if there is none).
-spec unregister_function(function_name()) -> ok.
unregister_function(Name) ->
    try ets:delete(?FUNCTIONS, pyport_call:name(Name)) of
        true -> ok
    catch
        error:badarg -> ok
    end.

%%% Asynchronous calls

%% @doc Starts `Module.Function(*Args)' and returns at once. The result arrives as the
%% message `{pyport, Ref, Result}', `Result' being what call/6 would have returned; see
%% await/1,2. `erlang.self()' in Python is the calling process, and a handle returned
%% with `return => ref' is owned by it.
-spec async_call(target(), name(), name(), list()) -> reference().
async_call(Ctx, Module, Function, Args) ->
    async_call(Ctx, Module, Function, Args, #{}, #{}).

-spec async_call(target(), name(), name(), list(), map()) -> reference().
async_call(Ctx, Module, Function, Args, Kwargs) ->
    async_call(Ctx, Module, Function, Args, Kwargs, #{}).

-spec async_call(target(), name(), name(), list(), map(), call_opts()) -> reference().
async_call(Ctx, Module, Function, Args, Kwargs, Opts) ->
    Caller = self(),
    Ref = make_ref(),
    _ = case check_call(Ctx, Module, Function, Args, Kwargs, Opts) of
        ok ->
            %% A short-lived process waits for the reply, so the caller's mailbox only
            %% ever gets the one result message, whatever happens to the call.
            Reentrant = get(pyport_reentrant),
            _ = spawn(fun() ->
                          _ = put(pyport_reentrant, Reentrant),
                          Result = try
                                       call(Ctx, Module, Function, Args, Kwargs,
                                            Opts#{caller => Caller})
                                   catch
                                       Class:Reason -> {error, {Class, Reason}}
                                   end,
                          Caller ! {pyport, Ref, Result}
                      end);
        {error, _} = Error ->
            Caller ! {pyport, Ref, Error}
    end,
    Ref.

%% Arguments that would make a request fail before it is sent: `{bad_request, What}'
%% at once, rather than a crash in a process the caller does not see.
check_call(Ctx, Module, Function, Args, Kwargs, Opts) ->
    check_call(Ctx, Module, Function, Args, Kwargs, Opts, ?CALL_OPTIONS).

check_call(Ctx, Module, Function, Args, Kwargs, Opts, Known) ->
    Checks = [{ctx, ?IS_TARGET(Ctx)},
              {module, is_name(Module)},
              {function, is_name(Function)},
              {args, is_list(Args)},
              {kwargs, is_map(Kwargs)},
              {opts, is_map(Opts)}],
    case [What || {What, false} <- Checks] of
        [] ->
            case pyport_call:unknown_option(Opts, Known) of
                none -> ok;
                Key -> {error, {bad_option, Key}}
            end;
        [What | _] ->
            {error, {bad_request, What}}
    end.

is_name(Name) ->
    is_atom(Name) orelse is_binary(Name)
        orelse (is_list(Name) andalso is_binary(catch unicode:characters_to_binary(Name))).

%% @doc Waits for the result of async_call/4,5,6.
-spec await(reference()) -> {ok, term()} | {error, error()}.
await(Ref) ->
    await(Ref, infinity).

%% @doc Waits at most Timeout ms; `{error, timeout}' leaves the call running (its result
%% message still arrives later).
-spec await(reference(), timeout()) -> {ok, term()} | {error, error()}.
await(Ref, Timeout) ->
    receive
        {pyport, Ref, Result} -> Result
    after Timeout ->
        {error, timeout}
    end.

%% @doc Runs `Module.Function(*Args)' without waiting for it; failures are logged by
%% the runtime (domain `[pyport, python]'). Arguments of the wrong type are
%% `{error, {bad_request, What}}' at once.
%% A handle of another node: the cast is handed over there before this returns (so it
%% keeps its place before the caller's next request), and a node that is down is
%% `{error, {nodedown, Node}}'.
-spec cast(target(), name(), name(), list()) ->
          ok | {error, {bad_request, atom()} | {nodedown, node()}}.
cast(Ctx, Module, Function, Args) ->
    case check_call(Ctx, Module, Function, Args, #{}, #{}) of
        ok -> cast_as(Ctx, Module, Function, Args, self());
        {error, _} = Error -> Error
    end.

%% @private cast/4 for Caller (`erlang.self()' in Python), which a cast from another
%% node keeps.
-spec cast_as(target(), name(), name(), list(), pid()) -> ok | {error, {nodedown, node()}}.
cast_as(Target, Module, Function, Args, Caller) when ?REMOTE(Target) ->
    pyport_remote:call(pyport_remote:node_of(Target), cast_as,
                       [Target, Module, Function, Args, Caller]);
cast_as(#pyport_pool{} = Pool, Module, Function, Args, Caller) ->
    pyport_affinity:on_pool(Pool, Args, #{},
                            fun(Ctx) -> cast_as(Ctx, Module, Function, Args, Caller) end);
cast_as(#pyport_ctx{key = Key, id = Id}, Module, Function, Args, Caller) ->
    pyport_call:cast(Key, Id, pyport_call:name(Module), pyport_call:name(Function), Args,
                     Caller).

%%% Streams

%% @doc Streams the items of `Module.Function(*Args)' (a generator, an async generator
%% or any iterable). See stream/6.
-spec stream(target(), name(), name(), list()) -> {ok, stream()} | {error, error()}.
stream(Ctx, Module, Function, Args) ->
    stream(Ctx, Module, Function, Args, #{}, #{}).

-spec stream(target(), name(), name(), list(), map()) -> {ok, stream()} | {error, error()}.
stream(Ctx, Module, Function, Args, Kwargs) ->
    stream(Ctx, Module, Function, Args, Kwargs, #{}).

%% @doc Starts a stream and returns at once. The calling process then receives
%% `{pyport_stream, Stream, {data, Item}}' for each item and one final
%% `{pyport_stream, Stream, done}' or `{pyport_stream, Stream, {error, Error}}' (an
%% exception in the function itself, before any item, is that final message too). At
%% most `window' items (Opts, default 64) are ever ahead of what the caller took:
%% stream_next/1,2 takes one and grants credit; a process that receives the messages
%% itself calls stream_ack/1 for each item. If the runtime goes down, the monitor behind
%% the stream delivers `{'DOWN', Stream, process, _, Reason}' (stream_next/1,2 turns it
%% into `{error, {runtime_down, Reason}}'). The stream belongs to the calling process:
%% it is cancelled when that process exits.
-spec stream(target(), name(), name(), list(), map(), call_opts()) ->
          {ok, stream()} | {error, error()}.
stream(Ctx, Module, Function, Args, Kwargs, Opts) ->
    case check_call(Ctx, Module, Function, Args, Kwargs, Opts, ?STREAM_OPTIONS) of
        ok -> pyport_stream:start(Ctx, Module, Function, Args, Kwargs, Opts);
        {error, _} = Error -> Error
    end.

%% @doc Takes the next message of the stream (waiting as long as it takes).
-spec stream_next(stream()) -> stream_msg().
stream_next(Stream) ->
    stream_next(Stream, infinity).

%% @doc Takes the next message of the stream: `{data, Item}', `done' or
%% `{error, Error}'; `{error, timeout}' if none came within Timeout ms (the stream goes
%% on). Taking an item grants the producer credit for another.
-spec stream_next(stream(), timeout()) -> stream_msg().
stream_next(Stream, Timeout) ->
    pyport_stream:next(Stream, Timeout).

%% @doc Grants credit for one item, for a process that receives the stream's messages
%% itself (call it once per `{data, _}' taken).
-spec stream_ack(stream()) -> ok.
stream_ack(Stream) ->
    pyport_stream:ack(Stream).

%% @doc Stops the stream: the Python generator is closed (its `finally' runs), and no
%% message of the stream arrives from now on (those already here are dropped).
-spec stream_cancel(stream()) -> ok.
stream_cancel(Stream) ->
    pyport_stream:cancel(Stream).

%%% Channels

%% @doc Opens a channel named `Name' in that context, for a long-running Python
%% consumer: `erlang.channel(Name)' in Python (`receive()', `try_receive()',
%% `async for'). Opts: `capacity' (default 1000), the items Python may leave untaken
%% before channel_send/2 answers `busy'. Opening a name again replaces the channel.
-spec channel_open(ctx(), name(), #{capacity => pos_integer()}) ->
          {ok, channel()} | {error, error()}.
channel_open(#pyport_ctx{home = Home} = Ctx, Name, Opts) when node(Home) =/= node(), is_map(Opts) ->
    pyport_remote:call(node(Home), channel_open, [Ctx, Name, Opts]);
channel_open(#pyport_ctx{} = Ctx, Name, Opts) when is_map(Opts) ->
    pyport_channel:open(Ctx, Name, Opts);
channel_open(Ctx, _Name, Opts) ->
    bad_request([{ctx, is_record(Ctx, pyport_ctx)}, {opts, is_map(Opts)}]).

%% @doc Sends a term to the channel without ever blocking: `busy' while `capacity'
%% items are in it that Python has not taken, `{error, closed}' once it is closed (or
%% its context or runtime is gone).
-spec channel_send(channel(), term()) ->
          ok | busy | {error, closed | {bad_request, channel} | error()}.
channel_send(#pyport_channel{port_owner = Pid} = Chan, Term) when node(Pid) =/= node() ->
    pyport_remote:call(node(Pid), channel_send, [Chan, Term]);
channel_send(#pyport_channel{} = Chan, Term) ->
    pyport_channel:send(Chan, Term);
channel_send(_NotAChannel, _Term) ->
    {error, {bad_request, channel}}.

%% @doc Closes the channel: Python takes what is left, then `receive()' raises
%% `erlang.ChannelClosed' and `async for' ends. Closing again is `ok'.
-spec channel_close(channel()) -> ok | {error, {bad_request, channel}}.
channel_close(#pyport_channel{port_owner = Pid} = Chan) when node(Pid) =/= node() ->
    _ = pyport_remote:call(node(Pid), channel_close, [Chan]),
    ok;
channel_close(#pyport_channel{} = Chan) ->
    pyport_channel:close(Chan);
channel_close(_NotAChannel) ->
    {error, {bad_request, channel}}.

%%% Reloading code

%% @doc reload/3 with the runtime's `call_timeout' for each context.
-spec reload(runtime() | target(), name()) ->
          {ok, [{ctx(), ok | {error, error()}}]} | {error, error()}.
reload(Target, Module) ->
    reload(Target, Module, #{}).

%% @doc Loads `Module' again from its source in every context of Target: a runtime
%% (pid or registered name: all its contexts), a context, or a pool (every member, on
%% every node). A context where the module is imported reloads it
%% (`importlib.reload'); one where it is not imports it, so once this answers `ok'
%% every context runs the current code, and an error in it shows now. The answer
%% has each context's handle with `ok' or its error, the error a call would give
%% (`{python, <<"ModuleNotFoundError">>, ...}' for no such module, `{python,
%% <<"ValueError">>, ...}' for a name that is no module name, `timeout' for a context
%% still busy at the timeout). Opts: `timeout' (ms or `infinity'). The contexts are
%% asked at once, so it takes as long as the slowest of them. See docs/api.md,
%% "Reloading code", for what a reload keeps.
-spec reload(runtime() | target(), name(), #{timeout => timeout()}) ->
          {ok, [{ctx(), ok | {error, error()}}]} | {error, error()}.
reload(Target, Module, Opts) ->
    Checks = [{ctx, is_pid(Target) orelse is_atom(Target) orelse ?IS_TARGET(Target)},
              {module, is_name(Module)},
              {opts, is_map(Opts)}],
    case [What || {What, false} <- Checks] of
        [] ->
            case pyport_call:unknown_option(Opts, [timeout]) of
                none -> reload_checked(Target, pyport_call:name(Module), Opts);
                Key -> {error, {bad_option, Key}}
            end;
        [What | _] ->
            {error, {bad_request, What}}
    end.

reload_checked(Runtime, Module, Opts) when is_pid(Runtime), node(Runtime) =/= node() ->
    pyport_remote:call(node(Runtime), reload, [Runtime, Module, Opts], Opts);
reload_checked(Target, Module, Opts) when ?REMOTE(Target) ->
    pyport_remote:call(pyport_remote:node_of(Target), reload, [Target, Module, Opts], Opts);
reload_checked(#pyport_pool{name = Name}, Module, Opts) ->
    case pyport_dispatch:member_contexts(Name) of
        {ok, Members} ->
            Ctxs = [pyport_affinity:member_ctx(M) || M <- Members],
            {ok, reloaded(pyport_reload:contexts(Ctxs, Module, Opts, false))};
        {error, _} = Error ->
            Error
    end;
reload_checked(#pyport_ctx{} = Ctx, Module, Opts) ->
    {ok, reloaded(pyport_reload:contexts([Ctx], Module, Opts, false))};
reload_checked(Runtime, Module, Opts) ->
    case runtime_key(Runtime) of
        {ok, Key} ->
            case pyport_reload:runtime(Key, Module, Opts, false) of
                {ok, Answers} -> {ok, reloaded(Answers)};
                {error, _} = Error -> Error
            end;
        {error, _} = Error ->
            Error
    end.

reloaded(Answers) ->
    [{Ctx, case Outcome of
               {error, _} -> Outcome;
               _ -> ok
           end} || {Ctx, Outcome} <- Answers].

%%% For the benchmarks

%% @private Exported for benches/pieces.escript, which times it under load: the body of
%% a request (pyport_call:encode/2).
-spec encode(tuple(), map()) -> iolist().
encode(Req, Opts) ->
    pyport_call:encode(Req, Opts).

%%% Pools

%% @doc Starts a pool under pyport's supervisor (see pyport_pool for Opts: `size',
%% `mode' (`main', `owngil' or `auto', the default), `preload', `max_requests' and the
%% runtime options every member gets). The handle goes wherever a context does in
%% call, eval, exec, async_call, cast, stream and new_env.
-spec start_pool(atom(), map()) -> {ok, pool()} | {error, term()}.
start_pool(Name, Opts) when is_atom(Name), is_map(Opts) ->
    case pyport_pool:start(Name, Opts) of
        {ok, _Pid} -> {ok, #pyport_pool{name = Name}};
        {error, _} = Error -> Error
    end.

%% @doc Stops a pool started with start_pool/2 and all its members.
-spec stop_pool(pool()) -> ok | {error, not_found}.
stop_pool(#pyport_pool{home = Home} = Pool) when node(Home) =/= node() ->
    pyport_remote:call(node(Home), stop_pool, [Pool]);
stop_pool(#pyport_pool{name = Name}) ->
    pyport_pool:stop(Name).

%% @doc The handle of a running pool, by name (one started in the user's own tree with
%% pyport_pool:child_spec/1, say).
-spec pool(atom()) -> {ok, pool()} | {error, not_found}.
pool(Name) when is_atom(Name) ->
    case pyport_table:lookup({pool, Name}) of
        [_] -> {ok, #pyport_pool{name = Name}};
        [] -> {error, not_found}
    end.

%% @doc The pool's `mode' and `mode_reason', `size', `max_requests', how many members
%% were `replaced', and `members': for each its `index', `node', `status' (`up',
%% `down' or `draining'), `in_flight', `requests' (since it was last replaced),
%% `os_pid' and `context' (a context handle).
-spec pool_info(pool()) -> {ok, map()} | {error, term()}.
pool_info(#pyport_pool{home = Home} = Pool) when node(Home) =/= node() ->
    pyport_remote:call(node(Home), pool_info, [Pool]);
pool_info(#pyport_pool{name = Name}) ->
    case pyport_pool:info(Name) of
        {ok, #{members := Members} = Info} ->
            {ok, Info#{members => [M#{context => pyport_affinity:member_ctx(C)}
                                   || #{context := C} = M <- Members]}};
        {error, _} = Error ->
            Error
    end.

%%% Called from other nodes

%% @private A member of a pool of this node, for a stream consumed on another node.
-spec pool_member(pool()) -> {ok, ctx()} | {error, error()}.
pool_member(Pool) ->
    pyport_affinity:on_pool(Pool, [], #{}, fun(Ctx) -> {ok, Ctx} end).

%% @private The runtime's row, for a stream consumed on another node.
-spec runtime_row(pyport_runtime:key()) -> {ok, pyport_call:row()} | {error, error()}.
runtime_row(Key) ->
    pyport_table:port_row(Key).

%%% Helpers

default_context() ->
    case pyport_table:lookup({contexts, ?DEFAULT_RUNTIME}) of
        [{_, Ids}] when tuple_size(Ids) > 0 ->
            N = (erlang:system_info(scheduler_id) - 1) rem tuple_size(Ids) + 1,
            {ok, #pyport_ctx{key = ?DEFAULT_RUNTIME, id = element(N, Ids)}};
        [{_, {}}] ->
            {error, {context_down, no_context}};
        [] ->
            {error, {runtime_down, noproc}}
    end.

%% Runs Fun(Key, Pid, CallTimeout) for a running runtime.
with_runtime(Runtime, Fun) ->
    case runtime_key(Runtime) of
        {ok, Key} ->
            case pyport_table:port_row(Key) of
                {ok, {_, Pid, _Port, Timeout, _MaxFrame}} -> Fun(Key, Pid, Timeout);
                {error, _} = Error -> Error
            end;
        {error, _} = Error ->
            Error
    end.

%% A registered name is the runtime's key; a pid is looked up.
runtime_key(Name) when is_atom(Name) ->
    {ok, Name};
runtime_key(Pid) when is_pid(Pid) ->
    case pyport_runtime:key(Pid) of
        {ok, Key} -> {ok, Key};
        {error, not_found} -> {error, {runtime_down, noproc}}
    end.

code(Code) when is_binary(Code) -> Code;
code(Code) -> unicode:characters_to_binary(Code).

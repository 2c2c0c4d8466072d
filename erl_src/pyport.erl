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

-define(FUNCTIONS, pyport_functions).
-define(DEFAULT_RUNTIME, pyport).
%% Binary arguments larger than this are not copied into the request frame.
-define(IOVEC_THRESHOLD, 65536).
-define(DEFAULT_WINDOW, 64).
-define(DEFAULT_CAPACITY, 1000).
-define(REENTRANT_BIT, (1 bsl 63)).
%% The process dictionary key of the runtime row a process used last (request/4).
-define(LAST_RUNTIME, pyport_last_runtime).
%% How many terms of a pool request's arguments are looked at for an object handle.
-define(REF_SEARCH, 64).
%% The keys of a request's Opts (`caller' is set for a request made on behalf of
%% another process: async_call/6, a handle of another node), a stream's, and a
%% channel's. Any other key is `{error, {bad_option, Key}}' before anything is sent.
-define(CALL_OPTIONS, [timeout, env, return, caller]).
-define(STREAM_OPTIONS, [window | ?CALL_OPTIONS]).
-define(CHANNEL_OPTIONS, [capacity]).
-define(IS_NAME(N), (is_atom(N) orelse is_binary(N) orelse is_list(N))).
-define(IS_CODE(C), (is_binary(C) orelse is_list(C))).
-define(IS_TARGET(T), (is_record(T, pyport_ctx) orelse is_record(T, pyport_pool))).
%% Expr inside a telemetry span when the telemetry module is loaded; otherwise Expr
%% alone, with no metadata map or closure built.
-define(TRACED(Meta, Expr),
        case pyport_telemetry:enabled() of
            false -> Expr;
            true -> pyport_telemetry:span(Meta, fun() -> Expr end)
        end).

%% Every handle knows its node: used on another node of the cluster, the request runs
%% on the handle's node (remote/3,4), so it never reaches another node's interpreter.
%% The node is kept as `home', a process of that node (`init' when made here): a local
%% pid follows the node's name, so a handle made before distribution started stays this
%% node's, and one made on a node before it started distribution stays that node's.
-record(pyport_ctx, {key :: pyport_runtime:key(), id :: pos_integer(),
                     home = whereis(init) :: pid()}).
%% `port_owner' is the port owner that made the env: an env does not outlive the OS
%% process it lives in, even when a restarted runtime reuses the key and context id.
-record(pyport_env, {key :: pyport_runtime:key(),
                     ctx :: pos_integer(),
                     id :: non_neg_integer(),
                     port_owner :: pid(),
                     home = whereis(init) :: pid()}).
%% This exact shape, `{pyport_ref, Key, CtxId, RefId, Home}', is what the port program
%% recognizes in arguments and replaces with the live object.
-record(pyport_ref, {key :: pyport_runtime:key(),
                     ctx :: pos_integer(),
                     id :: non_neg_integer(),
                     home = whereis(init) :: pid()}).

%% A pool (pyport_pool): goes wherever a context does in call, eval, exec, async_call,
%% cast, stream and new_env.
-record(pyport_pool, {name :: atom(), home = whereis(init) :: pid()}).

%% A context or pool handle of another node (a guard).
-define(REMOTE(T), ((is_record(T, pyport_ctx) andalso node(T#pyport_ctx.home) =/= node())
                    orelse (is_record(T, pyport_pool)
                            andalso node(T#pyport_pool.home) =/= node()))).

-opaque ctx() :: #pyport_ctx{}.
-opaque pool() :: #pyport_pool{}.
-type target() :: ctx() | pool().
-opaque env() :: #pyport_env{}.
-opaque pyref() :: #pyport_ref{}.
%% `counters' holds the items Python has not taken yet (1) and a closed flag (2).
-record(pyport_channel, {key :: pyport_runtime:key(),
                         ctx :: pos_integer(),
                         id :: pos_integer(),
                         port :: port(),
                         port_owner :: pid(),
                         max_frame :: pos_integer(),
                         capacity :: pos_integer(),
                         counters :: counters:counters_ref()}).
-opaque channel() :: #pyport_channel{}.
%% A stream is the alias its messages carry: `{pyport_stream, Stream, Msg}'.
-type stream() :: reference().
-type stream_msg() :: {data, term()} | done | {error, error()}.
%% What the consuming process knows of each of its streams (in its dictionary).
-record(stream_state, {port :: port(),
                       ctx :: pos_integer(),
                       id :: binary(),
                       owner :: pid(),
                       batch :: pos_integer(),
                       unacked = 0 :: non_neg_integer()}).
-type runtime() :: pid() | atom().
-type name() :: atom() | binary() | string().
-type code() :: unicode:chardata().
-type call_opts() :: #{timeout => timeout(),
                       env => env(),
                       return => ref | term,
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
    remote(node(Runtime), stop_runtime, [Runtime]);
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
    remote(node(Runtime), info, [Runtime]);
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
    remote(node(Runtime), new_context, [Runtime, Opts]);
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
    case remote(node(Runtime), context, [Runtime, Name]) of
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
    remote(node(Home), stop_context, [Ctx]);
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
    remote(node(Home), interrupt, [Ctx]);
interrupt(#pyport_ctx{key = Key, id = Id}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, _Pid, Port, _, _}} ->
            _ = pyport_port:cast_request(Port, Id, {interrupt}),
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
    remote(target_node(Target), call, [Target, Module, Function, Args, Kwargs, as_caller(Opts)],
           Opts);
call(#pyport_pool{} = Pool, Module, Function, Args, Kwargs, Opts)
  when is_list(Args), is_map(Kwargs), is_map(Opts) ->
    on_pool(Pool, [Args, Kwargs], Opts,
            fun(Ctx) -> call(Ctx, Module, Function, Args, Kwargs, Opts) end);
call(#pyport_ctx{key = Key, id = Id}, Module, Function, Args, Kwargs, Opts)
  when ?IS_NAME(Module), ?IS_NAME(Function), is_list(Args), is_map(Kwargs), is_map(Opts) ->
    ?TRACED(#{runtime => Key, context => Id, op => call, module => Module,
              function => Function},
            request(Key, Id, {call, name(Module), name(Function), Args, Kwargs}, Opts));
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
    remote(target_node(Target), eval, [Target, Code, Locals, as_caller(Opts)], Opts);
eval(#pyport_pool{} = Pool, Code, Locals, Opts) when is_map(Locals), is_map(Opts) ->
    on_pool(Pool, Locals, Opts, fun(Ctx) -> eval(Ctx, Code, Locals, Opts) end);
eval(#pyport_ctx{key = Key, id = Id}, Code, Locals, Opts)
  when ?IS_CODE(Code), is_map(Locals), is_map(Opts) ->
    ?TRACED(#{runtime => Key, context => Id, op => eval},
            request(Key, Id, {eval, code(Code), Locals}, Opts));
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
    remote(target_node(Target), exec, [Target, Code, as_caller(Opts)], Opts);
exec(#pyport_pool{} = Pool, Code, Opts) when is_map(Opts) ->
    on_pool(Pool, [], Opts, fun(Ctx) -> exec(Ctx, Code, Opts) end);
exec(#pyport_ctx{key = Key, id = Id}, Code, Opts) when ?IS_CODE(Code), is_map(Opts) ->
    ?TRACED(#{runtime => Key, context => Id, op => exec},
            request(Key, Id, {exec, code(Code)}, Opts));
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
    remote(target_node(Target), new_env_owned, [Target, Owner]);
new_env_owned(#pyport_pool{} = Pool, Owner) ->
    on_pool(Pool, [], #{}, fun(Ctx) -> new_env_owned(Ctx, Owner) end);
new_env_owned(#pyport_ctx{key = Key, id = Id}, Owner) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, _, _, _} = Runtime} ->
            case new_id(Runtime, Id, {new_env}) of
                {ok, EnvId} ->
                    gen_server:cast(Pid, {own, Owner, Id, {env, EnvId}}),
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
    _ = remote(node(Pid), drop_env, [Env]),
    ok;
drop_env(#pyport_env{key = Key, ctx = Id, id = EnvId, port_owner = Pid}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, Port, _, _}} ->
            %% no reply wanted: a reply could be refused (a full queue) or dropped
            %% unrun (a deadline passed in the queue), and the env would live on
            _ = pyport_port:cast_request(Port, Id, {drop_env, EnvId, #{}}),
            gen_server:cast(Pid, {disown, Id, {env, EnvId}});
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
    remote(node(Home), getattr, [Ref, Name, as_caller(Opts)], Opts);
getattr(#pyport_ref{key = Key, ctx = Id, id = RefId}, Name, Opts)
  when ?IS_NAME(Name), is_map(Opts) ->
    request(Key, Id, {getattr, RefId, name(Name)}, Opts);
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
    remote(node(Home), call_method, [Ref, Name, Args, Kwargs, as_caller(Opts)], Opts);
call_method(#pyport_ref{key = Key, ctx = Id, id = RefId}, Name, Args, Kwargs, Opts)
  when ?IS_NAME(Name), is_list(Args), is_map(Kwargs), is_map(Opts) ->
    request(Key, Id, {call_method, RefId, name(Name), Args, Kwargs}, Opts);
call_method(Ref, Name, Args, Kwargs, Opts) ->
    bad_request([{ref, is_record(Ref, pyport_ref)}, {name, ?IS_NAME(Name)},
                 {args, is_list(Args)}, {kwargs, is_map(Kwargs)}, {opts, is_map(Opts)}]).

%% @doc The object converted to a term (`{error, {bad_term, _}}' if it has no Erlang form).
-spec to_term(pyref()) -> {ok, term()} | {error, error()}.
to_term(#pyport_ref{home = Home} = Ref) when node(Home) =/= node() ->
    remote(node(Home), to_term, [Ref]);
to_term(#pyport_ref{key = Key, ctx = Id, id = RefId}) ->
    request(Key, Id, {to_term, RefId}, #{});
to_term(_NotARef) ->
    {error, {bad_request, ref}}.

%% @doc Lets go of the object (from any process). Later uses of the handle give
%% `{error, not_found}'; releasing it again is `ok'. Returns at once, like drop_env/1.
-spec release(pyref()) -> ok | {error, {bad_request, ref}}.
release(#pyport_ref{home = Home} = Ref) when node(Home) =/= node() ->
    _ = remote(node(Home), release, [Ref]),
    ok;
release(#pyport_ref{key = Key, ctx = Id, id = RefId}) ->
    case pyport_table:port_row(Key) of
        {ok, {_, Pid, Port, _, _}} ->
            _ = pyport_port:cast_request(Port, Id, {release, RefId, #{}}),
            gen_server:cast(Pid, {disown, Id, {ref, RefId}});
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
    try ets:insert(?FUNCTIONS, {name(Name), Fun}) of
        true -> ok
    catch
        error:badarg -> {error, not_started}
    end.

%% @doc Removes a function registered with register_function/2 (`ok' if there is none).
-spec unregister_function(function_name()) -> ok.
unregister_function(Name) ->
    try ets:delete(?FUNCTIONS, name(Name)) of
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
            case unknown_option(Opts, Known) of
                none -> ok;
                Key -> {error, {bad_option, Key}}
            end;
        [What | _] ->
            {error, {bad_request, What}}
    end.

%% The first key of Opts that is not in Known, or `none'.
unknown_option(Opts, _Known) when map_size(Opts) =:= 0 ->
    none;
unknown_option(Opts, Known) ->
    pyport_opts:unknown_key(Opts, Known).

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
    remote(target_node(Target), cast_as, [Target, Module, Function, Args, Caller]);
cast_as(#pyport_pool{} = Pool, Module, Function, Args, Caller) ->
    on_pool(Pool, Args, #{}, fun(Ctx) -> cast_as(Ctx, Module, Function, Args, Caller) end);
cast_as(#pyport_ctx{key = Key, id = Id}, Module, Function, Args, Caller) ->
    case pyport_table:port_row(Key) of
        {ok, {_, _Pid, Port, CallTimeout, MaxFrame}} ->
            %% a cast has the runtime's call_timeout as its deadline too
            Body = encode({call, name(Module), name(Function), Args, #{}},
                          #{caller => Caller, timeout => CallTimeout}),
            %% an empty header: no reply; a closed port loses the cast, as `!' would
            case write_request(Port, Id, <<>>, Body, MaxFrame) of
                {error, {frame_too_large, Size, MaxFrame}} ->
                    logger:warning("pyport:cast of ~p bytes is over max_frame ~p",
                                   [Size, MaxFrame], #{domain => [pyport]});
                _WrittenOrClosed ->
                    ok
            end;
        {error, _} ->
            ok
    end.

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
        ok -> stream_checked(Ctx, Module, Function, Args, Kwargs, Opts);
        {error, _} = Error -> Error
    end.

stream_checked(#pyport_pool{home = Home} = Pool, Module, Function, Args, Kwargs, Opts)
  when node(Home) =/= node() ->
    case remote(node(Home), pool_member, [Pool]) of
        {ok, Ctx} -> stream_checked(Ctx, Module, Function, Args, Kwargs, Opts);
        {error, _} = Error -> Error
    end;
stream_checked(#pyport_pool{} = Pool, Module, Function, Args, Kwargs, Opts) ->
    on_pool(Pool, [Args, Kwargs], Opts,
            fun(Ctx) -> stream_checked(Ctx, Module, Function, Args, Kwargs, Opts) end);
stream_checked(#pyport_ctx{key = Key, id = Id, home = Home}, Module, Function, Args, Kwargs,
               Opts) ->
    %% A stream of another node's context is consumed here as well: the frames are
    %% written there, and the messages and credit cross the distribution.
    Row = case node(Home) =:= node() of
              true -> pyport_table:port_row(Key);
              false -> remote(node(Home), runtime_row, [Key])
          end,
    stream_on(Row, Key, Id, Module, Function, Args, Kwargs, Opts).

stream_on(Row, Key, Id, Module, Function, Args, Kwargs, Opts) ->
    Window = maps:get(window, Opts, ?DEFAULT_WINDOW),
    case Row of
        {ok, _} when not (is_integer(Window) andalso Window > 0) ->
            {error, {bad_request, {window, Window}}};
        {ok, {_, Pid, Port, CallTimeout, MaxFrame}} ->
            Timeout = maps:get(timeout, Opts, CallTimeout),
            WireOpts0 = Opts#{timeout => Timeout, caller => self(), window => Window},
            case wire_opts(Key, Id, Pid, WireOpts0) of
                {ok, WireOpts} ->
                    Req = {stream, name(Module), name(Function), Args, Kwargs},
                    start_stream(Pid, Port, Id, encode(Req, WireOpts), Window, MaxFrame);
                other_run ->
                    {error, not_found};
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% The stream's messages come to an alias of a monitor of the runtime, so a crash ends
%% the stream at once; the frame header `{pyport_stream, Alias}' tells the runtime to
%% deliver them in the stream's shape.
start_stream(Pid, Port, Id, Body, Window, MaxFrame) ->
    Stream = erlang:monitor(process, Pid, [{alias, demonitor}]),
    H = term_to_binary({pyport_stream, Stream}),
    case write_request(Port, Id, H, Body, MaxFrame) of
        ok ->
            gen_server:cast(Pid, {own, self(), Id, {stream, H}}),
            put({?MODULE, Stream}, #stream_state{port = Port, ctx = Id, id = H, owner = Pid,
                                                 batch = max(1, Window div 2)}),
            {ok, Stream};
        not_written ->
            erlang:demonitor(Stream, [flush]),
            {error, {runtime_down, port_closed}};
        {error, _} = Error ->
            erlang:demonitor(Stream, [flush]),
            Error
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
    case get({?MODULE, Stream}) of
        undefined ->
            {error, not_found};
        State ->
            receive
                {pyport_stream, Stream, {data, _} = Data} ->
                    ack(Stream, State),
                    Data;
                {pyport_stream, Stream, Final} ->
                    end_stream(Stream, State, Final),
                    Final;
                {'DOWN', Stream, process, Pid, noconnection} ->
                    erase({?MODULE, Stream}),
                    {error, {nodedown, node(Pid)}};
                {'DOWN', Stream, process, _, Reason} ->
                    erase({?MODULE, Stream}),
                    {error, {runtime_down, Reason}}
            after Timeout ->
                {error, timeout}
            end
    end.

%% @doc Grants credit for one item, for a process that receives the stream's messages
%% itself (call it once per `{data, _}' taken).
-spec stream_ack(stream()) -> ok.
stream_ack(Stream) ->
    case get({?MODULE, Stream}) of
        undefined -> ok;
        State -> ack(Stream, State)
    end.

%% @doc Stops the stream: the Python generator is closed (its `finally' runs), and no
%% message of the stream arrives from now on (those already here are dropped).
-spec stream_cancel(stream()) -> ok.
stream_cancel(Stream) ->
    case erase({?MODULE, Stream}) of
        undefined ->
            ok;
        #stream_state{port = Port, ctx = Ctx, id = H, owner = Pid} ->
            _ = pyport_port:cast_request(Port, Ctx, {stream_cancel, H, #{}}),
            gen_server:cast(Pid, {disown, Ctx, {stream, H}}),
            erlang:demonitor(Stream, [flush]),
            flush_stream(Stream)
    end.

flush_stream(Stream) ->
    receive
        {pyport_stream, Stream, _} -> flush_stream(Stream)
    after 0 ->
        ok
    end.

%% Credit goes back in batches of half the window, so the producer never has more than
%% `window' items out and the port sees one credit frame per batch.
ack(Stream, #stream_state{unacked = N, batch = Batch} = State) when N + 1 < Batch ->
    put({?MODULE, Stream}, State#stream_state{unacked = N + 1}),
    ok;
ack(Stream, #stream_state{port = Port, ctx = Ctx, id = H, unacked = N} = State) ->
    _ = pyport_port:cast_request(Port, Ctx, {stream_credit, H, N + 1, #{}}),
    put({?MODULE, Stream}, State#stream_state{unacked = 0}),
    ok.

end_stream(Stream, #stream_state{port = Port, ctx = Ctx, id = H, owner = Pid}, Final) ->
    erase({?MODULE, Stream}),
    %% An error made on this side (an item the node refused) leaves the Python end
    %% running: stop it. After the port's own final frame this finds nothing to stop.
    Final =:= done orelse pyport_port:cast_request(Port, Ctx, {stream_cancel, H, #{}}),
    gen_server:cast(Pid, {disown, Ctx, {stream, H}}),
    erlang:demonitor(Stream, [flush]),
    flush_stream(Stream).

%%% Channels

%% @doc Opens a channel named `Name' in that context, for a long-running Python
%% consumer: `erlang.channel(Name)' in Python (`receive()', `try_receive()',
%% `async for'). Opts: `capacity' (default 1000), the items Python may leave untaken
%% before channel_send/2 answers `busy'. Opening a name again replaces the channel.
-spec channel_open(ctx(), name(), #{capacity => pos_integer()}) ->
          {ok, channel()} | {error, error()}.
channel_open(#pyport_ctx{home = Home} = Ctx, Name, Opts) when node(Home) =/= node(), is_map(Opts) ->
    remote(node(Home), channel_open, [Ctx, Name, Opts]);
channel_open(#pyport_ctx{key = Key, id = Id}, Name, Opts) when is_map(Opts) ->
    Capacity = maps:get(capacity, Opts, ?DEFAULT_CAPACITY),
    Unknown = unknown_option(Opts, ?CHANNEL_OPTIONS),
    case pyport_table:port_row(Key) of
        {ok, _} when Unknown =/= none ->
            {error, {bad_option, Unknown}};
        {ok, _} when not (is_integer(Capacity) andalso Capacity > 0) ->
            {error, {bad_request, {capacity, Capacity}}};
        {ok, {_, Pid, Port, _, MaxFrame} = Runtime} ->
            case new_id(Runtime, Id, {channel_open, name(Name), Capacity}) of
                {ok, ChanId} ->
                    Counters = counters:new(2, [atomics]),
                    %% once this returns, the handle of the channel this one replaced
                    %% (same name, same context) answers `{error, closed}'
                    pyport_port:channel_opened(Pid, Id, ChanId, name(Name), Counters),
                    {ok, #pyport_channel{key = Key, ctx = Id, id = ChanId, port = Port,
                                         port_owner = Pid, max_frame = MaxFrame,
                                         capacity = Capacity, counters = Counters}};
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end;
channel_open(Ctx, _Name, Opts) ->
    bad_request([{ctx, is_record(Ctx, pyport_ctx)}, {opts, is_map(Opts)}]).

%% @doc Sends a term to the channel without ever blocking: `busy' while `capacity'
%% items are in it that Python has not taken, `{error, closed}' once it is closed (or
%% its context or runtime is gone).
-spec channel_send(channel(), term()) ->
          ok | busy | {error, closed | {bad_request, channel} | error()}.
channel_send(#pyport_channel{port_owner = Pid} = Chan, Term) when node(Pid) =/= node() ->
    remote(node(Pid), channel_send, [Chan, Term]);
channel_send(#pyport_channel{counters = Counters, capacity = Capacity} = Chan, Term) ->
    case counters:get(Counters, 2) of
        0 ->
            case counters:get(Counters, 1) >= Capacity of
                true -> busy;
                false -> channel_write(Chan, Term)
            end;
        _ ->
            {error, closed}
    end;
channel_send(_NotAChannel, _Term) ->
    {error, {bad_request, channel}}.

channel_write(#pyport_channel{port = Port, ctx = Ctx, id = Id, counters = Counters,
                              max_frame = MaxFrame}, Term) ->
    Body = term_to_binary({channel_send, Id, Term}),
    Size = 10 + byte_size(Body),
    if
        Size > MaxFrame ->
            {error, {frame_too_large, Size, MaxFrame}};
        true ->
            counters:add(Counters, 1, 1),
            case pyport_port:cast_request(Port, Ctx, Body) of
                true -> ok;
                false -> counters:put(Counters, 2, 1), {error, closed}
            end
    end.

%% @doc Closes the channel: Python takes what is left, then `receive()' raises
%% `erlang.ChannelClosed' and `async for' ends. Closing again is `ok'.
-spec channel_close(channel()) -> ok | {error, {bad_request, channel}}.
channel_close(#pyport_channel{port_owner = Pid} = Chan) when node(Pid) =/= node() ->
    _ = remote(node(Pid), channel_close, [Chan]),
    ok;
channel_close(#pyport_channel{port = Port, ctx = Ctx, id = Id, port_owner = Pid,
                              counters = Counters}) ->
    case counters:get(Counters, 2) of
        0 ->
            counters:put(Counters, 2, 1),
            _ = pyport_port:cast_request(Port, Ctx, term_to_binary({channel_close, Id})),
            gen_server:cast(Pid, {channel_closed, Ctx, Id});
        _ ->
            ok
    end;
channel_close(_NotAChannel) ->
    {error, {bad_request, channel}}.

%%% The call path

%% Req is the request body without its trailing Opts map. Opts is checked for unknown
%% keys first, at no cost for the plain shapes (none, or only a timeout). The
%% effective timeout and the caller are sent along in Opts (the port program
%% interrupts code that overran, and `erlang.self()' is the caller); an env goes as
%% its id.
%%
%% The runtime's row is kept in the process dictionary between requests (a look-up in
%% pyport's table is about a tenth of a call's cost under load). The row stays true for
%% the life of its port owner, and its port closes when the owner ends; so a request
%% whose port turns out closed (the runtime restarted or stopped since), or whose env
%% belongs to another run of the runtime than the kept row, was not written, and is
%% made again with the row looked up afresh. Nothing else checks the row: a check that
%% the owner is alive waits for the signals this process sent it, which costs more than
%% the look-up.
request(Key, Id, Req, Opts) when map_size(Opts) =:= 0 ->
    request_known(Key, Id, Req, Opts);
request(Key, Id, Req, #{timeout := _} = Opts) when map_size(Opts) =:= 1 ->
    request_known(Key, Id, Req, Opts);
request(Key, Id, Req, Opts) ->
    case unknown_option(Opts, ?CALL_OPTIONS) of
        none -> request_known(Key, Id, Req, Opts);
        Unknown -> {error, {bad_option, Unknown}}
    end.

request_known(Key, Id, Req, Opts) ->
    case get(?LAST_RUNTIME) of
        {Key, _, _, _, _} = Runtime ->
            case try_runtime_request(Runtime, Id, Req, Opts) of
                Stale when Stale =:= not_written; Stale =:= other_run ->
                    _ = erase(?LAST_RUNTIME),
                    request_looked_up(Key, Id, Req, Opts);
                Reply ->
                    Reply
            end;
        _ ->
            request_looked_up(Key, Id, Req, Opts)
    end.

request_looked_up(Key, Id, Req, Opts) ->
    case pyport_table:port_row(Key) of
        {ok, Runtime} ->
            _ = put(?LAST_RUNTIME, Runtime),
            runtime_request(Runtime, Id, Req, Opts);
        {error, _} = Error ->
            Error
    end.

runtime_request(Runtime, Id, Req, Opts) ->
    case try_runtime_request(Runtime, Id, Req, Opts) of
        not_written -> {error, {runtime_down, port_closed}};
        other_run -> {error, not_found};
        Reply -> Reply
    end.

%% The request's reply; `not_written' when the port was closed, `other_run' when its
%% env was made by another run of the runtime (neither was sent).
try_runtime_request({Key, Pid, Port, CallTimeout, MaxFrame}, Id, Req, Opts) ->
    Timeout = maps:get(timeout, Opts, CallTimeout),
    Owner = maps:get(caller, Opts, self()),
    case wire_opts(Key, Id, Pid, Opts#{timeout => Timeout, caller => Owner}) of
        {ok, WireOpts} ->
            Body = encode(Req, WireOpts),
            Reply = send_request(Pid, Port, wire_ctx(Key, Id), Body, Timeout, MaxFrame),
            returned(Reply, Key, Id, Pid, Owner, Opts);
        NotSent ->
            NotSent
    end.

%% A request answered with the id of something it made (an env, a channel).
new_id(Runtime, Id, Req) ->
    case runtime_request(Runtime, Id, Req, #{}) of
        {ok, New} when is_integer(New) -> {ok, New};
        {ok, Other} -> {error, {bad_reply, Other}};
        {error, _} = Error -> Error
    end.

%% A request made by the Erlang function Python called with `erlang.call' (or by a
%% process it started with async_call/4,5,6) to the context waiting for it carries the
%% re-entrant bit: that context serves it however deep its waits are nested.
wire_ctx(Key, Id) ->
    case get(pyport_reentrant) of
        {Key, Id} -> Id bor ?REENTRANT_BIT;
        _ -> Id
    end.

%% An env is checked here, so it never reaches another context: it must come from this
%% runtime (and from this run of it) and this context. A timeout is what `receive'
%% takes.
wire_opts(_Key, _Id, _Pid, #{timeout := T})
  when not (T =:= infinity orelse (is_integer(T) andalso T >= 0 andalso T =< 16#ffffffff)) ->
    {error, {bad_request, {timeout, T}}};
wire_opts(Key, Id, Pid, #{env := Env} = Opts) ->
    case Env of
        #pyport_env{key = Key, ctx = Id, id = EnvId, port_owner = Pid} ->
            {ok, Opts#{env => EnvId}};
        #pyport_env{key = Key, ctx = Id} ->
            other_run;  % made before the runtime restarted, or after the row was read
        _ ->
            {error, {env_wrong_context, Env}}
    end;
wire_opts(_Key, _Id, _Pid, Opts) ->
    {ok, Opts}.

%% With `return => ref' the reply names an object kept in the context: it becomes a
%% handle owned by the calling process.
returned({ok, {pyport_ref, RefId}}, Key, Id, Pid, Owner, #{return := ref})
  when is_integer(RefId) ->
    gen_server:cast(Pid, {own, Owner, Id, {ref, RefId}}),
    {ok, #pyport_ref{key = Key, ctx = Id, id = RefId}};
returned(Reply, _Key, _Id, _Pid, _Owner, _Opts) ->
    Reply.

%% The monitor (with an alias) and the receive stay in one function, so the receive
%% skips the messages queued before the monitor was made. The reply leaves no 'DOWN'
%% behind, even when the runtime exits right after sending it: `reply_demonitor'
%% removes the monitor as the reply's signal reaches this process, and the runtime's
%% 'DOWN' (the port owner sends both) always comes after it and finds no monitor
%% (pyport_contract_SUITE checks this with the caller suspended meanwhile). After a
%% timeout the demonitor deactivates the alias: a late reply is dropped and can never
%% reach a later call; one that arrived just before is taken out of the mailbox here.
send_request(Pid, Port, Id, Body, Timeout, MaxFrame) ->
    Mref = erlang:monitor(process, Pid, [{alias, reply_demonitor}]),
    case write_request(Port, Id, term_to_binary(Mref), Body, MaxFrame) of
        ok ->
            receive
                {Mref, Reply} ->
                    decode(Reply);
                {'DOWN', Mref, _, _, Reason} ->
                    {error, {runtime_down, Reason}}
            after Timeout ->
                erlang:demonitor(Mref, [flush]),
                receive
                    {Mref, Reply} -> decode(Reply)
                after 0 ->
                    {error, timeout}
                end
            end;
        NotWritten ->
            erlang:demonitor(Mref, [flush]),
            NotWritten
    end.

%% Writes a request frame with header H (also to a port of another node): `ok',
%% `not_written' when the port is closed, or `{error, frame_too_large...}'.
write_request(Port, Id, H, Body, MaxFrame) ->
    Size = 10 + byte_size(H) + iolist_size(Body),
    if
        Size > MaxFrame ->
            {error, {frame_too_large, Size, MaxFrame}};
        true ->
            try pyport_port:write(Port, pyport_port:request_frame(Id, H, Body)) of
                true -> ok
            catch
                error:badarg -> not_written
            end
    end.

%% The body of a request: the ETF of Req with Opts appended as its last element, as
%% iodata. Req is encoded alone and Opts spliced in after its elements. The usual Opts,
%% a timeout and this process as the caller, are written out directly with the
%% caller's encoding kept in the process dictionary: encoding a pid is the dearest
%% part of a small request, and without it every piece stays under the 64 bytes past
%% which a binary is allocated off the heap (an `operator.add(1, 2)' call: 240 ns ->
%% 140 ns).
%% @private Exported for benches/pieces.escript, which times it under load.
-spec encode(tuple(), map()) -> iolist().
encode(Req, Opts) ->
    [<<131, 104, Arity, First/binary>> | More] = encode(Req),
    [<<131, 104, (Arity + 1)>>, First | More] ++ [encode_opts(Opts)].

encode_opts(#{timeout := Timeout, caller := Caller} = Opts)
  when map_size(Opts) =:= 2, Caller =:= self(),
       ((is_integer(Timeout) andalso Timeout >= 0 andalso Timeout < 16#80000000)
        orelse Timeout =:= infinity) ->
    [<<116, 2:32, 119, 7, "timeout">>,
     case Timeout of
         infinity -> <<119, 8, "infinity">>;
         _ when Timeout < 256 -> <<97, Timeout>>;
         _ -> <<98, Timeout:32>>
     end,
     <<119, 6, "caller">>, self_ext()];
encode_opts(Opts) ->
    <<131, Ext/binary>> = term_to_binary(Opts),
    Ext.

%% This process's pid in ETF (without the version byte), as of this node name and
%% creation: starting or restarting distribution changes it.
self_ext() ->
    Node = {node(), erlang:system_info(creation)},
    case get(pyport_self) of
        {Node, Ext} ->
            Ext;
        _ ->
            <<131, Ext/binary>> = term_to_binary(self()),
            _ = put(pyport_self, {Node, Ext}),
            Ext
    end.

%% A request whose arguments hold a large binary is encoded with term_to_iovec/1, which
%% refers to the binary instead of copying it; term_to_binary/1 is faster for the rest.
encode({Op, _, _, Args, _} = Req) when Op =:= call; Op =:= call_method; Op =:= stream ->
    case has_large_binary(Args, 8) of
        true -> erlang:term_to_iovec(Req);
        false -> [term_to_binary(Req)]
    end;
encode(Req) ->
    [term_to_binary(Req)].

has_large_binary([Arg | Args], Budget) when Budget > 0 ->
    (is_binary(Arg) andalso byte_size(Arg) > ?IOVEC_THRESHOLD)
        orelse has_large_binary(Args, Budget - 1);
has_large_binary(_, _) ->
    false.

%% A reply that is exactly {ok, Binary} yields a sub-binary of the reply instead of a
%% copy (binary_to_term/1 copies), which matters for large binaries.
decode(<<131, 104, 2, 119, 2, "ok", 109, Len:32, Bin/binary>>) when byte_size(Bin) =:= Len ->
    {ok, Bin};
decode(<<131, 104, 2, 100, 0, 2, "ok", 109, Len:32, Bin/binary>>) when byte_size(Bin) =:= Len ->
    {ok, Bin};
decode({pyport_safe, Max, Reply}) ->
    %% it holds atoms past the runtime's max_atoms budget: only existing ones decode
    case pyport_atoms:decode(Reply, {true, Max}) of
        {ok, Reply1} -> Reply1;
        {error, Limit} -> {error, {bad_term, Limit}}
    end;
decode(Reply) ->
    binary_to_term(Reply).

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
    remote(node(Home), stop_pool, [Pool]);
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
    remote(node(Home), pool_info, [Pool]);
pool_info(#pyport_pool{name = Name}) ->
    case pyport_pool:info(Name) of
        {ok, #{members := Members} = Info} ->
            {ok, Info#{members => [M#{context => member_ctx(C)} || #{context := C} = M <- Members]}};
        {error, _} = Error ->
            Error
    end.

%% A pool member's context as a handle.
member_ctx({Key, Id, Home}) -> #pyport_ctx{key = Key, id = Id, home = Home};
member_ctx(undefined) -> undefined.

%% The member a request on a pool goes to: the one that holds the env or an object
%% handle the request uses (they stay on their member), else the least loaded one. It
%% counts as in flight on that member until Fun returns.
on_pool(Pool, Args, Opts, Fun) ->
    case unknown_option(Opts, ?STREAM_OPTIONS) of
        none -> on_pool_checked(Pool, Args, Opts, Fun);
        Unknown -> {error, {bad_option, Unknown}}
    end.

on_pool_checked(#pyport_pool{name = Name}, Args, Opts, Fun) ->
    case affinity(Args, Opts) of
        {ok, #pyport_ctx{key = Key, id = Id, home = Home} = Ctx} ->
            case pyport_pool:checkout_member(Name, Key, Id, node(Home)) of
                {ok, Ticket} ->
                    try
                        Fun(Ctx)
                    after
                        pyport_pool:checkin(Ticket)
                    end;
                none ->
                    Fun(Ctx)
            end;
        none ->
            case pyport_pool:checkout(Name, maps:get(timeout, Opts, default)) of
                {ok, Ticket, Member} ->
                    try
                        Fun(member_ctx(Member))
                    after
                        pyport_pool:checkin(Ticket)
                    end;
                {error, _} = Error ->
                    Error
            end
    end.

affinity(_Args, #{env := #pyport_env{key = Key, ctx = Id, home = Home}}) ->
    {ok, #pyport_ctx{key = Key, id = Id, home = Home}};
affinity(Args, _Opts) ->
    case find_ref([Args], ?REF_SEARCH) of
        {found, #pyport_ref{key = Key, ctx = Id, home = Home}} ->
            %% the context keeps the handle's node: a member may live on another node
            {ok, #pyport_ctx{key = Key, id = Id, home = Home}};
        _ ->
            none
    end.

%% The first object handle among Terms and inside their lists, tuples and map values,
%% looking at no more than Budget terms (a request's arguments are scanned only this
%% far for the member to send it to). Returns the budget left when none was found.
find_ref(_, 0) ->
    0;
find_ref([], Budget) ->
    Budget;
find_ref([#pyport_ref{} = Ref | _], _) ->
    {found, Ref};
find_ref([T | Rest], Budget) ->
    Inner = if
                is_list(T) -> T;
                is_tuple(T) -> tuple_to_list(T);
                is_map(T) -> maps:values(T);
                true -> []
            end,
    case find_ref(Inner, Budget - 1) of
        {found, _} = Found -> Found;
        Left -> find_ref(Rest, Left)
    end;
find_ref(_ImproperTail, Budget) ->
    Budget.

%%% Handles of other nodes

%% The request runs on the handle's node, over distribution, and its reply comes back.
%% A node this one is not connected to is `{error, {nodedown, Node}}' at once (no
%% connection attempt that could hang); one that goes down meanwhile, the same.
remote(Node, Function, Args) ->
    remote(Node, Function, Args, #{}).

remote(Node, Function, Args, Opts) ->
    case lists:member(Node, nodes([visible, hidden])) of
        false ->
            {error, {nodedown, Node}};
        true ->
            try
                erpc:call(Node, ?MODULE, Function, Args, remote_timeout(Opts))
            catch
                error:{erpc, noconnection} -> {error, {nodedown, Node}};
                error:{erpc, timeout} -> {error, timeout};
                error:{exception, undef, [{?MODULE, Function, _, _} | _]} ->
                    {error, {runtime_down, {pyport_not_loaded, Node}}};
                error:{exception, Reason, Stack} -> erlang:raise(error, Reason, Stack);
                exit:{exception, Reason} -> exit(Reason)
            end
    end.

%% The request's own timeout runs on the other node; this one only bounds a node that
%% stops answering without going down.
remote_timeout(#{timeout := T}) when is_integer(T) -> T + 5000;
remote_timeout(_) -> infinity.

%% The caller on this node stays the caller: `erlang.self()', and the owner of the envs
%% and handles the request makes.
as_caller(Opts) ->
    Opts#{caller => maps:get(caller, Opts, self())}.

target_node(#pyport_ctx{home = Home}) -> node(Home);
target_node(#pyport_pool{home = Home}) -> node(Home).

%% @private A member of a pool of this node, for a stream consumed on another node.
-spec pool_member(pool()) -> {ok, ctx()} | {error, error()}.
pool_member(Pool) ->
    on_pool(Pool, [], #{}, fun(Ctx) -> {ok, Ctx} end).

%% @private The runtime's row, for a stream consumed on another node.
-spec runtime_row(pyport_runtime:key()) -> {ok, tuple()} | {error, error()}.
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

name(Name) when is_atom(Name) -> atom_to_binary(Name, utf8);
name(Name) when is_binary(Name) -> Name;
name(Name) when is_list(Name) -> unicode:characters_to_binary(Name).

code(Code) when is_binary(Code) -> Code;
code(Code) -> unicode:characters_to_binary(Code).

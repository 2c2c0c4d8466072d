%% The handles pyport gives out (opaque to users: see the types in pyport.erl) and the
%% guards on them, shared by the modules of the caller's side: pyport (the facade),
%% pyport_call, pyport_stream, pyport_channel, pyport_remote and pyport_affinity.

%% Every handle knows its node: used on another node of the cluster, the request runs
%% on the handle's node (pyport_remote), so it never reaches another node's
%% interpreter. The node is kept as `home', a process of that node (`init' when made
%% here): a local pid follows the node's name, so a handle made before distribution
%% started stays this node's, and one made on a node before it started distribution
%% stays that node's.
-record(pyport_ctx, {key :: pyport_table:key(), id :: pos_integer(),
                     home = whereis(init) :: pid()}).
%% `port_owner' is the port owner (pyport_port) that made the env: an env does not
%% outlive the OS process it lives in, even when a restarted runtime reuses the key and
%% context id.
-record(pyport_env, {key :: pyport_table:key(),
                     ctx :: pos_integer(),
                     id :: non_neg_integer(),
                     port_owner :: pid()}).
%% This exact shape, `{pyport_ref, Key, CtxId, RefId, Home}', is what the port program
%% recognizes in arguments and replaces with the live object.
-record(pyport_ref, {key :: pyport_table:key(),
                     ctx :: pos_integer(),
                     id :: non_neg_integer(),
                     home = whereis(init) :: pid()}).
%% A pool (pyport_pool): goes wherever a context does in call, eval, exec, async_call,
%% cast, stream and new_env.
-record(pyport_pool, {name :: atom(), home = whereis(init) :: pid()}).
%% `counters' holds the items Python has not taken yet (1) and a closed flag (2).
-record(pyport_channel, {key :: pyport_table:key(),
                         ctx :: pos_integer(),
                         id :: pos_integer(),
                         port :: port(),
                         port_owner :: pid(),
                         max_frame :: pos_integer(),
                         capacity :: pos_integer(),
                         counters :: counters:counters_ref()}).

%% The keys of a request's Opts (`caller' is set for a request made on behalf of
%% another process: async_call/6, a handle of another node) and a stream's. Any other
%% key is `{error, {bad_option, Key}}' before anything is sent.
-define(CALL_OPTIONS, [timeout, env, return, caller, arrays]).
-define(STREAM_OPTIONS, [window | ?CALL_OPTIONS]).

-define(IS_NAME(N), (is_atom(N) orelse is_binary(N) orelse is_list(N))).
-define(IS_CODE(C), (is_binary(C) orelse is_list(C))).
-define(IS_TARGET(T), (is_record(T, pyport_ctx) orelse is_record(T, pyport_pool))).
%% A context or pool handle of another node (a guard).
-define(REMOTE(T), ((is_record(T, pyport_ctx) andalso node(T#pyport_ctx.home) =/= node())
                    orelse (is_record(T, pyport_pool)
                            andalso node(T#pyport_pool.home) =/= node()))).

%% @doc A runtime's options: the tables of the keys a runtime and a context spec may
%% have, every default and limit (the one place they are written: the port program
%% has no copies of its own), their validation, and the command line the port program
%% is started with, which carries every limit to it (docs/protocol.md, "Start-up").
%% No process: the functions run in the runtime's process, a pool's and the port
%% owner's.
-module(pyport_opts).

-export([check/1]).
-export([check_pool/1]).
-export([runtime_keys/0]).
-export([pool_keys/0]).
-export([unknown_key/2]).
-export([contexts/1]).
-export([context_body/1]).
-export([call_timeout/1]).
-export([start_timeout/1]).
-export([max_frame/1]).
-export([max_atoms/1]).
-export([max_mailbox/1]).
-export([restart_delays/1]).
-export([drain_timeout/1]).
-export([watch_dirs/1]).
-export([watch_interval/0]).
-export([executable/1]).
-export([port_args/2]).

-export_type([opts/0]).
-export_type([context_spec/0]).
-export_type([context_body/0]).

-define(DEFAULT_CALL_TIMEOUT, 30000).
-define(DEFAULT_START_TIMEOUT, 10000).
-define(DEFAULT_MAX_FRAME, 1073741824).
-define(DEFAULT_MAX_ATOMS, 5000).
-define(DEFAULT_MAX_MAILBOX, 10000).
%% Requests a context queues beyond the one it runs; more get {error, overloaded}.
-define(DEFAULT_QUEUE_CAPACITY, 10000).
%% How long a request may stay blocked past its deadline before its context is replaced.
-define(DEFAULT_STUCK_AFTER, 2000).
-define(DEFAULT_NONE, none).
%% The back-off between restarts of a crashing OS process: doubling from the first up
%% to the second (`restart => #{min_delay, max_delay}').
-define(DEFAULT_MIN_DELAY, 100).
-define(DEFAULT_MAX_DELAY, 5000).
%% How long a pool member being replaced may take to finish what it runs.
-define(DEFAULT_DRAIN_TIMEOUT, 60000).
%% How often the folders of `watch' are scanned for changed `.py' files (pyport_watch).
-define(WATCH_INTERVAL_MS, 500).
%% The keys of a runtime's Opts (`key' and `runtime' are set by `pyport_runtime') and of
%% a context spec. Any other key is `{error, {bad_option, Key}}' at start.
-define(RUNTIME_KEYS, [name, key, runtime, executable, path, venv, app, env, contexts,
                       call_timeout, start_timeout, max_frame, queue_capacity,
                       stuck_after, max_memory, max_atoms, max_reply, max_mailbox,
                       none, arrays, restart, watch]).
-define(CONTEXT_KEYS, [name, mode, preload, path]).
%% A pool's own keys (with the runtime keys every member gets).
-define(POOL_KEYS, [name, nodes, size, mode, preload, max_requests, drain_timeout]).

-type context_spec() :: #{name => atom(),
                          mode => owngil | main,
                          preload => iodata(),
                          path => [file:filename_all()]}.
%% A checked context spec, as the port program's `new_context' takes it.
-type context_body() :: #{mode := owngil | main, name => atom(), preload => binary(),
                          path => [binary()]}.
-type opts() :: #{name => atom(),
                  key => pyport_table:key(),
                  %% set by pyport_runtime for its port owner: the runtime's own pid
                  runtime => pid(),
                  executable => file:filename_all(),
                  path => [file:filename_all()],
                  venv => file:filename_all(),
                  env => [{string(), string() | false}],
                  contexts => [context_spec()],
                  call_timeout => timeout(),
                  start_timeout => non_neg_integer(),
                  max_frame => pos_integer(),
                  queue_capacity => pos_integer(),
                  stuck_after => pos_integer() | infinity,
                  max_memory => pos_integer(),
                  max_atoms => non_neg_integer(),
                  max_reply => pos_integer(),
                  max_mailbox => pos_integer(),
                  none => none | nil | undefined,
                  %% issue 19: the form numpy arrays come back in
                  arrays => lists | binary,
                  %% issue 20: whose priv/python/.venv (pyport_app_env)
                  app => atom(),
                  restart => #{min_delay => non_neg_integer(),
                               max_delay => non_neg_integer()},
                  %% issue 20: folders whose changed .py files are reloaded (pyport_watch)
                  watch => [file:filename_all()]}.

%% @doc Checks a runtime's Opts before anything starts: `{error, {bad_option, Key}}'
%% for a key no runtime knows (a misspelt `call_timout' would otherwise be ignored),
%% `{error, {bad_option, {venv, Dir}}}' for a `venv' that is no virtualenv (no
%% `lib/python*/site-packages' under it), `{error, {bad_option, {watch, Dir}}}' for a
%% `watch' entry that is no directory (or a `watch' that is no list of them), and
%% `{error, {bad_option, Key}}' for a context spec in `contexts' with an unknown key.
-spec check(map()) -> ok | {error, {bad_option, term()}}.
check(Opts) ->
    case {unknown_key(Opts, ?RUNTIME_KEYS), check_watch(Opts)} of
        {none, ok} when is_map_key(venv, Opts) -> check_venv(Opts);
        {none, ok} -> pyport_app_env:check(Opts);  % issue 20: the app's venv
        {none, Error} -> Error;
        {Key, _} -> {error, {bad_option, Key}}
    end.

%% @doc Checks a pool's Opts: its own keys and the runtime options every member gets
%% (but `key', `runtime' and `contexts', which the pool sets itself); any other key is
%% `{error, {bad_option, Key}}', and a `venv' that is no virtualenv is refused as a
%% runtime's is.
-spec check_pool(map()) -> ok | {error, {bad_option, term()}}.
check_pool(Opts) ->
    Known = ?POOL_KEYS ++ (?RUNTIME_KEYS -- [key, runtime, contexts]),
    case unknown_key(Opts, Known) of
        none -> check(maps:with(?RUNTIME_KEYS, Opts));
        Key -> {error, {bad_option, Key}}
    end.

%% @doc The keys a runtime's Opts may have.
-spec runtime_keys() -> [atom()].
runtime_keys() ->
    ?RUNTIME_KEYS.

%% @doc A pool's own keys (a pool passes the others on to its members' runtimes).
-spec pool_keys() -> [atom()].
pool_keys() ->
    ?POOL_KEYS.

%% @doc The first key of an Opts map that is not in Known, or `none'.
-spec unknown_key(map(), [atom()]) -> term().
unknown_key(Map, Known) ->
    case [K || K <- maps:keys(Map), not lists:member(K, Known)] of
        [] -> none;
        [Key | _] -> Key
    end.

check_venv(#{venv := Dir}) ->
    case venv_site_packages(Dir) of
        [] -> {error, {bad_option, {venv, Dir}}};
        _ -> ok
    end;
check_venv(_) ->
    ok.

%% `watch' is a list of directories (a string alone is refused, not taken for a list of
%% characters).
check_watch(#{watch := Dirs}) ->
    case Dirs =:= [] orelse is_list(Dirs) andalso not io_lib:printable_unicode_list(Dirs) of
        true ->
            case [Dir || Dir <- Dirs, not is_dir(Dir)] of
                [] -> ok;
                [Dir | _] -> {error, {bad_option, {watch, Dir}}}
            end;
        false ->
            {error, {bad_option, {watch, Dirs}}}
    end;
check_watch(_) ->
    ok.

is_dir(Dir) ->
    (is_binary(Dir) orelse is_list(Dir)) andalso (catch filelib:is_dir(Dir)) =:= true.

venv_site_packages(Dir) ->
    try
        filelib:wildcard(filename:join([to_list(Dir), "lib", "python*", "site-packages"]))
    catch
        error:_ -> []
    end.

%% @doc The contexts from Opts' `contexts', checked, with ids 1..N in order.
-spec contexts(term()) -> {ok, [{pos_integer(), context_body()}]} | {error, term()}.
contexts(Specs) when is_list(Specs) ->
    Numbered = lists:zip(lists:seq(1, length(Specs)), Specs),
    Bodies = [{Id, context_body(Spec)} || {Id, Spec} <- Numbered],
    case [Spec || {_, {error, _}} = Spec <- Bodies] of
        [{_, Error} | _] ->
            Error;
        [] ->
            Contexts = [{Id, Body} || {Id, {ok, Body}} <- Bodies],
            Names = [Name || {_, #{name := Name}} <- Contexts],
            case Names -- lists:usort(Names) of
                [] -> {ok, Contexts};
                [Dup | _] -> {error, {duplicate_context_name, Dup}}
            end
    end;
contexts(Other) ->
    {error, {bad_context_spec, Other}}.

%% @doc Validates a context spec and turns it into the body map of `new_context'.
-spec context_body(term()) -> {ok, context_body()} | {error, term()}.
context_body(Spec) when is_map(Spec) ->
    case unknown_key(Spec, ?CONTEXT_KEYS) of
        none -> context_body_checked(Spec);
        Key -> {error, {bad_option, Key}}
    end;
context_body(Spec) ->
    {error, {bad_context_spec, Spec}}.

context_body_checked(Spec) ->
    try
        Mode = maps:get(mode, Spec, owngil),
        true = Mode =:= owngil orelse Mode =:= main,
        Body0 = #{mode => Mode},
        Body1 = case maps:find(name, Spec) of
                    {ok, undefined} -> Body0;
                    {ok, Name} when is_atom(Name) -> Body0#{name => Name};
                    error -> Body0
                end,
        Body2 = case maps:find(preload, Spec) of
                    {ok, Code} -> Body1#{preload => text(Code)};
                    error -> Body1
                end,
        Body = case maps:find(path, Spec) of
                   {ok, Path} when is_list(Path) -> Body2#{path => [text(P) || P <- Path]};
                   error -> Body2
               end,
        {ok, Body}
    catch
        error:_ -> {error, {bad_context_spec, Spec}}
    end.

text(Text) ->
    case unicode:characters_to_binary(Text) of
        Bin when is_binary(Bin) -> Bin;
        _ -> error(badarg)
    end.

%%% Defaults

%% @doc A runtime's `call_timeout' (its default when Opts has none).
-spec call_timeout(map()) -> timeout().
call_timeout(Opts) ->
    maps:get(call_timeout, Opts, ?DEFAULT_CALL_TIMEOUT).

%% @doc How long the port program may take to say hello and create the Opts contexts.
-spec start_timeout(map()) -> non_neg_integer().
start_timeout(Opts) ->
    maps:get(start_timeout, Opts, ?DEFAULT_START_TIMEOUT).

%% @doc The largest frame either side writes.
-spec max_frame(map()) -> pos_integer().
max_frame(Opts) ->
    maps:get(max_frame, Opts, ?DEFAULT_MAX_FRAME).

%% @doc A runtime's `max_atoms' (its default when Opts has none).
-spec max_atoms(map()) -> non_neg_integer().
max_atoms(#{max_atoms := N}) when is_integer(N), N >= 0 -> N;
max_atoms(_) -> ?DEFAULT_MAX_ATOMS.

%% @doc Messages a process may have queued before Python's sends to it are refused.
-spec max_mailbox(map()) -> pos_integer().
max_mailbox(Opts) ->
    maps:get(max_mailbox, Opts, ?DEFAULT_MAX_MAILBOX).

%% @doc The back-off between restarts of a crashing OS process: `{MinDelay, MaxDelay}'.
-spec restart_delays(map()) -> {non_neg_integer(), non_neg_integer()}.
restart_delays(Opts) ->
    Restart = maps:get(restart, Opts, #{}),
    {maps:get(min_delay, Restart, ?DEFAULT_MIN_DELAY),
     maps:get(max_delay, Restart, ?DEFAULT_MAX_DELAY)}.

%% @doc How long a pool member being replaced (`max_requests') may take to finish what
%% it runs before it is replaced anyway.
-spec drain_timeout(map()) -> timeout().
drain_timeout(Opts) ->
    maps:get(drain_timeout, Opts, ?DEFAULT_DRAIN_TIMEOUT).

%% @doc The folders of the runtime's `watch' option (none without it), as absolute
%% paths.
-spec watch_dirs(map()) -> [file:filename_all()].
watch_dirs(Opts) ->
    [filename:absname(Dir) || Dir <- maps:get(watch, Opts, [])].

%% @doc How often pyport_watch scans the `watch' folders, in ms.
-spec watch_interval() -> pos_integer().
watch_interval() ->
    ?WATCH_INTERVAL_MS.

%%% The port program's command line

%% @doc The port program: `executable', else $PYPORT_EXECUTABLE, else priv/pyport.
-spec executable(map()) -> file:filename_all().
executable(#{executable := Exe}) ->
    Exe;
executable(_) ->
    case os:getenv("PYPORT_EXECUTABLE") of
        Exe when is_list(Exe), Exe =/= "" -> Exe;
        _ -> filename:join(priv_dir(), "pyport")
    end.

priv_dir() ->
    case code:priv_dir(pyport) of
        {error, bad_name} -> filename:join(filename:dirname(filename:dirname(
                                           code:which(?MODULE))), "priv");
        Dir -> Dir
    end.

%% @doc The port program's arguments: every limit, so it has no defaults of its own
%% (docs/protocol.md). AtomsLeft is what the runtime's earlier OS processes left of
%% its `max_atoms' budget.
-spec port_args(map(), non_neg_integer()) -> [string()].
port_args(Opts, AtomsLeft) ->
    path_args(Opts)
        ++ ["--max-frame", integer_to_list(max_frame(Opts)),
            "--queue", integer_to_list(queue_capacity(Opts)),
            "--stuck-after", integer_to_list(stuck_after(Opts)),
            "--max-atoms", integer_to_list(AtomsLeft),
            "--none-as", atom_to_list(none_atom(Opts))]
        ++ memory_args(Opts) ++ reply_args(Opts) ++ arrays_args(Opts).

%% The form numpy arrays come back in (issue 19): `lists' (the default) or `binary';
%% the port program refuses any other at start.
arrays_args(#{arrays := Form}) when is_atom(Form) -> ["--arrays", atom_to_list(Form)];
arrays_args(#{arrays := _}) -> ["--arrays", "?"];
arrays_args(_) -> [].

queue_capacity(#{queue_capacity := N}) when is_integer(N), N > 0 -> N;
queue_capacity(_) -> ?DEFAULT_QUEUE_CAPACITY.

%% 0 for never (`infinity').
stuck_after(#{stuck_after := infinity}) -> 0;
stuck_after(#{stuck_after := Ms}) when is_integer(Ms), Ms > 0 -> Ms;
stuck_after(_) -> ?DEFAULT_STUCK_AFTER.

%% The atom Python's None comes back as (`nil' for Elixir); none, nil and undefined
%% all go in as None whatever this is. The port program rejects other atoms at start.
none_atom(#{none := Atom}) when is_atom(Atom) -> Atom;
none_atom(_) -> ?DEFAULT_NONE.

%% Resident bytes the OS process may use; past them it restarts (exit status 76).
%% No bound without the option.
memory_args(#{max_memory := Bytes}) when is_integer(Bytes), Bytes > 0 ->
    ["--max-memory", integer_to_list(Bytes)];
memory_args(_) -> [].

%% Bytes of one reply or stream item; without the option only max_frame bounds them.
reply_args(#{max_reply := Bytes}) when is_integer(Bytes), Bytes > 0 ->
    ["--max-reply", integer_to_list(Bytes)];
reply_args(_) -> [].

%% `--path' for each entry of `path', then the site-packages of `venv'.
path_args(Opts) ->
    Venv = case maps:find(venv, Opts) of
               {ok, Dir} -> venv_site_packages(Dir);
               %% issue 20: else the venv of the runtime's application
               error -> lists:flatmap(fun venv_site_packages/1, pyport_app_env:venvs(Opts))
           end,
    lists:append([["--path", to_list(P)] || P <- maps:get(path, Opts, []) ++ Venv]).

to_list(P) when is_binary(P) -> unicode:characters_to_list(P);
to_list(P) -> P.

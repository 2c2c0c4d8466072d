%% @doc A runtime's `watch' option (for development): every 500 ms
%% (pyport_opts:watch_interval/0) it scans the folders for `.py' files created or
%% changed since the last scan, and reloads the module of each in the runtime's
%% contexts where that module is imported (pyport_reload; a context that has not
%% imported it gets the current file when it does). What it reloaded is logged at
%% `notice', a reload that failed (say a syntax error in the file) at `warning', both
%% with domain `[pyport]'. OTP has no file-change notification, hence the scan.
%%
%% Each folder is read as a `sys.path' root: `pkg/mod.py' is module `pkg.mod',
%% `pkg/__init__.py' module `pkg'. A folder whose name is no Python identifier
%% (`.venv', `site-packages', `node_modules') holds no module of that root and is not
%% entered, nor is `__pycache__' or a symbolic link to a folder.
%%
%% A file's state is its mtime (whole seconds), size and inode and, while its mtime is
%% at most ?RECENT_S seconds old, a digest of its content: a second edit within the
%% same second that keeps the size is seen too.
%%
%% pyport_runtime starts it (linked) when the runtime starts and stops it with the
%% runtime; it lives across restarts of the runtime's OS process (a new OS process
%% imports the current files anyway, and changes made while none runs are reloaded
%% where the module is imported once one does).
-module(pyport_watch).
-behaviour(gen_server).

-export([start_link/2]).
-export([init/1]).
-export([handle_call/3]).
-export([handle_cast/2]).
-export([handle_info/2]).

-include_lib("kernel/include/file.hrl").
-include("pyport_handles.hrl").

-define(RECENT_S, 2).

%% mtime, size, inode, and the content's digest while the mtime is recent
-type signature() :: {integer(), non_neg_integer(), integer(), binary() | undefined}.

-record(state, {key :: pyport_table:key(),
                dirs :: [file:filename_all()],
                %% every module file of the folders, as found by the last scan
                files :: #{file:filename_all() => {Module :: binary(), signature()}}}).

%%% API

%% @doc Starts watching Dirs for runtime Key, linked to the caller. The first scan is
%% made before this returns: a file changed after it is seen.
-spec start_link(pyport_table:key(), [file:filename_all()]) -> {ok, pid()} | {error, term()}.
start_link(Key, Dirs) ->
    gen_server:start_link(?MODULE, {Key, Dirs}, []).

%%% gen_server callbacks

%% @private gen_server callback.
-spec init({pyport_table:key(), [file:filename_all()]}) -> {ok, #state{}}.
init({Key, Dirs}) ->
    logger:info("pyport runtime ~0p: watching ~0p for changed .py files", [Key, Dirs],
                #{domain => [pyport]}),
    schedule(),
    {ok, #state{key = Key, dirs = Dirs, files = scan(Dirs)}}.

%% @private gen_server callback.
-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(_Request, _From, S) ->
    {reply, {error, {bad_request, unknown_call}}, S}.

%% @private gen_server callback.
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(_Msg, S) ->
    {noreply, S}.

%% @private gen_server callback.
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info(scan, #state{key = Key, dirs = Dirs, files = Old} = S) ->
    New = scan(Dirs),
    Changed = [{Module, Path} || {Path, {Module, Sig}} <- lists:sort(maps:to_list(New)),
                                 changed(maps:get(Path, Old, none), Sig)],
    %% a package's __init__.py and a module of the same name count once
    _ = [reload(Key, Module, Path) || {Module, Path} <- lists:ukeysort(1, Changed)],
    schedule(),
    {noreply, S#state{files = New}};
handle_info(_Msg, S) ->
    {noreply, S}.

schedule() ->
    _ = erlang:send_after(pyport_opts:watch_interval(), self(), scan),
    ok.

%%% Reloading

reload(Key, Module, Path) ->
    case pyport_reload:runtime(Key, Module, #{}, true) of
        {ok, Answers} ->
            Meta = #{domain => [pyport], pyport_runtime => Key, pyport_reloaded => Module},
            case [Id || {#pyport_ctx{id = Id}, reloaded} <- Answers] of
                [] ->
                    ok;
                Ids ->
                    logger:notice("pyport runtime ~0p: reloaded ~ts (~ts changed) in "
                                  "context(s) ~w", [Key, Module, Path, Ids],
                                  Meta#{pyport_contexts => Ids})
            end,
            case [{Id, E} || {#pyport_ctx{id = Id}, {error, E}} <- Answers] of
                [] ->
                    ok;
                [{_, Error} | _] = Failed ->
                    Ids1 = [Id || {Id, _} <- Failed],
                    logger:warning("pyport runtime ~0p: reloading ~ts (~ts changed) failed "
                                   "in context(s) ~w: ~ts", [Key, Module, Path, Ids1,
                                                              describe(Error)],
                                   Meta#{pyport_contexts => Ids1, pyport_error => Error})
            end;
        {error, _} ->
            ok  % no OS process now: the next one imports the current file
    end.

describe({python, Type, Message, _Traceback}) -> [Type, ": ", Message];
describe(Error) -> io_lib:format("~0p", [Error]).

%%% Scanning

scan(Dirs) ->
    maps:from_list(lists:append([walk(Dir, []) || Dir <- Dirs])).

%% The module files under Dir, the folder of package Package (its names, outermost
%% first) from the root.
walk(Dir, Package) ->
    case file:list_dir(Dir) of
        {ok, Names} -> lists:append([entry(filename:join(Dir, N), N, Package) || N <- Names]);
        {error, _} -> []
    end.

entry(Path, Name, Package) ->
    case file:read_link_info(Path) of
        {ok, #file_info{type = directory}} ->
            case identifier(Name) andalso Name =/= "__pycache__" of
                true -> walk(Path, Package ++ [Name]);
                false -> []
            end;
        {ok, #file_info{type = Type}} when Type =:= regular; Type =:= symlink ->
            source(Path, Name, Package);
        _ ->
            []
    end.

source(Path, Name, Package) ->
    case filename:extension(Name) =:= ".py" andalso module(Package, filename:rootname(Name)) of
        {ok, Module} ->
            case file:read_file_info(Path, [{time, posix}]) of
                {ok, #file_info{type = regular} = Info} -> [{Path, {Module, signature(Path, Info)}}];
                _ -> []
            end;
        _ ->
            []
    end.

%% The root's own __init__.py is no module of the root.
module([], "__init__") -> none;
module(Package, "__init__") -> {ok, dotted(Package)};
module(Package, Stem) ->
    case identifier(Stem) of
        true -> {ok, dotted(Package ++ [Stem])};
        false -> none
    end.

dotted(Names) ->
    unicode:characters_to_binary(lists:join(".", Names)).

%% A name Python can import (a file name that is not valid UTF-8 comes as a binary:
%% it is none).
identifier(Name) when is_list(Name) ->
    re:run(Name, "^[_\\p{L}][_\\p{L}\\p{N}]*$", [unicode, {capture, none}]) =:= match;
identifier(_) ->
    false.

-spec signature(file:filename_all(), #file_info{}) -> signature().
signature(Path, #file_info{mtime = Mtime, size = Size, inode = Inode}) ->
    Digest = case Mtime >= erlang:system_time(second) - ?RECENT_S of
                 true ->
                     case file:read_file(Path) of
                         {ok, Content} -> erlang:md5(Content);
                         {error, _} -> undefined
                     end;
                 false ->
                     undefined
             end,
    {Mtime, Size, Inode, Digest}.

%% A file is changed when it is new, its mtime, size or inode changed, or both scans
%% have a digest of it and they differ.
changed(none, _New) -> true;
changed({_, {Mtime, Size, Inode, Old}}, {Mtime, Size, Inode, New}) ->
    Old =/= undefined andalso New =/= undefined andalso Old =/= New;
changed(_Old, _New) -> true.

%% @doc Reloading code (issue 20, item 5): pyport:reload/2,3 on a runtime, a context
%% and a pool (both modes, across nodes), its errors, and the `watch' runtime option.
%% Each case writes its own modules under its own folder of priv_dir; an edit keeps
%% the file's size and is made within the second of the import before it, so the
%% bytecode cache alone would not see it.
-module(pyport_reload_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% how long a case waits for a log event before it fails (a guard, not a delay)
-define(LOG_WAIT, 10000).

all() ->
    [runtime_owngil, runtime_main, context_alone, pool_owngil, pool_main, pool_across_nodes,
     missing_module_and_bad_names, syntax_error_keeps_old_code, busy_context_times_out,
     bad_arguments, watch_reloads_where_imported, watch_package_and_failure, watch_main_pool,
     watch_bad_option].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    Config.

end_per_suite(_Config) ->
    pyport_ct:stop_app().

init_per_testcase(Case, Config) ->
    Dir = filename:join(?config(priv_dir, Config), Case),
    ok = filelib:ensure_path(Dir),
    [{dir, Dir} | Config].

end_per_testcase(_Case, _Config) ->
    pyport_ct:stop_forwarding_logs(),
    flush_logs(),
    pyport_ct:assert_no_messages().

%% The log events forwarded after those a case waited for (a pool's start, say).
flush_logs() ->
    receive
        {pyport_log, _, _, _} -> flush_logs()
    after 0 ->
        ok
    end.

%%% Helpers

%% A module whose version() answers N; every version has the same size.
version_module(N) when N >= 0, N =< 9 ->
    <<"import builtins\n"
      "builtins.pyport_loads = getattr(builtins, 'pyport_loads', 0) + 1\n"
      "VERSION = ", (integer_to_binary(N))/binary, "\n"
      "def version():\n"
      "    return VERSION\n">>.

%% Written whole, as editors save (a new file renamed over the old one): the watcher
%% never reads it half-written.
write(Dir, Rel, Content) ->
    Path = filename:join(Dir, Rel),
    ok = filelib:ensure_dir(Path),
    ok = file:write_file(Path ++ ".new", Content),
    ok = file:rename(Path ++ ".new", Path).

version(Target, Module) ->
    pyport:call(Target, Module, version, []).

%% How many times the module code of version_module/1 ran in that interpreter.
loads(Target) ->
    {ok, N} = pyport:eval(Target, <<"__import__('builtins').pyport_loads">>),
    N.

start_runtime(Dir, Mode, Extra) ->
    {ok, Rt} = pyport:start_runtime(Extra#{path => [Dir],
                                           contexts => [#{name => a, mode => Mode},
                                                        #{name => b, mode => Mode}]}),
    {ok, A} = pyport:context(Rt, a),
    {ok, B} = pyport:context(Rt, b),
    {Rt, A, B}.

member_contexts(Pool) ->
    {ok, #{members := Members}} = pyport:pool_info(Pool),
    [Ctx || #{context := Ctx} <- Members].

%% Waits for the watcher's notice that Module was reloaded; returns its metadata.
await_reloaded(Module) ->
    receive
        {pyport_log, notice, _Text, #{pyport_reloaded := Module} = Meta} ->
            Meta
    after ?LOG_WAIT ->
        ct:fail({no_reload_logged, Module})
    end.

%%% Cases

runtime_owngil() ->
    [{doc, "reload/2 on a runtime of owngil contexts: the context that imported the module "
           "and the one that did not (it imports it) both run the new code, and so does a "
           "context made with new_context/2; each interpreter ran the module's code once "
           "per load."}].
runtime_owngil(Config) ->
    runtime_case(owngil, Config).

runtime_main() ->
    [{doc, "reload/2 on a runtime of main contexts, which share one interpreter: every "
           "context answers ok and runs the new code, and the module's code ran once more "
           "there, not once per context."}].
runtime_main(Config) ->
    runtime_case(main, Config).

runtime_case(Mode, Config) ->
    Dir = ?config(dir, Config),
    Module = list_to_atom("rt_" ++ atom_to_list(Mode)),
    File = atom_to_list(Module) ++ ".py",
    write(Dir, File, version_module(1)),
    {Rt, A, B} = start_runtime(Dir, Mode, #{}),
    try
        {ok, C} = pyport:new_context(Rt, #{mode => Mode}),
        ?assertEqual({ok, 1}, version(A, Module)),
        write(Dir, File, version_module(2)),
        ?assertEqual({ok, 1}, version(A, Module)),  % no reload yet
        ?assertEqual({ok, [{A, ok}, {B, ok}, {C, ok}]}, pyport:reload(Rt, Module)),
        [?assertEqual({ok, 2}, version(Ctx, Module)) || Ctx <- [A, B, C]],
        case Mode of
            owngil -> ?assertEqual([2, 1, 1], [loads(Ctx) || Ctx <- [A, B, C]]);
            main -> ?assertEqual([2, 2, 2], [loads(Ctx) || Ctx <- [A, B, C]])
        end,
        write(Dir, File, version_module(3)),
        {ok, Answers} = pyport:reload(Rt, Module, #{timeout => 5000}),
        ?assertEqual([{A, ok}, {B, ok}, {C, ok}], Answers),
        [?assertEqual({ok, 3}, version(Ctx, Module)) || Ctx <- [A, B, C]]
    after
        pyport:stop_runtime(Rt)
    end.

context_alone() ->
    [{doc, "reload/2 on a context handle reloads there only: another context that had "
           "imported the module keeps its old code."}].
context_alone(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "alone.py", version_module(1)),
    {Rt, A, B} = start_runtime(Dir, owngil, #{}),
    try
        ?assertEqual({ok, 1}, version(A, alone)),
        ?assertEqual({ok, 1}, version(B, alone)),
        write(Dir, "alone.py", version_module(2)),
        ?assertEqual({ok, [{A, ok}]}, pyport:reload(A, <<"alone">>)),
        ?assertEqual({ok, 2}, version(A, alone)),
        ?assertEqual({ok, 1}, version(B, alone))
    after
        pyport:stop_runtime(Rt)
    end.

pool_owngil() ->
    [{doc, "reload/2 on an owngil pool: every member answers and runs the new code (the "
           "preload imported the module in each)."}].
pool_owngil(Config) ->
    pool_case(owngil, Config).

pool_main() ->
    [{doc, "reload/2 on a main pool (a runtime per member): every member answers and runs "
           "the new code."}].
pool_main(Config) ->
    pool_case(main, Config).

pool_case(Mode, Config) ->
    Dir = ?config(dir, Config),
    Module = list_to_atom("pool_" ++ atom_to_list(Mode)),
    File = atom_to_list(Module) ++ ".py",
    write(Dir, File, version_module(1)),
    Name = list_to_atom("reload_" ++ atom_to_list(Mode)),
    {ok, Pool} = pyport:start_pool(Name, #{size => 2, mode => Mode, path => [Dir],
                                           preload => <<"import ", (atom_to_binary(Module))/binary>>}),
    try
        Members = member_contexts(Pool),
        ?assertEqual(2, length(lists:usort(Members))),
        [?assertEqual({ok, 1}, version(Ctx, Module)) || Ctx <- Members],
        write(Dir, File, version_module(2)),
        ?assertEqual({ok, [{Ctx, ok} || Ctx <- Members]}, pyport:reload(Pool, Module)),
        [?assertEqual({ok, 2}, version(Ctx, Module)) || Ctx <- Members],
        [?assertEqual(2, loads(Ctx)) || Ctx <- Members]
    after
        pyport:stop_pool(Pool)
    end.

pool_across_nodes() ->
    [{doc, "reload/2 on a pool with nodes => [here, peer]: the member on the peer answers "
           "too and runs the new code (the file is read there from the same path)."}].
pool_across_nodes(Config) ->
    case pyport_ct:start_distribution() of
        ok -> pool_across_nodes_started(Config);
        {error, Reason} -> {skip, {no_distribution, Reason}}
    end.

pool_across_nodes_started(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "spread.py", version_module(1)),
    {ok, Peer, Node} = peer:start_link(#{name => peer:random_name(?MODULE),
                                         args => pyport_ct:code_path()}),
    try
        ok = erpc:call(Node, application, load, [pyport]),
        ok = erpc:call(Node, application, set_env, [pyport, default_runtime, false]),
        {ok, _} = erpc:call(Node, application, ensure_all_started, [pyport]),
        {ok, Pool} = pyport:start_pool(reload_spread,
                                       #{nodes => [node(), Node], size => 1, mode => owngil,
                                         path => [Dir], preload => <<"import spread">>}),
        try
            {ok, #{members := [#{node := Here, context := Mine},
                               #{node := Node, status := up, context := Theirs}]}} =
                pyport:pool_info(Pool),
            ?assertEqual(node(), Here),
            [?assertEqual({ok, 1}, version(Ctx, spread)) || Ctx <- [Mine, Theirs]],
            write(Dir, "spread.py", version_module(2)),
            ?assertEqual({ok, [{Mine, ok}, {Theirs, ok}]}, pyport:reload(Pool, spread)),
            [?assertEqual({ok, 2}, version(Ctx, spread)) || Ctx <- [Mine, Theirs]],
            %% a context handle of the peer, reloaded from here
            write(Dir, "spread.py", version_module(3)),
            ?assertEqual({ok, [{Theirs, ok}]}, pyport:reload(Theirs, spread)),
            ?assertEqual({ok, 3}, version(Theirs, spread)),
            ?assertEqual({ok, 2}, version(Mine, spread))
        after
            pyport:stop_pool(Pool)
        end
    after
        catch peer:stop(Peer)
    end.

missing_module_and_bad_names() ->
    [{doc, "A module that does not exist is each context's ModuleNotFoundError; a name "
           "that is no module name each context's ValueError saying so; a stopped runtime "
           "is runtime_down."}].
missing_module_and_bad_names(Config) ->
    {Rt, A, B} = start_runtime(?config(dir, Config), owngil, #{}),
    Missing = {error, {python, <<"ModuleNotFoundError">>,
                       <<"No module named 'no_such_module_here'">>}},
    {ok, Answers} = pyport:reload(Rt, no_such_module_here),
    ?assertEqual([{A, Missing}, {B, Missing}], without_traceback(Answers)),
    [begin
         Bad = {error, {python, <<"ValueError">>, Message}},
         {ok, Answers1} = pyport:reload(Rt, Name),
         ?assertEqual([{A, Bad}, {B, Bad}], without_traceback(Answers1))
     end || {Name, Message} <- [{<<"not a name">>, <<"'not a name' is not a module name">>},
                                {"", <<"'' is not a module name">>},
                                {<<"os..path">>, <<"'os..path' is not a module name">>},
                                {<<".relative">>, <<"'.relative' is not a module name">>}]],
    %% a module of the standard library reloads as any other
    ?assertEqual({ok, [{A, ok}, {B, ok}]}, pyport:reload(Rt, 'json.decoder')),
    ok = pyport:stop_runtime(Rt),
    ?assertEqual({error, {runtime_down, noproc}}, pyport:reload(Rt, json)).

without_traceback(Answers) ->
    [{Ctx, case Answer of
               {error, {python, Type, Message, Traceback}} when is_binary(Traceback) ->
                   {error, {python, Type, Message}};
               Other ->
                   Other
           end} || {Ctx, Answer} <- Answers].

syntax_error_keeps_old_code() ->
    [{doc, "A file that no longer compiles is each context's SyntaxError, and the old code "
           "keeps running there; fixed, it reloads."}].
syntax_error_keeps_old_code(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "broken.py", version_module(1)),
    {Rt, A, B} = start_runtime(Dir, owngil, #{}),
    try
        ?assertEqual({ok, 1}, version(A, broken)),
        write(Dir, "broken.py", <<"def version(:\n">>),
        {ok, [{A, {error, {python, <<"SyntaxError">>, _, _}}},
              {B, {error, {python, <<"SyntaxError">>, _, _}}}]} = pyport:reload(Rt, broken),
        ?assertEqual({ok, 1}, version(A, broken)),
        write(Dir, "broken.py", version_module(2)),
        ?assertEqual({ok, [{A, ok}, {B, ok}]}, pyport:reload(Rt, broken)),
        ?assertEqual({ok, 2}, version(A, broken)),
        ?assertEqual({ok, 2}, version(B, broken))
    after
        pyport:stop_runtime(Rt)
    end.

busy_context_times_out() ->
    [{doc, "A context busy past the reload's timeout answers {error, timeout}; the others "
           "answer at once. Interrupted, it serves again."}].
busy_context_times_out(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "busy.py", version_module(1)),
    {Rt, A, B} = start_runtime(Dir, owngil, #{}),
    try
        Busy = pyport:async_call(A, time, sleep, [60]),
        pyport_ct:wait_for(fun() -> running(Rt, ctx_id(A)) end, 500),
        ?assertEqual({ok, [{A, {error, timeout}}, {B, ok}]},
                     pyport:reload(Rt, busy, #{timeout => 300})),
        ok = pyport:interrupt(A),
        ?assertEqual({error, interrupted}, pyport:await(Busy, 5000)),
        ?assertEqual({ok, [{A, ok}, {B, ok}]}, pyport:reload(Rt, busy)),
        ?assertEqual({ok, 1}, version(A, busy))
    after
        pyport:stop_runtime(Rt)
    end.

bad_arguments() ->
    [{doc, "Arguments of the wrong type are bad_request at once, an unknown option "
           "bad_option, a stopped pool pool_down."}].
bad_arguments(_Config) ->
    ?assertEqual({error, {bad_request, module}}, pyport:reload(pyport, 42)),
    ?assertEqual({error, {bad_request, ctx}}, pyport:reload({not_a, target}, json)),
    ?assertEqual({error, {bad_request, opts}}, pyport:reload(pyport, json, [])),
    ?assertEqual({error, {bad_option, timout}}, pyport:reload(pyport, json, #{timout => 1})),
    {ok, Pool} = pyport:start_pool(reload_gone, #{size => 1, mode => owngil}),
    ok = pyport:stop_pool(Pool),
    ?assertEqual({error, {pool_down, reload_gone}}, pyport:reload(Pool, json)).

watch_reloads_where_imported() ->
    [{doc, "watch => [Dir]: a changed .py file is reloaded, by itself, in the contexts that "
           "imported its module, and that is logged at notice; the other context imports "
           "the new file when it first uses it. The scanner stops with the runtime."}].
watch_reloads_where_imported(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "watched.py", version_module(1)),
    {Rt, A, B} = start_runtime(Dir, owngil, #{watch => [Dir]}),
    Watcher = watcher(Rt),
    try
        ?assertEqual({ok, 1}, version(A, watched)),
        ok = pyport_ct:forward_logs_with_meta(),
        write(Dir, "watched.py", version_module(2)),
        #{pyport_contexts := Ids, pyport_runtime := Key} = await_reloaded(<<"watched">>),
        ?assertEqual({[ctx_id(A)], {ok, Key}}, {Ids, pyport_runtime:key(Rt)}),
        ?assertEqual({ok, 2}, version(A, watched)),
        ?assertEqual({ok, 2}, version(B, watched))
    after
        pyport:stop_runtime(Rt)
    end,
    ?assertNot(is_process_alive(Watcher)).

watch_package_and_failure() ->
    [{doc, "watch: pkg/sub.py is module pkg.sub and pkg/__init__.py module pkg; a file that "
           "no longer compiles is logged at warning with the SyntaxError, and the old code "
           "keeps running; a main runtime works as an owngil one."}].
watch_package_and_failure(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "pkg/__init__.py", <<"NAME = 'a'\n">>),
    write(Dir, "pkg/sub.py", version_module(1)),
    {Rt, A, B} = start_runtime(Dir, main, #{watch => [Dir]}),
    try
        ?assertEqual({ok, 1}, version(A, 'pkg.sub')),
        ok = pyport_ct:forward_logs_with_meta(),
        write(Dir, "pkg/sub.py", version_module(2)),
        %% main contexts share the interpreter: both had it imported
        #{pyport_contexts := Ids} = await_reloaded(<<"pkg.sub">>),
        ?assertEqual([ctx_id(A), ctx_id(B)], Ids),
        ?assertEqual({ok, 2}, version(B, 'pkg.sub')),
        write(Dir, "pkg/__init__.py", <<"NAME = 'b'\n">>),
        _ = await_reloaded(<<"pkg">>),
        ?assertEqual({ok, <<"b">>}, pyport:eval(A, <<"__import__('pkg').NAME">>)),
        write(Dir, "pkg/sub.py", <<"def version(:\n">>),
        receive
            {pyport_log, warning, Text, #{pyport_reloaded := <<"pkg.sub">>,
                                         pyport_error := {python, <<"SyntaxError">>, _, _}}} ->
                ?assertMatch({match, _}, re:run(Text, "reloading pkg.sub .* failed .*SyntaxError"))
        after ?LOG_WAIT ->
            ct:fail(no_failure_logged)
        end,
        ?assertEqual({ok, 2}, version(A, 'pkg.sub'))
    after
        pyport:stop_runtime(Rt)
    end.

watch_main_pool() ->
    [{doc, "watch as a pool option: each member runtime of a main pool reloads the changed "
           "module and logs it; every member then runs the new code."}].
watch_main_pool(Config) ->
    Dir = ?config(dir, Config),
    write(Dir, "pooled.py", version_module(1)),
    {ok, Pool} = pyport:start_pool(reload_watched, #{size => 2, mode => main, path => [Dir],
                                                     watch => [Dir],
                                                     preload => <<"import pooled">>}),
    try
        ok = pyport_ct:forward_logs_with_meta(),
        write(Dir, "pooled.py", version_module(2)),
        Keys = [Key || _ <- [1, 2],
                       #{pyport_runtime := Key} <- [await_reloaded(<<"pooled">>)]],
        ?assertEqual([{pyport_pool, reload_watched, 1}, {pyport_pool, reload_watched, 2}],
                     lists:sort(Keys)),
        [?assertEqual({ok, 2}, version(Ctx, pooled)) || Ctx <- member_contexts(Pool)]
    after
        pyport:stop_pool(Pool)
    end.

watch_bad_option() ->
    [{doc, "watch must be a list of existing directories: anything else is "
           "{bad_option, {watch, What}} from start_runtime/1 and start_pool/2; [] watches "
           "nothing."}].
watch_bad_option(Config) ->
    Dir = ?config(dir, Config),
    Missing = filename:join(Dir, "missing"),
    File = filename:join(Dir, "file.py"),
    write(Dir, "file.py", <<>>),
    [?assertEqual({error, {bad_option, {watch, What}}}, pyport:start_runtime(#{watch => Opt}))
     || {Opt, What} <- [{[Missing], Missing}, {[Dir, File], File}, {Dir, Dir},
                        {not_a_list, not_a_list}, {[undefined], undefined}]],
    ?assertEqual({error, {bad_option, {watch, Missing}}},
                 pyport:start_pool(reload_bad_watch, #{size => 1, watch => [Missing]})),
    {ok, Rt} = pyport:start_runtime(#{watch => []}),
    ?assertEqual(undefined, watcher(Rt)),
    ok = pyport:stop_runtime(Rt).

%%% More helpers

running(Rt, Id) ->
    {ok, #{contexts := Contexts}} = pyport:info(Rt),
    case [C || #{id := CId, running := true} = C <- Contexts, CId =:= Id] of
        [_] -> {ok, running};
        [] -> not_yet
    end.

ctx_id(Ctx) ->
    element(3, Ctx).

%% The runtime's pyport_watch process (linked to it), if any.
watcher(Rt) ->
    {links, Links} = process_info(Rt, links),
    case [P || P <- Links, is_pid(P),
               proc_lib:initial_call(P) =:= {pyport_watch, init, ['Argument__1']}] of
        [P] -> P;
        [] -> undefined
    end.


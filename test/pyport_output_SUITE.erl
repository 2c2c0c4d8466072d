%% @doc What a user's node shows of pyport, without any configuration: Python's output
%% and pyport's own warnings in the default logger handler's output, muted by the
%% documented config; a contained crash as one warning line, with no error or crash
%% report; nothing on stderr at a clean stop or a halt. Each case runs a separate,
%% plain `erl -noshell -pa <pyport's ebin>' (no config, no flags of the CT node) with a
%% script, and reads its stdout and stderr.
-module(pyport_output_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

%% How long one node may take (it starts pyport and Python, and halts).
-define(NODE_TIMEOUT, 60000).

%% The kernel config docs/api.md ("Output") gives to mute Python's output.
-define(MUTE_CONFIG,
        "[{kernel, [{logger, [{filters, log, [{no_python, {fun logger_filters:domain/2,\n"
        "                                                  {stop, sub, [pyport, python]}}}]}]}]}].\n").

%% The end of every script: the default handler has written everything logged so
%% far (the port owner logged each line before it routed the reply), then a marker.
-define(SCRIPT_END, "ok = logger_std_h:filesync(default),\n"
                    "io:format(\"script done~n\"),\n").

all() ->
    [output_in_default_handler, output_muted_by_config, contained_crash_is_one_warning,
     pool_member_crash_is_one_warning, halt_leaves_stderr_empty].

%%% Cases

output_in_default_handler() ->
    [{doc, "In a plain erl: print and sys.stdout at notice, sys.stderr at warning, "
           "logging records at their level reach the default handler's output; "
           "logging.info stays below the primary level (notice) as in OTP."}].
output_in_default_handler(Config) ->
    {0, Out, Err} = run_node(Config, output_script(), []),
    ?assertEqual(<<>>, Err),
    Events = events(Out),
    ct:log("events: ~p", [Events]),
    ?assertEqual([{notice, <<"python (context a): hello from print">>},
                  {notice, <<"python (context a): hello from stdout">>},
                  {warning, <<"python (context a): hello from stderr">>},
                  {warning, <<"python (context a): WARNING:app:a warning record">>},
                  {error, <<"python (context a): ERROR:app:an error record">>}],
                 Events),
    ?assertNotEqual(nomatch, binary:match(Out, <<"script done">>)).

output_muted_by_config() ->
    [{doc, "The same node with the kernel config docs/api.md gives (-config) shows no "
           "Python output; removing pyport's handler filter at run time does the same "
           "for the default handler."}].
output_muted_by_config(Config) ->
    File = filename:join(?config(priv_dir, Config), "mute.config"),
    ok = file:write_file(File, ?MUTE_CONFIG),
    {0, Out, Err} = run_node(Config, output_script(), ["-config", File]),
    ?assertEqual(<<>>, Err),
    ?assertEqual([], events(Out)),
    ?assertNotEqual(nomatch, binary:match(Out, <<"script done">>)),
    {0, Out2, <<>>} = run_node(Config, "ok = logger:remove_handler_filter(default, pyport),\n"
                                       ++ output_script(), []),
    ?assertEqual([], events(Out2)),
    ?assertNotEqual(nomatch, binary:match(Out2, <<"script done">>)).

contained_crash_is_one_warning() ->
    [{doc, "A runtime whose OS process segfaults and is restarted: the node's output has "
           "exactly one line about it, a warning naming the signal and the restart delay, "
           "and no ERROR REPORT or CRASH REPORT; the caller's reason is {port_exit, 139}; "
           "stderr stays empty through init:stop()."}].
contained_crash_is_one_warning(Config) ->
    Script = "{ok, Rt} = pyport:start_runtime(#{name => crashy, contexts => [#{name => a, mode => main}]}),\n"
             "{ok, C} = pyport:context(Rt, a),\n"
             "io:format(\"reply: ~p~n\", [pyport:exec(C, <<\"import ctypes\\nctypes.string_at(0)\">>)]),\n"
             ++ await_up("C") ++ ?SCRIPT_END ++ "init:stop().\n",
    {0, Out, Err} = run_node(Config, Script, []),
    ?assertEqual(<<>>, Err),
    ?assertNotEqual(nomatch, binary:match(Out, <<"reply: {error,{runtime_down,{port_exit,139}}}">>)),
    ?assertEqual([{warning, <<"pyport runtime crashy: its Python process was killed by "
                              "signal 11 (SIGSEGV) (exit status 139); restarting it in 0 ms">>}],
                 events(Out)),
    ?assertEqual(nomatch, binary:match(Out, [<<"ERROR REPORT">>, <<"CRASH REPORT">>])),
    ?assertNotEqual(nomatch, binary:match(Out, <<"script done">>)).

pool_member_crash_is_one_warning() ->
    [{doc, "The same for a member of a `main' pool: one warning naming the pool and the "
           "member, no report, empty stderr."}].
pool_member_crash_is_one_warning(Config) ->
    Script = "{ok, P} = pyport:start_pool(crashpool, #{size => 2, mode => main}),\n"
             "io:format(\"reply: ~p~n\", [pyport:exec(P, <<\"import ctypes\\nctypes.string_at(0)\">>)]),\n"
             ++ await_up("P") ++ ?SCRIPT_END ++ "init:stop().\n",
    {0, Out, Err} = run_node(Config, Script, []),
    ?assertEqual(<<>>, Err),
    ?assertNotEqual(nomatch, binary:match(Out, <<"reply: {error,{runtime_down,{port_exit,139}}}">>)),
    Events = [E || {_, Text} = E <- events(Out),
                   binary:match(Text, <<"members on">>) =:= nomatch],  % its start notice
    ?assertMatch([{warning, <<"pyport pool crashpool (member ", _:1/binary, "): its Python "
                              "process was killed by signal 11 (SIGSEGV) (exit status 139); "
                              "restarting it in 0 ms">>}], Events),
    ?assertEqual(nomatch, binary:match(Out, [<<"ERROR REPORT">>, <<"CRASH REPORT">>])).

halt_leaves_stderr_empty() ->
    [{doc, "A node that halts (halt/0) while Python sends to it as fast as it can: the "
           "port program finds its stdout closed and says nothing on stderr. Three "
           "rounds (before the fix, with these 200 kB messages, `protocol stream closed: "
           "Broken pipe' in four of five halts)."}].
halt_leaves_stderr_empty(Config) ->
    Script = "{ok, _} = pyport:start_runtime(#{name => out, contexts => [#{name => a}]}),\n"
             "{ok, C} = pyport:context(out, a),\n"
             "Sink = spawn(fun Loop() -> receive _ -> Loop() end end),\n"
             "ok = pyport:exec(C, <<\"import erlang\\n"
                                   "def flood(p):\\n"
                                   "    while True:\\n"
                                   "        erlang.send(p, b'x' * 200000)\\n\">>),\n"
             "ok = pyport:cast(C, '__main__', flood, [Sink]),\n"
             %% the flood runs: a round trip through the sink after its first message
             "erlang:trace(Sink, true, ['receive']),\n"
             "receive {trace, Sink, 'receive', _} -> ok end,\n"
             "io:format(\"script done~n\"),\n"
             "halt().\n",
    lists:foreach(fun(_) ->
                      {0, Out, Err} = run_node(Config, Script, []),
                      ?assertEqual(<<>>, Err),
                      ?assertNotEqual(nomatch, binary:match(Out, <<"script done">>))
                  end, lists:seq(1, 3)).

%%% Helpers

output_script() ->
    "{ok, _} = pyport:start_runtime(#{name => out, contexts => [#{name => a}]}),\n"
    "{ok, C} = pyport:context(out, a),\n"
    "ok = pyport:exec(C, <<\"print('hello from print')\">>),\n"
    "ok = pyport:exec(C, <<\"import sys\\nsys.stdout.write('hello from stdout\\\\n')\">>),\n"
    "ok = pyport:exec(C, <<\"import sys\\nsys.stderr.write('hello from stderr\\\\n')\">>),\n"
    "ok = pyport:exec(C, <<\"import logging\\nlogging.basicConfig(level=logging.INFO)\\n"
                       "logging.getLogger('app').info('an info record')\\n"
                       "logging.getLogger('app').warning('a warning record')\\n"
                       "logging.getLogger('app').error('an error record')\">>),\n"
    ?SCRIPT_END
    "init:stop().\n".

%% Script lines that wait until the target answers again after a crash (each try is a
%% round trip; the back-off between tries is not what is waited for).
await_up(Var) ->
    "Await = fun Await(0) -> exit(never_up);\n"
    "            Await(N) -> case pyport:eval(" ++ Var ++ ", <<\"1\">>) of\n"
    "                            {ok, 1} -> ok;\n"
    "                            {error, {runtime_down, _}} -> receive after 10 -> Await(N - 1) end\n"
    "                        end\n"
    "        end,\n"
    "ok = Await(1000),\n".

%% Runs Script (Erlang expressions separated by commas, ending in a full stop) in a new
%% plain `erl' node that starts pyport first; returns its exit status, stdout and
%% stderr.
run_node(Config, Script, ErlArgs) ->
    Dir = ?config(priv_dir, Config),
    N = erlang:unique_integer([positive]),
    ScriptFile = filename:join(Dir, "node" ++ integer_to_list(N) ++ ".script"),
    ErrFile = filename:join(Dir, "node" ++ integer_to_list(N) ++ ".stderr"),
    ok = file:write_file(ScriptFile, ["{ok, _} = application:ensure_all_started(pyport),\n",
                                      Script]),
    Erl = filename:join([code:root_dir(), "bin", "erl"]),
    Ebin = filename:dirname(code:which(pyport)),
    Eval = "case file:script(\"" ++ ScriptFile ++ "\") of "
           "{error, E} -> io:format(\"script failed: ~p~n\", [E]), halt(3); _ -> ok end",
    Args = ["-noshell", "-pa", Ebin | ErlArgs] ++ ["-eval", Eval],
    Command = "exec " ++ lists:join(" ", [quote(A) || A <- [Erl | Args]])
              ++ " </dev/null 2>" ++ quote(ErrFile),
    Port = open_port({spawn_executable, "/bin/sh"},
                     [{args, ["-c", Command]}, binary, exit_status, {env, clean_env()}]),
    {Status, Out} = collect(Port, []),
    {ok, Err} = file:read_file(ErrFile),
    ct:log("node exit ~p~nstdout:~n~ts~nstderr:~n~ts", [Status, Out, Err]),
    {Status, Out, Err}.

collect(Port, Acc) ->
    receive
        {Port, {data, Data}} -> collect(Port, [Acc, Data]);
        {Port, {exit_status, Status}} -> {Status, iolist_to_binary(Acc)}
    after ?NODE_TIMEOUT ->
        ct:fail({node_timeout, iolist_to_binary(Acc)})
    end.

%% The user's node gets none of the flags the CT node was started with.
clean_env() ->
    [{Var, false} || Var <- ["ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "ERL_LIBS"]].

quote(S) ->
    "'" ++ lists:flatten(string:replace(S, "'", "'\\''", all)) ++ "'".

%% The default handler's events in Out (its default format: a `=LEVEL REPORT==== time
%% ===' line, then the message), as {Level, Message}, in order.
events(Out) ->
    Parts = re:split(Out, "^=([A-Z]+) REPORT==== [^\n]* ===\n", [multiline]),
    pairs(tl(Parts)).

pairs([Level, Text | Rest]) ->
    Message = hd(binary:split(Text, <<"\n">>)),
    [{binary_to_atom(string:lowercase(Level)), Message} | pairs(Rest)];
pairs([]) ->
    [].

%% Shared by the benchmark escripts (`-include("bench.hrl").'): pyport from this
%% checkout's build, and the median.

%% This checkout (the folder above benches/).
bench_root() ->
    filename:dirname(filename:dirname(filename:absname(escript:script_name()))).

%% The build's ebin folder; stops the benchmark with a message when it is missing.
pyport_ebin() ->
    Ebin = filename:join([bench_root(), "_build", "default", "lib", "pyport", "ebin"]),
    case filelib:is_dir(Ebin) of
        true ->
            Ebin;
        false ->
            io:format(standard_error, "~s not found: run `make build' first~n", [Ebin]),
            halt(2)
    end.

%% Starts pyport from the build, without its default runtime and with the logger
%% quiet, and returns the port program to use: PYPORT_EXECUTABLE or the build's own.
start_pyport() ->
    true = code:add_patha(pyport_ebin()),
    ok = application:load(pyport),
    ok = application:set_env(pyport, default_runtime, false),
    {ok, _} = application:ensure_all_started(pyport),
    ok = logger:set_primary_config(level, error),
    case os:getenv("PYPORT_EXECUTABLE") of
        Path when is_list(Path), Path =/= "" -> Path;
        _ -> filename:join([bench_root(), "priv", "pyport"])
    end.

median(Xs) ->
    lists:nth((length(Xs) + 1) div 2, lists:sort(Xs)).

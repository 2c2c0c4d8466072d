%% @doc pyport from Elixir: a Mix project depending on pyport compiles (the port binary
%% built by pyport's own Mix compiler) and calls Python; the Elixir example of
%% examples/elixir (a supervised runtime, a callback into Elixir, a stream through
%% Stream.resource/3) runs. Needs `mix' (`make test' installs Debian's elixir).
-module(pyport_elixir_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

suite() ->
    [{timetrap, {minutes, 20}}].

all() ->
    [mix_dependency, mix_release, elixir_example, elixir_logger].

init_per_suite(Config) ->
    case os:find_executable("mix") of
        false -> {skip, "mix (Elixir) is not installed"};
        _ -> [{root, pyport_ct:repo_root()} | Config]
    end.

end_per_suite(_Config) ->
    ok.

mix_dependency() ->
    [{doc, "A new Mix project with {:pyport, git: ...}: `mix compile' builds pyport and "
           "its port binary; `mix run' calls Python."}].
mix_dependency(Config) ->
    Root = ?config(root, Config),
    Dir = filename:join(?config(priv_dir, Config), "mixapp"),
    ok = filelib:ensure_dir(filename:join([Dir, "lib", "x"])),
    ok = file:write_file(
           filename:join(Dir, "mix.exs"),
           io_lib:format("defmodule Mixapp.MixProject do~n"
                         "  use Mix.Project~n"
                         "  def project, do: [app: :mixapp, version: \"0.1.0\", deps: deps()]~n"
                         "  def application, do: [extra_applications: [:logger]]~n"
                         "  defp deps, do: [{:pyport, git: ~p, ref: ~p}]~n"
                         "end~n", ["file://" ++ Root, pyport_ct:head_commit()])),
    Env = env(Root),
    {0, _} = pyport_ct:shell(Dir, Env ++ " mix deps.get"),
    {0, _} = pyport_ct:shell(Dir, Env ++ " mix compile"),
    ?assert(filelib:is_regular(filename:join([Dir, "deps", "pyport", "priv", "pyport"]))),
    {0, Out} = pyport_ct:shell(Dir, Env ++ " mix run -e '{:ok, _} = Application.ensure_all_started(:pyport); "
                              "IO.inspect(:pyport.call(:math, :sqrt, [16]))'"),
    ?assertNotEqual(nomatch, string:find(Out, "{:ok, 4.0}")).

mix_release() ->
    [{doc, "`mix release' of the Mix project from mix_dependency carries the port "
           "binary: the release, moved to another directory, runs a Python call with "
           "`bin/mixapp eval'."}].
mix_release(Config) ->
    Root = ?config(root, Config),
    Dir = filename:join(?config(priv_dir, Config), "mixapp"),
    filelib:is_regular(filename:join(Dir, "mix.exs")) orelse mix_dependency(Config),
    Env = env(Root) ++ " MIX_ENV=prod",
    {0, _} = pyport_ct:shell(Dir, Env ++ " mix release --overwrite"),
    Moved = filename:join(?config(priv_dir, Config), "moved_mix_release"),
    {0, _} = pyport_ct:shell(Dir, "rm -rf " ++ Moved ++ " && mv _build/prod/rel/mixapp " ++ Moved),
    Released = filelib:wildcard(filename:join([Moved, "lib", "pyport-*", "priv", "pyport"])),
    ?assertMatch([_], Released),
    {0, Out} = pyport_ct:shell(Moved, "bin/mixapp eval '{:ok, _} = Application.ensure_all_started(:pyport); "
                               "IO.inspect(:pyport.call(:math, :sqrt, [16]))'"),
    ?assertNotEqual(nomatch, string:find(Out, "{:ok, 4.0}")).

elixir_example() ->
    [{doc, "examples/elixir runs: a call, a callback into an Elixir function, a stream "
           "taken whole and one cut short by Enum.take/2."}].
elixir_example(Config) ->
    Root = ?config(root, Config),
    Dir = filename:join(?config(priv_dir, Config), "example"),
    {0, _} = pyport_ct:shell(Root, "cp -r examples/elixir " ++ Dir),
    {0, Out} = pyport_ct:shell(Dir, env(Root) ++ " PYPORT_PATH=" ++ Root ++ " mix run -e Example.main"),
    [?assertNotEqual(nomatch, string:find(Out, Line))
     || Line <- ["sqrt: {:ok, 4.0}", "greet: {:ok, \"HELLO ELIXIR\"}",
                 "squares: [0, 1, 4, 9, 16]", "first two: [0, 1]"]].

%%% Helpers


env(Root) ->
    "MIX_HOME=" ++ filename:join([Root, "_build", "mix_home"])
        ++ " CARGO_TARGET_DIR=" ++ filename:join([Root, "target", "dependency-build"]).


elixir_logger() ->
    [{doc, "In Elixir, Python's print shows through Elixir's Logger with no configuration "
           "as a [notice] line; the primary filter docs/api.md gives mutes it."}].
elixir_logger(Config) ->
    Root = ?config(root, Config),
    Dir = filename:join(?config(priv_dir, Config), "mixapp"),
    filelib:is_regular(filename:join(Dir, "mix.exs")) orelse mix_dependency(Config),
    Script = "{:ok, _} = Application.ensure_all_started(:pyport); "
             "{:ok, rt} = :pyport.start_runtime(%{name: :out, contexts: [%{name: :a}]}); "
             "{:ok, c} = :pyport.context(rt, :a); "
             ":ok = :pyport.exec(c, \"print(\\\"shown by logger\\\")\"); "
             "Logger.flush(); "
             ":logger.add_primary_filter(:no_python, "
             "{&:logger_filters.domain/2, {:stop, :sub, [:pyport, :python]}}); "
             ":ok = :pyport.exec(c, \"print(\\\"muted by filter\\\")\"); "
             "Logger.flush(); IO.puts(\"script done\")",
    {0, Out} = pyport_ct:shell(Dir, env(Root) ++ " mix run -e '" ++ Script ++ "'"),
    ?assertMatch({match, _}, re:run(Out, "\\[notice\\] *python \\(context :a\\): shown by logger")),
    ?assertEqual(nomatch, string:find(Out, "muted by filter")),
    ?assertNotEqual(nomatch, string:find(Out, "script done")).

# pyport as a Mix dependency: `{:pyport, git: "...", branch: "main"}` (or `path:`).
# The Erlang sources are compiled by Mix; the port program by the `pyport_port`
# compiler below, which runs the same script as rebar3's compile hook
# (scripts/build-port.sh), so `mix compile` builds it and a release carries it in
# pyport's priv/.

defmodule Mix.Tasks.Compile.PyportPort do
  @moduledoc "Builds the pyport port program into priv/pyport."
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    script = Path.join([__DIR__, "scripts", "build-port.sh"])

    case System.cmd(script, [], stderr_to_stdout: true, into: IO.stream(:stdio, :line)) do
      {_, 0} -> {:ok, []}
      {_, status} -> Mix.raise("pyport: building the port program failed (#{status})")
    end
  end
end

defmodule Pyport.MixProject do
  use Mix.Project

  def project do
    [
      app: :pyport,
      version: "0.1.0",
      language: :erlang,
      erlc_paths: ["erl_src"],
      erlc_options: [:debug_info],
      compilers: [:pyport_port | Mix.compilers()],
      deps: []
    ]
  end

  def application do
    [mod: {:pyport_app, []}, extra_applications: [:kernel, :stdlib]]
  end
end

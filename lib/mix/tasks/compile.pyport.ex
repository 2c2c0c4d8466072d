defmodule Mix.Tasks.Compile.Pyport do
  @moduledoc """
  Makes the project's Python venv, `priv/python/.venv`, from its
  `priv/python/requirements.txt`, with the Python pyport's port program links
  (pyport's `scripts/app-venv.sh`). Once per content of that file: an unchanged file
  costs nothing and needs no network. Add it after the default compilers:

      compilers: Mix.compilers() ++ [:pyport]
  """
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    script = Path.join([Pyport.Mix.dir(), "scripts", "app-venv.sh"])

    case System.cmd(script, [File.cwd!()], stderr_to_stdout: true, into: IO.stream(:stdio, :line)) do
      {_, 0} -> {:ok, []}
      {_, _} -> Mix.raise("pyport: the Python venv of this project was not made (see above)")
    end
  end
end

defmodule Pyport.Mix do
  @moduledoc false

  # pyport's command line (:pyport_cli) in this VM, on the project's port program and
  # venv, after a compile (which makes both up to date); halts with the command's exit
  # status when it is not 0
  def cli(command, args) do
    Mix.Task.run("compile")
    Mix.Task.run("loadpaths")
    venv = Path.join([File.cwd!(), "priv", "python", ".venv"])
    venv_args = if File.dir?(venv), do: ["--venv", venv], else: []
    binary = Path.join([dir(), "priv", "pyport"])
    argv = ["--port-binary", binary] ++ venv_args ++ [command | args]

    case :pyport_cli.run(Enum.map(argv, &String.to_charlist/1)) do
      0 -> :ok
      status -> System.halt(status)
    end
  end

  # pyport's own directory: the dependency's, or this project's when it is pyport
  def dir do
    case Mix.Project.deps_paths()[:pyport] do
      nil -> Path.expand("../../..", __DIR__)
      path -> path
    end
  end
end

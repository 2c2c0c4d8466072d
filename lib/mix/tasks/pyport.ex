defmodule Mix.Tasks.Pyport.Doctor do
  @shortdoc "The Python, OWN_GIL support, and where each module imports"
  @moduledoc """
  `mix pyport.doctor [MODULE...]`: pyport's `doctor` (docs/cli.md) with this
  project's port program and venv (`priv/python/.venv`). Compiles first.
  """
  use Mix.Task
  @impl true
  def run(args), do: Pyport.Mix.cli("doctor", args)
end

defmodule Mix.Tasks.Pyport.Eval do
  @shortdoc "Print the value of a Python expression"
  @moduledoc "`mix pyport.eval EXPR`: pyport's `eval` (docs/cli.md) with this project's port program and venv."
  use Mix.Task
  @impl true
  def run(args), do: Pyport.Mix.cli("eval", args)
end

defmodule Mix.Tasks.Pyport.Run do
  @shortdoc "Run a Python file as __main__"
  @moduledoc "`mix pyport.run FILE.py [ARG...]`: pyport's `run` (docs/cli.md) with this project's port program and venv."
  use Mix.Task
  @impl true
  def run(args), do: Pyport.Mix.cli("run", args)
end

defmodule Mix.Tasks.Pyport.Call do
  @shortdoc "Print MOD.FUN(*ARGS)"
  @moduledoc "`mix pyport.call MOD FUN [ARG...]`: pyport's `call` (docs/cli.md) with this project's port program and venv."
  use Mix.Task
  @impl true
  def run(args), do: Pyport.Mix.cli("call", args)
end

# An Elixir application using pyport: a runtime in its own supervision tree, calls, a
# callback into Elixir, and a stream consumed with Stream.resource/3.
# `mix run -e Example.main` (pyport_elixir_SUITE runs it).
defmodule Example.MixProject do
  use Mix.Project

  def project do
    [app: :example, version: "0.1.0", elixir: "~> 1.14", deps: deps()]
  end

  def application do
    [mod: {Example.Application, []}, extra_applications: [:logger]]
  end

  defp deps do
    # PYPORT_PATH: where pyport is, when this example is copied elsewhere
    [{:pyport, path: System.get_env("PYPORT_PATH", "../..")}]
  end
end

defmodule Example.Application do
  use Application

  @impl true
  def start(_type, _args) do
    children = [
      # A pyport runtime as a child of this application's supervisor: it restarts its
      # OS process by itself if Python crashes, so this supervisor never sees it.
      :pyport_runtime.child_spec(%{
        name: :example_py,
        contexts: [%{name: :main, preload: Example.python()}]
      })
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Example.Supervisor)
  end
end

defmodule Example do
  def python do
    """
    import erlang

    def greet(name):
        # calls the Elixir function registered as "shout"
        return erlang.call("shout", "hello " + name)

    def squares(n):
        for i in range(n):
            yield i * i
    """
  end

  def ctx do
    {:ok, ctx} = :pyport.context(:example_py, :main)
    ctx
  end

  @doc "Python items as an Elixir Stream, taken on demand."
  def stream(ctx, module, function, args) do
    Stream.resource(
      fn ->
        {:ok, ref} = :pyport.stream(ctx, module, function, args)
        ref
      end,
      fn ref ->
        case :pyport.stream_next(ref) do
          {:data, item} -> {[item], ref}
          :done -> {:halt, ref}
          {:error, reason} -> raise "python stream failed: #{inspect(reason)}"
        end
      end,
      fn ref -> :pyport.stream_cancel(ref) end
    )
  end

  def main do
    :ok = :pyport.register_function("shout", fn text -> String.upcase(text) end)
    ctx = ctx()
    IO.puts("sqrt: #{inspect(:pyport.call(ctx, :math, :sqrt, [16]))}")
    IO.puts("greet: #{inspect(:pyport.call(ctx, :__main__, :greet, ["elixir"]))}")
    IO.puts("squares: #{inspect(Enum.to_list(stream(ctx, :__main__, :squares, [5])))}")
    IO.puts("first two: #{inspect(Enum.take(stream(ctx, :__main__, :squares, [1_000_000]), 2))}")
  end
end

#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%%
%% Churn: thousands of requests of each kind, and the memory each one leaves behind.
%% For every kind, on a fresh runtime with one context: ?WARMUP(N) requests of
%% warm-up, then the memory is read, N more requests are made and the memory is read
%% again. Printed per request, in bytes:
%%   - rss: the VmRSS of the port program (read once it stops moving);
%%   - owner: the port owner's Erlang memory (process_info memory, after a GC);
%%   - caller: the memory of the process that made the requests (after a GC);
%% and what the port program's `info' counts as open on the context afterwards
%% (`open': requests answered later, `streams', `channels').
%% A kind that leaves nothing behind reads 0 give or take the noise of a page
%% (4096 bytes / N). N is CHURN_OPS, else 20000 (a tenth of that for `timeout', whose
%% requests each wait a millisecond); CHURN_MODE=main uses a `main' context;
%% CHURN_KINDS=call,stream_cancel runs only those. `make soak' runs it.
%% Run `make build' first.
-mode(compile).
-include("bench.hrl").
-compile(nowarn_unused_function).

-define(RT, churn_rt).
-define(HELPERS, <<"import erlang, time
class Box:
    def __init__(self, v): self.v = v
    def get(self): return self.v
def back(x):
    return erlang.call('churn_echo', x)
async def later(x):
    return x
def nap(s):
    time.sleep(s)
    return s
def ping(x):
    erlang.send(erlang.self(), x)
    return x
def forever():
    i = 0
    while True:
        yield i
        i += 1
def take(name):
    return erlang.channel(name).receive(5)
">>).

main(_Args) ->
    Exe = start_pyport(),
    ok = pyport:register_function(churn_echo, fun(X) -> X end),
    Mode = case os:getenv("CHURN_MODE") of
               "main" -> main;
               _ -> owngil
           end,
    N = case os:getenv("CHURN_OPS") of
            Ops when is_list(Ops), Ops =/= "" -> list_to_integer(Ops);
            _ -> 20000
        end,
    Kinds = case os:getenv("CHURN_KINDS") of
                Ks when is_list(Ks), Ks =/= "" -> [list_to_atom(K) || K <- string:tokens(Ks, ",")];
                _ -> kinds()
            end,
    io:format("port program ~s, ~s context~n~n", [Exe, Mode]),
    io:format("~-20s ~8s ~10s ~10s ~10s   ~s~n",
              ["kind", "ops", "rss B/op", "owner B/op", "caller B/op", "open after"]),
    [row(Kind, Mode, ops(Kind, N)) || Kind <- Kinds],
    io:format("(bytes per request over the ops after ~b% of warm-up, each kind on a fresh "
              "runtime; one page of RSS is ~.1f bytes/op)~n", [25, 4096 / N]),
    halt(0).

kinds() ->
    [call, eval, exec, async_call, cast, coroutine, timeout, stream_done,
     stream_cancel_early, stream_cancel_mid, channel, channel_drained, channel_reopen,
     channel_replaced,
     env, ref, callback, send].

ops(timeout, N) -> max(100, N div 10);
ops(_, N) -> N.

row(Kind, Mode, N) ->
    {Rss, Owner, Caller, Open} = measure(Kind, Mode, N),
    io:format("~-20s ~8b ~10.1f ~10.1f ~10.1f   ~s~n",
              [Kind, N, Rss, Owner, Caller,
               lists:join(" ", [io_lib:format("~s=~w", [K, V]) || {K, V} <- lists:sort(maps:to_list(Open))])]).

%% {rss, owner, caller} in bytes per op, and what the context counts as open afterwards.
measure(Kind, Mode, N) ->
    {ok, _} = pyport:start_runtime(#{name => ?RT,
                                     contexts => [#{name => c, mode => Mode,
                                                    preload => ?HELPERS}]}),
    {ok, Ctx} = pyport:context(?RT, c),
    [{_, Owner, _, _, _}] = ets:lookup(pyport_runtimes, ?RT),
    {ok, #{os_pid := OsPid}} = pyport:info(?RT),
    Self = self(),
    Worker = spawn_link(fun() -> worker(Self, Kind, Ctx) end),
    run(Worker, max(100, N div 4)),
    Before = {settled_rss(OsPid), proc_memory(Owner), worker_memory(Worker)},
    run(Worker, N),
    After = {settled_rss(OsPid), proc_memory(Owner), worker_memory(Worker)},
    Open = open_counts(Ctx),
    unlink(Worker),
    exit(Worker, kill),
    ok = pyport:stop_runtime(?RT),
    {R0, O0, C0} = Before,
    {R1, O1, C1} = After,
    {(R1 - R0) * 1024 / N, (O1 - O0) / N, (C1 - C0) / N, Open}.

run(Worker, N) ->
    Worker ! {run, N},
    receive
        {ran, Worker} -> ok;
        {failed, Worker, Why} -> io:format("~p~n", [Why]), halt(1)
    end.

worker(Parent, Kind, Ctx) ->
    receive
        {run, N} ->
            try
                [op(Kind, Ctx, I) || I <- lists:seq(1, N)],
                sync(Ctx),
                Parent ! {ran, self()}
            catch
                C:R:St -> Parent ! {failed, self(), {Kind, C, R, St}}
            end,
            worker(Parent, Kind, Ctx);
        {memory, From} ->
            erlang:garbage_collect(),
            {memory, M} = process_info(self(), memory),
            From ! {memory, self(), M},
            worker(Parent, Kind, Ctx)
    end.

%% One request of each kind, checked.
op(call, Ctx, I) ->
    {ok, I} = pyport:call(Ctx, operator, add, [I, 0]);
op(eval, Ctx, I) ->
    {ok, I} = pyport:eval(Ctx, <<"x + 0">>, #{x => I});
op(exec, Ctx, _I) ->
    ok = pyport:exec(Ctx, <<"y = 1">>);
op(async_call, Ctx, I) ->
    {ok, I} = pyport:await(pyport:async_call(Ctx, operator, add, [I, 0]), 10000);
op(cast, Ctx, I) ->
    ok = pyport:cast(Ctx, operator, add, [I, 0]),
    paced(Ctx, I);
op(coroutine, Ctx, I) ->
    {ok, I} = pyport:call(Ctx, '__main__', later, [I]);
op(timeout, Ctx, _I) ->
    {error, timeout} = pyport:call(Ctx, '__main__', nap, [5], #{}, #{timeout => 1});
op(stream_done, Ctx, I) ->
    {ok, S} = pyport:stream(Ctx, builtins, range, [I, I + 3]),
    [I, _, _] = take_all(S, []);
op(stream_cancel_early, Ctx, I) ->
    {ok, S} = pyport:stream(Ctx, '__main__', forever, []),
    ok = pyport:stream_cancel(S),
    paced(Ctx, I);
op(stream_cancel_mid, Ctx, _I) ->
    {ok, S} = pyport:stream(Ctx, '__main__', forever, [], #{}, #{window => 4}),
    {data, 0} = pyport:stream_next(S, 10000),
    ok = pyport:stream_cancel(S);
op(channel, Ctx, I) ->
    {ok, Ch} = pyport:channel_open(Ctx, q, #{capacity => 4}),
    ok = pyport:channel_send(Ch, I),
    ok = pyport:channel_close(Ch),
    paced(Ctx, I);
op(channel_drained, Ctx, I) ->
    {ok, Ch} = pyport:channel_open(Ctx, q, #{capacity => 4}),
    ok = pyport:channel_send(Ch, I),
    {ok, I} = pyport:call(Ctx, '__main__', take, [q]),
    ok = pyport:channel_close(Ch);
op(channel_reopen, Ctx, I) ->
    {ok, Ch1} = pyport:channel_open(Ctx, q, #{capacity => 4}),
    {ok, Ch2} = pyport:channel_open(Ctx, q, #{capacity => 4}),
    ok = pyport:channel_close(Ch2),
    ok = pyport:channel_close(Ch1),
    paced(Ctx, I);
op(channel_replaced, Ctx, I) ->
    %% opened again and again under one name, never closed by Erlang
    {ok, _} = pyport:channel_open(Ctx, q, #{capacity => 4}),
    paced(Ctx, I);
op(env, Ctx, I) ->
    {ok, Env} = pyport:new_env(Ctx),
    {ok, I} = pyport:eval(Ctx, <<"x">>, #{x => I}, #{env => Env}),
    ok = pyport:drop_env(Env);
op(ref, Ctx, I) ->
    {ok, Ref} = pyport:call(Ctx, '__main__', 'Box', [I], #{}, #{return => ref}),
    {ok, I} = pyport:call_method(Ref, get, []),
    ok = pyport:release(Ref);
op(callback, Ctx, I) ->
    {ok, I} = pyport:call(Ctx, '__main__', back, [I]);
op(send, Ctx, I) ->
    {ok, I} = pyport:call(Ctx, '__main__', ping, [I]),
    receive I -> ok after 10000 -> error({no_message, I}) end.

take_all(S, Acc) ->
    case pyport:stream_next(S, 10000) of
        {data, X} -> take_all(S, [X | Acc]);
        done -> lists:reverse(Acc)
    end.

%% Requests that wait for no answer: a round trip now and then, so they do not pile up
%% in the context's queue (which is bounded).
paced(Ctx, I) ->
    I rem 256 =:= 0 andalso sync(Ctx),
    ok.

%% A round trip through the context: everything sent before it has been served.
sync(Ctx) ->
    {ok, 3} = pyport:call(Ctx, operator, add, [1, 2]).

%% The worker collects its own garbage and answers.
worker_memory(Worker) ->
    Worker ! {memory, self()},
    receive {memory, Worker, M} -> M end.

proc_memory(Pid) ->
    erlang:garbage_collect(Pid),
    {memory, M} = process_info(Pid, memory),
    M.

%% What the port program counts as open in the context (if it reports it).
open_counts(Ctx) ->
    {ok, #{contexts := [C | _]}} = pyport:info(?RT),
    _ = Ctx,
    maps:with([open, streams, channels], C).

%% VmRSS in KiB once it stops moving: three equal readings 200 ms apart, at most ~6 s.
settled_rss(OsPid) ->
    settled_rss(OsPid, rss(OsPid), 0, 30).

settled_rss(_OsPid, Kb, _Same, 0) ->
    Kb;
settled_rss(_OsPid, Kb, 2, _Left) ->
    Kb;
settled_rss(OsPid, Kb, Same, Left) ->
    timer:sleep(200),
    case rss(OsPid) of
        Kb -> settled_rss(OsPid, Kb, Same + 1, Left - 1);
        New -> settled_rss(OsPid, New, 0, Left - 1)
    end.

rss(OsPid) ->
    {ok, Status} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    {match, [Kb]} = re:run(Status, "VmRSS:\\s+(\\d+) kB", [{capture, all_but_first, binary}]),
    binary_to_integer(Kb).

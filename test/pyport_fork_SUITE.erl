%% @doc fork() without exec from Python. In a `main' context a forked child is a working
%% Python, as in plain CPython (os.fork, multiprocessing's fork start method,
%% subprocess's preexec_fn), that never writes to the protocol's pipes and ends when it
%% returns from its request; in an `owngil' context CPython itself refuses fork and
%% preexec_fn (a sub-interpreter restriction), with its own errors.
-module(pyport_fork_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_fork_rt).
%% Every request of the suite gets this deadline: a hang fails the case, it is not
%% waited for.
-define(OPTS, #{timeout => 30000}).

-define(HELPERS, <<"
import asyncio, os, sys, multiprocessing, subprocess

def square(x):
    return x * x

def in_child(code):
    '''Forks; the child runs `code` (a function of the write end of a pipe) and
    _exits 0; returns what the child wrote and its exit code.'''
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            code(w)
        finally:
            os._exit(0)
    os.close(w)
    data = b''
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    return data, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def compute():
    return in_child(lambda w: os.write(w, str(sum(range(1000))).encode()))

def pipes():
    '''The descriptors above 2 of this process that are pipes.'''
    found = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            if int(fd) > 2 and os.readlink('/proc/self/fd/' + fd).startswith('pipe:'):
                found.append(int(fd))
        except OSError:
            pass
    return sorted(found)

def child_pipes():
    '''The pipes the parent has besides the test's own, and those the child has.'''
    mine = pipes()
    def code(w):
        os.write(w, repr([fd for fd in pipes() if fd != w]).encode())
    data, status = in_child(code)
    return mine, eval(data), status

def child_reaches_erlang():
    def code(w):
        try:
            import erlang
            erlang.call('pyport_fork_echo', 1)
            os.write(w, b'returned')
        except RuntimeError as e:
            os.write(w, str(e).encode())
    return in_child(code)

def fork_and_return(how):
    '''The child does not _exit: it returns from the request, which ends it.'''
    pid = os.fork()
    if pid == 0:
        print('the child prints')
        if how == 'exit':
            raise SystemExit(5)
        if how == 'raise':
            raise ValueError('in the child')
        return 'child'
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

async def fork_in_task(how):
    '''The child does not _exit: it goes back into the context's loop, which ends it.'''
    pid = os.fork()
    if pid == 0:
        if how == 'exit':
            raise SystemExit(5)
        if how == 'raise':
            raise ValueError('in the child')
        if how == 'await':
            await asyncio.sleep(0)
            os._exit(7)  # went on after the await: it should have ended before
        return 'child'
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def child_dies_of(signum):
    '''The child sends itself `signum`; its exit code as waitpid gives it.'''
    import signal
    pid = os.fork()
    if pid == 0:
        try:
            os.kill(os.getpid(), signum)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

def fork_pool(n):
    with multiprocessing.get_context('fork').Pool(2) as pool:
        return pool.map(square, range(n))

def preexec():
    return subprocess.run(['pwd'], preexec_fn=lambda: os.chdir('/'),
                          cwd='/tmp', capture_output=True, timeout=20).stdout

def spawn_pool(n):
    with multiprocessing.get_context('spawn').Pool(2) as pool:
        return pool.map(abs, range(-n, 0))

def refused(f):
    try:
        f()
        return 'no error'
    except Exception as e:
        return (type(e).__name__, str(e))

def fork_refused():
    return refused(os.fork)

def preexec_refused():
    return refused(lambda: subprocess.run(['true'], preexec_fn=lambda: None))

def fork_pool_refused():
    return refused(lambda: fork_pool(2))

def process_pool_refused(method):
    '''A ProcessPoolExecutor on spawn or forkserver: its call queue's feeder thread is a
    daemon thread, which CPython refuses; the pool reports that as its cause.'''
    import concurrent.futures
    ctx = multiprocessing.get_context(method)
    try:
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
            pool.submit(abs, -1).result(timeout=20)
        return 'no error'
    except Exception as e:
        cause = e.__cause__
        lines = [l for l in str(cause).splitlines() if l.strip() not in ('', chr(39) * 3)]
        return (type(e).__name__, lines[-1] if lines else None)
">>).

all() ->
    [{group, main}, {group, owngil}].

groups() ->
    [{main, [], [fork_child_computes, fork_child_has_no_protocol_pipes,
                 fork_child_cannot_reach_erlang, fork_child_ends_with_its_request,
                 fork_child_dies_of_sigsegv, fork_child_ends_with_its_task,
                 multiprocessing_fork_pool, subprocess_preexec_fn,
                 multiprocessing_spawn_pool]},
     {owngil, [], [fork_refused, preexec_fn_refused, multiprocessing_fork_refused,
                   process_pool_executor_refused]}].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    %% Both modes in one runtime: the owngil contexts (and the router's spare) are the
    %% sub-interpreters that made every forked child of a main context die.
    {ok, _} = pyport:start_runtime(#{name => ?RUNTIME,
                                     contexts => [#{name => main, mode => main,
                                                    preload => ?HELPERS},
                                                  #{name => owngil, mode => owngil,
                                                    preload => ?HELPERS}]}),
    ok = pyport:register_function(pyport_fork_echo, fun(X) -> X end),
    [{os_pid, pyport_ct:os_pid(?RUNTIME)} | Config].

end_per_suite(_Config) ->
    _ = pyport:unregister_function(pyport_fork_echo),
    _ = pyport:stop_runtime(?RUNTIME),
    pyport_ct:stop_app().

init_per_group(Mode, Config) ->
    {ok, Ctx} = pyport:context(?RUNTIME, Mode),
    [{ctx, Ctx} | Config].

end_per_group(_Mode, _Config) ->
    ok.

%% No case may cost the runtime its OS process, nor leave a message behind (a child's
%% reply or output reaching Erlang would).
end_per_testcase(_Case, Config) ->
    ?assertEqual({ok, 2}, pyport:eval(?config(ctx, Config), <<"1 + 1">>)),
    ?assertEqual(?config(os_pid, Config), pyport_ct:os_pid(?RUNTIME)),
    {ok, #{restarts := 0}} = pyport:info(?RUNTIME),
    pyport_ct:assert_no_messages().

call(Config, Fun, Args) ->
    pyport:call(?config(ctx, Config), '__main__', Fun, Args, #{}, ?OPTS).

%%% main

%% The child computes and exits 0; the parent reads its result.
fork_child_computes(Config) ->
    ?assertEqual({ok, {<<"499500">>, 0}}, call(Config, compute, [])).

%% The child keeps none of the port's pipes (the parent has them: the listing sees them).
fork_child_has_no_protocol_pipes(Config) ->
    {ok, {Parent, Child, 0}} = call(Config, child_pipes, []),
    ?assertMatch([_, _ | _], Parent),
    ?assertEqual([], Child).

%% erlang.call in the child raises at once (no router carries a reply back there).
fork_child_cannot_reach_erlang(Config) ->
    ?assertEqual({ok, {<<"a forked child of a pyport context cannot reach Erlang">>, 0}},
                 call(Config, child_reaches_erlang, [])).

%% A child that returns from the request ends there, as a plain Python child ends at the
%% end of its script: 0, the code of a SystemExit, 1 for an exception. Only the
%% parent's reply arrives (end_per_testcase checks the mailbox).
fork_child_ends_with_its_request(Config) ->
    ?assertEqual({ok, 0}, call(Config, fork_and_return, [<<"return">>])),
    ?assertEqual({ok, 5}, call(Config, fork_and_return, [<<"exit">>])),
    ?assertEqual({ok, 1}, call(Config, fork_and_return, [<<"raise">>])).

%% A child that raises SIGSEGV or SIGBUS dies of it, as under plain CPython (the port
%% program's Rust runtime had a handler for both that returned: the child exited 0).
fork_child_dies_of_sigsegv(Config) ->
    ?assertEqual({ok, -11}, call(Config, child_dies_of, [11])),
    ?assertEqual({ok, -7}, call(Config, child_dies_of, [7])).

%% A child forked by a task of the context's loop ends when it is back in the loop, at
%% the end of the loop's step that forked it, with its task's outcome if the task ended
%% there. It hung before (the child went back to waiting on the context's wake pipe and
%% its parent in waitpid), unless a job happened to be queued at the fork. Repeated:
%% the hang came and went with that.
fork_child_ends_with_its_task(Config) ->
    [?assertEqual({ok, 0}, call(Config, fork_in_task, [<<"return">>])) || _ <- lists:seq(1, 10)],
    ?assertEqual({ok, 5}, call(Config, fork_in_task, [<<"exit">>])),
    ?assertEqual({ok, 1}, call(Config, fork_in_task, [<<"raise">>])),
    %% a task that awaits after the fork does not go on in the child
    ?assertEqual({ok, 0}, call(Config, fork_in_task, [<<"await">>])).

%% multiprocessing's fork start method (the Linux default on 3.12 and 3.13).
multiprocessing_fork_pool(Config) ->
    ?assertEqual({ok, [X * X || X <- lists:seq(0, 19)]}, call(Config, fork_pool, [20])).

%% preexec_fn runs in the forked child before exec.
subprocess_preexec_fn(Config) ->
    ?assertEqual({ok, <<"/\n">>}, call(Config, preexec, [])).

%% spawn worked before; it still does.
multiprocessing_spawn_pool(Config) ->
    ?assertEqual({ok, [3, 2, 1]}, call(Config, spawn_pool, [3])).

%%% owngil: CPython refuses fork in an isolated sub-interpreter

fork_refused(Config) ->
    ?assertEqual({ok, {<<"RuntimeError">>, <<"fork not supported for isolated subinterpreters">>}},
                 call(Config, fork_refused, [])).

preexec_fn_refused(Config) ->
    ?assertEqual({ok, {<<"RuntimeError">>, <<"preexec_fn not supported within subinterpreters">>}},
                 call(Config, preexec_refused, [])).

multiprocessing_fork_refused(Config) ->
    ?assertEqual({ok, {<<"RuntimeError">>, <<"fork not supported for isolated subinterpreters">>}},
                 call(Config, fork_pool_refused, [])).

%% concurrent.futures' ProcessPoolExecutor with spawn or forkserver breaks at its first
%% task: multiprocessing.Queue feeds its pipe from a daemon thread, which an isolated
%% sub-interpreter refuses. The pool says so in its error's cause (77 tests of CPython's
%% test_concurrent_futures, docs/cpython-suite.md). A `main' context runs such pools.
process_pool_executor_refused(Config) ->
    Refused = {ok, {<<"BrokenProcessPool">>,
                    <<"RuntimeError: daemon threads are disabled in this (sub)interpreter">>}},
    ?assertEqual(Refused, call(Config, process_pool_refused, [<<"spawn">>])),
    ?assertEqual(Refused, call(Config, process_pool_refused, [<<"forkserver">>])).

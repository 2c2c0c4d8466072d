%% @doc Starting and stopping the linked processes pyport's own processes keep
%% themselves (a runtime its port owner, a pool its member runtimes): a failed start
%% that leaves no crash report and no stray exit, and a stop that returns once every
%% process is gone. No process.
-module(pyport_linked).

-export([quiet_start/1]).
-export([stop/1]).

%% How long a process stopped with stop/1 may take to end before it is killed: within
%% the supervisors' shutdown time (pyport_runtime, pyport_pool), and longer than a port
%% owner takes to stop its OS process (pyport_port's ?EXIT_GRACE, twice).
-define(STOP_WAIT, 5000).

%% @doc A process that fails to start exits with `{shutdown, Reason}' (no crash
%% report for a failure its starter is told of); the starter gets `{error, Reason}'.
%% A starter that traps exits also has the failed process's exit taken out of its
%% mailbox when it has come: only that one (same reason), never another linked
%% process's, which the starter must still see. One that comes later is the starter's
%% to ignore.
-spec quiet_start({ok, pid()} | {error, term()}) -> {ok, pid()} | {error, term()}.
quiet_start({error, {shutdown, Reason}}) ->
    receive {'EXIT', _, {shutdown, Reason}} -> ok after 0 -> ok end,
    {error, Reason};
quiet_start({error, Reason} = Error) ->
    receive {'EXIT', _, Reason} -> ok after 0 -> ok end,
    Error;
quiet_start(Started) ->
    Started.

%% @doc Stops linked processes that trap exits (port owners, runtimes): asks each to
%% stop (`shutdown') at once, then waits for their exits; one that takes longer than
%% ?STOP_WAIT is killed. Returns once all are gone. The caller traps exits. `undefined'
%% in the list (no process) is passed over.
-spec stop([pid() | undefined]) -> ok.
stop(Pids0) ->
    Pids = [Pid || Pid <- Pids0, is_pid(Pid)],
    lists:foreach(fun(Pid) -> exit(Pid, shutdown) end, Pids),
    Deadline = erlang:monotonic_time(millisecond) + ?STOP_WAIT,
    lists:foreach(fun(Pid) ->
                      receive
                          {'EXIT', Pid, _} -> ok
                      after max(0, Deadline - erlang:monotonic_time(millisecond)) ->
                          exit(Pid, kill),
                          receive {'EXIT', Pid, _} -> ok end
                      end
                  end, Pids).

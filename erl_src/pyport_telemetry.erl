%% @doc `[pyport, call, start | stop | exception]' events for call, eval and exec,
%% through the `telemetry' library when its module is loaded, and nothing otherwise:
%% pyport does not depend on it.
%%
%% Measurements: `start' has `monotonic_time' and `system_time'; `stop' and `exception'
%% have `duration' and `monotonic_time' (native time units, as telemetry:span/3 gives).
%% Metadata: `runtime' (the runtime key), `context' (the context id), `op' (`call',
%% `eval' or `exec'), `module' and `function' for calls, and `telemetry_span_context'.
%% A call answered `{ok, _}' or `ok' ends with `stop' (with `result => ok'); one answered
%% `{error, Reason}' ends with `exception' with `kind => error', `reason => Reason' and
%% an empty `stacktrace', so handlers written for telemetry:span/3 work unchanged. A
%% call that raises (bad arguments) ends with `exception' too, and the error goes on.
-module(pyport_telemetry).

-export([enabled/0]).
-export([span/2]).

-define(EVENT, [pyport, call]).

%% @doc Whether the `telemetry' module is loaded (callers check this first, so a call
%% builds no metadata when nobody listens).
-spec enabled() -> boolean().
enabled() ->
    erlang:function_exported(telemetry, execute, 3).

%% @doc Runs Fun() between the events.
-spec span(map(), fun(() -> Result)) -> Result.
span(Meta, Fun) ->
    traced(Meta#{telemetry_span_context => make_ref()}, Fun).

traced(Meta, Fun) ->
    Start = erlang:monotonic_time(),
    execute(start, #{monotonic_time => Start, system_time => erlang:system_time()}, Meta),
    try Fun() of
        {error, Reason} = Error ->
            ended(exception, Start, Meta#{kind => error, reason => Reason, stacktrace => []}),
            Error;
        Result ->
            ended(stop, Start, Meta#{result => ok}),
            Result
    catch
        Class:Reason:Stack ->
            ended(exception, Start, Meta#{kind => Class, reason => Reason, stacktrace => Stack}),
            erlang:raise(Class, Reason, Stack)
    end.

ended(Event, Start, Meta) ->
    Now = erlang:monotonic_time(),
    execute(Event, #{duration => Now - Start, monotonic_time => Now}, Meta).

%% A crashing handler is telemetry's to detach; a telemetry unloaded meanwhile is no
%% reason to fail the call.
execute(Event, Measurements, Meta) ->
    try
        telemetry:execute(?EVENT ++ [Event], Measurements, Meta)
    catch
        error:undef -> ok
    end.

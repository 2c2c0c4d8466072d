%% @doc Malformed frames written straight to the port: each one that carries a header
%% gets an error reply, the others are logged, and the runtime keeps serving.
-module(pyport_protocol_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-compile(export_all).
-compile(nowarn_export_all).

-define(RUNTIME, pyport_protocol_rt).
-define(CTX_ID, 1).
-define(REPLY_TIMEOUT, 5000).

all() ->
    [random_bytes_body, random_frames, truncated_body, wrong_shape, opts_not_a_map, wrong_shape_control,
     huge_list_header, trailing_bytes, short_frames, header_longer_than_frame,
     unknown_context, valid_frame_by_hand].

init_per_suite(Config) ->
    ok = pyport_ct:start_app(),
    {ok, Pid} = pyport:start_runtime(#{name => ?RUNTIME, contexts => [#{name => a}]}),
    {ok, Ctx} = pyport:context(?RUNTIME, a),
    [{ctx, Ctx}, {runtime_pid, Pid}, {os_pid, pyport_ct:os_pid(?RUNTIME)} | Config].

end_per_suite(_Config) ->
    _ = pyport:stop_runtime(?RUNTIME),
    pyport_ct:stop_app().

init_per_testcase(_Case, Config) ->
    Config.

%% After every case: the same runtime (owner and OS process) still answers calls.
end_per_testcase(_Case, Config) ->
    ?assertEqual({ok, 3}, pyport:call(?config(ctx, Config), operator, add, [1, 2])),
    ?assertEqual(?config(runtime_pid, Config), whereis(?RUNTIME)),
    ?assertEqual(?config(os_pid, Config), pyport_ct:os_pid(?RUNTIME)),
    flush_logs(),
    pyport_ct:assert_no_messages().

%% Helpers

port() ->
    pyport_ct:runtime_port(?RUNTIME).

%% Sends Body to context CtxId with a header naming a fresh alias; returns the decoded
%% reply payload.
request(CtxId, Body) ->
    Alias = alias(),
    H = term_to_binary(Alias),
    true = erlang:port_command(port(), [<<CtxId:64, (byte_size(H)):16>>, H, Body]),
    receive
        {Alias, Payload} ->
            _ = unalias(Alias),
            binary_to_term(Payload)
    after ?REPLY_TIMEOUT ->
        _ = unalias(Alias),
        ct:fail({no_reply, CtxId, Body})
    end.

call_body(Args) ->
    term_to_binary({call, <<"operator">>, <<"add">>, Args, #{}, #{}}).

%% Random bytes that are not an ETF term (the version byte is never 131).
random_body(Size) ->
    case rand:bytes(Size) of
        <<131, Rest/binary>> -> <<130, Rest/binary>>;
        Bytes -> Bytes
    end.

%% Waits for a logger event of the pyport domain (the runtime logs what it cannot answer).
await_log() ->
    receive
        {pyport_log, Level, Message} -> {Level, Message}
    after ?REPLY_TIMEOUT ->
        ct:fail(no_log_event)
    end.

%%% Cases

random_bytes_body() ->
    [{doc, "A body of random bytes gets {error, {bad_term, _}}, to a context and to 0."}].
random_bytes_body(_Config) ->
    assert_bad_terms(?CTX_ID, [random_body(Size) || Size <- [1, 2, 7, 100, 4096]] ++ [<<>>]),
    assert_bad_terms(0, [random_body(Size) || Size <- [1, 100]]).

random_frames() ->
    [{doc, "Whole frames of random bytes (random ids and header lengths) never break "
           "the runtime."}].
random_frames(_Config) ->
    pyport_ct:forward_logs(),
    Port = port(),
    rand:seed(exsss, {1, 2, 3}),
    [true = erlang:port_command(Port, rand:bytes(rand:uniform(300) - 1))
     || _ <- lists:seq(1, 2000)],
    %% a round trip through the control channel after the garbage: everything before
    %% it has been read
    {ok, _} = pyport:info(?RUNTIME),
    pyport_ct:stop_forwarding_logs(),
    flush_logs().

flush_logs() ->
    receive
        {pyport_log, _, _} -> flush_logs()
    after 0 ->
        ok
    end.

truncated_body() ->
    [{doc, "A truncated ETF body gets {error, {bad_term, _}}."}].
truncated_body(_Config) ->
    Full = call_body([1, 2]),
    assert_bad_terms(?CTX_ID, [binary:part(Full, 0, Len)
                               || Len <- [1, 2, 3, byte_size(Full) div 2, byte_size(Full) - 1]]),
    assert_bad_terms(0, [binary:part(term_to_binary(info), 0, 3)]).

wrong_shape() ->
    [{doc, "Valid ETF that is no request gets {error, {bad_request, _}}."}].
wrong_shape(_Config) ->
    assert_bad_requests(?CTX_ID, [{hello, world}, foo, [1, 2], #{call => 1},
                                  {call, <<"m">>, <<"f">>},
                                  {call, <<"operator">>, <<"add">>, not_a_list, #{}, #{}},
                                  {call, <<"operator">>, <<"add">>, [1, 2], not_a_map, #{}},
                                  {call, 1, 2, [], #{}, #{}},
                                  {eval, <<"1">>}, {eval, <<"1">>, not_a_map, #{}},
                                  {exec, 42, #{}}]).

opts_not_a_map() ->
    [{doc, "A request whose Opts is not a map gets {error, {bad_request, _}}."}].
opts_not_a_map(_Config) ->
    assert_bad_requests(?CTX_ID, [{call, <<"operator">>, <<"add">>, [1, 2], #{}, not_a_map},
                                  {eval, <<"1">>, #{}, not_a_map},
                                  {exec, <<"1">>, not_a_map}]).

wrong_shape_control() ->
    [{doc, "A control request (context 0) of the wrong shape gets {bad_request, _}."}].
wrong_shape_control(_Config) ->
    assert_bad_requests(0, [foo, {new_context}, {new_context, x, #{}}, {new_context, 0, #{}},
                            {new_context, 7, #{mode => weird}}, {new_context, 8, not_a_map},
                            {stop_context, <<"x">>}, {info, 1},
                            {call, <<"operator">>, <<"add">>, [1, 2], #{}, #{}}]).

%% Fails with every body that did not get {error, {bad_request, _}}, and what it got.
assert_bad_requests(CtxId, Terms) ->
    Replies = [{Term, request(CtxId, term_to_binary(Term))} || Term <- Terms],
    case [R || {_, Reply} = R <- Replies, not is_bad_request(Reply)] of
        [] -> ok;
        Wrong -> ct:fail({not_bad_request, Wrong})
    end.

is_bad_request({error, {bad_request, _}}) -> true;
is_bad_request(_) -> false.

huge_list_header() ->
    [{doc, "An ETF list header claiming 2^32 elements gets {bad_term, _} without a "
           "huge allocation; so do a binary, a tuple, a map and a string claiming more "
           "than there is."}].
huge_list_header(_Config) ->
    assert_bad_terms(?CTX_ID, [<<131, 108, 255, 255, 255, 255>>,
                               <<131, 104, 6, 100, 0, 4, "call", 108, 255, 255, 255, 255>>,
                               <<131, 109, 255, 255, 255, 255, 1>>,
                               <<131, 105, 255, 255, 255, 255>>,
                               <<131, 116, 255, 255, 255, 255>>,
                               <<131, 107, 255, 255, 1>>]).

trailing_bytes() ->
    [{doc, "Bytes after a valid term make the body invalid: {bad_term, _}."}].
trailing_bytes(_Config) ->
    assert_bad_terms(?CTX_ID, [<<(call_body([1, 2]))/binary, 0>>,
                               <<(call_body([1, 2]))/binary, (call_body([3, 4]))/binary>>]),
    assert_bad_terms(0, [<<(term_to_binary(info))/binary, 1, 2>>]).

%% Fails with every body that did not get {error, {bad_term, _}}, and what it got.
assert_bad_terms(CtxId, Bodies) ->
    Replies = [{Body, request(CtxId, Body)} || Body <- Bodies],
    case [R || {_, Reply} = R <- Replies, not is_bad_term(Reply)] of
        [] -> ok;
        Wrong -> ct:fail({not_bad_term, Wrong})
    end.

is_bad_term({error, {bad_term, _}}) -> true;
is_bad_term(_) -> false.

short_frames() ->
    [{doc, "Frames shorter than the fixed header cannot be answered: they are logged "
           "and skipped."}].
short_frames(_Config) ->
    pyport_ct:forward_logs(),
    Port = port(),
    lists:foreach(fun(Frame) ->
                      true = erlang:port_command(Port, Frame),
                      {_Level, Message} = await_log(),
                      ct:log("~p -> ~ts", [Frame, Message])
                  end, [<<>>, <<1>>, <<0:64>>, <<1:64, 0>>]),
    pyport_ct:stop_forwarding_logs().

header_longer_than_frame() ->
    [{doc, "A header length past the end of the frame is logged and skipped."}].
header_longer_than_frame(_Config) ->
    pyport_ct:forward_logs(),
    true = erlang:port_command(port(), <<?CTX_ID:64, 500:16, 1, 2, 3>>),
    {_Level, Message} = await_log(),
    ct:log("~ts", [Message]),
    pyport_ct:stop_forwarding_logs().

unknown_context() ->
    [{doc, "A request to a context that does not exist gets {context_down, _}."}].
unknown_context(_Config) ->
    ?assertMatch({error, {context_down, _}}, request(987654321, call_body([1, 2]))),
    ?assertMatch({error, {context_down, _}}, request(16#FFFFFFFFFFFFFFFF, call_body([1, 2]))).

valid_frame_by_hand() ->
    [{doc, "A well-formed frame written by hand gets its reply, with a pid as header."}].
valid_frame_by_hand(_Config) ->
    ?assertEqual({ok, 3}, request(?CTX_ID, call_body([1, 2]))),
    H = term_to_binary(self()),
    true = erlang:port_command(port(), [<<?CTX_ID:64, (byte_size(H)):16>>, H,
                                        call_body([20, 22])]),
    Self = self(),
    receive {Self, Payload} -> ?assertEqual({ok, 42}, binary_to_term(Payload))
        after 60000 -> ct:fail({no_message, ?LINE}) end.

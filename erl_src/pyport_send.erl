%% @doc Python sending messages: `erlang.send(Dest, Msg)' (frames of kind 3), with its
%% back-pressure. The port owner delivers them itself (through deliver/5), so the
%% messages of one Python sender arrive in the order they were sent; the `sends()'
%% kept here live in its state (a process of their own would add a hop to each send).
%% No process of its own.
%%
%% A name that is not registered (or not even an atom) drops the message, as `!' to a
%% dead pid would. Python numbers its destinations (DestId). A local process with
%% `max_mailbox' messages queued is busy: the message is dropped (and counted), the
%% context is told once (`send_busy'), and its sends to that destination raise
%% `erlang.Busy' until check_busy/2 clears it (`send_clear'); sends already on their
%% way meanwhile are dropped and counted.
-module(pyport_send).

-export([new/1]).
-export([deliver/5]).
-export([check_busy/2]).
-export([dropped/1]).
-export([destination/1]).

-export_type([sends/0]).

%% How often a destination refused for a full mailbox is looked at again.
-define(BUSY_CHECK_MS, 10).

-record(sends, {
    max_mailbox :: pos_integer(),
    %% the destinations refused now, by context and Python's number for them
    busy = #{} :: #{{non_neg_integer(), non_neg_integer()} => pid()},
    dropped = 0 :: non_neg_integer()
}).
-opaque sends() :: #sends{}.

%% @doc No destination busy, none dropped yet.
-spec new(pos_integer()) -> sends().
new(MaxMailbox) ->
    #sends{max_mailbox = MaxMailbox}.

%% @doc How many sends were dropped (for info/1's `sends_dropped').
-spec dropped(sends()) -> non_neg_integer().
dropped(#sends{dropped = Dropped}) ->
    Dropped.

%% @doc Delivers one `erlang.send' frame's payload. While some destination is busy,
%% the calling process (the port owner) gets `check_busy' every ?BUSY_CHECK_MS and
%% passes it to check_busy/2.
-spec deliver(binary(), {boolean(), non_neg_integer()}, pyport_table:key(), port(),
              sends()) -> sends().
deliver(Payload, Safe, Key, Port, #sends{max_mailbox = MaxMailbox, busy = Busy,
                                         dropped = Dropped} = S) ->
    case pyport_atoms:decode(Payload, Safe) of
        {error, _} ->
            S;  % atoms past the budget: dropped (the port owner logged it once)
        {ok, {Ctx, DestId, Dest, Msg}} when is_integer(Ctx), is_integer(DestId) ->
            case destination(Dest) of
                undefined ->
                    S;
                _ when is_map_key({Ctx, DestId}, Busy) ->
                    S#sends{dropped = Dropped + 1};
                To ->
                    case mailbox_len(To) >= MaxMailbox of
                        true ->
                            _ = pyport_call:cast_request(Port, Ctx, {send_busy, DestId}),
                            map_size(Busy) =:= 0 andalso
                                erlang:send_after(?BUSY_CHECK_MS, self(), check_busy),
                            S#sends{busy = Busy#{{Ctx, DestId} => To},
                                    dropped = Dropped + 1};
                        false ->
                            send_message(To, Msg),
                            S
                    end
            end;
        {ok, Other} ->
            logger:warning("pyport runtime ~p: malformed send from the port: ~P",
                           [Key, Other, 20], #{domain => [pyport]}),
            S
    end.

%% @doc Every ?BUSY_CHECK_MS while some destination is busy: one whose queue is down to
%% half the bound, or whose process is gone, is cleared.
-spec check_busy(port(), sends()) -> sends().
check_busy(Port, #sends{busy = Busy, max_mailbox = MaxMailbox} = S) ->
    Still = maps:filter(fun({Ctx, DestId}, To) ->
                                case mailbox_len(To) > MaxMailbox div 2 of
                                    true ->
                                        true;
                                    false ->
                                        _ = pyport_call:cast_request(Port, Ctx,
                                                                     {send_clear, DestId}),
                                        false
                                end
                        end, Busy),
    map_size(Still) > 0 andalso erlang:send_after(?BUSY_CHECK_MS, self(), check_busy),
    S#sends{busy = Still}.

%% @doc A pid, or the pid registered under an existing atom (a name never makes an
%% atom); `undefined' for anything else.
-spec destination(term()) -> pid() | port() | undefined.
destination(Dest) when is_pid(Dest) ->
    Dest;
destination(Dest) when is_atom(Dest) ->
    whereis(Dest);
destination(Dest) when is_binary(Dest) ->
    try binary_to_existing_atom(Dest, utf8) of
        Name -> whereis(Name)
    catch
        error:badarg -> undefined
    end;
destination(_) ->
    undefined.

%% The queue of a local process (0 once it is gone, and for a remote one: its node
%% bounds what it takes in).
mailbox_len(Pid) when node(Pid) =:= node() ->
    case erlang:process_info(Pid, message_queue_len) of
        {message_queue_len, N} -> N;
        undefined -> 0
    end;
mailbox_len(_Pid) ->
    0.

send_message(Dest, Msg) ->
    try
        _ = erlang:send(Dest, Msg, [noconnect]),
        ok
    catch
        error:badarg -> ok
    end.

%% The pool's row in the `pyport_runtimes' table, written by its process (pyport_pool)
%% and read by every caller (pyport_dispatch), and the states of a member.

%% The row callers read: members as a tuple of `{RuntimeKey, ContextName}' (this node:
%% the context is found by name, so a member replaced or restarted is found again) or
%% `{remote, Node, Index, member()}' (the Index-th member of the pool's part on Node),
%% and atomics arrays
%% indexed by member: in flight, state, served (slot Size + 1 of `load' rotates ties).
-record(row, {name :: atom(),
              members :: tuple(),
              load :: atomics:atomics_ref(),
              state :: atomics:atomics_ref(),
              served :: atomics:atomics_ref(),
              max_requests :: pos_integer() | infinity,
              %% how long a request without a `timeout' waits for a member being replaced
              call_timeout :: timeout(),
              pid :: pid()}).

%% a member's state (the row's `state' array)
-define(READY, 0).
-define(DRAINING, 1).
%% a member on a node that is down (or whose pyport is not running yet)
-define(DOWN, 2).

//! pyport: a port program that runs Python for Erlang, one OS process per runtime.
//!
//! # Layout
//!
//! - [`startup`]: command line, fd hygiene, Python start, the hello frame; `main` calls it.
//! - [`keeper`]: the first process, which forks the worker, holds stdin while the port
//!   lives and reports how the worker ended (`{exited, Status}`).
//! - [`framing`]: `{packet,4}` frames in (incremental, non-blocking) and out.
//! - [`etf`]: External Term Format reader/writer and a small `Term` tree for control.
//! - [`router`]: the router thread: stdin frames -> context mailboxes; control requests.
//! - [`request`]: a request decoded once (its typed op, options), jobs, context specs.
//! - [`context`]: context threads, one interpreter each, and their bounded mailboxes.
//! - [`session`]: what a context does with a request: call, eval, exec, envs, handles,
//!   streams; coroutine results become tasks.
//! - [`event_loop`]: the one wait of a context thread (its poller) and the asyncio loop
//!   it drives between requests: fds, timers, tasks, streams, async callbacks.
//! - [`poller`]: a context thread's epoll and waker, on fds above the ones Python opens.
//! - [`fork`]: what a child forked without `exec` keeps of pyport (nothing that
//!   reaches Erlang), and CPython's after-fork code made safe with sub-interpreters.
//! - [`atoms`]: `max_atoms`, the budget of atoms Python may create in the node.
//! - [`channel`]: channels Erlang feeds and Python reads, per context.
//! - [`erlang_module`]: the `erlang` module in every interpreter: callbacks, send, output;
//!   the context thread's one thread-local, for the functions Python calls.
//! - [`convert`]: Erlang terms <-> Python objects, straight from and to ETF bytes.
//! - [`python`]: CPython lifecycle through `pyo3::ffi` (main and OWN_GIL interpreters).
//! - [`pyerr`]: Python exceptions as `{python, Type, Message, Traceback}`.
//! - [`memory`]: `max_memory`, the bound on the process's resident memory.
//! - [`watchdog`]: request deadlines; interrupts Python code that runs past them.
//! - [`writer`]: the shared, batching writer of outbound frames.
//! - [`error`]: errors as the Erlang caller sees them.
//! - [`sync`]: locks taken as they are after a panic (`Unpoison`).
//!
//! The wire grammar is in `docs/protocol.md`; the architecture in `docs/architecture.md`.

/// The environment variable that turns on pyport's test hooks (for its own tests; a
/// runtime's `env` sets it for its OS process). With `PYPORT_TEST_HOOKS=1`:
/// - `_pyport._test_panic_outside_request()` exists: the context thread panics right
///   after the running request is answered, in the loop's own code, which no request's
///   panic guard covers (as a bug there would);
/// - the watchdog (at a deadline) and `pyport:interrupt/1` wait 20 ms between deciding
///   to stop a request and queuing the interrupt on its interpreter, which widens the
///   window in which the context may end its interpreter meanwhile (the race
///   `watchdog::Deadline::unbind_thread` closes).
pub const TEST_HOOKS: &str = "PYPORT_TEST_HOOKS";

/// Whether [`TEST_HOOKS`] is on (read once).
pub fn test_hooks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(TEST_HOOKS).is_some_and(|v| v == "1"))
}

pub mod atoms;
pub mod channel;
pub mod context;
pub mod convert;
pub mod erlang_module;
pub mod error;
pub mod etf;
pub mod event_loop;
pub mod fork;
pub mod framing;
pub mod keeper;
pub mod memory;
pub mod poller;
pub mod pyerr;
pub mod python;
pub mod request;
pub mod router;
pub mod session;
pub mod startup;
pub mod sync;
pub mod watchdog;
pub mod writer;

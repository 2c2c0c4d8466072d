//! pyport: a port program that runs Python for Erlang, one OS process per runtime.
//!
//! # Layout
//!
//! - [`startup`]: command line, fd hygiene, Python start, the hello frame; `main` calls it.
//! - [`framing`]: `{packet,4}` frames in (incremental, non-blocking) and out.
//! - [`etf`]: External Term Format reader/writer and a small `Term` tree for control.
//! - [`router`]: the router thread: stdin frames -> context mailboxes; control requests.
//! - [`request`]: a request decoded once (op, parts, options), jobs, context specs.
//! - [`context`]: context threads, one interpreter each, and their bounded mailboxes.
//! - [`session`]: what a context does with a request: call, eval, exec, envs, handles,
//!   streams; coroutine results become tasks.
//! - [`event_loop`]: the one wait of a context thread (mio poll) and the asyncio loop
//!   it drives between requests: fds, timers, tasks, streams, async callbacks.
//! - [`fork`]: what a child forked without `exec` keeps of pyport (nothing that
//!   reaches Erlang), and CPython's after-fork code made safe with sub-interpreters.
//! - [`atoms`]: `max_atoms`, the budget of atoms Python may create in the node.
//! - [`channel`]: channels Erlang feeds and Python reads, per context.
//! - [`erlang_module`]: the `erlang` module in every interpreter: callbacks, send, output.
//! - [`convert`]: Erlang terms <-> Python objects, straight from and to ETF bytes.
//! - [`python`]: CPython lifecycle through `pyo3::ffi` (main and OWN_GIL interpreters).
//! - [`pyerr`]: Python exceptions as `{python, Type, Message, Traceback}`.
//! - [`memory`]: `max_memory`, the bound on the process's resident memory.
//! - [`watchdog`]: request deadlines; interrupts Python code that runs past them.
//! - [`writer`]: the shared, batching writer of outbound frames.
//! - [`error`]: errors as the Erlang caller sees them.
//!
//! The wire grammar is in `docs/protocol.md`; the architecture in `docs/architecture.md`.

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
pub mod memory;
pub mod pyerr;
pub mod python;
pub mod request;
pub mod router;
pub mod session;
pub mod startup;
pub mod watchdog;
pub mod writer;

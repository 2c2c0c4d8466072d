//! A `fork()` without `exec` (`os.fork()` and `multiprocessing`'s fork start method in a
//! `main` context, `subprocess` with `preexec_fn`, a C library): what the child keeps of
//! pyport, set right after the fork by a `pthread_atfork` child handler, which runs in
//! the child before CPython's own `PyOS_AfterFork_Child`.
//!
//! - The protocol's pipes become /dev/null in the child: it can neither write frames
//!   into the parent's stream nor keep the port's pipes open after the parent is gone,
//!   and the descriptor numbers stay taken, so no file the child opens later gets them.
//! - [`in_child`] turns true: the `erlang` module then raises instead of reaching Erlang
//!   (no router thread exists in the child to carry a reply back), Python's output goes
//!   to stderr, and a child that returns from its request instead of exiting ends there
//!   (`context::answer`), as a plain Python child ends at the end of its script.
//! - The sub-interpreters (the `owngil` contexts and the router's spare) are unlinked
//!   from CPython's list of interpreters. `PyOS_AfterFork_Child` deletes every
//!   interpreter but the main one with no current thread state, and clearing an
//!   interpreter needs one: with any sub-interpreter alive, every forked child of CPython
//!   3.12-3.14 dies at once with "PyThreadState_Get: the function must be called with
//!   the GIL held" (CPython issue 101437; plain `python3` does the same after
//!   `_interpreters.create()`). Unlinked, they are skipped, and their memory (copies of
//!   the parent's pages) is simply never freed in the child, whose threads are gone anyway.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use pyo3::ffi;
use pyo3::prelude::*;

/// The protocol's two descriptors (input, output), for the child handler.
static PROTOCOL_FDS: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

/// Set in a forked child (see the module's doc).
static IN_CHILD: AtomicBool = AtomicBool::new(false);

/// How far into `_PyRuntime` the list of interpreters is looked for: it sits in the
/// first few hundred bytes on 3.12-3.14 (the whole struct is hundreds of KiB).
const RUNTIME_SCAN_BYTES: usize = 4096;

extern "C" {
    /// CPython's runtime state (exported for debuggers); only its `interpreters.head`
    /// field is touched, found by its value (see [`unlink_subinterpreters`]).
    static mut _PyRuntime: u8;
}

/// Whether this process is a child forked (without `exec`) from the port program.
pub fn in_child() -> bool {
    IN_CHILD.load(Ordering::Relaxed)
}

/// Installs the child handler; `fds` are the protocol's input and output.
pub fn install(fds: [i32; 2]) {
    for (slot, fd) in PROTOCOL_FDS.iter().zip(fds) {
        slot.store(fd, Ordering::SeqCst);
    }
    // SAFETY: registers a handler that does only async-signal-safe work (open, dup2,
    // close, plain loads and stores).
    unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) };
}

extern "C" fn in_forked_child() {
    IN_CHILD.store(true, Ordering::SeqCst);
    // SAFETY: plain descriptor calls on this new, single-threaded process's own fds.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        for fd in &PROTOCOL_FDS {
            let fd = fd.load(Ordering::SeqCst);
            if fd < 0 {
                continue;
            }
            if null < 0 || libc::dup3(null, fd, libc::O_CLOEXEC) < 0 {
                libc::close(fd);
            }
        }
        if null >= 0 {
            libc::close(null);
        }
    }
    unlink_subinterpreters();
}

/// Makes the main interpreter the only one in CPython's list (`interpreters.head`).
/// Interpreters are prepended as they are made, so the main one is the last: the list
/// is `head -> ... -> main -> NULL`, and `head = main` leaves the main one alone in it.
/// The field is found as the pair of adjacent words `(head, main)` of the struct
/// `pyinterpreters { mutex; head; main; next_id }` (the same on 3.12-3.14), and only
/// written when exactly one such pair is found.
fn unlink_subinterpreters() {
    // SAFETY: in the forked child, no other thread exists to change the list; these
    // two calls only read `_PyRuntime` (they take no lock and need no thread state).
    let (head, main) = unsafe {
        (
            ffi::PyInterpreterState_Head(),
            ffi::PyInterpreterState_Main(),
        )
    };
    if head.is_null() || main.is_null() || head == main {
        return;
    }
    let word = std::mem::size_of::<usize>();
    // `_PyRuntime` is far larger than RUNTIME_SCAN_BYTES and word-aligned.
    let base = std::ptr::addr_of_mut!(_PyRuntime).cast::<usize>();
    let words = RUNTIME_SCAN_BYTES / word;
    let mut found = None;
    for i in 0..words - 1 {
        // SAFETY: both reads are inside the scanned prefix of `_PyRuntime`.
        let (a, b) = unsafe { (base.add(i).read(), base.add(i + 1).read()) };
        if a == head as usize && b == main as usize {
            if found.is_some() {
                return;
            }
            found = Some(i);
        }
    }
    if let Some(i) = found {
        // SAFETY: word `i` is `interpreters.head` (the unique (head, main) pair); the
        // child's only thread writes it before CPython's after-fork code reads it.
        unsafe { base.add(i).write(main as usize) };
    }
}

/// Ends a forked child whose request returned (it did not `os._exit`), the way a plain
/// Python child ends at the end of its script: with status 0, the code of a
/// `SystemExit`, or 1 and the error on stderr. Nothing goes back to Erlang.
pub fn end_child(py: Python<'_>, outcome: Result<(), &crate::error::Error>) -> ! {
    let status = match outcome {
        Ok(()) => 0,
        Err(crate::error::Error::Python { kind, message, .. }) if kind == "SystemExit" => {
            match message.trim() {
                "" | "None" => 0,
                code => code.parse().unwrap_or_else(|_| {
                    eprintln!("{code}");
                    1
                }),
            }
        }
        Err(crate::error::Error::Python {
            kind,
            message,
            traceback,
        }) => {
            eprintln!("{traceback}{kind}: {message}");
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    };
    for stream in ["stdout", "stderr"] {
        let _ = py
            .import("sys")
            .and_then(|sys| sys.getattr(stream))
            .and_then(|s| s.call_method0("flush"));
    }
    // SAFETY: ends this child process at once, like `os._exit`.
    unsafe { libc::_exit(status) }
}

//! The keeper: the port program's first process. It forks the worker, which runs
//! everything else in this crate, waits for it, and tells Erlang how it ended.
//!
//! Why a second process: callers write requests straight into the port's stdin. Once
//! the process reading it has exited, such a write fails with EPIPE, Erlang closes the
//! port, and the exit status is lost: a caller of a request that crashed Python would
//! get `{runtime_down, {port_closed, epipe}}` instead of `{port_exit, Status}`. The
//! keeper holds stdin open as long as the port lives, so no write fails. When the
//! worker ends, the keeper sends the event `{exited, Status}` (Erlang's convention: the
//! exit code, or 128 + the signal), then reads and drops what Erlang still writes
//! until the port owner's control request `exited_seen`, the end of stdin or
//! [`ACK_BOUND`], and exits with the same status. By then the port owner holds the
//! status, whatever a late write does to the port (docs/protocol.md, "Exit").
//!
//! The keeper dies with its parent (Erlang's `erl_child_setup`) and the worker with
//! the keeper (`PR_SET_PDEATHSIG`), so a node that goes leaves neither behind. It forks
//! before any thread or Python exists, and uses nothing but the plain calls below.

use crate::etf;
use crate::framing::{begin_frame, finish_frame, split_request, KIND_EVENT};
use std::io;
use std::time::{Duration, Instant};

/// How long the keeper waits for `exited_seen` before it exits anyway.
const ACK_BOUND: Duration = Duration::from_secs(5);

/// Forks the worker. Returns in the worker; the keeper never returns. If the fork
/// fails, the process goes on as the worker alone (and says so on stderr).
pub fn split() {
    // SAFETY: getpid has no preconditions.
    let keeper = unsafe { libc::getpid() };
    // SAFETY: no other thread exists yet; the child only returns into Rust code that
    // starts from scratch, as after exec.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!(
            "pyport: no keeper process ({}): a write after a crash may hide its exit status",
            io::Error::last_os_error()
        );
        return;
    }
    if pid == 0 {
        // SAFETY: plain prctl/getppid calls on this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // the keeper may have gone before the call
            if libc::getppid() != keeper {
                libc::_exit(1);
            }
        }
        return;
    }
    let status = wait(pid);
    send_exited(status);
    drain_until_seen();
    // SAFETY: ends the keeper without running destructors (there are none to run).
    unsafe { libc::_exit(status) }
}

/// Waits for the worker; its end as Erlang reports an exit status.
fn wait(pid: libc::pid_t) -> i32 {
    let mut raw = 0;
    loop {
        // SAFETY: waits for our own child; `raw` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut raw, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 255;
        }
    }
    if libc::WIFSIGNALED(raw) {
        128 + libc::WTERMSIG(raw)
    } else {
        libc::WEXITSTATUS(raw)
    }
}

/// The event frame `{exited, Status}` on stdout (blocking until written, or the port
/// is gone).
fn send_exited(status: i32) {
    let mut frame = Vec::with_capacity(32);
    begin_frame(&mut frame, KIND_EVENT, &[]);
    let mut w = etf::Writer::new(&mut frame);
    w.tuple_header(2);
    w.atom("exited");
    w.int(i64::from(status));
    if finish_frame(&mut frame).is_err() {
        return;
    }
    let mut rest = &frame[..];
    while !rest.is_empty() {
        // SAFETY: writes from a live buffer to our stdout.
        let n = unsafe { libc::write(1, rest.as_ptr().cast(), rest.len()) };
        if n > 0 {
            rest = &rest[n as usize..];
            continue;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                poll(1, libc::POLLOUT, 100);
            }
            _ => return,
        }
    }
}

/// Reads stdin (non-blocking: the worker made it so) and drops every frame until the
/// control request `exited_seen`, the end of stdin or [`ACK_BOUND`].
fn drain_until_seen() {
    let deadline = Instant::now() + ACK_BOUND;
    let mut frames = Frames::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        poll(
            0,
            libc::POLLIN,
            left.as_millis().min(i32::MAX as u128) as i32,
        );
        loop {
            // SAFETY: reads into a live buffer of that length.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                return;
            }
            if n < 0 {
                match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return,
                }
            }
            if frames.push(&buf[..n as usize]) {
                return;
            }
        }
    }
}

/// Waits until `fd` is ready for `events` (or hangs up), at most `ms`.
fn poll(fd: i32, events: i16, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// `{packet,4}` frames cut from a byte stream, kept only when small enough to be
/// `exited_seen`; the rest are skipped as they come.
#[derive(Default)]
struct Frames {
    /// bytes of the current length prefix or small frame
    held: Vec<u8>,
    /// bytes of a large frame still to skip
    skip: usize,
}

/// A frame longer than this is no control request of ours.
const SMALL: usize = 256;

impl Frames {
    /// Takes more bytes; true once a whole `exited_seen` came.
    fn push(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let want = if self.held.len() < 4 {
                4
            } else {
                4 + u32::from_be_bytes([self.held[0], self.held[1], self.held[2], self.held[3]])
                    as usize
            };
            if self.held.len() >= 4 && want - 4 > SMALL {
                self.skip = want - self.held.len();
                self.held.clear();
                continue;
            }
            let n = (want - self.held.len()).min(data.len());
            self.held.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.held.len() == want && want > 4 {
                if is_exited_seen(&self.held[4..]) {
                    return true;
                }
                self.held.clear();
            } else if self.held.len() == 4 && want == 4 && self.held == [0, 0, 0, 0] {
                self.held.clear();
            }
        }
        false
    }
}

/// Whether a request frame is the control request `exited_seen` (context 0).
fn is_exited_seen(frame: &[u8]) -> bool {
    match split_request(frame) {
        Some(r) if r.ctx == 0 => etf::Reader::new(r.body)
            .and_then(|mut t| t.atom())
            .is_ok_and(|a| a == "exited_seen"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(ctx: u64, body: &[u8]) -> Vec<u8> {
        let mut f = ctx.to_be_bytes().to_vec();
        f.extend_from_slice(&0u16.to_be_bytes());
        f.extend_from_slice(body);
        let mut p = (f.len() as u32).to_be_bytes().to_vec();
        p.extend(f);
        p
    }

    fn atom(name: &str) -> Vec<u8> {
        let mut t = vec![131, 119, name.len() as u8];
        t.extend_from_slice(name.as_bytes());
        t
    }

    #[test]
    fn finds_exited_seen_behind_other_frames_in_any_chunking() {
        let mut stream = request(3, &[131, 109, 0, 0, 4, 0]);
        stream.extend(request(0, &atom("shutdown")));
        stream.extend(request(7, &vec![0; 100_000]));
        stream.extend(request(0, &atom("exited_seen")));
        for chunk in [1, 3, 7, 4096, stream.len()] {
            let mut frames = Frames::default();
            let found = stream.chunks(chunk).any(|c| frames.push(c));
            assert!(found, "chunks of {chunk}");
        }
    }

    #[test]
    fn other_frames_are_not_exited_seen() {
        let mut frames = Frames::default();
        let mut stream = request(1, &atom("exited_seen"));
        stream.extend(request(0, &atom("shutdown")));
        stream.extend(request(0, &[131, 97, 1]));
        stream.extend([0, 0, 0, 1, 9]);
        assert!(!frames.push(&stream));
    }
}

//! A context thread's epoll and its waker (an eventfd), on fds above the ones Python
//! code opens.
//!
//! Contexts start and stop while other contexts run Python, and the kernel gives every
//! new fd the lowest free number. A poll made at a low number, or one that closes there,
//! leaves a gap among the fds that code opens: the next `os.open` and `os.dup` then do
//! not get two numbers in a row, as they do in a plain Python process (CPython's own
//! `test_os` relies on it). So each of these fds moves at once to a number at or above
//! [`floor`], where Python's own fds reach only in a process that has opened that many.
//!
//! The readiness model is mio's, which the router keeps using: edge-triggered, and the
//! waker's counter is never read (it is reset only if it would overflow).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

/// Readiness of one registered fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    pub token: u64,
    /// Readable, or its reading side closed, or an error.
    pub read: bool,
    /// Writable, or its writing side closed, or an error.
    pub write: bool,
}

/// The lowest fd number pyport's own fds move to: half the soft `RLIMIT_NOFILE`, at most
/// 1024 (with the usual limit of 1024, from 512 up).
pub fn floor() -> RawFd {
    static FLOOR: OnceLock<RawFd> = OnceLock::new();
    *FLOOR.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            1024
        };
        RawFd::try_from((soft / 2).min(1024)).unwrap_or(1024)
    })
}

/// `fd` moved to a number at or above [`floor`]; where none is free there, `fd` as it
/// was (it works the same, only lower).
fn above_python(fd: OwnedFd) -> OwnedFd {
    if fd.as_raw_fd() >= floor() {
        return fd;
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the new fd is ours alone.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor()) };
    if high < 0 {
        return fd;
    }
    // SAFETY: `high` was just made and nothing else owns it; `fd` closes on drop.
    unsafe { OwnedFd::from_raw_fd(high) }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The fd a syscall that makes one returned (or its error), moved above Python's.
fn made_fd(ret: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(ret)?;
    // SAFETY: `fd` was just made by the syscall and nothing else owns it.
    Ok(above_python(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// An epoll instance.
pub struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let epoll = made_fd(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Poller { epoll })
    }

    fn ctl(
        &self,
        op: libc::c_int,
        fd: RawFd,
        token: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        let mut events = libc::EPOLLET;
        if read {
            events |= libc::EPOLLIN | libc::EPOLLRDHUP;
        }
        if write {
            events |= libc::EPOLLOUT;
        }
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: `event` is a valid epoll_event; the kernel checks `fd`.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) }).map(drop)
    }

    /// Watches `fd` (edge-triggered), reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64, read: bool, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, read, write)
    }

    /// Changes what `fd` is watched for; arms its edge again.
    pub fn modify(&self, fd: RawFd, token: u64, read: bool, write: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, read, write)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        check(unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        })
        .map(drop)
    }

    /// Waits at most `timeout` (`None`: until an event; a signal restarts the wait),
    /// then fills `events` with what is ready.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) {
        let ms = timeout.map_or(-1, |d| {
            // rounded up, so a wait for a timer never wakes just before it is due
            libc::c_int::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(libc::c_int::MAX)
        });
        let n = loop {
            // SAFETY: the buffer has room for the count given.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.raw.as_mut_ptr(),
                    libc::c_int::try_from(events.raw.len()).unwrap_or(libc::c_int::MAX),
                    ms,
                )
            };
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        events.len = usize::try_from(n).unwrap_or(0);
    }
}

/// What one [`Poller::wait`] found.
pub struct Events {
    raw: Vec<libc::epoll_event>,
    len: usize,
}

impl Events {
    pub fn with_capacity(capacity: usize) -> Self {
        Events {
            raw: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(1)],
            len: 0,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Ready> + '_ {
        let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        let read = (libc::EPOLLIN | libc::EPOLLPRI | libc::EPOLLRDHUP) as u32 | err;
        let write = libc::EPOLLOUT as u32 | err;
        self.raw[..self.len].iter().map(move |ev| {
            let bits = ev.events;
            Ready {
                token: ev.u64,
                read: bits & read != 0,
                write: bits & write != 0,
            }
        })
    }
}

/// Wakes a thread waiting in its [`Poller`]: an eventfd registered for reading.
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new(poller: &Poller, token: u64) -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = made_fd(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        poller.add(fd.as_raw_fd(), token, true, false)?;
        Ok(Waker { fd })
    }

    /// Wakes the poller's thread (now, or at its next wait).
    pub fn wake(&self) -> io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a u64 on our eventfd.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if n == 8 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // the counter is full (never read): reset it, then wake
                    let mut sink: u64 = 0;
                    // SAFETY: reads 8 bytes into a u64 from our eventfd.
                    unsafe { libc::read(self.fd.as_raw_fd(), (&mut sink as *mut u64).cast(), 8) };
                }
                _ => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_move_above_the_floor() {
        let poller = Poller::new().unwrap();
        let waker = Waker::new(&poller, 0).unwrap();
        assert!(poller.epoll.as_raw_fd() >= floor());
        assert!(waker.fd.as_raw_fd() >= floor());
    }

    #[test]
    fn a_wake_and_a_readable_pipe_are_reported() {
        let poller = Poller::new().unwrap();
        let waker = Waker::new(&poller, 0).unwrap();
        let mut events = Events::with_capacity(8);
        let mut wait = |timeout| {
            poller.wait(&mut events, Some(timeout));
            events.iter().collect::<Vec<_>>()
        };
        assert_eq!(wait(Duration::ZERO), vec![]);
        waker.wake().unwrap();
        let woken = Ready {
            token: 0,
            read: true,
            write: false,
        };
        assert_eq!(wait(Duration::from_secs(5)), vec![woken]);

        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        poller.add(fds[0], 7, true, false).unwrap();
        assert_eq!(wait(Duration::ZERO), vec![]);
        // SAFETY: writes one byte to the pipe we made.
        assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
        let readable = Ready {
            token: 7,
            read: true,
            write: false,
        };
        assert_eq!(wait(Duration::from_secs(5)), vec![readable]);
        // edge-triggered: reported once until armed again
        assert_eq!(wait(Duration::ZERO), vec![]);
        poller.modify(fds[0], 7, true, false).unwrap();
        assert_eq!(wait(Duration::ZERO), vec![readable]);
        poller.delete(fds[0]).unwrap();
        // SAFETY: closes the pipe we made.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}

//! Start-up: command line, fd hygiene, Python, the hello frame, then the router.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::erlang_module::erlang_module;
use crate::python::{self, PythonInfo};
use crate::router::{Config, Router};
use crate::writer::Writer;

pub const PROTOCOL_VERSION: i64 = 2;

/// Parses the command line. The Erlang side (`pyport_opts`) owns every default and
/// gives every limit, so this program keeps no copies of them (docs/protocol.md):
/// `--path DIR`, `--max-frame BYTES`, `--queue N`, `--stuck-after MS` (0: never),
/// `--max-atoms N`, `--none-as ATOM` (all of these but `--path` required), and the
/// optional bounds `--max-memory BYTES` and `--max-reply BYTES` (none without them),
/// and `--arrays binary|lists` (numpy arrays' form, `lists` without it).
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut max_frame = None;
    let mut max_atoms = None;
    let mut none_as = None;
    let mut arrays = None;
    let mut max_reply = None;
    let mut queue_capacity = None;
    let mut stuck_after = None;
    let mut config_path = Vec::new();
    let mut max_memory = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--path" => config_path.push(value()?.clone()),
            "--max-frame" => {
                max_frame = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--max-frame needs a number of bytes")?,
                )
            }
            "--queue" => {
                queue_capacity = Some(value()?.parse().map_err(|_| "--queue needs a number")?)
            }
            "--max-reply" => {
                max_reply = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--max-reply needs a number of bytes")?,
                )
            }
            "--max-atoms" => {
                max_atoms = Some(value()?.parse().map_err(|_| "--max-atoms needs a number")?)
            }
            "--none-as" => none_as = Some(value()?.clone()),
            "--arrays" => arrays = Some(value()?.clone()),
            "--max-memory" => {
                max_memory = Some(
                    value()?
                        .parse()
                        .map_err(|_| "--max-memory needs a number of bytes")?,
                )
            }
            "--stuck-after" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|_| "--stuck-after needs a number of milliseconds")?;
                stuck_after = Some((ms > 0).then(|| std::time::Duration::from_millis(ms)));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let missing = |flag: &str| format!("{flag} is required (the Erlang side gives every limit)");
    Ok(Args {
        config: Config {
            max_frame: max_frame.ok_or_else(|| missing("--max-frame"))?,
            queue_capacity: queue_capacity.ok_or_else(|| missing("--queue"))?,
            stuck_after: stuck_after.ok_or_else(|| missing("--stuck-after"))?,
            max_memory,
            path: config_path,
        },
        max_atoms: max_atoms.ok_or_else(|| missing("--max-atoms"))?,
        none_as: none_as.ok_or_else(|| missing("--none-as"))?,
        max_reply,
        arrays,
    })
}

/// The command line: the router's configuration and the process-wide settings.
pub struct Args {
    pub config: Config,
    pub max_atoms: usize,
    pub none_as: String,
    pub max_reply: Option<usize>,
    /// `--arrays binary|lists` (optional, `lists` without it): numpy arrays' form.
    pub arrays: Option<String>,
}

impl Args {
    /// Sets the process-wide settings (once, at start-up) and returns the router's
    /// configuration; an unknown `--none-as` atom is an error.
    fn apply(self) -> Result<Config, String> {
        crate::atoms::set_max(self.max_atoms);
        crate::convert::set_none_atom(&self.none_as)?;
        if let Some(max) = self.max_reply {
            crate::framing::set_max_reply(max);
        }
        if let Some(form) = &self.arrays {
            crate::convert::set_arrays_binary(form)?;
        }
        Ok(self.config)
    }
}

/// Takes fds 0 and 1 for the protocol (close-on-exec, so children don't inherit them),
/// then points fd 0 at /dev/null and fd 1 at fd 2: C code or Python that writes to
/// stdout can't corrupt frames.
fn take_protocol_fds() -> io::Result<(File, File)> {
    let dup = |fd| {
        // SAFETY: plain fcntl on a descriptor we were started with.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `new` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    };
    let input = dup(0)?;
    let output = dup(1)?;
    crate::fork::install([
        std::os::fd::AsRawFd::as_raw_fd(&input),
        std::os::fd::AsRawFd::as_raw_fd(&output),
    ]);
    let null = File::open("/dev/null")?;
    // SAFETY: dup2 onto the standard descriptors, which we no longer use directly.
    unsafe {
        if libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) < 0 || libc::dup2(2, 1) < 0 {
            return Err(io::Error::last_os_error());
        }
        // 64 KiB pipes cap large transfers; 1 MiB (the default limit) triples a 16 MiB echo.
        for fd in [
            std::os::fd::AsRawFd::as_raw_fd(&input),
            std::os::fd::AsRawFd::as_raw_fd(&output),
        ] {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
        }
        let flags = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&input), libc::F_GETFL);
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&input),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        );
        // subprocess.run hangs if SIGCHLD is ignored.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        // Rust's runtime catches SIGSEGV and SIGBUS to name a stack overflow; for any
        // other fault its handler returns, so a raised SIGSEGV (`os.kill(os.getpid(),
        // SIGSEGV)`, as in a forked child) was survived and the process exited 0. A
        // fault must end the process with its signal, as in plain CPython.
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
    Ok((File::from(input), File::from(output)))
}

fn hello(writer: &Writer, info: &PythonInfo, config: &Config) {
    writer.event(|w| {
        w.tuple_header(2);
        w.atom("hello");
        w.map_header(7);
        w.atom("protocol");
        w.int(PROTOCOL_VERSION);
        w.atom("python_version");
        w.binary(info.version.as_bytes());
        w.atom("owngil");
        w.boolean(info.owngil);
        w.atom("os_pid");
        w.int(std::process::id() as i64);
        w.atom("max_frame");
        w.int(config.max_frame as i64);
        w.atom("max_atoms");
        w.int(crate::atoms::max() as i64);
        w.atom("capabilities");
        let mut caps = vec![
            "call",
            "eval",
            "exec",
            "event_loop",
            "stream",
            "channel",
            "main",
        ];
        if info.owngil {
            caps.push("owngil");
        }
        w.list_header(caps.len());
        for c in caps {
            w.atom(c);
        }
        w.nil();
    });
}

fn start_error(writer: &Writer, reason: &str) -> i32 {
    eprintln!("pyport: start failed: {reason}");
    writer.event(|w| {
        w.tuple_header(2);
        w.atom("start_error");
        w.binary(reason.as_bytes());
    });
    2
}

/// The port program never outlives the Erlang side: its parent (the VM's
/// `erl_child_setup`, which ends with the VM) going away kills it, whatever state its
/// threads are in. The normal way out is the end of stdin; this is the backstop.
fn die_with_parent() {
    // SAFETY: plain prctl/getppid calls on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // the parent may have gone before the call: then we are adopted already
        if libc::getppid() == 1 {
            libc::_exit(1);
        }
    }
}

/// Runs the port program; returns the exit code.
pub fn main(args: Vec<String>) -> i32 {
    die_with_parent();
    crate::keeper::split();
    let (input, output) = match take_protocol_fds() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("pyport: cannot set up stdio: {e}");
            return 2;
        }
    };
    let writer = Arc::new(Writer::new(output));
    let reporter = writer.clone();
    crate::atoms::report_with(move |name| {
        reporter.event(|w| {
            w.tuple_header(2);
            w.atom("atom_admitted");
            w.binary(name.as_bytes());
        })
    });
    let config = match parse_args(&args).and_then(Args::apply) {
        Ok(c) => c,
        Err(e) => return start_error(&writer, &e),
    };
    let path = config.path.clone();
    let info = match python::init_main(|py| {
        python::prepend_sys_path(py, &path)?;
        erlang_module(py).map(drop)
    }) {
        Ok(info) => info,
        Err(e) => return start_error(&writer, &e),
    };
    if let Some(max) = config.max_memory {
        if let Err(e) = crate::memory::watch(max, writer.clone()) {
            return start_error(&writer, &format!("memory watch: {e}"));
        }
    }
    hello(&writer, &info, &config);
    let inbox = Router::new(config, info, writer.clone(), input);
    let code = match inbox.run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pyport: router failed: {e}");
            1
        }
    };
    let _ = writer.flush();
    // Python is not finalized: a context stuck in C code would make that hang, and the
    // OS reclaims everything anyway.
    // SAFETY: ends the process without running atexit handlers or destructors.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn every_limit_comes_from_the_command_line() {
        let config = parse_args(&args(&[
            "--max-frame",
            "4096",
            "--queue",
            "7",
            "--stuck-after",
            "0",
            "--max-atoms",
            "9",
            "--none-as",
            "none",
        ]))
        .unwrap();
        assert_eq!(config.config.max_frame, 4096);
        assert_eq!(config.config.queue_capacity, 7);
        assert_eq!(config.config.stuck_after, None, "0 is never");
        assert_eq!(config.max_atoms, 9);
        assert_eq!(config.none_as, "none");
        assert_eq!(config.max_reply, None);
    }

    #[test]
    fn a_missing_limit_is_a_start_error_not_a_default() {
        let err = parse_args(&args(&[
            "--max-frame",
            "9",
            "--queue",
            "7",
            "--stuck-after",
            "5",
            "--none-as",
            "nil",
        ]))
        .err();
        assert_eq!(
            err.as_deref(),
            Some("--max-atoms is required (the Erlang side gives every limit)")
        );
        let err = parse_args(&args(&[
            "--queue",
            "7",
            "--stuck-after",
            "5",
            "--max-atoms",
            "9",
            "--none-as",
            "nil",
        ]))
        .err();
        assert_eq!(
            err.as_deref(),
            Some("--max-frame is required (the Erlang side gives every limit)")
        );
    }
}

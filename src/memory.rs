//! `max_memory`: the whole OS process stays under a bound on its resident memory.
//!
//! A thread reads the process's resident set size from `/proc/self/statm` every
//! [`PERIOD`]; past the bound it reports it and ends the process, so `pyport_runtime`
//! restarts it cleanly (exit status [`EXIT_STATUS`]). Every allocation counts, whoever
//! makes it: Python objects, numpy buffers, C libraries.
//!
//! The address space is bounded too, far above the resident bound (virtual
//! reservations, thread stacks and allocator arenas are not memory in use): a single
//! request far over the bound (`bytearray(10**11)`) then fails at once in Python with
//! `MemoryError` instead of filling memory page by page. mimalloc maps with
//! `MAP_NORESERVE`, which the kernel's overcommit check lets through.

use std::sync::Arc;
use std::time::Duration;

use crate::writer::Writer;

const PERIOD: Duration = Duration::from_millis(20);
/// The exit status of a runtime that went over `max_memory`.
pub const EXIT_STATUS: i32 = 76;

/// Resident bytes of this process, if `/proc` tells.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Address space allowed for a resident bound of `max` bytes.
fn address_space(max: u64) -> u64 {
    max.saturating_mul(4).saturating_add(4 << 30)
}

/// Bounds the address space, then starts the thread that holds the process under
/// `max` resident bytes.
pub fn watch(max: u64, writer: Arc<Writer>) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: address_space(max),
        rlim_max: address_space(max),
    };
    // SAFETY: plain setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("pyport-memory".into())
        .spawn(move || loop {
            std::thread::sleep(PERIOD);
            let Some(used) = resident_bytes() else {
                continue;
            };
            if used > max {
                writer.log(
                    "error",
                    0,
                    &format!(
                        "the runtime uses {used} bytes, over its max_memory of {max}: \
                         restarting it"
                    ),
                );
                let _ = writer.flush();
                // SAFETY: ends the process at once; finalizing Python could block.
                unsafe { libc::_exit(EXIT_STATUS) };
            }
        })
        .map(drop)
}

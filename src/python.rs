//! The CPython lifecycle through raw `pyo3::ffi`: starting the main interpreter, and
//! creating and ending OWN_GIL sub-interpreters (pyo3 has no API for these).
//!
//! Rules (see docs/architecture.md): the main interpreter pre-imports `_datetime` and `ctypes` on
//! Python < 3.14 before any sub-interpreter exists, then releases its GIL for good.
//! Each sub-interpreter is created on, used by, and ended on one dedicated thread.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use pyo3::ffi;
use pyo3::prelude::*;

#[cfg(Py_3_12)]
use crate::sync::Unpoison;

/// What the rest of the program needs to know about the embedded Python.
#[derive(Clone, Debug)]
pub struct PythonInfo {
    pub version: String,
    /// Whether `owngil` contexts can be created (Python >= 3.12).
    pub owngil: bool,
}

/// The Python carried beside the port program: `python-home` in its folder, made by a
/// build with `PYPORT_BUNDLE_PYTHON=1` (scripts/bundle-python.py, docs/deployment.md)
/// and marked by its `pyport.stamp`. The binary's rpath looks in `python-home/lib`
/// first (build.rs), so the libpython there is the one already loaded.
fn bundled_home() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let home = exe.parent()?.join("python-home");
    home.join("pyport.stamp").is_file().then_some(home)
}

/// The Python executable: `PYPORT_PYTHON_EXECUTABLE`, else the carried one, else the
/// one pyport was built against. It is `sys.executable`, and CPython finds its
/// standard library from it.
fn program_name(bundled: Option<&Path>) -> Option<String> {
    std::env::var("PYPORT_PYTHON_EXECUTABLE")
        .ok()
        .or_else(|| bundled.map(|home| home.join("bin").join("python3").display().to_string()))
        .or_else(|| option_env!("PYPORT_BUILD_PYTHON").map(str::to_string))
}

/// With a carried Python: its folder is the home (unless `PYTHONHOME` says otherwise),
/// and its `lib` leads `LD_LIBRARY_PATH` for the processes Python starts
/// (`sys.executable` in a subprocess or `multiprocessing`'s spawn finds the same
/// libpython). Called before Python starts, as the PYTHONMALLOC default is set.
fn use_bundled_home(home: &Path) -> Option<String> {
    let lib = home.join("lib");
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) if !old.is_empty() => {
            let mut joined = lib.into_os_string();
            joined.push(":");
            joined.push(old);
            joined
        }
        _ => lib.into_os_string(),
    };
    std::env::set_var("LD_LIBRARY_PATH", path);
    match std::env::var_os("PYTHONHOME") {
        Some(_) => None,
        None => Some(home.display().to_string()),
    }
}

/// Sets one string field of a `PyConfig`; the error is the status's text.
///
/// # Safety
/// `config` is initialised and `field` one of its `wchar_t*` fields.
unsafe fn set_config_string(
    config: *mut ffi::PyConfig,
    field: *mut *mut libc::wchar_t,
    value: &str,
) -> Result<(), String> {
    let value = CString::new(value).map_err(|_| format!("NUL in {value:?}"))?;
    // SAFETY: as the caller promises; `value` outlives the call, which copies it.
    let status = unsafe { ffi::PyConfig_SetBytesString(config, field, value.as_ptr()) };
    // SAFETY: plain struct inspection.
    if unsafe { ffi::PyStatus_Exception(status) } != 0 {
        return Err(status_message(&status));
    }
    Ok(())
}

/// The text of a failed `PyStatus`.
fn status_message(status: &ffi::PyStatus) -> String {
    let func = if status.func.is_null() {
        String::new()
    } else {
        // SAFETY: CPython sets `func` to a static C string when not NULL.
        unsafe { CStr::from_ptr(status.func) }
            .to_string_lossy()
            .into_owned()
    };
    let msg = if status.err_msg.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: CPython sets `err_msg` to a static C string when not NULL.
        unsafe { CStr::from_ptr(status.err_msg) }
            .to_string_lossy()
            .into_owned()
    };
    if func.is_empty() {
        msg
    } else {
        format!("{func}: {msg}")
    }
}

/// Starts the main interpreter on the calling thread, runs `setup` in it, then releases
/// its GIL for good (context threads attach as they need).
pub fn init_main(setup: impl FnOnce(Python<'_>) -> PyResult<()>) -> Result<PythonInfo, String> {
    // CPython keeps every obmalloc arena of an ended sub-interpreter if a single object
    // leaked, which 3.13 always does: ~1.7 MiB per context lifetime. With mimalloc only
    // the leaked blocks stay (~0.16 MiB). PYTHONMALLOC set by the user wins. CPython
    // has mimalloc from 3.13 on; 3.12 refuses to start with it.
    #[cfg(Py_3_13)]
    if std::env::var_os("PYTHONMALLOC").is_none() {
        std::env::set_var("PYTHONMALLOC", "mimalloc");
    }
    let bundled = bundled_home();
    let home = bundled.as_deref().and_then(use_bundled_home);
    // SAFETY: called once, before any other Python API, on the main thread. The config
    // is initialised by CPython before use and cleared after.
    unsafe {
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::zeroed().assume_init();
        ffi::PyConfig_InitPythonConfig(&mut config);
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        let set = program_name(bundled.as_deref())
            .map_or(Ok(()), |prog| {
                set_config_string(&mut config, &mut config.program_name, &prog)
            })
            .and_then(|()| {
                home.map_or(Ok(()), |home| {
                    set_config_string(&mut config, &mut config.home, &home)
                })
            });
        if let Err(e) = set {
            ffi::PyConfig_Clear(&mut config);
            return Err(e);
        }
        let status = ffi::Py_InitializeFromConfig(&config);
        ffi::PyConfig_Clear(&mut config);
        if ffi::PyStatus_Exception(status) != 0 {
            return Err(status_message(&status));
        }
    }
    let info = Python::attach(|py| -> Result<PythonInfo, String> {
        let version = py.version_info();
        let info = PythonInfo {
            version: format!("{}.{}.{}", version.major, version.minor, version.patch),
            owngil: cfg!(Py_3_12) && (version.major, version.minor) >= (3, 12),
        };
        if (version.major, version.minor) < (3, 14) {
            // Sub-interpreters that import these first own their static state and
            // crash the others when they end; importing them here first avoids it.
            for name in ["_datetime", "ctypes"] {
                if let Err(e) = py.import(name) {
                    eprintln!("pyport: pre-import of {name} failed: {e}");
                }
            }
        }
        setup(py).map_err(|e| format!("setting up the main interpreter: {e}"))?;
        Ok(info)
    })?;
    // SAFETY: this thread holds the main GIL (taken by Py_InitializeFromConfig); it never
    // runs Python again, so the saved thread state is simply kept.
    unsafe {
        ffi::PyEval_SaveThread();
    }
    Ok(info)
}

/// A sub-interpreter owned by the current thread.
pub struct SubInterpreter {
    tstate: *mut ffi::PyThreadState,
}

/// Held while a sub-interpreter is being created: one creation at a time per process.
/// CPython 3.12 and 3.13 let concurrent creations race on state they share (the static
/// types' per-interpreter slots among it), and now and then one of them fails, with
/// "Failed to import encodings module" or "failed to get the Python codec of the
/// filesystem encoding" (CPython's own `test_interpreters` stress tests hit the same;
/// here 1 failure in 22,400 creations from 16 threads of plain CPython 3.13.15).
#[cfg(Py_3_12)]
static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How many times a creation is tried before its failure is reported: one that loses a
/// race with code running in another interpreter fails once, not every time.
#[cfg(Py_3_12)]
const CREATION_TRIES: usize = 3;

impl SubInterpreter {
    /// Creates an OWN_GIL sub-interpreter on the calling thread, which must hold no
    /// Python thread state. On success the thread is attached to it (its GIL held), and
    /// the new thread state is the one `Python::attach` finds on this thread.
    #[cfg(Py_3_12)]
    pub fn new() -> Result<Self, String> {
        let config = ffi::PyInterpreterConfig {
            use_main_obmalloc: 0,
            allow_fork: 0,
            allow_exec: 1,
            allow_threads: 1,
            allow_daemon_threads: 0,
            check_multi_interp_extensions: 1,
            gil: ffi::PyInterpreterConfig_OWN_GIL,
        };
        let _one_at_a_time = CREATING.lock().unpoison();
        let mut failure = String::new();
        for _ in 0..CREATION_TRIES {
            let mut tstate = std::ptr::null_mut();
            // SAFETY: the runtime is initialised; this thread has no thread state, so
            // the new one becomes this thread's bound state. Failure leaves tstate NULL
            // and the thread without a thread state again, as before the call.
            let status = unsafe { ffi::Py_NewInterpreterFromConfig(&mut tstate, &config) };
            // SAFETY: plain struct inspection.
            if unsafe { ffi::PyStatus_Exception(status) } == 0 && !tstate.is_null() {
                return Ok(SubInterpreter { tstate });
            }
            failure = status_message(&status);
        }
        Err(failure)
    }

    #[cfg(not(Py_3_12))]
    pub fn new() -> Result<Self, String> {
        Err("owngil contexts need Python 3.12 or newer".to_string())
    }

    /// Ends the interpreter. The calling thread must be the creating thread, attached
    /// to it, with no other thread of that interpreter still alive.
    pub fn end(self) {
        // SAFETY: `tstate` belongs to this thread and is current (the context loop only
        // detaches around waits and re-attaches before returning here).
        unsafe {
            ffi::PyThreadState_Swap(self.tstate);
            ffi::Py_EndInterpreter(self.tstate);
            // Give the interpreter's freed arenas back to the OS.
            libc::malloc_trim(0);
        }
    }
}

/// Puts `dirs`, in order, at the front of the current interpreter's `sys.path`.
pub fn prepend_sys_path(py: Python<'_>, dirs: &[String]) -> PyResult<()> {
    let sys_path = py.import("sys")?.getattr("path")?;
    for (i, dir) in dirs.iter().enumerate() {
        sys_path.call_method1("insert", (i, dir))?;
    }
    Ok(())
}

/// Runs `f` with this thread detached from its interpreter (GIL released), like
/// `Python::detach`, for closures that touch no Python object but are not `Send`.
pub fn detached<R>(_py: Python<'_>, f: impl FnOnce() -> R) -> R {
    struct Reattach(*mut pyo3::ffi::PyThreadState);
    impl Drop for Reattach {
        fn drop(&mut self) {
            // SAFETY: restores the thread state saved below, on the same thread.
            unsafe { pyo3::ffi::PyEval_RestoreThread(self.0) }
        }
    }
    // SAFETY: the thread is attached (we hold `_py`); `f` uses no Python API.
    let _reattach = Reattach(unsafe { pyo3::ffi::PyEval_SaveThread() });
    f()
}

//! In-process cost of serving one request (decode, call, encode), without the pipe.
//! Run with `make bench` (or `cargo bench --bench session` with PYO3_PYTHON set).

use std::time::Instant;

use pyo3::prelude::*;
use pyport::etf::Term;
use pyport::request::{Mode, Spec};
use pyport::session::Session;

fn call_body(module: &str, function: &str, args: Vec<Term>) -> Vec<u8> {
    call_body_opts(module, function, args, vec![])
}

fn call_body_opts(
    module: &str,
    function: &str,
    args: Vec<Term>,
    opts: Vec<(Term, Term)>,
) -> Vec<u8> {
    Term::Tuple(vec![
        Term::atom("call"),
        Term::Binary(module.as_bytes().to_vec()),
        Term::Binary(function.as_bytes().to_vec()),
        Term::List(args),
        Term::Map(vec![]),
        Term::Map(opts),
    ])
    .encode()
}

/// The Opts pyport:call/4 sends: `#{caller => Pid, timeout => 5000}`.
fn facade_opts() -> Vec<(Term, Term)> {
    let mut pid = vec![88, 119, 13];
    pid.extend_from_slice(b"nonode@nohost");
    pid.extend_from_slice(&[0, 0, 0, 81, 0, 0, 0, 0, 0, 0, 0, 0]);
    vec![
        (Term::atom("caller"), Term::Other(pid)),
        (Term::atom("timeout"), Term::Int(5000)),
    ]
}

fn time(py: Python<'_>, session: &Session, name: &str, body: &[u8]) {
    // `cargo bench --bench session -- WORD` runs only the cases whose name has WORD.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !name.contains(&filter) {
            return;
        }
    }
    let mut out = Vec::new();
    let n = (200_000_000 / body.len().max(1000)).clamp(10, 200_000);
    for _ in 0..(n / 100).max(2) {
        session
            .serve(py, b"h", body, &mut out, &|_| Ok(None))
            .unwrap();
    }
    let t0 = Instant::now();
    for _ in 0..n {
        session
            .serve(py, b"h", body, &mut out, &|_| Ok(None))
            .unwrap();
    }
    println!(
        "session {name}: {:.0} ns/request",
        t0.elapsed().as_nanos() as f64 / n as f64
    );
}

fn main() {
    pyport::python::init_main(|_| Ok(())).expect("python starts");
    Python::attach(|py| {
        let spec = Spec {
            id: 1,
            mode: Mode::Main,
            name: None,
            preload: None,
            path: vec![],
        };
        let writer = std::sync::Arc::new(pyport::writer::Writer::new(
            std::fs::File::create("/dev/null").unwrap(),
        ));
        let deadline = std::sync::Arc::new(pyport::watchdog::Deadline::default());
        let link = pyport::erlang_module::Link::new(1, writer, deadline);
        let poll = pyport::poller::Poller::new().expect("poll");
        let reactor = std::rc::Rc::new(pyport::event_loop::Reactor::new(poll).expect("reactor"));
        let session = Session::new(py, &spec, link, reactor).expect("session");
        time(
            py,
            &session,
            "operator.add(1, 2)",
            &call_body("operator", "add", vec![Term::Int(1), Term::Int(2)]),
        );
        time(
            py,
            &session,
            "operator.add(1, 2) with the facade's opts",
            &call_body_opts(
                "operator",
                "add",
                vec![Term::Int(1), Term::Int(2)],
                facade_opts(),
            ),
        );
        let list: Vec<Term> = (0..1000).map(Term::Int).collect();
        time(
            py,
            &session,
            "builtins.len(1000 ints)",
            &call_body("builtins", "len", vec![Term::List(list)]),
        );
        session.exec_for_bench(py, "def identity(x): return x");
        let big: Vec<u8> = (0..16u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        time(
            py,
            &session,
            "identity(16 MiB binary)",
            &call_body("__main__", "identity", vec![Term::Binary(big)]),
        );
        session.close(py);
    });
}

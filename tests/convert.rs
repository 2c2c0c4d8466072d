//! Round trips through real CPython: ETF -> Python objects -> ETF.

use proptest::prelude::*;
use pyo3::prelude::*;
use pyport::convert::{self, Types};
use pyport::error::{BadTerm, Error};
use pyport::etf::{self, Term};
use std::sync::Once;

fn python() {
    static START: Once = Once::new();
    START.call_once(|| {
        pyport::python::init_main(|py| pyport::erlang_module::erlang_module(py).map(drop))
            .expect("python starts");
    });
}

fn with_types<R>(f: impl FnOnce(Python<'_>, &Types) -> R) -> R {
    python();
    Python::attach(|py| {
        let types = Types::from_module(&pyport::erlang_module::erlang_module(py).unwrap()).unwrap();
        let r = f(py, &types);
        types.clear();
        r
    })
}

fn round_trip(py: Python<'_>, types: &Types, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let obj = convert::decode(py, types, bytes)?;
    let mut out = Vec::new();
    convert::encode(types, &obj, &mut out)?;
    Ok(out)
}

fn py_eval<'py>(py: Python<'py>, code: &str) -> Bound<'py, PyAny> {
    let code = std::ffi::CString::new(code).unwrap();
    py.eval(&code, None, None).unwrap()
}

fn encode_py(types: &Types, obj: &Bound<'_, PyAny>) -> Result<Term, Error> {
    let mut out = Vec::new();
    convert::encode(types, obj, &mut out)?;
    Ok(Term::decode(&out).unwrap())
}

#[test]
fn special_atoms_and_bytes_wrapper() {
    with_types(|py, types| {
        for (input, expect) in [
            (Term::atom("nil"), Term::atom("none")),
            (Term::atom("undefined"), Term::atom("none")),
            (
                Term::Tuple(vec![Term::atom("bytes"), Term::Binary(b"ab".to_vec())]),
                Term::Binary(b"ab".to_vec()),
            ),
        ] {
            let out = round_trip(py, types, &input.encode()).unwrap();
            assert_eq!(Term::decode(&out).unwrap(), expect);
        }
        let obj = convert::decode(py, types, &Term::Binary(vec![0xff]).encode()).unwrap();
        assert_eq!(obj.get_type().name().unwrap().to_string(), "bytes");
        let obj = convert::decode(py, types, &Term::atom("ok").encode()).unwrap();
        assert_eq!(obj.get_type().name().unwrap().to_string(), "Atom");
    });
}

#[test]
fn python_only_values() {
    with_types(|py, types| {
        let nan = encode_py(
            types,
            &py_eval(py, "[float('nan'), float('inf'), -float('inf')]"),
        )
        .unwrap();
        assert_eq!(
            nan,
            Term::List(vec![
                Term::atom("nan"),
                Term::atom("infinity"),
                Term::atom("neg_infinity")
            ])
        );
        let set = encode_py(types, &py_eval(py, "frozenset([3])")).unwrap();
        assert_eq!(set, Term::List(vec![Term::Int(3)]));
        let big = encode_py(types, &py_eval(py, "-(2**64)")).unwrap();
        assert_eq!(big.encode()[1], etf::SMALL_BIG);
        let err = encode_py(types, &py_eval(py, "object()")).unwrap_err();
        assert_eq!(err, Error::BadTerm(BadTerm::Unsupported("object".into())));
        let nested = py_eval(py, "[]");
        let mut cur = nested.clone();
        for _ in 0..1100 {
            let inner = pyo3::types::PyList::empty(py);
            cur.call_method1("append", (&inner,)).unwrap();
            cur = inner.into_any();
        }
        assert_eq!(
            encode_py(types, &nested).unwrap_err(),
            Error::BadTerm(BadTerm::TooDeep)
        );
    });
}

#[test]
fn deep_erlang_nesting_is_refused_without_crashing() {
    with_types(|py, types| {
        let mut bytes = vec![etf::VERSION];
        for _ in 0..1_000_000 {
            bytes.extend_from_slice(&[etf::LIST, 0, 0, 0, 1]);
        }
        bytes.push(etf::NIL);
        bytes.extend(std::iter::repeat_n(etf::NIL, 1_000_000));
        assert_eq!(
            convert::decode(py, types, &bytes).unwrap_err(),
            Error::BadTerm(BadTerm::TooDeep)
        );
    });
}

fn arb_term() -> impl Strategy<Value = Term> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Term::Int),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Term::Float),
        "[a-z][a-zA-Z_é😀]{0,10}"
            .prop_filter("special atoms", |a| ![
                "true",
                "false",
                "none",
                "nil",
                "undefined",
                "bytes"
            ]
            .contains(&a.as_str()))
            .prop_map(Term::Atom),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Term::Binary),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Term::List),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Term::Tuple),
            // Binary keys, unique: Python's 1 == 1.0 == True would merge other keys.
            proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 0..6),
                inner,
                0..5
            )
            .prop_map(|m| Term::Map(m.into_iter().map(|(k, v)| (Term::Binary(k), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    #[test]
    fn terms_survive_python(t in arb_term()) {
        let out = with_types(|py, types| round_trip(py, types, &t.encode())).unwrap();
        prop_assert_eq!(Term::decode(&out).unwrap(), t);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut input = vec![etf::VERSION];
        input.extend(bytes);
        let _ = with_types(|py, types| round_trip(py, types, &input));
    }
}

// Fuzzing: bytes from nowhere, and valid terms with bytes flipped, never panic or hang
// in the ETF reader, the request decoder or the conversion into Python objects; they
// are an error or a value. `make fuzz` runs these with PROPTEST_CASES=1000000.

/// A valid term's encoding with some bytes changed.
fn mutated_term() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<i64>(),
        proptest::collection::vec((any::<u16>(), any::<u8>()), 1..4),
    )
        .prop_map(|(n, flips)| {
            let mut bytes = Term::Tuple(vec![
                Term::atom("call"),
                Term::Binary(b"operator".to_vec()),
                Term::Int(n),
                Term::List(vec![
                    Term::Int(n),
                    Term::Binary(vec![1, 2, 3]),
                    Term::atom("x"),
                ]),
                Term::Map(vec![(Term::atom("k"), Term::Float(1.5))]),
                Term::Map(vec![]),
            ])
            .encode();
            for (at, b) in flips {
                let i = at as usize % bytes.len();
                bytes[i] = b;
            }
            bytes
        })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|mut v| {
            v.insert(0, etf::VERSION);
            v
        }),
        proptest::collection::vec(any::<u8>(), 0..64),
        mutated_term(),
    ]
}

proptest! {
    #[test]
    fn fuzz_decoders_never_panic(bytes in any_input()) {
        let _ = Term::decode(&bytes);
        let _ = pyport::request::Request::decode(&bytes);
        with_types(|py, types| {
            let _ = convert::decode(py, types, &bytes);
        });
    }

    #[test]
    fn fuzz_frame_reader_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        chunks in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let mut reader = pyport::framing::FrameReader::new(1 << 20);
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        for n in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*n).min(rest.len()));
            let mut src = now;
            // both kinds of reader: one that stops at a short read, one that drains
            let _ = reader.fill(&mut src, &mut out, *n % 2 == 0);
            rest = later;
        }
        for item in out {
            if let pyport::framing::Inbound::Frame(f) = item {
                let _ = pyport::framing::split_request(&f);
            }
        }
    }
}

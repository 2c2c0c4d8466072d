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
                "bytes",
                // tags with a built-in decoder (issue 19): their tuples become objects
                "datetime",
                "date",
                "time",
                "timedelta",
                "decimal",
                "uuid",
                "enum",
                "complex",
                "range",
                "ndarray"
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

// Python's data (issue 19): the standard library's shapes, `__index__`, the encoder
// and decoder hooks, and tagged tuples of any shape.

fn tagged(tag: &str, items: Vec<Term>) -> Term {
    let mut all = vec![Term::atom(tag)];
    all.extend(items);
    Term::Tuple(all)
}

fn none_or(t: Option<Term>) -> Term {
    t.unwrap_or_else(|| Term::atom("none"))
}

/// A timezone as the shapes have it: none, an offset in seconds, or a zone name.
fn arb_tz() -> impl Strategy<Value = Term> {
    prop_oneof![
        Just(Term::atom("none")),
        (-86399i64..86400).prop_map(Term::Int),
        prop::sample::select(vec![
            "Europe/Paris",
            "America/New_York",
            "Asia/Kolkata",
            "UTC"
        ])
        .prop_map(|z| Term::Binary(z.as_bytes().to_vec())),
    ]
}

fn ints(v: &[i64]) -> Term {
    Term::Tuple(v.iter().map(|&i| Term::Int(i)).collect())
}

/// A valid term of each standard library shape.
fn arb_stdlib_term() -> impl Strategy<Value = Term> {
    prop_oneof![
        (
            1i64..=9999,
            1i64..=12,
            1i64..=28,
            0i64..24,
            0i64..60,
            0i64..60,
            0i64..1_000_000,
            arb_tz()
        )
            .prop_map(|(y, mo, d, h, mi, s, us, tz)| tagged(
                "datetime",
                vec![
                    Term::Tuple(vec![ints(&[y, mo, d]), ints(&[h, mi, s])]),
                    Term::Int(us),
                    tz
                ]
            )),
        (1i64..=9999, 1i64..=12, 1i64..=28)
            .prop_map(|(y, mo, d)| tagged("date", vec![ints(&[y, mo, d])])),
        (
            0i64..24,
            0i64..60,
            0i64..60,
            0i64..1_000_000,
            prop::option::of(-86399i64..86400)
        )
            .prop_map(|(h, mi, s, us, tz)| tagged(
                "time",
                vec![ints(&[h, mi, s]), Term::Int(us), none_or(tz.map(Term::Int))]
            )),
        (-86_400_000_000i64 * 999_999..86_400_000_000 * 999_999)
            .prop_map(|us| tagged("timedelta", vec![Term::Int(us)])),
        any::<u128>().prop_map(|u| {
            let h = format!("{u:032x}");
            let text = format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            );
            tagged("uuid", vec![Term::Binary(text.into_bytes())])
        }),
        (any::<f64>(), any::<f64>())
            .prop_filter("finite", |(a, b)| a.is_finite() && b.is_finite())
            .prop_map(|(a, b)| tagged("complex", vec![Term::Float(a), Term::Float(b)])),
        (
            any::<i64>(),
            any::<i64>(),
            any::<i64>().prop_filter("step", |s| *s != 0)
        )
            .prop_map(|(a, b, c)| tagged("range", vec![Term::Int(a), Term::Int(b), Term::Int(c)])),
        prop::sample::select(vec!["safe", "unsafe", "unknown"]).prop_map(|m| tagged(
            "enum",
            vec![
                Term::Binary(b"uuid.SafeUUID".to_vec()),
                Term::Binary(m.as_bytes().to_vec())
            ]
        )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every standard library shape becomes its Python object and comes back the same.
    #[test]
    fn stdlib_shapes_survive_python(t in arb_stdlib_term()) {
        let out = with_types(|py, types| {
            let obj = convert::decode(py, types, &t.encode())?;
            prop_assert!(!obj.is_instance_of::<pyo3::types::PyTuple>(), "{t:?} stayed a tuple");
            let mut out = Vec::new();
            convert::encode(types, &obj, &mut out)?;
            Ok(out)
        });
        let out = match out {
            Ok(out) => out,
            Err(e) => return Err(TestCaseError::fail(format!("{t:?}: {e:?}"))),
        };
        prop_assert_eq!(Term::decode(&out).unwrap(), t);
    }

    /// Decimals from Python go to Erlang and back to an equal Decimal.
    #[test]
    fn decimals_survive_erlang(sign in 0u8..2, digits in proptest::collection::vec(0u8..10, 1..40),
                               exp in -40i32..40) {
        let equal = with_types(|py, types| {
            let digits: Vec<String> = digits.iter().map(|d| d.to_string()).collect();
            let code = format!(
                "__import__('decimal').Decimal(({sign}, ({},), {exp}))",
                digits.join(",")
            );
            let d = py_eval(py, &code);
            let mut out = Vec::new();
            convert::encode(types, &d, &mut out).unwrap();
            let back = convert::decode(py, types, &out).unwrap();
            back.eq(&d).unwrap() && back.get_type().is(d.get_type())
        });
        prop_assert!(equal);
    }

    /// Any integer an `__index__` gives is the integer.
    #[test]
    fn index_objects_are_integers(n in any::<i128>()) {
        let t = with_types(|py, types| {
            let obj = py_eval(py, &format!(
                "type('I', (), {{'__index__': lambda self: {n}}})()"
            ));
            let mut out = Vec::new();
            convert::encode(types, &obj, &mut out).unwrap();
            Term::decode(&out).unwrap()
        });
        let v: Vec<u8> = {
            let mut o = Vec::new();
            with_types(|py, types| {
                convert::encode(types, &py_eval(py, &n.to_string()), &mut o).unwrap()
            });
            o
        };
        prop_assert_eq!(t, Term::decode(&v).unwrap());
    }

    /// A tuple tagged with a built-in tag but of any other content never panics: it is
    /// its Python object, the tuple unchanged, or an error (a Python exception, such as
    /// a date out of range or numpy not importing).
    #[test]
    fn tagged_garbage_never_panics(
        tag in prop::sample::select(vec!["datetime", "date", "time", "timedelta", "decimal",
                                         "uuid", "enum", "complex", "range", "ndarray"]),
        items in proptest::collection::vec(arb_term(), 0..5),
    ) {
        let t = tagged(tag, items);
        let r = with_types(|py, types| round_trip(py, types, &t.encode()));
        match r {
            Ok(out) => {
                let back = Term::decode(&out).unwrap();
                // what stayed a tuple comes back unchanged; what became an object
                // comes back in its shape, tagged the same
                match &back {
                    Term::Tuple(xs) => prop_assert_eq!(&xs[0], &Term::atom(tag)),
                    other => prop_assert!(tag == "ndarray", "{t:?} -> {other:?}"),
                }
            }
            Err(Error::Python { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("{t:?}: {e:?}"))),
        }
    }
}

#[test]
fn encoders_decoders_and_erlang_method() {
    with_types(|py, types| {
        let m = py_eval(py, "__import__('erlang')");
        let point = py_eval(
            py,
            "type('Point', (), {'__init__': lambda s, x: setattr(s, 'x', x)})",
        );
        let enc = py_eval(py, "lambda p: (__import__('erlang').atom('point'), p.x)");
        m.call_method1("register_encoder", (&point, enc)).unwrap();
        let dec = py_eval(py, "lambda t: ('decoded', t[1])");
        m.call_method1("register_decoder", ("pyport_test_point", dec))
            .unwrap();
        // an instance, and one of a subclass
        let sub = py_eval(py, "lambda base: type('Sub', (base,), {})");
        let sub = sub.call1((&point,)).unwrap();
        for class in [&point, &sub] {
            let obj = class.call1((7,)).unwrap();
            assert_eq!(
                encode_py(types, &obj).unwrap(),
                Term::Tuple(vec![Term::atom("point"), Term::Int(7)])
            );
        }
        // a decoder
        let t = Term::Tuple(vec![Term::atom("pyport_test_point"), Term::Int(1)]).encode();
        let obj = convert::decode(py, types, &t).unwrap();
        assert_eq!(
            encode_py(types, &obj).unwrap(),
            Term::Tuple(vec![Term::Binary(b"decoded".to_vec()), Term::Int(1)])
        );
        // __erlang__
        let obj = py_eval(py, "type('C', (), {'__erlang__': lambda self: [1, 2]})()");
        assert_eq!(
            encode_py(types, &obj).unwrap(),
            Term::List(vec![Term::Int(1), Term::Int(2)])
        );
        // an encoder that raises: its exception
        let boom = py_eval(py, "type('Boom', (), {})");
        let fail = py_eval(py, "lambda o: 1 / 0");
        m.call_method1("register_encoder", (&boom, fail)).unwrap();
        match encode_py(types, &boom.call0().unwrap()) {
            Err(Error::Python { kind, .. }) => assert_eq!(kind, "ZeroDivisionError"),
            other => panic!("{other:?}"),
        }
        // unknown: unsupported
        assert_eq!(
            encode_py(types, &py_eval(py, "object()")).unwrap_err(),
            Error::BadTerm(BadTerm::Unsupported("object".into()))
        );
    });
}


# ---------------------------------------------------------------------------------------
# Conversions past the built-in mapping (compiled into the `erlang` module after
# erlang.py; see docs/api.md, "Type mapping", and src/convert.rs).
#
# The port program converts the exact built-in types itself. An object of any other
# type comes here once per object (`_encode_other`), through a per-class table: an
# encoder registered for the class or a base (`register_encoder`), the class's
# `__erlang__` method, then the standard library's types and numpy's. A tuple from
# Erlang whose first element is an atom with a decoder (`register_decoder`, or one of
# the tags below) comes here to become its Python value (`_decode_tagged`).
# ---------------------------------------------------------------------------------------

__all__ += ["register_encoder", "register_decoder"]

_encoders = {}
_decoders = {}
# class -> encoder (or None), resolved over the MRO; cleared when one is registered
_encoder_cache = {}
_ENCODER_CACHE_MAX = 4096


class _NoConversion:
    """`_encode_other`'s answer for an object with no Erlang form."""

    __slots__ = ()


_NO_CONVERSION = _NoConversion()


class _TooLarge:
    """`_encode_other`'s answer for an array whose list form would pass max_reply."""

    __slots__ = ("size",)

    def __init__(self, size):
        self.size = size


def register_encoder(cls, fn):
    """Converts objects of ``cls`` (and of its subclasses) with ``fn(obj)``, which returns
    something convertible. Applies to this context; registering again replaces."""
    if not isinstance(cls, type):
        raise TypeError("register_encoder takes a class, not %s" % type(cls).__name__)
    if not callable(fn):
        raise TypeError("the encoder must be callable")
    _encoders[cls] = fn
    _encoder_cache.clear()


def register_decoder(tag, fn):
    """Converts each tuple from Erlang whose first element is the atom ``tag`` with
    ``fn(tuple)`` (the tuple as decoded, its first element the ``erlang.Atom``). Applies
    to this context; registering again replaces, ``fn=None`` removes."""
    if not isinstance(tag, str):
        raise TypeError("the tag is an atom name (str), not %s" % type(tag).__name__)
    if fn is None:
        _decoders.pop(str(tag), None)
        return
    if not callable(fn):
        raise TypeError("the decoder must be callable")
    _decoders[str(tag)] = fn


def _encoder_for(cls):
    try:
        return _encoder_cache[cls]
    except KeyError:
        pass
    fn = None
    for base in cls.__mro__:
        fn = _encoders.get(base)
        if fn is not None:
            break
    else:
        method = getattr(cls, "__erlang__", None)
        if callable(method):
            fn = method
        else:
            fn = _builtin_encoder(cls)
    if len(_encoder_cache) >= _ENCODER_CACHE_MAX:
        _encoder_cache.clear()
    _encoder_cache[cls] = fn
    return fn


def _encode_other(obj, arrays_binary, max_reply):
    fn = _encoder_for(type(obj))
    if fn is None:
        return _NO_CONVERSION
    if fn is _encode_ndarray:
        return fn(obj, arrays_binary, max_reply)
    return fn(obj)


# --- the standard library ---------------------------------------------------------------

_A_DATETIME = Atom("datetime")
_A_DATE = Atom("date")
_A_TIME = Atom("time")
_A_TIMEDELTA = Atom("timedelta")
_A_DECIMAL = Atom("decimal")
_A_UUID = Atom("uuid")
_A_ENUM = Atom("enum")
_A_COMPLEX = Atom("complex")
_A_RANGE = Atom("range")
_A_NDARRAY = Atom("ndarray")


def _tz_out(tz, at):
    """None (naive), a zone key (a ZoneInfo), or the UTC offset in whole seconds."""
    if tz is None:
        return None
    import sys

    zoneinfo = sys.modules.get("zoneinfo")
    if zoneinfo is not None and isinstance(tz, zoneinfo.ZoneInfo):
        return tz.key
    offset = tz.utcoffset(at)
    if offset is None:
        return None
    return offset.days * 86400 + offset.seconds


def _tz_in(tz):
    import datetime

    if tz is None:
        return None
    if isinstance(tz, int) and not isinstance(tz, bool):
        if tz == 0:
            return datetime.timezone.utc
        return datetime.timezone(datetime.timedelta(seconds=tz))
    if isinstance(tz, str):
        try:
            import zoneinfo
        except (ImportError, AttributeError) as e:
            # CPython 3.12's _zoneinfo does not load in a sub-interpreter
            raise ImportError("a time zone name needs zoneinfo, which does not import "
                              "in this context: %s" % (e,)) from None
        return zoneinfo.ZoneInfo(tz)
    raise ValueError("a time zone is none, an offset in seconds or a zone name")


def _encode_datetime(d):
    return (_A_DATETIME, ((d.year, d.month, d.day), (d.hour, d.minute, d.second)),
            d.microsecond, _tz_out(d.tzinfo, d))


def _encode_date(d):
    return (_A_DATE, (d.year, d.month, d.day))


def _encode_time(t):
    return (_A_TIME, (t.hour, t.minute, t.second), t.microsecond, _tz_out(t.tzinfo, None))


def _encode_timedelta(t):
    return (_A_TIMEDELTA, (t.days * 86400 + t.seconds) * 1000000 + t.microseconds)


def _encode_decimal(d):
    return (_A_DECIMAL, str(d))


def _encode_uuid(u):
    return (_A_UUID, str(u))


def _encode_enum(e):
    cls = type(e)
    return (_A_ENUM, "%s.%s" % (cls.__module__, cls.__qualname__), e.name)


def _encode_complex(c):
    return (_A_COMPLEX, float(c.real), float(c.imag))


def _encode_range(r):
    return (_A_RANGE, r.start, r.stop, r.step)


def _encode_fspath(p):
    return p.__fspath__()


def _encode_index(obj):
    import operator

    return operator.index(obj)


def _encode_float(obj):
    return float(obj)


def _encode_bool(obj):
    return bool(obj)


# (module, class, encoder), in order (a datetime is a date): a class of a module not
# imported yet has no instances to convert
_STDLIB_ENCODERS = (
    ("builtins", "complex", _encode_complex),
    ("builtins", "range", _encode_range),
    ("datetime", "datetime", _encode_datetime),
    ("datetime", "date", _encode_date),
    ("datetime", "time", _encode_time),
    ("datetime", "timedelta", _encode_timedelta),
    ("decimal", "Decimal", _encode_decimal),
    ("uuid", "UUID", _encode_uuid),
    ("enum", "Enum", _encode_enum),
    ("pathlib", "PurePath", _encode_fspath),
)

# numpy's classes by name, likewise in order
_NUMPY_ENCODERS = (
    ("numpy", "ndarray", None),
    ("numpy", "bool_", _encode_bool),
    ("numpy", "integer", _encode_index),
    ("numpy", "floating", _encode_float),
    ("numpy", "complexfloating", _encode_complex),
)


def _first_encoder(cls, table):
    import sys

    for module_name, class_name, fn in table:
        # a module another thread is importing may not have the class yet
        base = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(base, type) and issubclass(cls, base):
            return fn or _encode_ndarray
    return None


def _builtin_encoder(cls):
    fn = _first_encoder(cls, _STDLIB_ENCODERS)
    if fn is None:
        module = getattr(cls, "__module__", "") or ""
        if module == "numpy" or module.startswith("numpy."):
            fn = _first_encoder(cls, _NUMPY_ENCODERS)
    if fn is None and hasattr(cls, "__index__"):
        fn = _encode_index
    return fn


# --- numpy --------------------------------------------------------------------------------

# dtype kinds with a binary form: bool, signed, unsigned, float, complex
_BINARY_KINDS = frozenset("biufc")


def _encode_ndarray(a, binary, max_reply):
    if binary and a.dtype.kind in _BINARY_KINDS:
        if a.nbytes > max_reply:
            return _TooLarge(a.nbytes)
        import numpy as np

        little = a.dtype.newbyteorder("<")
        if a.dtype != little or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=little)
        return (_A_NDARRAY, a.dtype.name, list(a.shape), memoryview(a))
    # each element takes two bytes at least in the list form
    if a.size * 2 > max_reply:
        return _TooLarge(a.size * 2)
    return a.tolist()


def _numpy():
    try:
        import numpy
    except ImportError as e:
        raise ImportError("an {ndarray, DType, Shape, Data} tuple needs numpy, which "
                          "does not import in this context: %s" % (e,)) from None
    return numpy


def _decode_ndarray(t):
    if len(t) != 4:
        return t
    _, dtype, shape, data = t
    if not (isinstance(dtype, str) and isinstance(shape, list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for n in shape)
            and isinstance(data, (bytes, bytearray, str))):
        return t
    if not isinstance(data, bytearray):
        # the array owns writable memory (the port program sends a bytearray)
        data = bytearray(data.encode() if isinstance(data, str) else data)
    np = _numpy()
    dt = np.dtype(dtype).newbyteorder("<")
    count = 1
    for n in shape:
        count *= n
    if count * dt.itemsize != len(data):
        raise ValueError("ndarray of shape %r and dtype %s takes %d bytes, not %d"
                         % (tuple(shape), dtype, count * dt.itemsize, len(data)))
    a = np.frombuffer(data, dtype=dt).reshape(shape)
    if not dt.isnative:
        a = a.astype(dt.newbyteorder("="))
    return a


# --- from Erlang --------------------------------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_ints(t, n):
    return isinstance(t, tuple) and len(t) == n and all(_is_int(v) for v in t)


def _decode_datetime(t):
    import datetime

    if len(t) != 4 or not (isinstance(t[1], tuple) and len(t[1]) == 2
                           and _is_ints(t[1][0], 3) and _is_ints(t[1][1], 3)
                           and _is_int(t[2])):
        return t
    (y, mo, d), (h, mi, s) = t[1]
    return datetime.datetime(y, mo, d, h, mi, s, t[2], tzinfo=_tz_in(t[3]))


def _decode_date(t):
    import datetime

    if len(t) != 2 or not _is_ints(t[1], 3):
        return t
    return datetime.date(*t[1])


def _decode_time(t):
    import datetime

    if len(t) != 4 or not (_is_ints(t[1], 3) and _is_int(t[2])):
        return t
    h, mi, s = t[1]
    return datetime.time(h, mi, s, t[2], tzinfo=_tz_in(t[3]))


def _decode_timedelta(t):
    import datetime

    if len(t) != 2 or not _is_int(t[1]):
        return t
    return datetime.timedelta(microseconds=t[1])


def _decimal_aborts_here():
    """CPython 3.12 aborts the process when a second sub-interpreter imports `decimal`
    (its C module keeps state across interpreters): a tuple from Erlang must not be
    the import that does it. Where the context's code imported it already, it is in."""
    import sys

    if sys.version_info >= (3, 13) or "decimal" in sys.modules:
        return False
    try:
        import _xxsubinterpreters as interpreters
    except ImportError:
        return False
    return interpreters.get_current() != interpreters.get_main()


def _decode_decimal(t):
    if len(t) != 2 or not isinstance(t[1], str):
        return t
    if _decimal_aborts_here():
        raise ImportError("a {decimal, Text} tuple needs decimal, which CPython 3.12 "
                          "cannot load safely in an owngil sub-interpreter (a second "
                          "one importing it aborts the process): use a main context, "
                          "or Python 3.13")
    import decimal

    return decimal.Decimal(t[1])


def _decode_uuid(t):
    if len(t) != 2 or not isinstance(t[1], str):
        return t
    import uuid

    return uuid.UUID(t[1])


def _decode_enum(t):
    if len(t) != 3 or not (isinstance(t[1], str) and isinstance(t[2], str)):
        return t
    import enum

    obj = _lookup_qualified(t[1])
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        raise ValueError("%s is not an enum class" % t[1])
    return obj[t[2]]


def _lookup_qualified(name):
    import importlib

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError("no module for %s" % name)


_FLOAT_ATOMS = {"nan": float("nan"), "infinity": float("inf"), "neg_infinity": float("-inf")}


def _float_in(v):
    if isinstance(v, Atom):
        return _FLOAT_ATOMS[str(v)]
    return float(v)


def _decode_complex(t):
    if len(t) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                              or (isinstance(v, Atom) and str(v) in _FLOAT_ATOMS)
                              for v in t[1:]):
        return t
    return complex(_float_in(t[1]), _float_in(t[2]))


def _decode_range(t):
    if len(t) != 4 or not all(_is_int(v) for v in t[1:]):
        return t
    return range(t[1], t[2], t[3])


_BUILTIN_DECODERS = {
    "datetime": _decode_datetime,
    "date": _decode_date,
    "time": _decode_time,
    "timedelta": _decode_timedelta,
    "decimal": _decode_decimal,
    "uuid": _decode_uuid,
    "enum": _decode_enum,
    "complex": _decode_complex,
    "range": _decode_range,
    "ndarray": _decode_ndarray,
}


def _decode_tagged(t):
    fn = _decoders.get(t[0])
    if fn is None:
        fn = _BUILTIN_DECODERS.get(t[0])
        if fn is None:
            return t
    return fn(t)

"""Types and helpers for Python code that talks to Erlang through pyport.

pyport creates this module in every interpreter it starts (it is compiled into the
port program), so ``import erlang`` works in every context.
"""

import io

import _pyport

__all__ = [
    "Atom", "Pid", "Ref", "Opaque", "Error", "CallTimeout",
    "atom", "call", "async_call", "send", "self", "whereis",
]


class Atom(str):
    """An Erlang atom. A ``str`` subclass: compares and hashes like its text."""

    __slots__ = ()

    def __repr__(self):
        return "erlang.atom(%s)" % str.__repr__(self)


def atom(name):
    """Returns the atom ``name``: the only way Python data becomes an Erlang atom."""
    if not isinstance(name, str):
        raise TypeError("atom name must be str, not %s" % type(name).__name__)
    if len(name) > 255:
        raise ValueError("atom name longer than 255 characters")
    return Atom(name)


class _Term:
    """An Erlang term Python has no type for, kept as its external format bytes so it
    goes back to Erlang unchanged. Hashable; equal when the bytes are equal."""

    __slots__ = ("_etf",)

    def __init__(self, etf):
        self._etf = bytes(etf)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._etf == other._etf

    def __lt__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._etf < other._etf

    def __le__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._etf <= other._etf

    def __gt__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._etf > other._etf

    def __ge__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._etf >= other._etf

    def __hash__(self):
        return hash((type(self).__name__, self._etf))

    def __repr__(self):
        return "<erlang.%s %s>" % (type(self).__name__, self._etf.hex())

    def __reduce__(self):
        return (type(self), (self._etf,))


class Pid(_Term):
    """An Erlang process identifier."""

    __slots__ = ()


class Ref(_Term):
    """An Erlang reference."""

    __slots__ = ()


class Opaque(_Term):
    """A port, fun, bitstring or improper list: passed through unchanged."""

    __slots__ = ()


class Error(Exception):
    """Raised when a call into Erlang fails; ``args[0]`` carries the Erlang reason."""


class CallTimeout(BaseException):
    """Raised in Python code that runs past its request's timeout (the Erlang caller
    already got ``{error, timeout}``). A ``BaseException``, so ``except Exception``
    does not swallow it."""


def call(name, *args):
    """Runs the Erlang function registered as ``name`` (``pyport:register_function/2``)
    with ``args`` and returns its result. Raises ``erlang.Error`` if it fails. Callbacks
    are re-entrant: the function may call back into this context."""
    return _pyport.call(name, args)


async def async_call(name, *args):
    """``call`` for asyncio code: the event loop keeps running while Erlang works."""
    import asyncio
    return await asyncio.get_running_loop().run_in_executor(None, _pyport.call, name, args)


def send(dest, term):
    """Sends ``term`` to ``dest`` (an ``erlang.Pid`` or a registered name). Never
    blocks; messages from one sender arrive in order; an unknown name drops it."""
    _pyport.send(dest, term)


def self():
    """The pid of the Erlang process that made the current request, or None."""
    return _pyport.caller()


def whereis(name):
    """The pid registered as ``name`` in the Erlang node, or None."""
    return _pyport.call("$whereis", (name,))


class _Output(io.TextIOBase):
    """sys.stdout / sys.stderr: complete lines go to Erlang's logger."""

    def __init__(self, level, name):
        self._level = level
        self._name = name
        self._pending = ""

    @property
    def name(self):
        return self._name

    @property
    def encoding(self):
        return "utf-8"

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            _pyport.log(self._level, line)
        if self._pending:
            _pyport.unflushed()
        return len(text)

    def flush(self):
        if self._pending:
            _pyport.log(self._level, self._pending)
            self._pending = ""


def _flush_output():
    import sys
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _Output):
            stream.flush()


def _before_end():
    """Runs before the interpreter ends: flush output, and drop the threading module's
    record of this thread (not a ``threading`` thread), whose clean-up would otherwise
    run after the module is torn down and print an ignored exception."""
    import sys
    _flush_output()
    threading = sys.modules.get("threading")
    info = getattr(threading, "_thread_local_info", None)
    if info is not None and hasattr(info, "_track_dummy_thread_ref"):
        del info._track_dummy_thread_ref


def _install_output():
    import sys
    sys.stdout = _Output("info", "<stdout>")
    sys.stderr = _Output("warning", "<stderr>")


_LEVELS = ((50, "critical"), (40, "error"), (30, "warning"), (20, "info"))


def _add_log_handler(logging):
    class _Handler(logging.Handler):
        def emit(self, record):
            try:
                text = self.format(record)
                level = next((name for no, name in _LEVELS if record.levelno >= no), "debug")
                _pyport.log(level, text)
            except Exception:
                self.handleError(record)

    root = logging.getLogger()
    if not any(type(h).__name__ == "_Handler" for h in root.handlers):
        root.addHandler(_Handler())


class _LoggingHook:
    """Adds the handler when ``logging`` is first imported, so contexts that never log
    do not pay for importing it (about 2 MiB and several ms per interpreter)."""

    def find_spec(self, name, path=None, target=None):
        if name != "logging":
            return None
        import sys
        from importlib.machinery import PathFinder
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_hook(module):
                exec_module(module)
                _add_log_handler(module)

            spec.loader.exec_module = exec_and_hook
        return spec


def _install_logging():
    import sys
    if "logging" in sys.modules:
        _add_log_handler(sys.modules["logging"])
    elif not any(isinstance(f, _LoggingHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _LoggingHook())

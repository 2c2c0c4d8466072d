"""Types and helpers for Python code that talks to Erlang through pyport.

pyport creates this module in every interpreter it starts (it is compiled into the
port program), so ``import erlang`` works in every context.
"""

__all__ = ["Atom", "Pid", "Ref", "Opaque", "Error", "atom"]


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

"""CPython's own tests, one at a time, for pyport_cpython_SUITE.

Inside a context the suite calls ``list_tests(name)`` once and ``run_test(id)`` per test
(each request with its own timeout). As the control, the same Python runs this file as
a plain process:

    python3 runner.py control NAME TIMEOUT START

which runs the tests of NAME from index START in a ``threading.Thread`` (as a context
runs them on a thread that is not the main one) and prints one line per test:
``S<TAB>index<TAB>test id`` as it starts, ``T<TAB>index<TAB>test id<TAB>outcome<TAB>detail``
when it ended. A test past TIMEOUT seconds is
printed as ``timeout`` and the process ends (exit 3); the suite starts it again from
the next test, as it starts a fresh runtime after a timeout in a context.

Tests that need a resource (network, cpu, ...) are skipped on both sides alike.
"""

import contextlib
import io
import sys
import threading
import traceback
import unittest

OUTCOMES = ("pass", "fail", "error", "skip", "xfail", "xpass")


def _setup():
    from test import support
    # Not under regrtest: every resource would count as enabled (network included).
    support.use_resources = []
    support.verbose = 0


def _flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _flatten(t)
        else:
            yield t


def list_tests(name):
    """The ids of the tests of ``name`` (a module, package or class), or
    ``('error', text)`` when it cannot be loaded."""
    _setup()
    try:
        suite = unittest.defaultTestLoader.loadTestsFromName(name)
    except unittest.SkipTest as e:
        return ("skip", str(e))
    except Exception as e:
        return ("error", "%s: %s" % (type(e).__name__, e))
    ids = []
    for t in _flatten(suite):
        # A module that failed to import, or a class whose setUpClass is skipped, is a
        # _FailedTest / _ErrorHolder: run it under its own id all the same.
        ids.append(t.id())
    return ids


class _Result(unittest.TestResult):
    def __init__(self):
        super().__init__()
        self.outcome = None
        self.detail = ""

    def _set(self, outcome, detail=""):
        # The worst outcome of a test and its subtests wins.
        order = {"pass": 0, "skip": 0, "xfail": 0, "xpass": 1, "fail": 2, "error": 3}
        if self.outcome is None or order[outcome] > order[self.outcome]:
            self.outcome = outcome
            self.detail = detail

    @staticmethod
    def _last_line(err):
        # The error's last line, then its causes' (a process pool's BrokenProcessPool
        # carries the worker side's traceback as its cause, where a restriction's
        # message shows): "Outer: ... <- Inner: ...".
        lines, exc, seen = [], err[1], set()
        while exc is not None and id(exc) not in seen and len(lines) < 4:
            seen.add(id(exc))
            text = "".join(traceback.format_exception_only(type(exc), exc))
            last = [l for l in text.splitlines() if l.strip() and l.strip() != "'''"]
            if last:
                lines.append(last[-1].strip()[:300])
            exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        return " <- ".join(lines)

    def addSuccess(self, test):
        self._set("pass")

    def addFailure(self, test, err):
        self._set("fail", self._last_line(err))

    def addError(self, test, err):
        self._set("error", self._last_line(err))

    def addSkip(self, test, reason):
        self._set("skip", str(reason)[:300])

    def addExpectedFailure(self, test, err):
        self._set("xfail")

    def addUnexpectedSuccess(self, test):
        self._set("xpass")

    def addSubTest(self, test, subtest, err):
        if err is not None:
            failure = issubclass(err[0], test.failureException)
            self._set("fail" if failure else "error", self._last_line(err))


def _load(test_id):
    suite = unittest.defaultTestLoader.loadTestsFromName(test_id)
    tests = list(_flatten(suite))
    if len(tests) == 1:
        return tests[0]
    return suite


def run_test(test_id):
    """Runs one test (its class and module fixtures included); returns
    ``(outcome, detail)``. What the test prints is kept out of the way."""
    _setup()
    try:
        test = _load(test_id)
    except Exception as e:
        return ("error", "cannot load: %s: %s" % (type(e).__name__, e))
    result = _Result()
    out = io.StringIO()
    suite = unittest.TestSuite([test])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        suite.run(result)
        # class and module fixtures end here, as unittest's runner ends them
        suite._tearDownPreviousClass(None, result)
        suite._handleModuleTearDown(result)
    if result.outcome is None:
        # an error outside the test (a fixture) comes as an _ErrorHolder
        if result.errors:
            return ("error", result.errors[0][1].strip().splitlines()[-1][:300])
        if result.skipped:
            return ("skip", str(result.skipped[0][1])[:300])
        return ("error", "no outcome")
    if result.outcome in ("pass", "skip") and result.errors:
        # setUpClass/tearDownModule errors are reported besides the test
        return ("error", result.errors[-1][1].strip().splitlines()[-1][:300])
    return (result.outcome, result.detail)


def _clean(text):
    return str(text).replace("\t", " ").replace("\n", " ")


def _control(name, timeout, start):
    ids = list_tests(name)
    if isinstance(ids, tuple):
        print("L\t%s\t%s" % (ids[0], _clean(ids[1])), flush=True)
        return 0
    print("N\t%d" % len(ids), flush=True)
    for i in range(start, len(ids)):
        print("S\t%d\t%s" % (i, ids[i]), flush=True)
        box = []
        # not a daemon: threads a test starts inherit the flag (test_threading checks
        # it), and the process ends with os._exit anyway
        worker = threading.Thread(target=lambda: box.append(run_test(ids[i])),
                                  name="control")
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            print("T\t%d\t%s\ttimeout\t" % (i, ids[i]), flush=True)
            return 3
        outcome, detail = box[0] if box else ("error", "no result")
        print("T\t%d\t%s\t%s\t%s" % (i, ids[i], outcome, _clean(detail)), flush=True)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["control"]:
    import os
    code = _control(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
    sys.stdout.flush()
    os._exit(code)

"""Types and helpers for Python code that talks to Erlang through pyport.

pyport creates this module in every interpreter it starts (it is compiled into the
port program), so ``import erlang`` works in every context.
"""

import contextvars
import io

import _pyport

__all__ = [
    "Atom", "Pid", "Ref", "Opaque", "Error", "CallTimeout", "Interrupted", "ChannelClosed",
    "Busy",
    "atom", "call", "async_call", "send", "self", "whereis", "channel",
]

# The pid that made the request a task or a stream serves (``erlang.self()`` there).
_caller = contextvars.ContextVar("erlang_caller", default=None)


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


class Interrupted(BaseException):
    """Raised in the running request by ``pyport:interrupt/1`` (its caller gets
    ``{error, interrupted}``). A ``BaseException``, like ``CallTimeout``."""


class Busy(Exception):
    """Raised by ``erlang.send`` while its destination's mailbox is over the runtime's
    bound (``max_mailbox``): the message was not sent. ``args[0]`` is the destination.
    Sends to it raise this until its queue is down to half the bound; the few sends
    already on their way when the bound was reached are dropped (``sends_dropped`` in
    ``pyport:info/1``)."""


class ChannelClosed(Exception):
    """Raised by ``Channel.receive`` once the channel is closed and drained."""


class Channel:
    """The Python end of a channel Erlang opened in this context
    (``pyport:channel_open/3``) and feeds with ``pyport:channel_send/2``."""

    __slots__ = ("name", "_id")

    def __init__(self, name):
        self.name = name
        self._id = _pyport.channel_lookup(name)

    def __del__(self):
        # pyport frees a closed channel once no Channel object can take from it.
        try:
            _pyport.channel_release(self._id)
        except Exception:
            pass  # the interpreter is ending, or __init__ failed

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("an erlang.Channel belongs to its context: it cannot be pickled")

    def receive(self, timeout=None):
        """The next item, waiting for it (the context keeps serving other requests
        meanwhile). Raises ``TimeoutError`` after ``timeout`` seconds, and
        ``ChannelClosed`` once the channel is closed and drained."""
        status, item = _pyport.channel_receive(self._id, timeout)
        if status == 1:
            return item
        if status == 2:
            raise ChannelClosed(self.name)
        raise TimeoutError("no item on channel %r within %s s" % (self.name, timeout))

    def try_receive(self):
        """The next item, or None when there is none now (or the channel is closed)."""
        return _pyport.channel_try(self._id)[1]

    def __aiter__(self):
        return self

    async def __anext__(self):
        import asyncio
        loop = asyncio.get_running_loop()
        while True:
            status, item = _pyport.channel_try(self._id)
            if status == 1:
                return item
            if status == 2:
                raise StopAsyncIteration
            if not isinstance(loop, _loop_class or ()):
                await asyncio.sleep(0.001)  # another loop: pyport cannot wake it
                continue
            waiter = loop.create_future()
            loop._pyport_channel_waiters.append(waiter)
            await waiter

    def __repr__(self):
        return "<erlang.Channel %r>" % (self.name,)


def channel(name):
    """The channel ``name`` of this context (``LookupError`` if Erlang opened none)."""
    return Channel(str(name))


def call(name, *args):
    """Runs the Erlang function registered as ``name`` (``pyport:register_function/2``)
    with ``args`` and returns its result. Raises ``erlang.Error`` if it fails. Callbacks
    are re-entrant: the function may call back into this context."""
    return _pyport.call(name, args)


async def async_call(name, *args):
    """``call`` for asyncio code: the event loop keeps running while Erlang works. On
    the context's own loop no thread waits: the result comes back through the loop's
    poll. On any other loop (``asyncio.run`` inside a request) it runs in a thread."""
    import asyncio
    loop = asyncio.get_running_loop()
    if not isinstance(loop, _loop_class or ()):
        return await loop.run_in_executor(None, _pyport.call, name, args)
    future = loop.create_future()
    loop._pyport_pending[_pyport.call_async(name, args)] = future
    return await future


def send(dest, term):
    """Sends ``term`` to ``dest`` (an ``erlang.Pid`` or a registered name). Never
    blocks; messages from one sender arrive in order; an unknown name drops it."""
    _pyport.send(dest, term)


def self():
    """The pid of the Erlang process that made the current request (or the request
    the running task or stream serves), or None."""
    pid = _pyport.caller()
    return pid if pid is not None else _caller.get()


def whereis(name):
    """The pid registered as ``name`` in the Erlang node, or None."""
    return _pyport.call("$whereis", (name,))


def _reload(name, only_if_imported=False):
    """``pyport:reload/2,3`` and the ``watch`` option, in one context: loads module
    ``name`` again from its source (``importlib.reload``), or imports it if this
    interpreter has not yet (unless ``only_if_imported``: then returns False). The
    import system's caches and the module's bytecode cache are dropped first, so a
    file changed a moment ago (the same second, the same size) is read again."""
    import importlib
    import importlib.util
    import sys
    name = str(name)
    if not all(part.isidentifier() for part in name.split(".")):
        raise ValueError("%r is not a module name" % name)
    importlib.invalidate_caches()
    module = sys.modules.get(name)
    if module is None and only_if_imported:
        return False
    spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
    _forget_bytecode(spec)
    if module is None:
        importlib.import_module(name)
    else:
        importlib.reload(module)
    return True


def _forget_bytecode(spec):
    """Removes the ``__pycache__`` file of a module loaded from source: it is checked
    against the source's mtime in whole seconds and its size only."""
    import importlib.machinery
    import os
    origin = getattr(spec, "origin", None)
    cached = getattr(spec, "cached", None)
    if (cached and origin and cached != origin
            and origin.endswith(tuple(importlib.machinery.SOURCE_SUFFIXES))):
        try:
            os.remove(cached)
        except OSError:
            pass


class _Output(io.TextIOBase):
    """sys.stdout / sys.stderr: complete lines go to Erlang's logger."""

    def __init__(self, level, name):
        self._level = level
        self._name = name
        self._pending = ""
        # The level of the log record being written, if a record is (see
        # _route_log_records).
        self._record_level = None

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
        level = self._record_level or self._level
        for line in lines:
            _pyport.log(level, line)
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


def _install_sleep():
    """``time.sleep`` in a request on its context thread ends at once when the request
    times out or is interrupted; everywhere else it is the usual sleep."""
    import time
    if getattr(time.sleep, "_pyport", False):
        return
    plain = time.sleep

    def sleep(seconds):
        if not _pyport.sleep(seconds):
            plain(seconds)

    sleep._pyport = True
    sleep.__doc__ = plain.__doc__
    # pickle (a process pool's task, say) finds it as time.sleep, as the plain one
    sleep.__module__ = "time"
    sleep.__qualname__ = sleep.__name__ = "sleep"
    time.sleep = sleep


def _install_threads():
    """A ``threading`` thread started by a context's code (or by such a thread)
    belongs to that context for its life: ``erlang.call`` goes through it and
    ``erlang.self()`` is the pid of the request that started the thread. Needed in
    ``main`` mode, where contexts share one interpreter. When the context stops, the
    thread's waits in ``erlang.call`` and later ``erlang.*`` calls raise
    ``erlang.Error((context_down, stopped))``."""
    _after_import("threading", _patch_thread)


def _patch_thread(threading):
    thread = threading.Thread
    if getattr(thread.start, "_pyport", False):
        return
    start, bootstrap_inner = thread.start, thread._bootstrap_inner

    def start_in_context(self):
        self._pyport_ticket = _pyport.thread_ticket()
        return start(self)

    def bootstrap_in_context(self):
        ticket = self.__dict__.pop("_pyport_ticket", None)
        if ticket is not None:
            _pyport.adopt(*ticket)
        return bootstrap_inner(self)

    start_in_context._pyport = True
    start_in_context.__doc__ = start.__doc__
    thread.start = start_in_context
    thread._bootstrap_inner = bootstrap_in_context


def _no_daemon_context_thread():
    """A `main` context's thread is one CPython did not start: ``threading`` sees a
    ``_DummyThread``, a daemon, and threads started from it would inherit the flag.
    The thread serving requests is no daemon, as a plain program's worker thread
    (and an `owngil` context's thread) is not: threads it starts are none either."""
    import threading
    thread = threading.current_thread()
    if isinstance(thread, threading._DummyThread):
        thread._daemonic = False


def _install_output():
    import sys
    sys.stdout = _Output("notice", "<stdout>")
    sys.stderr = _Output("warning", "<stderr>")


_LEVELS = ((50, "critical"), (40, "error"), (30, "warning"), (20, "info"))


def _level_name(levelno):
    return next((name for no, name in _LEVELS if levelno >= no), "debug")


def _route_log_records(logging):
    """Log records reach Erlang's logger at their own level. pyport adds no handler:
    the root logger starts with none, as in plain Python, so ``basicConfig`` configures
    it. Records go where the configuration sends them; a ``StreamHandler`` writing to
    pyport's ``sys.stderr``/``sys.stdout`` (``basicConfig``'s default, and
    ``logging.lastResort`` for an unconfigured program) passes its record's level
    along with the text, instead of the stream's own level."""
    cls = logging.StreamHandler
    if getattr(cls.emit, "_pyport", False):
        return
    plain = cls.emit

    def emit(self, record):
        stream = self.stream
        if not isinstance(stream, _Output):
            return plain(self, record)
        stream._record_level = _level_name(record.levelno)
        try:
            plain(self, record)
        finally:
            stream._record_level = None

    emit._pyport = True
    emit.__doc__ = plain.__doc__
    cls.emit = emit


class _PostImportHook:
    """Runs ``action(module)`` right after ``name`` is first imported, so contexts that
    never use a module do not pay for importing it (``logging`` costs about 2 MiB and
    several ms per interpreter, ``asyncio`` more)."""

    def __init__(self, name, action):
        self.name = name
        self.action = action

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        import sys
        from importlib.machinery import PathFinder
        sys.meta_path.remove(self)
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module
            action = self.action

            def exec_and_hook(module):
                exec_module(module)
                action(module)

            spec.loader.exec_module = exec_and_hook
        return spec


def _after_import(name, action):
    import sys
    if name in sys.modules:
        # Another thread of this interpreter (a `main` context) may be importing it
        # right now: importing waits until the module is whole.
        import importlib
        action(importlib.import_module(name))
    elif not any(isinstance(f, _PostImportHook) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(name, action))


def _install_logging():
    _after_import("logging", _route_log_records)


def _install_loop_policy(asyncio):
    """``asyncio.get_event_loop()`` in sync code on a context thread returns the
    context's loop (made on first use): each request starts as a program's main thread
    does, with a current loop. Within a request, an ``asyncio.set_event_loop(None)``
    holds as in plain Python (``get_event_loop()`` then raises ``RuntimeError``) until
    the request ends; so does the one ``asyncio.run()`` makes when it ends."""
    base = type(asyncio.get_event_loop_policy())
    if getattr(base, "_pyport", False):
        return

    class Policy(base):
        _pyport = True

        def set_event_loop(self, loop):
            super().set_event_loop(loop)
            self._local._pyport_unset_in = _pyport.request_serial() if loop is None else None

        def get_event_loop(self):
            if self._local._loop is None:
                unset_in = getattr(self._local, "_pyport_unset_in", None)
                if unset_in is None or unset_in != _pyport.request_serial():
                    loop = _pyport.context_loop()
                    if loop is not None:
                        return loop
            return super().get_event_loop()

    asyncio.set_event_loop_policy(Policy())


def _install_asyncio():
    _after_import("asyncio", _install_loop_policy)


# The event loop of a context ------------------------------------------------------
#
# pyport (Rust) owns the wait: the context thread's poll watches the fds registered
# here, and steps the loop (``_pyport_step``) when they are ready or a timer is due.
# Between steps no loop is running, so sync requests may call ``asyncio.run()``. The
# classes are made on first use: a context that never uses asyncio never imports it.

_loop_class = None

# Outbox tags: what a step produced for Erlang (see src/event_loop.rs).
_OUT_RESULT, _OUT_RESULT_REF, _OUT_ITEM, _OUT_DONE, _OUT_ERROR = range(5)

# A sync generator gives the context back after this many items, or sooner when
# other work waits.
_STREAM_BATCH = 32


def _new_loop():
    """The context's loop (called by pyport once per context, on its thread)."""
    global _loop_class
    if _loop_class is None:
        _loop_class = _define_loop()
    loop = _loop_class()
    import asyncio
    asyncio.set_event_loop(loop)
    return loop


def _define_loop():
    import asyncio
    import os
    import selectors
    import sys
    import threading
    from asyncio import events

    class Selector(selectors._BaseSelectorImpl):
        """A selector over the context's poll: ``select()`` hands over what pyport
        collected (or, when the loop is run from inside a request, waits for real)."""

        def register(self, fileobj, events, data=None):
            key = super().register(fileobj, events, data)
            try:
                _pyport.watch(key.fd, events)
            except BaseException:
                super().unregister(fileobj)
                raise
            return key

        def unregister(self, fileobj):
            key = super().unregister(fileobj)
            _pyport.unwatch(key.fd)
            return key

        def select(self, timeout=None):
            keys = self._fd_to_key
            ready = []
            for fd, mask in _pyport.select(timeout):
                key = keys.get(fd)
                if key is not None and mask & key.events:
                    ready.append((key, mask & key.events))
            return ready

        def close(self):
            for fd in list(self._fd_to_key):
                _pyport.unwatch(fd)
            super().close()

    # A child forked by a task of a pyport loop is ended by pyport once it is back in
    # the loop, with that task's outcome if it ended (src/event_loop.rs). The task is
    # noted before the fork: in the child asyncio's own hook has already cleared the
    # running loop, as in plain CPython.
    forking = []

    def note_forking_task():
        loop = events._get_running_loop()
        if isinstance(loop, Loop):
            forking.append((loop, asyncio.current_task(loop)))

    def mark_forked_task():
        while forking:
            loop, task = forking.pop()
            loop._pyport_forked_task = task

    os.register_at_fork(before=note_forking_task, after_in_child=mark_forked_task,
                        after_in_parent=forking.clear)

    class Stream:
        __slots__ = ("credit", "waiter", "task", "cancelled")

        def __init__(self, credit):
            self.credit = credit
            self.waiter = None
            self.task = None
            self.cancelled = False

    class Loop(asyncio.SelectorEventLoop):
        """asyncio's selector loop over the context's poll, stepped by pyport."""

        def __init__(self):
            super().__init__(Selector())
            self._pyport_ident = threading.get_ident()
            self._pyport_pending = {}   # erlang.async_call id -> future
            self._pyport_streams = {}   # request header -> Stream
            self._pyport_outbox = []    # (tag, header, value) for Erlang
            self._pyport_forked_task = None     # in a forked child: the task that forked
            self._pyport_channel_waiters = []   # coroutines in `async for` on a channel
            sys.set_asyncgen_hooks(firstiter=self._asyncgen_firstiter_hook,
                                   finalizer=self._asyncgen_finalizer_hook)

        # Outside a step (in a sync request), scheduling something tells pyport to
        # look at the loop's next due time after the request; inside a step the step
        # reports it. So a request that leaves the loop alone costs nothing here.

        def call_soon(self, callback, *args, context=None):
            handle = super().call_soon(callback, *args, context=context)
            if self._thread_id is None:
                _pyport.loop_touched()
            return handle

        def call_at(self, when, callback, *args, context=None):
            handle = super().call_at(when, callback, *args, context=context)
            if self._thread_id is None:
                _pyport.loop_touched()
            return handle

        # Called by pyport ------------------------------------------------------

        def _pyport_step(self):
            """One iteration: ready fds and due timers, then ready callbacks."""
            events._set_running_loop(self)
            self._thread_id = self._pyport_ident
            try:
                self._run_once()
            finally:
                self._thread_id = None
                events._set_running_loop(None)
            return self._pyport_due()

        def _pyport_due(self):
            """Seconds until the loop wants a step: 0 now, -1 never."""
            if self._ready:
                return 0.0
            if self._scheduled:
                return max(0.0, self._scheduled[0]._when - self.time())
            return -1.0

        def _pyport_take(self):
            out = self._pyport_outbox
            if not out:
                return None
            self._pyport_outbox = []
            return out

        def _pyport_start_task(self, header, coro, timeout, caller, want_ref):
            context = contextvars.copy_context()
            if caller is not None:
                context.run(_caller.set, caller)
            task = self.create_task(coro, context=context)
            if timeout is not None:
                timer = self.call_later(timeout, task.cancel)
                task.add_done_callback(lambda _t: timer.cancel())
            tag = _OUT_RESULT_REF if want_ref else _OUT_RESULT
            outbox = self._pyport_outbox_append
            task.add_done_callback(lambda t: outbox((tag, header, t)))

        def _pyport_outbox_append(self, entry):
            self._pyport_outbox.append(entry)

        def _pyport_start_stream(self, header, source, window, caller):
            if hasattr(type(source), "__aiter__"):
                pump = self._pyport_pump(header, source.__aiter__(), True)
            else:
                pump = self._pyport_pump(header, iter(source), False)
            stream = Stream(window)
            self._pyport_streams[header] = stream
            context = contextvars.copy_context()
            if caller is not None:
                context.run(_caller.set, caller)
            stream.task = self.create_task(pump, context=context)

        def _pyport_credit(self, header, n):
            stream = self._pyport_streams.get(header)
            if stream is not None:
                stream.credit += n
                waiter = stream.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

        def _pyport_cancel(self, header):
            stream = self._pyport_streams.pop(header, None)
            if stream is not None:
                stream.cancelled = True
                stream.task.cancel()

        def _pyport_channels_changed(self):
            waiters, self._pyport_channel_waiters = self._pyport_channel_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

        def _pyport_resolve(self, cb_id, result):
            future = self._pyport_pending.pop(cb_id, None)
            if future is None or future.done():
                return
            tag, value = result
            if tag == "ok":
                future.set_result(value)
            else:
                future.set_exception(Error(value))

        def _pyport_shutdown(self):
            """The context ends: cancel what runs, let it unwind briefly, close."""
            for future in self._pyport_pending.values():
                future.cancel()
            tasks = asyncio.all_tasks(self)
            for task in tasks:
                task.cancel()
            for _ in range(100):
                if not any(not t.done() for t in tasks) or self._pyport_due() != 0.0:
                    break
                self._pyport_step()
            self.close()

        # Streams ----------------------------------------------------------------

        async def _pyport_credit_wait(self, stream):
            while stream.credit <= 0:
                stream.waiter = self.create_future()
                try:
                    await stream.waiter
                finally:
                    stream.waiter = None

        async def _pyport_pump(self, header, it, is_async):
            """Sends the items of ``it`` while the stream has credit. A sync iterator
            gives the context back every ``_STREAM_BATCH`` items, or sooner when other
            work waits, so a long stream does not monopolise its context."""
            stream = self._pyport_streams[header]
            try:
                n = 0
                while True:
                    await self._pyport_credit_wait(stream)
                    if is_async:
                        try:
                            item = await it.__anext__()
                        except StopAsyncIteration:
                            break
                    else:
                        try:
                            item = next(it)
                        except StopIteration:
                            break
                        n += 1
                        if n >= _STREAM_BATCH or _pyport.busy():
                            n = 0
                            await asyncio.sleep(0)
                    self._pyport_outbox.append((_OUT_ITEM, header, item))
                    stream.credit -= 1
                self._pyport_outbox.append((_OUT_DONE, header, None))
            except asyncio.CancelledError as e:
                if not stream.cancelled:
                    # Cancelled by other code than pyport's (not the consumer): the
                    # consumer still gets its final frame.
                    self._pyport_outbox.append((_OUT_ERROR, header, e))
                    raise
            except BaseException as e:
                self._pyport_outbox.append((_OUT_ERROR, header, e))
            finally:
                self._pyport_streams.pop(header, None)
                if is_async:
                    aclose = getattr(it, "aclose", None)
                    if aclose is not None:
                        await aclose()
                else:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()

    return Loop

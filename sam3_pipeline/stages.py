"""Running the stages of one video side by side, joined by small bounded queues, and the time each
stage spends working.

SAM3 should never wait for the CPU work around it: on a GPU worker that is paid-for GPU time.
Decoding runs ahead of SAM3 in a thread (`RunAhead`): FFmpeg and PyTorch release the GIL while
they work. The outputs (masks, overlay, tracks, H.264) run in a process of their own
(`ChildProcess`): much of that work is Python and numpy between short C calls, and in a thread it
held the GIL often enough to slow SAM3's own Python by a quarter (docs/performance.md).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")

POLL_SECONDS = 0.1  # how often a blocked stage looks whether it should stop
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal this process gets when its parent dies
INTERRUPT_WAIT_SECONDS = 2.0  # on Ctrl-C or SIGTERM, how long to wait for a stage to finish its item


class StageTimes:
    """Seconds each stage spent working (not waiting for the stage before or after it), summed
    over a video. Each stage is timed by the one thread that runs it."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started

    def iterate(self, stage: str, items: Iterable[Item]) -> Iterator[Item]:
        """`items`, with the time spent making each one counted to `stage`."""
        iterator = iter(items)
        while True:
            with self.measure(stage):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item

    def rounded(self) -> dict[str, float]:
        return {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}


class RunAhead(Generic[Item]):
    """Iterate `items` in a thread of its own, at most `depth` items ahead of the consumer.

    Items come out in order; an exception raised by `items` is raised again, as it was, in the
    consumer at that point. Leaving the `with` block stops the thread: at once when the consumer
    is done, after the item it is making when the consumer failed (so that nothing runs on into
    the next video), and after at most INTERRUPT_WAIT_SECONDS on Ctrl-C or SIGTERM (the process
    is ending; the daemon thread ends with it).
    """

    _DONE = object()

    def __init__(self, items: Iterable[Item], depth: int, name: str) -> None:
        self._queue: queue.Queue[tuple[object, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)

    def __enter__(self) -> RunAhead[Item]:
        self._thread.start()
        return self

    def __exit__(self, error_type: type[BaseException] | None, *rest: object) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # let a stage blocked on a full queue see the stop
            while True:
                self._queue.get_nowait()
        ending = error_type is not None and issubclass(error_type, (KeyboardInterrupt, SystemExit))
        self._thread.join(INTERRUPT_WAIT_SECONDS if ending else None)

    def __iter__(self) -> RunAhead[Item]:
        return self

    def __next__(self) -> Item:
        if self._finished:  # as any iterator: exhausted stays exhausted
            raise StopIteration
        kind, value = self._queue.get()
        if kind is self._DONE:
            self._finished = True
            raise StopIteration
        if isinstance(kind, BaseException):
            raise kind
        return value  # type: ignore[return-value]

    def _run(self, items: Iterable[Item]) -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not self._put((None, item)) or self._stop.is_set():
                    return
            self._put((self._DONE, None))
        except BaseException as error:  # handed to the consumer, which raises it
            self._put((error, None))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:  # a generator: run its cleanup (its own `with` blocks) here
                close()

    def _put(self, entry: tuple[object, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False


class ChildProcess:
    """`function(items, *args)` in a forked child process, fed `items` through a bounded queue.

    Forked, so the child starts at once with everything already imported, and nothing it is given
    needs pickling; only the items and the result do. The child must not use the GPU (a forked
    CUDA context is unusable), which the outputs stage does not. Leaving the `with` block without
    the result ends the child: on an error, Ctrl-C or SIGTERM here it is terminated (it only ever
    writes to scratch files); if this process is killed outright (SIGKILL, the OOM killer), the
    kernel kills the child too, on Linux. Enter it in the thread that will outlive it (the main
    thread): Linux sends that signal when the forking thread ends.
    """

    def __init__(self, function: Callable[..., Any], args: tuple[Any, ...], depth: int) -> None:
        context = multiprocessing.get_context("fork")
        self._inbox = context.Queue(maxsize=depth)
        self._outbox = context.Queue()
        self._process = context.Process(
            target=_child_main, args=(function, args, self._inbox, self._outbox, os.getpid()), daemon=True
        )

    def __enter__(self) -> ChildProcess:
        # The child must never collect this process's objects: some hold native thread pools that
        # do not exist in a fork (PyAV's scalers), and freeing one there waits forever for them.
        gc.freeze()
        # Held back until the child has its own handlers: this process's handlers, run in the
        # child just after the fork, would unwind it into this process's work as a copy of it.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            gc.unfreeze()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        for channel in (self._inbox, self._outbox):
            channel.cancel_join_thread()  # items still buffered for a child that is gone are dropped
            channel.close()

    def run(self, items: Iterable[Any]) -> Any:
        """Feed every item to the child, then return what its function returned (or raise what it
        raised, as it was)."""
        for item in items:
            self._send((True, item))
        self._send((False, None))
        while True:
            with contextlib.suppress(queue.Empty):
                return self._receive(self._outbox.get(timeout=POLL_SECONDS))
            if not self._process.is_alive() and self._outbox.empty():
                raise RuntimeError(f"the outputs process died (exit code {self._process.exitcode})")

    def _send(self, entry: tuple[bool, Any]) -> None:
        while True:
            try:
                self._inbox.put(entry, timeout=POLL_SECONDS)
                return
            except queue.Full:
                pass
            if not self._outbox.empty():  # the child gave up early: raise its error now
                self._receive(self._outbox.get())
            if not self._process.is_alive():
                raise RuntimeError(f"the outputs process died (exit code {self._process.exitcode})")

    @staticmethod
    def _receive(entry: tuple[bool, Any]) -> Any:
        succeeded, value = entry
        if not succeeded:
            raise value
        return value


def _child_main(
    function: Callable[..., Any], args: tuple[Any, ...], inbox: Any, outbox: Any, parent: int
) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when this child stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    die_with_parent()
    if os.getppid() != parent:  # it died before that took hold
        os._exit(1)

    def items() -> Iterator[Any]:
        while True:
            try:
                more, item = inbox.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if os.getppid() != parent:  # where die_with_parent cannot: nobody wants the result
                    os._exit(1)
                continue
            if not more:
                return
            yield item

    try:
        outbox.put((True, function(items(), *args)))
    except Exception as error:  # handed to the parent, which raises it as it was
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # an exception that does not travel: its type and text still do
            error = RuntimeError(f"{type(error).__name__}: {error}")
        outbox.put((False, error))


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux). Without it, a child
    waiting halfway through a queued item would wait forever if the parent were killed: the
    child's own inherited copy of the queue's write end keeps the pipe from reaching EOF."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

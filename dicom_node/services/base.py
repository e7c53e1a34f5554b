"""One background thread that does a piece of work over and over: :class:`BackgroundService`.

The job worker (:class:`dicom_node.services.jobs.Worker`), the export sender
(:class:`dicom_node.services.export.Exporter`) and the retention schedule
(:class:`dicom_node.services.retention.RetentionRunner`) share this loop::

    [wait _first_wait_seconds()]         (only when it is not None)
    while not stopped:
        last_loop_at = now
        busy = _tick()                   (an exception: _tick_failed() logs it, busy = False)
        runs += 1
        if not busy: wait _wait_seconds() (cut short by wake() or stop())

A subclass names its thread, says what :meth:`start` does first (:meth:`_starting`), what one
round is (:meth:`_tick`), how long to wait before the first round (:meth:`_first_wait_seconds`)
and between rounds (:meth:`_wait_seconds`), what a wait listens to (:meth:`_pause`), how to log a
failed round (:meth:`_tick_failed`, called inside the ``except`` so the traceback is logged),
and how long :meth:`stop` waits for the thread by default (:attr:`stop_timeout`).
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class BackgroundService:
    """A daemon thread named ``name`` that runs :meth:`_tick` until :meth:`stop`.

    A round that raises is logged and the loop goes on: a database outage must not end the
    thread.  :meth:`stop` does not interrupt a round; it ends the loop after it.
    """

    #: seconds :meth:`stop` waits for the thread when no ``timeout`` is given
    stop_timeout: float = 30.0
    #: the :class:`RuntimeError` message of a second :meth:`start`
    already_started_message: str = "already started"

    def __init__(self, name: str) -> None:
        #: the thread's name
        self.name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: ``time.monotonic()`` when the last round began (the health check reads it)
        self.last_loop_at: float | None = None
        #: rounds finished, ok or failed
        self.runs = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(self.already_started_message)
        self._starting()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after the current round and wait up to ``timeout`` seconds
        (:attr:`stop_timeout` when None) for the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout if timeout is None else timeout)
            self._thread = None

    def wake(self) -> None:
        """Cut the current wait short: the next round starts now."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the loop
    def _pause(self, seconds: float) -> None:
        """Wait up to ``seconds`` for :meth:`wake` or :meth:`stop`."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _loop(self) -> None:
        first = self._first_wait_seconds()
        if first is not None:
            self._pause(first)
        while not self._stop.is_set():
            self.last_loop_at = time.monotonic()
            try:
                busy = self._tick()
            except Exception:  # the thread must survive a failed round; logged with traceback
                self._tick_failed()
                busy = False
            self.runs += 1
            if not busy:
                self._pause(self._wait_seconds())

    # ------------------------------------------------------------------ what a subclass says
    def _starting(self) -> None:
        """Called by :meth:`start` before the thread starts (in the caller's thread)."""

    def _first_wait_seconds(self) -> float | None:
        """Seconds to wait before the first round; None (the default): start it at once."""
        return None

    def _tick(self) -> bool:
        """One round; True when there may be more work at once (no wait before the next)."""
        raise NotImplementedError

    def _wait_seconds(self) -> float:
        """Seconds to wait after a round that was not busy (or failed)."""
        raise NotImplementedError

    def _tick_failed(self) -> None:
        """Log the exception of a failed round (called inside the ``except`` block)."""
        log.exception("%s: round failed", self.name)

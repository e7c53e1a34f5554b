"""The retention schedule: :class:`RetentionRunner` runs the purge in a background thread."""
from __future__ import annotations

import logging

from dicom_node.services.base import BackgroundService
from dicom_node.services.retention.purge import Purger, PurgeReport

log = logging.getLogger(__name__)


class RetentionRunner(BackgroundService):
    """Runs :meth:`Purger.purge` in a thread: once ``first_delay_seconds`` after start, then every
    ``interval_minutes``.  A failing run (e.g. a database outage) is logged and the schedule
    goes on.  :meth:`stop` stops after the study being purged (a purge is never cut in the
    middle by this)."""

    stop_timeout = 30.0
    already_started_message = "the retention runner is already started"

    def __init__(self, purger: Purger, interval_minutes: float, first_delay_seconds: float = 0.0) -> None:
        if interval_minutes <= 0:
            raise ValueError(f"interval_minutes must be > 0, got {interval_minutes}")
        super().__init__("orthonode-retention")
        self.purger = purger
        self.interval_seconds = interval_minutes * 60.0
        self.first_delay_seconds = first_delay_seconds
        self.last_report: PurgeReport | None = None

    # ------------------------------------------------------------------ the loop (BackgroundService)
    def _first_wait_seconds(self) -> float:
        return self.first_delay_seconds

    def _pause(self, seconds: float) -> None:
        """The schedule keeps its interval: only :meth:`stop` cuts a wait short, not :meth:`wake`."""
        self._stop.wait(seconds)

    def _tick(self) -> bool:
        self.last_report = self.purger.purge()
        return False  # one run per interval

    def _wait_seconds(self) -> float:
        return self.interval_seconds

    def _tick_failed(self) -> None:  # a database outage must not end the schedule; logged with traceback
        log.exception("retention run failed; trying again in %.0f min", self.interval_seconds / 60)

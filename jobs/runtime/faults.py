"""Named crash points, for the tests that kill a job at a chosen moment and restart it.

``LAMBDA_LEARNER_CRASH_AT=<point>`` makes the process die at once (no cleanup, no
finally blocks: as a killed executor or a lost driver would) when it reaches that point;
``<point>@<key>`` only when it reaches it with that key (a micro-batch id, say).
``LAMBDA_LEARNER_PAUSE_AT=<point>=<seconds>`` makes it wait there instead (a slow run, for the
tests of what runs alongside). Unset, every crash point is a no-op.
"""

from __future__ import annotations

import os
import time

CRASH_VARIABLE = "LAMBDA_LEARNER_CRASH_AT"
PAUSE_VARIABLE = "LAMBDA_LEARNER_PAUSE_AT"
CRASH_EXIT_CODE = 86


def crash_point(name: str, key: object = None) -> None:
    """Die (or pause) here if this is the configured point."""
    names = (name, f"{name}@{key}")
    wanted = os.environ.get(CRASH_VARIABLE)
    if wanted is not None and wanted in names:
        os._exit(CRASH_EXIT_CODE)
    point, _, seconds = os.environ.get(PAUSE_VARIABLE, "").rpartition("=")
    if point in names:
        time.sleep(float(seconds))

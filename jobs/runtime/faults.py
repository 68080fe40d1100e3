"""Named crash points, for the tests that kill a job at a chosen moment and restart it.

``LAMBDA_LEARNER_CRASH_AT=<point>`` makes the process die at once (no cleanup, no
finally blocks: as a killed executor or a lost driver would) when it reaches that point;
``<point>@<key>`` only when it reaches it with that key (a micro-batch id, say). Unset,
every crash point is a no-op.
"""

from __future__ import annotations

import os

CRASH_VARIABLE = "LAMBDA_LEARNER_CRASH_AT"
CRASH_EXIT_CODE = 86


def crash_point(name: str, key: object = None) -> None:
    """Die here if this is the configured crash point."""
    wanted = os.environ.get(CRASH_VARIABLE)
    if wanted is not None and wanted in (name, f"{name}@{key}"):
        os._exit(CRASH_EXIT_CODE)

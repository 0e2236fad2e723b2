"""How the `fisao` command ends: its exit handlers run, its output is flushed, and the process ends
without Python's teardown of its modules.

That teardown (garbage collection over torch, transformers, Prefect and MLflow) took about 3 s
of a fully cached tiny `fisao run` on 2 cores (five runs each, alternating: median 10.87 s against
14.02 s ending through `sys.exit(main())`; docs/performance.md), and Prefect's log flush inside `logging.shutdown` could wait 5 s for a lock (its
timeout). Nothing is lost: every stage, manifest and MLflow write is done by then, Prefect's logs
are drained first, and the exit handlers still run (Prefect's stop the ephemeral API server,
`logging.shutdown` flushes the handlers). No Prefect import here: `fisao world build` never loads it.
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

DRAIN = 2.0  # seconds Prefect's API log worker may take to send what it holds


def exit_without_teardown(code: int, last_line: str | None = None) -> NoReturn:
    """Drain Prefect's logs (when Prefect is loaded), run the exit handlers, print `last_line` to
    stderr, flush, and end the process with `code`."""
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:
        handlers.APILogWorker.drain_all(timeout=DRAIN)  # here, not in logging.shutdown, where it waits 5 s for a lock
    atexit._run_exitfuncs()
    if last_line is not None:
        print(last_line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

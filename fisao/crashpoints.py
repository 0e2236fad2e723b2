"""A testing hook: kill this process with SIGKILL at a named point, to test crash recovery.

The chaos test sets `FISAO_CRASH_AT=NAME` or `NAME@ROUND` (e.g. `update:mid@1`) in a campaign's
environment; the first time the code passes `crash_point(NAME, round_index)` with a matching
round, the process kills itself, exactly as a pre-empted machine or `kill -9` would: no
exception, no cleanup, no atexit. Unset (always, outside tests), a crash point does nothing.

Points (see where they are called): `rollout:mid` (answers sampled, not yet written),
`update:mid` (PPO done, nothing written), `checkpoint:mid` (adapter and merged model written
into the temporary directory, not yet renamed into place), `log:mid` (the round's MLflow run
has its metrics and some artifacts but is not marked complete).
"""
from __future__ import annotations

import os
import signal

ENV = "FISAO_CRASH_AT"


def crash_point(name: str, round_index: int | None = None) -> None:
    """SIGKILL this process if `FISAO_CRASH_AT` names this point (and round)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, at_round = spec.partition("@")
    if point == name and (not at_round or round_index is None or int(at_round) == round_index):
        os.kill(os.getpid(), signal.SIGKILL)

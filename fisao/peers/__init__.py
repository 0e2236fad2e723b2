"""The methods a user would run instead of FiSAO, driven from the same base models, verifier and
calibration so that bench/peers.py can compare them (issue 14): TRL's GRPO with a whole-answer
reward (`grpo.py`) and CSR-style iterative DPO (`csr.py`).

They need the `peers` extra (`pip install -e '.[peers]'`, pinned in requirements-peers.lock);
nothing else in the project imports this package, so the default install stays without TRL.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Run a block that reseeds Python's, NumPy's and torch's global generators (TRL's trainers call
    `set_seed`), then give the caller's back."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)

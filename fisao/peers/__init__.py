"""The methods a user would run instead of FiSAO, driven from the same base models, verifier and
calibration so that bench/peers.py can compare them (issue 14): TRL's GRPO with a whole-answer
reward (`grpo.py`) and CSR-style iterative DPO (`csr.py`).

They need the `peers` extra (`pip install -e '.[peers]'`, pinned in requirements-peers.lock);
nothing else in the project imports this package, so the default install stays without TRL.
"""

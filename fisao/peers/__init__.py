"""Peers: what users would run instead of FiSAO (TRL GRPO, CSR-style DPO), on the same models and verifier."""

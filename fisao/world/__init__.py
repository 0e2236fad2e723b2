"""The shapes world: a deterministic synthetic dataset in which hallucination is real."""

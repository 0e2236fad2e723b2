"""Benchmarks that score a model's answers the way the papers do: CHAIR, POPE and MME.

`vocab` and `mentions` are shared with the verifier: the object-mention parser that CHAIR counts
with is the one that places token rewards. Pure library code: no Prefect, no MLflow.
"""

"""Prefect flows: wiring of tasks only (campaign, its rounds, sweep, evaluate, world)."""

"""Prefect flows (wiring of tasks only) and the `fisao` command line that starts them."""

"""The `fisao` command line: `cli.main` builds the parser and runs a command; each command group is
a module of its own (world, evaluate, estimate, convert, campaigns, runs).

It sits above the flows because some commands start them; the commands that need only the library
(`world build`, `eval chair`, `eval pope`) never import Prefect or MLflow, so they start fast.
"""

"""How a campaign's or sweep's process lives: the Prefect API server it starts (ephemeral.py) and how it stops on Ctrl-C or SIGTERM (shutdown.py)."""

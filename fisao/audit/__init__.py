"""A round's audit: its rollouts with per-token rewards, and a report people can look at."""

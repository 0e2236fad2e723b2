"""The file name of a round's audit that the report writes and the task checks (no torch here)."""
from __future__ import annotations

# The HTML report, written last in the audit directory: a directory holding it is complete.
REPORT = "report.html"

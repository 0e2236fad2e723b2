"""The file names in a base model's directory that the build writes and the tasks read (no torch here)."""
from __future__ import annotations

# The build's curves and figures (JSON), written last in the model's atomic directory: a directory
# holding it is complete.
TRAIN_LOG = "train_log.json"

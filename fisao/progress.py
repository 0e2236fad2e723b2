"""Progress bars that stay readable when stderr is not a terminal.

On a terminal, tqdm redraws one line with '\\r'. Written to a file or a pipe (a log, `make run >
log`, a Prefect worker), those redraws become one huge line. There, `bar` prints a plain line
every `LOG_SECONDS` seconds instead, and the bar's final state when it ends; a bar that ends
sooner prints nothing.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Iterable, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
# Seconds between two progress lines when stderr is not a terminal.
LOG_SECONDS = 10.0
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves for nested bars


class _Lines:
    """A stream for tqdm that turns its '\\r' redraws into whole lines (blank clears and repeats dropped)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        for part in _CURSOR.sub("", text).replace("\r", "\n").split("\n"):
            if part.strip() and part.rstrip() != self.last:  # the closing line repeats the last timed one
                self.last = part.rstrip()
                self.stream.write(self.last + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar whose postfix updates (a training loss) wait for the next timed line."""

    def set_postfix(self, ordered_dict=None, refresh: bool = False, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def bar(iterable: Iterable[T], desc: str, enabled: bool = True, leave: bool = False, **kwargs) -> tqdm:
    """tqdm over `iterable`; on a non-terminal stderr, a line every LOG_SECONDS (and one at the end)."""
    stream = sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if stream.isatty():
        return tqdm(iterable, desc=desc, leave=leave, **kwargs)
    return _LogBar(iterable, desc=desc, file=_Lines(stream), mininterval=LOG_SECONDS, maxinterval=LOG_SECONDS,
                   delay=LOG_SECONDS, leave=True, ncols=80, **kwargs)


def quiet_library_bars() -> None:
    """Turn off other libraries' bars; call before they are imported. Variables already set win.

    MLflow's "Downloading artifacts" bars always: resuming a campaign or a comparison checks every
    finished round's logged files, a nested bar per round and hundreds per run, which bury fisao's
    own bars and log lines. The Hugging Face libraries' (weights loading) off a terminal only,
    where they would print as one '\\r' line."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

"""Progress bars written to a file or pipe are whole lines, not one line of '\\r' redraws."""
from __future__ import annotations

import io
import sys
import time

from fisao import progress


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_non_terminal_gets_a_line_every_few_seconds_and_the_end(monkeypatch):
    pipe = Pipe()
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(progress, "LOG_SECONDS", 0.05)
    steps = progress.bar(range(6), "steps")
    for i in steps:
        steps.set_postfix(loss=f"{i:.3f}")  # as the training loops do: no line of its own
        time.sleep(0.03)
    text = pipe.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 2 <= len(lines) <= 6 and all(line.startswith("steps:") for line in lines)
    assert "6/6" in lines[-1] and "loss=5.000" in lines[-1]


def test_a_short_bar_on_a_non_terminal_prints_nothing(monkeypatch):
    pipe = Pipe()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(progress.bar(range(3), "quick")) == [0, 1, 2]
    assert pipe.getvalue() == ""


def test_disabled_bars_print_nothing_anywhere(monkeypatch):
    pipe = Pipe()
    pipe.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(progress.bar(range(3), "off", enabled=False)) == [0, 1, 2]
    assert pipe.getvalue() == ""


def test_library_bars_are_turned_off_only_off_a_terminal(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    terminal = Pipe()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    progress.quiet_library_bars()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # MLflow's artifact bars: always off
    monkeypatch.setattr(sys, "stderr", Pipe())
    progress.quiet_library_bars()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_mlflow_reads_the_switch_that_turns_its_artifact_bars_off(monkeypatch):
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is True
    progress.quiet_library_bars()
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False

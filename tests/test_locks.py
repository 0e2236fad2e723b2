"""The campaign lock: a second process is refused with the holder's pid; a dead holder's lock is taken over."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import pytest

from fisao.locks import CampaignLocked, RunLock, exclusive, lock_holder

HOLD = """
import sys, time
from fisao.locks import RunLock
RunLock(sys.argv[1], "demo").acquire()
print("held", flush=True)
time.sleep(60)
"""


def hold_in_child(path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_process_is_refused_naming_the_holder_then_takes_over_when_it_dies(tmp_path):
    path = tmp_path / "campaigns" / "demo" / ".lock"
    child = hold_in_child(path)
    try:
        with pytest.raises(CampaignLocked) as e:
            RunLock(path, "demo").acquire()
        message = str(e.value)
        assert f"pid {child.pid}" in message and str(path) in message and "--run-name" in message
        assert lock_holder(path).pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_holder(path) is None  # the kernel dropped the flock with the process
    lock = RunLock(path, "demo").acquire()
    try:
        assert lock.took_over is not None and lock.took_over.pid == child.pid
        assert lock_holder(path).pid == os.getpid()
    finally:
        lock.release()
    assert path.read_text() == ""  # a clean release leaves nobody to take over from
    with RunLock(path, "demo") as again:
        assert again.took_over is None


def test_reentrant_within_a_process_and_released_by_the_outermost(tmp_path):
    path = tmp_path / ".lock"
    with RunLock(path, "demo"):
        with RunLock(path, "demo") as inner:
            assert inner.took_over is None
        assert lock_holder(path).pid == os.getpid()  # still held by the outer one
        child = subprocess.run([sys.executable, "-c", f"from fisao.locks import RunLock; RunLock({str(path)!r}, 'demo').acquire()"],
                               capture_output=True, text=True)
        assert child.returncode != 0 and "already running" in child.stderr
    assert lock_holder(path) is None


def test_exclusive_waits_for_the_holder(tmp_path):
    lock_file, done = tmp_path / ".out.lock", tmp_path / "done"
    script = (f"import time, pathlib; from fisao.locks import exclusive\nwith exclusive({str(lock_file)!r}):\n"
              f"    print('in', flush=True); time.sleep(1); pathlib.Path({str(done)!r}).write_text('x')\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "in"
    with exclusive(lock_file):
        assert done.exists()  # we got the lock only after the child's critical section
    child.wait()
    assert child.returncode == 0

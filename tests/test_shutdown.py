"""CampaignStop (runner/shutdown.py) in a child process, without Prefect: a second Ctrl-C stops at
once, an unwinding that hangs is cut at the grace deadline, an ignored SIGINT stays ignored, and a
dead API server stops the campaign. Each forced exit releases the lock and ends with one line
saying how to go on. (tests/test_interrupt.py does the same with a real campaign.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.campaign_process import alive

# The child: a campaign body that takes its time to unwind after Ctrl-C (60 s unless stopped).
CHILD = """
import sys, time, subprocess
from fisao.locks import RunLock
from runner.shutdown import CampaignStop
import tasks.campaigns  # imported, with Prefect, before any campaign starts (cli/campaigns.py)
from tasks.mlflow_store import campaign_parent, experiment_id
lock_path, grace, server, opened = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "server", sys.argv[4] == "opened"
if opened:  # the campaign's parent run, as open_campaign leaves it
    from mlflow.tracking import MlflowClient
    MlflowClient().create_run(experiment_id("c"), run_name="c", tags={"fisao.campaign": "c", "fisao.kind": "campaign",
                                                                       "fisao.status": "running"})
assert (campaign_parent("c") is not None) == opened  # MLflow's store is created and its modules imported here
with RunLock(lock_path, "c") as lock, CampaignStop("c", lock.path, grace=grace) as stop:
    stop.watch(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) if server else None)
    try:
        print("ready", stop.server.pid if server else 0, flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        time.sleep(60)  # a slow unwinding
        raise
print("body ended", flush=True)
"""


def start(tmp_path: Path, grace: float = 30.0, server: bool = False, ignore_sigint: bool = False,
          opened: bool = False):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FISAO_PROJECT": str(tmp_path)}
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / ".lock"), str(grace),
                             "server" if server else "-", "opened" if opened else "-"], cwd=Path(__file__).parents[1], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec)
    ready = ""
    while not ready.startswith("ready"):  # after MLflow's messages about creating its store
        ready = proc.stdout.readline()
        assert ready, proc.stdout.read()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid
    return proc, int(ready.split()[1])


def campaign_status(tmp_path: Path) -> tuple[str, str, str]:
    """(MLflow status, fisao.status, fisao.error) of campaign `c`'s parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("c").experiment_id])[0]
    return run.info.status, run.data.tags["fisao.status"], run.data.tags.get("fisao.error", "")


def finish(proc, timeout: float = 20) -> tuple[int, list[str], float]:
    t = time.time()
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, [line for line in out.splitlines() if line.strip()], time.time() - t


def test_second_ctrl_c_stops_at_once_and_releases_the_lock(tmp_path):
    proc, server = start(tmp_path, server=True)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the body is now unwinding slowly
    assert proc.poll() is None
    t = time.time()
    proc.send_signal(signal.SIGINT)
    rc, lines, _ = finish(proc)
    assert time.time() - t < 3, lines
    assert rc == 130, lines
    assert "fisao: SIGINT: stopping campaign 'c' (again to stop at once)" in lines
    assert "fisao: second SIGINT: stopping now" in lines
    assert "Traceback (most recent call last):" not in lines
    # MLflow knows no campaign `c` here: the line says to start it again rather than resume it.
    assert lines[-1] == "fisao: campaign 'c' stopped before anything was recorded; start it again with the same " \
                        "`fisao run` command"
    assert (tmp_path / ".lock").read_text() == ""
    assert not alive(server), "a forced exit left the API server running"


def test_an_unwinding_that_hangs_is_cut_at_the_grace_deadline_and_an_ignored_sigint_stays_ignored(tmp_path):
    # A background job (`fisao run ... &` in a script) has SIGINT ignored: Ctrl-C must not stop it.
    proc, server = start(tmp_path, grace=2.0, opened=True, ignore_sigint=True, server=True)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    rc, lines, _ = finish(proc)
    seconds = time.time() - t
    assert 2.0 <= seconds < 5, (seconds, lines)
    assert rc == 143, lines
    assert "fisao: SIGTERM: not stopped after 2s: stopping now" in lines
    assert lines[-1] == "fisao: resume campaign 'c' with: fisao resume c"
    assert (tmp_path / ".lock").read_text() == ""
    assert campaign_status(tmp_path) == ("KILLED", "interrupted", "SIGTERM: not stopped after 2s")
    assert not alive(server), "a forced exit left the API server running"  # Prefect's exit handler did not run


def test_a_dead_api_server_stops_the_campaign_with_a_clear_error(tmp_path):
    proc, server = start(tmp_path, server=True, opened=True)
    t = time.time()
    os.kill(server, signal.SIGKILL)
    rc, lines, _ = finish(proc)
    assert time.time() - t < 3, lines
    assert rc == 1, lines
    assert f"fisao: error: Prefect's API server (pid {server}) was killed by SIGKILL while campaign 'c' was " \
           "running; nothing can record its progress, so it stops here" in lines
    assert "body ended" not in lines
    assert lines[-1] == "fisao: resume campaign 'c' with: fisao resume c"
    assert (tmp_path / ".lock").read_text() == ""
    status, end, error = campaign_status(tmp_path)
    assert (status, end) == ("FAILED", "failed") and error.startswith("Prefect's API server"), error


def test_prefects_termination_signal_reaching_the_command_counts_as_sigterm(tmp_path):
    """Prefect's SIGTERM handler raises TerminationSignal inside a flow; should it come out of the flow
    as it is (not re-raised as our Interrupted), the command still ends as interrupted by SIGTERM."""
    from prefect.exceptions import TerminationSignal

    from runner.shutdown import CampaignStop

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with CampaignStop("c", tmp_path / ".lock", grace=1e9) as stop:  # no forced exit of this test process
            raise TerminationSignal(signal.SIGTERM)
        assert (stop.code, stop.signum) == (143, signal.SIGTERM)
        with CampaignStop("c", tmp_path / ".lock", grace=1e9) as stop:
            raise KeyboardInterrupt
        assert stop.code == 130
        with pytest.raises(ValueError):
            with CampaignStop("c", tmp_path / ".lock", grace=1e9):
                raise ValueError("not an interruption")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _nested_frame(*modules: str):
    """The innermost frame of calls through functions defined in `modules` (outermost first)."""
    inner = None
    for name in reversed(modules):
        g = {"__name__": name, "inner": inner, "sys": sys}
        exec("def call():\n    return inner() if inner else sys._getframe()\n", g)
        inner = g["call"]
    return inner()


def test_in_prefect_tells_prefects_bookkeeping_from_the_campaigns_code():
    from runner.shutdown import in_prefect

    # The flow called a task; Prefect's engine is setting it up, inside a library it calls.
    assert in_prefect(_nested_frame("flows.rounds", "prefect.task_engine", "pydantic.main"))
    # The task body runs: the campaign's code (and the libraries it calls) is innermost.
    assert not in_prefect(_nested_frame("flows.rounds", "prefect.task_engine", "tasks.models", "fisao.models.clip",
                                        "torch.nn.modules.module"))
    assert not in_prefect(_nested_frame("flows.campaign", "fisao.summary"))
    # The command line (cli/) is the campaign's code as well, as it was when it lived in flows/.
    assert not in_prefect(_nested_frame("prefect.flows", "cli.campaigns"))
    assert not in_prefect(_nested_frame("__main__", "threading"))
    assert not in_prefect(None)


# A signal that lands in Prefect's code is raised once the main thread is back in the campaign's.
DEFERRED = """
import os, signal, sys, time
from fisao.locks import RunLock
from runner.shutdown import CampaignStop
g = {"__name__": "prefect.task_engine", "os": os, "signal": signal, "time": time}
exec("def bookkeeping():\\n    os.kill(os.getpid(), signal.SIGINT)\\n    t = time.time()\\n    while time.time() - t < 1.0:\\n        pass\\n", g)
h = {"__name__": "fisao.work", "time": time}
exec("def work():\\n    t = time.time()\\n    while time.time() - t < 20:\\n        pass\\n", h)
with RunLock(sys.argv[1], "c") as lock, CampaignStop("c", lock.path, grace=30) as stop:
    try:
        g["bookkeeping"]()
        print("bookkeeping ended undisturbed", flush=True)
        t = time.time()
        h["work"]()
        print("work ran to its end", flush=True)
    except KeyboardInterrupt as e:
        print("interrupted in", "work" if "t" in dir() else "bookkeeping", round(time.time() - t, 2), type(e).__name__, flush=True)
        raise
print("code", stop.code, flush=True)
"""


def test_a_signal_in_prefects_code_is_raised_once_the_campaigns_code_runs(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FISAO_PROJECT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", DEFERRED, str(tmp_path / ".lock")], cwd=Path(__file__).parents[1],
                         env=env, text=True, capture_output=True, timeout=60)
    lines = out.stdout.splitlines()
    assert lines[0] == "bookkeeping ended undisturbed", out.stdout + out.stderr
    _, _, where, seconds, kind = lines[1].split()
    assert (where, kind) == ("work", "Interrupted"), out.stdout
    assert float(seconds) < 1.0  # the watchdog looks every 50 ms while a signal waits
    assert lines[2] == "code 130" and "work ran to its end" not in out.stdout


# A sweep's body: the sweep's lock, then the lock of the campaign it runs (`sw-w0-s0`); the sweep's
# other campaign (`sw-w1-s0`) is marked running in MLflow by another process (`fisao resume`).
SWEEP = """
import sys, time, subprocess
from pathlib import Path
from mlflow.tracking import MlflowClient
from fisao.locks import RunLock
from runner.shutdown import SweepStop
import tasks.campaigns
from tasks.mlflow_store import experiment_id
root = Path(sys.argv[1])
for name, kind in (("sw-w0-s0", "campaign"), ("sw-w1-s0", "campaign"), ("sw", "sweep")):
    MlflowClient().create_run(experiment_id(name), run_name=name, tags={
        f"fisao.{kind}": name, "fisao.kind": kind, "fisao.status": "running"})
locks = {name: root / name / ".lock" for name in ("sw-w0-s0", "sw-w1-s0")}
with RunLock(root / "sw.lock", "sw") as lock, \\
        SweepStop("sw", lock.path, locks, "fisao sweep --worlds 0,1 --name sw", grace=30) as stop:
    stop.watch(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    with RunLock(locks["sw-w0-s0"], "sw-w0-s0"):
        try:
            print("ready", stop.server.pid, flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            time.sleep(60)  # a slow unwinding
            raise
"""


def test_a_forced_exit_of_a_sweep_marks_the_campaign_it_runs_and_the_sweep_and_releases_both_locks(tmp_path):
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "FISAO_PROJECT": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(tmp_path)], cwd=Path(__file__).parents[1], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ready = ""
    while not ready.startswith("ready"):
        ready = proc.stdout.readline()
        assert ready, proc.stdout.read()
    server = int(ready.split()[1])
    assert json.loads((tmp_path / "sw-w0-s0" / ".lock").read_text())["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # unwinding slowly
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    rc, lines, _ = finish(proc)
    assert rc == 143, lines
    assert "fisao: SIGTERM: stopping sweep 'sw' (again to stop at once)" in lines
    assert lines[-1] == "fisao: continue sweep 'sw' (finished campaigns are taken) with the same command: " \
                        "fisao sweep --worlds 0,1 --name sw"
    assert (tmp_path / "sw.lock").read_text() == "" and (tmp_path / "sw-w0-s0" / ".lock").read_text() == ""
    assert not alive(server), "a forced exit left the API server running"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def status(name: str) -> tuple[str, str]:
        (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        return run.info.status, run.data.tags["fisao.status"]

    assert status("sw-w0-s0") == ("KILLED", "interrupted")
    assert status("sw") == ("KILLED", "interrupted")
    assert status("sw-w1-s0") == ("RUNNING", "running")  # not this process's: left to whoever runs it


def test_the_sweep_command_a_stopped_sweep_prints_parses_back_to_the_same_sweep():
    import shlex

    from cli.campaigns import sweep_command
    from cli.main import build_parser

    argv = ["--project", "my project", "sweep", "--config", "configs/tiny.yaml", "--worlds", "10,11", "--seeds", "0,1",
            "--rounds", "0"]
    args = build_parser().parse_args(argv)
    command = sweep_command(args, "tiny-sweep")
    assert command == "fisao --project 'my project' sweep --config configs/tiny.yaml --worlds 10,11 --seeds 0,1 " \
                      "--rounds 0 --name tiny-sweep"
    again = build_parser().parse_args(shlex.split(command)[1:])
    assert vars(again) == {**vars(args), "name": "tiny-sweep"}
    assert sweep_command(build_parser().parse_args(["sweep", "--worlds", "3"]), "q") == \
        "fisao sweep --config configs/demo.yaml --worlds 3 --seeds 0 --name q"

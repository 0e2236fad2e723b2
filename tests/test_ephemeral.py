"""runner/ephemeral.py: the campaign's own Prefect API server runs in a session of its own, and what
it prints goes to PREFECT_HOME/ephemeral-server.log, not to the campaign's terminal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import os, sys
from runner.ephemeral import start_api
server = start_api(sys.argv[1])
print(server.pid, os.getsid(server.pid), os.readlink(f"/proc/{server.pid}/fd/1"), os.readlink(f"/proc/{server.pid}/fd/2"),
      flush=True)
"""


def test_the_api_server_has_its_own_session_and_writes_to_its_log(tmp_path):
    home = tmp_path / ".prefect"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=Path(__file__).parents[1], env=env,
                         text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    pid, sid, stdout, stderr = out.stdout.split()[-4:]
    assert int(sid) == int(pid) and int(sid) != os.getsid(0)  # a session of its own, led by the server
    assert stdout == stderr == str(home / "ephemeral-server.log")
    assert (home / "ephemeral-server.log").is_file()

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


SEED = """
import json, sqlite3, sys
from runner.ephemeral import seed_database, template_path
first, second = seed_database(), seed_database()
head = lambda db: sqlite3.connect(db).execute("select version_num from alembic_version").fetchall()
print(json.dumps({"first": str(first), "second": second, "template": str(template_path()),
                  "head": head(first), "template_head": head(template_path())}))
"""


def test_a_new_projects_database_starts_as_the_migrated_empty_one(tmp_path):
    # A new project's Prefect database is a copy of the machine's migrated empty one (in the user's
    # cache, built in a child process the first time); an existing database is left alone.
    home, cache = tmp_path / "project" / ".prefect", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")}
    env.update({"PREFECT_HOME": str(home), "XDG_CACHE_HOME": str(cache), "DO_NOT_TRACK": "true"})
    out = subprocess.run([sys.executable, "-c", SEED], cwd=Path(__file__).parents[1], env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    import prefect

    found = json.loads(out.stdout.splitlines()[-1])
    assert found["first"] == str(home / "prefect.db") and found["second"] is None
    assert Path(found["template"]).parent == cache / "fisao" / "prefect"
    assert Path(found["template"]).name.startswith(f"prefect-{prefect.__version__}-")
    assert found["head"] == found["template_head"] and len(found["head"]) == 1  # at the head revision
    assert sorted(p.name for p in (cache / "fisao" / "prefect").iterdir() if not p.name.endswith(".lock")) == [
        Path(found["template"]).name]  # the build's own files are gone


def test_without_a_writable_cache_the_server_migrates_the_new_database_itself(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL")}
    env.update({"PREFECT_HOME": str(tmp_path / ".prefect"), "XDG_CACHE_HOME": str(blocked / "cache"),
                "DO_NOT_TRACK": "true"})
    code = "from runner.ephemeral import seed_database; print(seed_database())"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split()[-1] == "None" and not (tmp_path / ".prefect" / "prefect.db").exists()

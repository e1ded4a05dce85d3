"""The suite's own rules hold: a test past its time limit is stopped and the processes it started die with it."""
from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

from conftest import run_process

TESTS = Path(__file__).resolve().parent

HUNG = textwrap.dedent('''
    import sys, time
    from conftest import spawn

    def test_hangs_with_two_processes(tmp_path):
        # a launcher with a rank under it, both waiting forever (a collective whose peer never comes)
        launcher = ("import subprocess, sys, time; "
                    "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                    "open(sys.argv[1], 'w').write(str(rank.pid)); time.sleep(600)")
        proc = spawn([sys.executable, "-c", launcher, {pids!r}])
        proc.wait()
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for its parent is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_a_hung_test_is_stopped_at_its_time_limit_and_its_processes_are_killed(tmp_path):
    pids = tmp_path / "rank.pid"
    (tmp_path / "test_hung.py").write_text(HUNG.format(pids=str(pids)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    result = run_process([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                          "--rootdir", str(tmp_path), "-c", os.devnull, "-o", "timeout_method=signal",
                          "--timeout=5", str(tmp_path / "test_hung.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Timeout" in out, out[-2000:]
    assert time.time() - start < 100
    rank = int(pids.read_text())
    deadline = time.time() + 10
    while _alive(rank) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(rank), "the rank started by the hung test outlived it"

"""What a run prints: a bar in a terminal that evaluation lines never collide with, plain lines in log files, a sign
of life during long evaluations, and the resolved architecture."""
import json
import os
import re
import select
import sys
import time
from types import SimpleNamespace

import pytest

from pixelformer.console import ProgressLog
from conftest import REPO, TINY_MODEL, run_process, spawn

ARGS = [*TINY_MODEL, "trainer.max_steps=10", "trainer.eval_every_steps=5", "trainer.log_every_steps=5",
        "trainer.eval_every_epochs=null", "logger=disabled", "trainer.accelerator=cpu"]


@pytest.mark.slow
def test_without_a_terminal_progress_is_plain_lines(tmp_path):
    out = run_process([sys.executable, str(REPO / "tools" / "train.py"), *ARGS, f"run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stdout + out.stderr  # no carriage-return bar in a log file
    lines = out.stdout.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["5/10", "10/10"]
    assert re.fullmatch(r"step 5/10 \(50%\) loss \d\.\d{4} lr \S+ \d+ img/s elapsed \S+ eta \S+", progress[0])
    assert any(line.startswith("eval step 5 epoch 0: test/loss=") for line in lines)
    assert any(line.startswith("final step 10 ") for line in lines)
    # the resolved architecture, printed at start and recorded with the results
    assert re.search(r"task=cls model=pit_mini: 1 blocks x 32 wide x 2 heads, 65 tokens/image, 0\.\d+ M params",
                     out.stdout)
    recorded = json.loads((tmp_path / "eval.json").read_text())["architecture"]
    assert {k: recorded[k] for k in ("depth", "width", "heads", "tokens")} == \
        {"depth": 1, "width": 32, "heads": 2, "tokens": 65}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a pseudo-terminal (pty) with a window size")
def test_in_a_terminal_evaluation_lines_clear_the_bar_first(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing at 0 columns
    proc = spawn([sys.executable, str(REPO / "tools" / "train.py"), *ARGS, f"run.dir={tmp_path}"],
                            stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "train:  " in text and "10/10" in text  # the bar was drawn
    # each evaluation line starts at the left edge of a cleared line, never glued to the bar
    for match in re.finditer(r"(eval|final) step \d+ ", text):
        before = text[:match.start()]
        assert before.endswith("\r") or before.endswith("\n"), repr(text[match.start() - 80:match.end()])
    assert re.search(r"\r +\reval step 5 ", text)


def test_a_long_evaluation_says_it_is_alive(capsys):
    log = ProgressLog(SimpleNamespace(is_global_zero=True), SimpleNamespace(progress_bar=False))
    with log.waiting("evaluating step 7", every=0.05):
        time.sleep(0.3)
    beats = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluating step 7: ")]
    assert len(beats) >= 3 and all(line.endswith(" s ...") for line in beats)
    with log.waiting("quick", every=10):  # nothing printed for a short one, and the thread is gone at once
        pass
    assert capsys.readouterr().out == ""

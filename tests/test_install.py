"""The package as a user installs it: a wheel with the YAML configs inside, console commands, the Python API."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import QUIET, REPO, TINY_MODEL, run_process

TINY_RUN = [*QUIET, *TINY_MODEL, "trainer.max_steps=1", "trainer.precision=32-true", "trainer.eval_every_epochs=null"]


def _source_copy(dest: Path) -> Path:
    """The checkout's files (tracked, and untracked but not ignored) copied to ``dest``: the wheel is built there, so
    the build leaves no ``build/`` or ``*.egg-info`` in the checkout that others are working in."""
    try:
        listed = run_process(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: all but what .gitignore names
        skip = {".git", ".venv", "runs", "data", "build", "dist", "wandb", ".pytest_cache", "__pycache__"}

        def ignore(folder: str, names: list[str]) -> set[str]:
            top = Path(folder) == REPO
            return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in skip)}

        shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
        return dest
    for name in filter(None, listed):
        source = REPO / name
        if not os.path.lexists(source):  # deleted in the working tree, not yet committed
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "src")
    run_process([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("pixelformer-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_ships_every_config_and_only_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pixelformer/configs/defaults.yaml" in names
    yamls = {f"pixelformer/{p.relative_to(REPO / 'pixelformer').as_posix()}"
             for p in (REPO / "pixelformer" / "configs").rglob("*.yaml")}
    assert {n for n in yamls if n.startswith("pixelformer/configs/experiment/")}, "no experiment files found"
    assert yamls <= names, sorted(yamls - names)
    assert {n for n in names if n.endswith(".yaml")} == yamls  # nothing else, nothing stale
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"pixelformer", wheel.name.split("-py")[0] + ".dist-info"}, top  # no tasks/, tests/, tools/
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    commands = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("pixelformer-train", "pixelformer-eval", "pixelformer-sample", "pixelformer-sweep",
                    "pixelformer-report", "pixelformer-cache-latents", "pixelformer-analyze"):
        assert f"{command} = pixelformer.cli:" in commands


def test_the_checkout_reads_the_packaged_configs():
    from pixelformer.config import CONFIG_DIR
    from pixelformer.sweep import EXPERIMENT_DIR

    assert CONFIG_DIR == REPO.resolve() / "pixelformer" / "configs" and (CONFIG_DIR / "defaults.yaml").is_file()
    assert EXPERIMENT_DIR == CONFIG_DIR / "experiment"
    assert (REPO / "configs").resolve() == CONFIG_DIR  # the top-level link that docs refer to


@pytest.mark.slow
def test_an_installed_wheel_trains_outside_the_checkout(wheel, tmp_path):
    """A fresh venv (no torch download: the test environment's site-packages come in through a .pth file) with only
    the wheel installed: the console command and the Python API train from a folder outside the checkout."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    venv = tmp_path / "venv"
    run_process([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # pip from this environment installs into the fresh one (before the .pth exists: it sees no other pixelformer)
    run_process([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(run_process([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Plain path lines: the checkout's editable-install finder (an __editable__*.pth there) is not activated.
    ours = dict.fromkeys(p for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]) if p)
    (site / "_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIXELFORMER_RUN_DIR", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        out = run_process(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    where = run(str(python), "-c", "import pixelformer, pixelformer.config as c; print(pixelformer.__file__); "
                "print(c.CONFIG_DIR); from pixelformer.sweep import list_experiments; print(list_experiments())")
    module, config_dir, experiments = where.stdout.strip().splitlines()[-3:]
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "pixelformer" / "configs", where.stdout
    assert "patch_size" in experiments

    run(str(venv / "bin" / "pixelformer-train"), *TINY_RUN, f"run.dir={tmp_path / 'cli-run'}")
    assert "test/acc1" in json.loads((tmp_path / "cli-run" / "eval.json").read_text())["metrics"]
    assert "pixelformer-eval ckpt=PATH" in run(str(venv / "bin" / "pixelformer-eval"), "--help").stdout

    # The API, twice in one process with run.dir unset: each fit gets its own default run directory.
    script = textwrap.dedent(f"""
        import pixelformer
        for seed in (0, 1):
            cfg = pixelformer.compose({TINY_RUN!r} + [f"run.seed={{seed}}"])
            assert cfg.run.dir is None
            metrics = pixelformer.fit(cfg)
            print("RUN", cfg.run.dir, sorted(metrics))
    """)
    out = run(str(python), "-c", script)
    dirs = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("RUN ")]
    assert len(dirs) == 2 and dirs[0] != dirs[1], out.stdout
    for name in dirs:
        assert (work / name / "eval.json").is_file() and (work / name).parent == work / "runs"

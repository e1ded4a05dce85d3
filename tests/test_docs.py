"""The documentation: the README stays short, every relative link resolves, the config reference names every key,
and the site builds in strict mode (when the `docs` extra is installed)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import typing
from pathlib import Path

import pytest

from conftest import REPO, run_process

DOCS = REPO / "docs"
GENERATED_REPORT = DOCS / "results"  # written by tools/report.py; its links are checked by the strict build
README_MAX_LINES = 220

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_text(path: Path) -> str:
    """A page as the site shows it: docs/config.md with its generated reference in place of the marker."""
    text = path.read_text(encoding="utf-8")
    if path == DOCS / "config.md":
        generator = config_reference()
        text = text.replace(generator.MARKER, generator.markdown())
    return text


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (mkdocs.yml makes the site use the same): lower case, punctuation dropped, each
    space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", page_text(path))
    return {slug(h) for h in _HEADING.findall(text)}


def links(path: Path) -> list[str]:
    """The targets of the Markdown links and images of a page, code blocks and code spans left out."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def pages() -> list[Path]:
    return [REPO / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if GENERATED_REPORT not in p.parents)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, more than {README_MAX_LINES}: move the detail "
                                       f"to a page under docs/ and link it")


@pytest.mark.slow
@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page: Path):
    """Every relative link points at a file of the checkout, and every #anchor at a heading of its page."""
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file {dest.relative_to(REPO) if REPO in dest.parents else dest}")
        elif REPO not in dest.parents:
            broken.append(f"{target}: outside the checkout")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n  " + "\n  ".join(broken)


def _keys(cls: type, prefix: str) -> list[str]:
    """Every dotted key of a dataclass schema, nested sections flattened (independently of the generator)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_config_reference_names_every_key():
    """A key added to a schema without reaching the reference fails here (the page is generated, so this guards
    the generator)."""
    import pixelformer.tasks  # noqa: F401  (registers the built-in tasks)
    from pixelformer.config import GROUPS, Config, group_choices
    from pixelformer.task import get_task, list_tasks

    text = config_reference().markdown()
    keys = _keys(Config, "")
    for name in list_tasks():
        keys += _keys(get_task(name).config_cls, "task.")
    assert len(keys) > 50
    missing = sorted(k for k in set(keys) if f"| `{k}` |" not in text)
    assert not missing, f"the config reference has no row for {', '.join(missing)}"
    for name in list_tasks():
        assert f"### `task={name}`" in text
    for group in GROUPS:
        for choice in group_choices(group):
            assert f"`{choice}`" in text, f"{group}={choice} is not in the config reference"


def test_config_reference_reads_field_comments():
    """The descriptions are the comments next to the fields: trailing, above, and after a class's last field."""
    from pixelformer.config import DataCfg, OptimCfg, TrainerCfg

    generator = config_reference()
    data = generator.field_comments(DataCfg)
    assert data["batch_size"] == "per device, per micro-batch"  # trailing
    assert data["on_device"].startswith("Hold the normalised images")  # the lines above
    assert "embeddings the least" in generator.field_comments(OptimCfg)["layer_decay"]  # continued below
    assert generator.field_comments(TrainerCfg)["devices"] == ""


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path):
    """mkdocs build --strict: a broken link or anchor, a page missing from the nav or an API reference to a name
    that no longer exists fails the build."""
    reason = "the docs extra is not installed (pip install -e '.[docs]'; `make docs` does it)"
    pytest.importorskip("mkdocs", reason=reason)
    pytest.importorskip("material", reason=reason)
    pytest.importorskip("mkdocstrings", reason=reason)
    pytest.importorskip("mkdocstrings_handlers.python", reason=reason)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = run_process([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    assert (tmp_path / "site" / "config" / "index.html").is_file()

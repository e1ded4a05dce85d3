"""mkdocs hooks (mkdocs.yml ``hooks:``): the pages that describe code are generated from it while the site builds.

* ``docs/config.md`` holds a marker that :func:`on_page_markdown` replaces with the tables that
  ``tools/config_reference.py`` generates from the config dataclasses and the YAML group files;
* ``docs/architecture.md`` holds a marker replaced by :func:`module_map`: each module of the package with the first
  paragraph of its docstring;
* ``docs/api.md``: :func:`check_api_members` fails the build when a ``members:`` list of a ``::: module`` block names
  something the module no longer has (mkdocstrings would skip it without a word).

So these pages always match the code they document; a marker that has gone missing fails the build.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pixelformer"
MODULE_MAP = "<!-- module-map -->"


def _generator():
    if str(REPO) not in sys.path:  # the package itself, imported from the checkout
        sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("pixelformer_config_reference", REPO / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def module_map() -> str:
    """A Markdown table: every module of ``pixelformer/`` and the first paragraph of its docstring. Modules whose
    docstring starts with "Moved to" (paths kept for old code) are left out."""
    rows = ["| module | what it owns |", "| --- | --- |"]
    for path in sorted(PACKAGE.rglob("*.py")):
        if "configs" in path.parts:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        first = " ".join(doc.split("\n\n")[0].split())
        if first.startswith("Moved to"):
            continue
        name = path.relative_to(REPO).as_posix()
        if path.name == "__init__.py":
            name = name[: -len("__init__.py")]
        # (Python-Markdown's tables do not split cells at a | inside a code span, where these docstrings have them)
        rows.append(f"| `{name}` | {first or '(no docstring)'} |")
    return "\n".join(rows) + "\n"


def _replace(markdown: str, marker: str, text: str, page: str) -> str:
    if marker not in markdown:
        raise ValueError(f"docs/{page} lacks the marker {marker!r} that the generated text replaces")
    return markdown.replace(marker, text)


_BLOCK = re.compile(r"^::: *([\w.]+)\n((?:[ \t]+.*\n?)*)", re.M)
_MEMBERS = re.compile(r"^\s+members:\s*\[([^\]]*)\]", re.M)


def check_api_members(markdown: str) -> None:
    """Every name in a ``members: [...]`` list of a ``::: module`` block exists in that module (read statically, as
    mkdocstrings reads it)."""
    import griffe
    from mkdocs.exceptions import PluginError

    missing = []
    for module, options in _BLOCK.findall(markdown):
        listed = _MEMBERS.search(options)
        if not listed:
            continue
        members = griffe.load(module, search_paths=[str(REPO)]).members
        missing += [f"{module}.{name}" for name in (n.strip() for n in listed.group(1).split(",")) if name
                    and name not in members]
    if missing:
        raise PluginError(f"docs/api.md lists members that do not exist: {', '.join(missing)}; update docs/api.md")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "api.md":
        check_api_members(markdown)
        return markdown
    if page.file.src_uri == "config.md":
        generator = _generator()
        return _replace(markdown, generator.MARKER, generator.markdown(), "config.md")
    if page.file.src_uri == "architecture.md":
        return _replace(markdown, MODULE_MAP, module_map(), "architecture.md")
    return markdown


# The docstrings use Sphinx cross-reference roles (:func:`x`); rendered, they show the role's name before the code
# span. Keep the code span only.
_ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|exc|obj):(<code>)~?")


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri not in ("api.md", "architecture.md"):
        return html
    return _ROLE.sub(r"\1", html)

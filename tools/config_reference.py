"""The config reference (docs/config.md), generated from the config dataclasses and the YAML group files.

Every key of every section comes from the dataclass schemas: ``pixelformer.config.Config`` (model, data, optim,
trainer, logger, run, recipe and the top-level keys) and each registered task's ``config_cls`` (the ``task:``
section). A key's type and default come from the field; its description is the ``#`` comment next to it in the
source (a trailing comment on the field's line, the comment lines right above it, or the comment lines after the
last field of a class). The groups' choices and what each YAML file sets come from ``pixelformer/configs/``.

The documentation site calls :func:`markdown` at build time (``docs/hooks.py``), so the page cannot go stale.
``python tools/config_reference.py`` prints it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

#: The marker in docs/config.md that the generated reference replaces.
MARKER = "<!-- config-reference -->"

#: The sections of ``Config`` in the order the page shows them, with the YAML group that fills each.
SECTIONS = ("model", "data", "optim", "trainer", "logger", "recipe", "run")


# ------------------------------------------------------------------------------------------------- comments
def field_comments(cls: type) -> dict[str, str]:
    """The ``#`` comments of each field of dataclass ``cls``, read from its source: the comment lines right above
    the field, then its trailing comment; comment lines after the last field belong to the last field."""
    source = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(source)
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef), cls
    fields = [(stmt.target.id, stmt.lineno, stmt.end_lineno) for stmt in node.body
              if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)]
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()  # lines holding code (not just a comment)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    own_line = {line for line in comments if line not in code_lines}  # comment-only lines

    out: dict[str, str] = {}
    for i, (name, first, last) in enumerate(fields):
        above: list[str] = []
        line = first - 1
        while line in own_line:
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(first, last + 1) if n in comments and n not in own_line]
        after: list[str] = []
        if i == len(fields) - 1:  # continuation lines after the class's last field
            line = last + 1
            while line in own_line:
                after.append(comments[line])
                line += 1
        text = " ".join(above)
        if trailing:  # a comment above may cover several fields; the field's own comment follows it
            text = f"{text}; {' '.join(trailing)}" if text else " ".join(trailing)
        out[name] = " ".join([text] + after) if after else text
    return out


# ------------------------------------------------------------------------------------------------ rendering
def _split_top(text: str) -> list[str]:
    """``a, b[c, d], e`` -> ``['a', 'b[c, d]', 'e']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def type_text(annotation: Any) -> str:
    """A field's annotation in words, free of ``|`` (which would split a Markdown table cell)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        return f"{type_text(text[len('Optional['):-1])}, or null"
    if text.startswith("Literal[") and text.endswith("]"):
        values = [v.strip("'\"") for v in _split_top(text[len("Literal["):-1])]
        return "one of " + ", ".join(f"`{v}`" for v in values)
    return f"`{text}`"


def value_text(value: Any) -> str:
    """A default as it would be written in YAML or on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def prose(text: str) -> str:
    """A source comment as Markdown text: ``*`` and ``<`` are literal there (``pit_local_*``, ``<data.root>``)."""
    return text.replace("*", "\\*").replace("<", "&lt;")


def rows(cls: type, prefix: str) -> Iterator[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` for every field of ``cls``, nested dataclasses flattened."""
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints.get(f.name)
        if dataclasses.is_dataclass(hint):
            if comments.get(f.name):
                yield key, "section", "", prose(comments[f.name])
            yield from rows(hint, key + ".")
            continue
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"`{value_text(default)}`"
        yield key, type_text(f.type), shown, prose(comments.get(f.name, ""))


def table(cls: type, prefix: str) -> list[str]:
    lines = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for key, kind, default, comment in rows(cls, prefix):
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(comment)} |")
    return lines


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def choice_table(group: str, config_dir: Path, prefix: str) -> list[str]:
    """What each YAML file of ``group`` sets (its ``defaults:`` picks of other groups included)."""
    from omegaconf import OmegaConf

    from pixelformer.config import group_choices

    lines = ["| choice | sets |", "| --- | --- |"]
    for choice in group_choices(group, config_dir):
        path = config_dir / group / f"{choice}.yaml"
        if not path.exists():
            continue
        content = OmegaConf.to_container(OmegaConf.load(path)) or {}
        picks = content.pop("defaults", None) or {}
        sets = [f"`{g}={c}`" for g, c in picks.items()]
        sets += [f"`{prefix}{k}={value_text(v)}`" for k, v in _flatten(content)]
        lines.append(f"| `{group}={choice}` | {_cell(', '.join(sets)) or '(nothing: the schema defaults)'} |")
    return lines


def _doc(cls: type) -> list[str]:
    doc = inspect.getdoc(cls)
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass's generated signature
        return []
    return [prose(" ".join(doc.split())), ""]


def markdown() -> str:
    """The whole reference, as Markdown (headings start at level 2)."""
    from omegaconf import OmegaConf

    import pixelformer.tasks  # noqa: F401  (registers the built-in tasks)
    from pixelformer.config import CONFIG_DIR, GROUPS, Config, group_choices
    from pixelformer.task import TaskCfg, get_task, list_tasks

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "defaults.yaml")).get("defaults", {})
    hints = typing.get_type_hints(Config)
    comments = field_comments(Config)
    out = ["## Groups and their choices", "",
           "`group=choice` on the command line picks `pixelformer/configs/<group>/<choice>.yaml` (`model=` also "
           "takes any registered backbone name); the column *default* is what `pixelformer/configs/defaults.yaml` "
           "picks when the command line names none (a task's YAML file may pick others: see its row below).", "",
           "| group | default | choices |", "| --- | --- | --- |"]
    for group in GROUPS:
        choices = ", ".join(f"`{c}`" for c in group_choices(group))
        out.append(f"| `{group}` | `{defaults.get(group, '')}` | {choices} |")
    out += ["", "The *default* column of the tables below is the schema's value (the dataclass field), which the "
            "chosen YAML file may change; each section's second table says what each file sets.", ""]

    out += ["## Top-level keys", "", "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(hints[f.name]):
            out.append(f"| `{f.name}` | {_cell(type_text(f.type))} | `{value_text(_default(f))}` | "
                       f"{_cell(prose(comments.get(f.name, '')))} |")
    out.append("")

    for section in SECTIONS:
        cls = hints[section]
        out += [f"## `{section}`", "", f"Schema: `pixelformer.config.{cls.__name__}`.", ""]
        out += _doc(cls)
        out += table(cls, f"{section}.") + [""]
        if section in GROUPS:
            out += [f"What each `{section}=` choice sets:", ""]
            if any((CONFIG_DIR / section).glob("*.yaml")):
                out += choice_table(section, CONFIG_DIR, f"{section}.") + [""]
            else:
                out += [f"No YAML files: each choice is a registered backbone, built with its registered defaults "
                        f"({', '.join(f'`{c}`' for c in group_choices(section))}).", ""]

    out += ["## `task`", "",
            "Each task has its own schema, a subclass of `pixelformer.task.TaskCfg`; `task=<name>` picks the task "
            "and its YAML file, and `task.*` keys are checked against that task's schema.", ""]
    out += table(TaskCfg, "task.") + [""]
    out += [f"What each `task=` choice sets:", ""] + choice_table("task", CONFIG_DIR, "task.") + [""]
    for name in list_tasks():
        cls = get_task(name).config_cls
        out += [f"### `task={name}`", "", f"Schema: `{cls.__module__}.{cls.__name__}`.", ""]
        out += _doc(cls)
        out += table(cls, "task.") + [""]
    return "\n".join(out).rstrip() + "\n"


def all_fields() -> list[str]:
    """Every dotted key the reference must show: the schemas' fields, nested sections flattened."""
    import pixelformer.tasks  # noqa: F401
    from pixelformer.config import Config
    from pixelformer.task import get_task, list_tasks

    keys = [key for key, *_ in rows(Config, "")]
    for name in list_tasks():
        keys += [key for key, *_ in rows(get_task(name).config_cls, "task.")]
    return sorted(set(keys))


if __name__ == "__main__":
    print(markdown(), end="")

"""Each config key with its documentation: the string under each field in `twotower.configs.schema`,
read from the source (Python keeps no per-field docstrings at run time). `twotower config show`
prints `commented_yaml`; `twotower fit --help` lists `key_lines`."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache

from omegaconf import OmegaConf

from twotower.configs.schema import Config


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal that follows its declaration} of a dataclass."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _walk(cls: type, value, prefix: str = ""):
    """(dotted key, nested dataclass type or None, value, doc) in declaration order."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        child = getattr(value, f.name)
        nested = type(child) if dataclasses.is_dataclass(child) else None
        yield f"{prefix}{f.name}", nested, child, docs.get(f.name, (nested.__doc__ or "").strip() if nested else "")


def commented_yaml(cfg: Config, width: int = 100) -> str:
    """The config as YAML (loadable with -c), each key under a comment with its documentation."""
    lines: list[str] = []

    def emit(cls: type, value, depth: int) -> None:
        indent = "  " * depth
        for key, nested, child, doc in _walk(cls, value):
            name = key.rsplit(".", 1)[-1]
            if doc:
                lines.extend(textwrap.wrap(doc, width, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "))
            if nested:
                lines.append(f"{indent}{name}:")
                emit(nested, child, depth + 1)
            else:
                rendered = OmegaConf.to_yaml({name: child}).rstrip("\n").splitlines()
                lines.extend(f"{indent}{line}" for line in rendered)

    emit(Config, cfg, 0)
    return "\n".join(lines) + "\n"


def key_lines(cfg: Config | None = None) -> list[str]:
    """`key = default  doc` for every leaf key, for `--help`."""
    cfg = cfg or Config()
    out = []

    def visit(cls: type, value, prefix: str) -> None:
        for key, nested, child, doc in _walk(cls, value, prefix):
            if nested:
                visit(nested, child, f"{key}.")
            else:
                default = (f"[{', '.join(map(str, child))}]" if isinstance(child, (list, tuple))
                           else OmegaConf.to_yaml({"v": child}).strip()[3:])
                out.append(f"  {key}={default}  {doc.split('. ')[0].rstrip('.')}")

    visit(Config, cfg, "")
    return out

"""``--help`` text for the config: every section and key with its type, default and meaning.

The meaning is the field's docstring in its dataclass (the string right under the field),
read from the source, so the help can never drift from the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} for dataclass ``cls``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def config_help(root: type, type_name) -> str:
    """One block per section of the ``root`` dataclass, one line per key."""
    lines = ["configuration (YAML files via --config, then --section.key=value overrides):"]
    hints = typing.get_type_hints(root)
    for section in dataclasses.fields(root):
        cls = hints[section.name]
        lines.append(f"\n  {section.name}:")
        sub_hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            head = f"    --{section.name}.{f.name}  ({type_name(sub_hints[f.name])}, " \
                   f"default {_default(f)})"
            lines.append(head)
            if docs.get(f.name):
                lines.extend(textwrap.wrap(docs[f.name], width=96, initial_indent=" " * 8,
                                           subsequent_indent=" " * 8))
    return "\n".join(lines)

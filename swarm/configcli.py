"""Command-line flags generated from a config: a flat frozen dataclass whose fields carry a trailing comment.

    @dataclass(frozen=True)
    class Config:
        model: str  # checkpoint directory            -> --model MODEL (required: no default)
        port: int = 0  # gRPC port; 0 picks a free one  -> --port PORT, help "gRPC port; ... (default: 0)"
        lan: bool = False  # LAN discovery              -> --lan (store_true); a default-True bool gives --no-x

Each field becomes ``--field-name``; its type gives the conversion (``int``, ``float``, ``str``, ``bool``,
``X | None``, ``tuple[str, ...]`` and any type in ``parsers``), its comment the help text, its default the
default. The same field list renders the markdown table of the README (:func:`markdown_table`), so the
flags, ``--help`` and the documentation cannot drift apart. Generic: nothing here knows any config.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from swarm.cliargs import peers_list


@dataclass(frozen=True)
class ConfigField:
    """One field of a config as the command line sees it."""

    name: str  # the dataclass field, e.g. max_batch_tokens
    kind: type  # the field's type without ``| None``: int, float, str, bool, tuple, or a parsers key
    default: Any  # dataclasses.MISSING when the field has no default (its flag is then required)
    optional: bool  # the type includes None
    help: str  # the field's trailing comment

    @property
    def flag(self) -> str:
        """``--max-batch-tokens`` for ``max_batch_tokens``; ``--no-x`` for a bool ``x`` that defaults to True."""
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.kind is bool and self.default is True else f"--{dashed}"

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of dataclass ``cls`` (read from its source), by field name.

    A field written over several lines collects the comments of all its lines, and comment-only lines
    right below a field (no blank line between) continue its comment."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    found = {}
    for stmt in body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            end = stmt.end_lineno or stmt.lineno
            while end < len(lines) and lines[end].lstrip().startswith("#"):  # lines[end] is line end + 1
                end += 1
            found[stmt.target.id] = " ".join(comments[n] for n in range(stmt.lineno, end + 1) if n in comments)
    return found


def config_fields(cls: type, parsers: Mapping[type, Callable[[str], Any]] | None = None) -> list[ConfigField]:
    """The fields of the flat dataclass ``cls``; TypeError for a field the command line cannot express
    (a nested type, an unknown class, a field without a comment)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints, comments, parsers = typing.get_type_hints(cls), field_comments(cls), parsers or {}
    result = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, optional = _unwrap_optional(hints[f.name])
        if not (kind in (int, float, str, bool) or kind == tuple[str, ...] or kind in parsers):
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {hints[f.name]} "
                            "(use int, float, str, bool, tuple[str, ...], X | None, or give a parser)")
        if kind is bool and optional:
            raise TypeError(f"{cls.__name__}.{f.name}: bool | None has no flag form; use a plain bool")
        if not comments.get(f.name):
            raise TypeError(f"{cls.__name__}.{f.name} has no trailing comment: it is the flag's help text")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        result.append(ConfigField(f.name, tuple if kind == tuple[str, ...] else kind, default, optional,
                                  comments[f.name]))
    return result


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def show_default(value: Any) -> str:
    """A default as the help text and the README show it: ``15`` for 15.0, ``off`` for False, ``none``."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _Words(argparse.Action):
    """``nargs="*"`` that also splits comma-separated values; stores a tuple."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, peers_list(values))


def _converter(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """``parse`` for argparse: its ValueError/TypeError message becomes the one-line error as it is."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    one_of: Iterable[Sequence[str]] = (),
    parsers: Mapping[type, Callable[[str], Any]] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Add a flag for every field of ``cls`` to ``parser``.

    ``one_of``: groups of fields of which exactly one must be given (a required mutually exclusive group).
    ``parsers``: type -> function from the flag's text to a value (ValueError with a message on bad text).
    ``choices``: field name -> the values its flag accepts."""
    parsers, choices = parsers or {}, choices or {}
    fields = {f.name: f for f in config_fields(cls, parsers)}
    groups = [tuple(g) for g in one_of]
    unknown = ({name for g in groups for name in g} | set(choices)) - set(fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    target = {name: parser for name in fields}
    for group in groups:
        exclusive = parser.add_mutually_exclusive_group(required=True)
        target.update({name: exclusive for name in group})
    for f in fields.values():
        _add_flag(target[f.name], f, parsers, choices.get(f.name), in_group=target[f.name] is not parser)


def _add_flag(parser, f: ConfigField, parsers, choices, in_group: bool) -> None:
    shown = "" if f.required or f.kind is bool or f.default in (None, ()) else f" (default: {show_default(f.default)})"
    text = f"disable: {f.help}" if f.kind is bool and f.default is True else f.help
    kw: dict[str, Any] = {"dest": f.name, "help": (text + shown).replace("%", "%%")}
    if f.kind is bool:
        kw["action"] = "store_false" if f.default is True else "store_true"
    elif f.kind is tuple:
        kw.update(nargs="*", action=_Words)
    elif f.kind in parsers:
        kw["type"] = _converter(parsers[f.kind], f.kind.__name__)
    else:
        kw["type"] = f.kind
    if choices is not None:
        kw["choices"] = tuple(choices)
    if not f.required:
        kw["default"] = f.default
    elif not in_group:
        kw["required"] = True
    parser.add_argument(f.flag, **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config ``cls`` built from ``args`` parsed by a parser :func:`add_config_arguments` filled.
    Whatever ``cls.__post_init__`` refuses raises here (ValueError/TypeError)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init})


def markdown_table(cls: type, parsers: Mapping[type, Callable[[str], Any]] | None = None) -> str:
    """The README's table of ``cls``'s flags: flag, meaning (the comment), default."""
    rows = ["| flag | meaning | default |", "|---|---|---|"]
    for f in config_fields(cls, parsers):
        default = "required" if f.required else show_default(f.default)
        meaning, default = (text.replace("|", r"\|") for text in (f.help, default))  # a | would end the cell
        rows.append(f"| `{f.flag}` | {meaning} | {default} |")
    return "\n".join(rows) + "\n"

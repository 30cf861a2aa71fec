"""The reader: YAML composed into nodes that keep their marks, read into typed values.

The YAML is composed, not loaded: composing keeps every node's position, so each
problem can point at the line and column where it was written (and duplicate keys,
which PyYAML's loader silently merges, can be seen).  `Reader` turns nodes into
typed values and records located problems; the section walkers
(`lazyd.config.sections`) drive it.  All problems are collected, so a single
`lazyd check` shows every one of them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from lazyd.config.convert import show
from lazyd.errors import ConfigError

MAP, SEQ, STR, NULL = (f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "null"))
_MERGE = "tag:yaml.org,2002:merge"

T = TypeVar("T")


def compose(text: str, filename: str) -> tuple[Node, Reader]:
    """The document's root node and a reader for it; ConfigError on a syntax error."""
    try:
        loader = yaml.SafeLoader(text)  # a str is checked for bad characters right here
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError([_syntax_error(filename, text, exc)]) from None
    if root is None:
        raise ConfigError([f"{filename}:1:1: the config is empty; it needs at least services:"])
    return root, Reader(filename, loader)


def join(path: str, name: str) -> str:
    # A name that could be misread in a message (empty, spaces, quotes) is shown quoted.
    if not name or not name.isprintable() or re.search(r"[\s'\"]", name):
        name = repr(name)
    return f"{path}.{name}" if path else name


@dataclass(frozen=True)
class Entry:
    key: Node  # problems about the entry as a whole point here
    value: Node


class Reader:
    """Typed access to composed YAML nodes; every problem is recorded at its node."""

    def __init__(self, filename: str, loader: yaml.SafeLoader) -> None:
        self.filename = filename
        self.loader = loader
        self.problems: list[tuple[int, int, str]] = []

    def problem(self, node: Node, path: str, message: str) -> None:
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        where = f"{path}: " if path else ""
        self.problems.append((line, col, f"{self.filename}:{line}:{col}: {where}{message}"))

    def describe(self, node: Node) -> str:
        if not isinstance(node, ScalarNode):
            return "a list" if isinstance(node, SequenceNode) else "a mapping"
        if node.tag == NULL:
            return "nothing" if node.value == "" else "null"
        text = str(node.value)
        plain = node.tag != STR and text.isprintable() and 0 < len(text) <= 80
        return text if plain else show(text)

    def expected(self, node: Node, path: str, what: str) -> None:
        self.problem(node, path, f"expected {what}, got {self.describe(node)}")

    def mapping(
        self, node: Node, path: str, known: Collection[str] | None = None, what: str = "a mapping"
    ) -> dict[str, Entry] | None:
        """A mapping's entries by key; duplicate keys and keys not `known` are problems."""
        if not (isinstance(node, MappingNode) and node.tag == MAP):
            self.expected(node, path, what)
            return None
        entries: dict[str, Entry] = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                self.problem(key, path, "merge keys (<<) are not supported; write the keys out")
            elif not isinstance(key, ScalarNode):
                self.expected(key, path, "a name as key")
            elif key.value in entries:
                first = entries[key.value].key.start_mark.line + 1
                self.problem(key, join(path, key.value),
                             f"duplicate key {key.value!r} (first at line {first})")
            elif known is not None and key.value not in known:
                close = difflib.get_close_matches(key.value, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problem(key, path, f"unknown key {key.value!r}{hint}")
            else:
                entries[key.value] = Entry(key, value)
        return entries

    def items(self, node: Node, path: str, what: str) -> list[Node] | None:
        if isinstance(node, SequenceNode) and node.tag == SEQ:
            return list(node.value)
        self.expected(node, path, what)
        return None

    def convert(self, node: Node, path: str, func: Callable[[object], T], what: str) -> T | None:
        """func(the scalar's value); the ValueError it raises becomes a problem at the node."""
        if not isinstance(node, ScalarNode):
            self.expected(node, path, what)
            return None
        try:
            value = self.loader.construct_object(node, deep=True)
        except Exception:  # PyYAML's constructors let int(), dict lookups etc. raise through
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            self.problem(node, path, f"cannot read {self.describe(node)} as {tag}")
            return None
        try:
            return func(value)
        except ValueError as exc:
            self.problem(node, path, str(exc).replace("\n", " "))
            return None

    def values(
        self, keys: Mapping[str, Entry], path: str,
        table: Mapping[str, tuple[Callable[[object], object], str]],
    ) -> dict[str, Any]:
        """Every key of `table` (converter, what) that is present, converted; a value with
        a problem is left out."""
        values = {}
        for key, (func, what) in table.items():
            if key in keys:
                value = self.convert(keys[key].value, join(path, key), func, what)
                if value is not None:
                    values[key] = value
        return values

    def text(self, node: Node, path: str, what: str) -> str | None:
        """A scalar exactly as written (`0660` stays `0660`), for arguments and variables."""
        if not isinstance(node, ScalarNode) or node.tag == NULL:
            self.expected(node, path, what)
            return None
        if "\0" in node.value:
            self.problem(node, path, "a NUL character cannot be passed to a process")
            return None
        return str(node.value)

    def error(self) -> ConfigError:
        """Every problem recorded, as one ConfigError."""
        # In file order; problems at one position keep the order they were found in.
        ordered = sorted(self.problems, key=lambda problem: problem[:2])
        return ConfigError([text for *_, text in ordered])


def _syntax_error(filename: str, text: str, exc: BaseException) -> str:
    line, col, problem = 1, 1, "the document is nested too deeply"  # a RecursionError
    if isinstance(exc, yaml.MarkedYAMLError):
        if mark := exc.problem_mark or exc.context_mark:
            line, col = mark.line + 1, mark.column + 1
        problem = exc.problem or exc.context or "cannot parse"
        if exc.context and exc.problem and not exc.context.startswith("while"):
            problem = f"{exc.context}, {exc.problem}"  # "expected a single document ..., but"
    elif isinstance(exc, ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - text.rfind("\n", 0, exc.position)
        problem = f"character #x{exc.character:04x} is not allowed"
    elif isinstance(exc, yaml.YAMLError):
        problem = str(exc)
    return f"{filename}:{line}:{col}: YAML syntax error: " + problem.replace("\n", " ")

"""Reading a sweep spec's YAML with bounded time and memory, and without silent key merges.

``yaml.safe_load`` expands aliases: a few hundred bytes of nested ``&a [*b, *b, ...]`` anchors (a "billion
laughs" document) become gigabytes once constructed. Here the document is first composed into its node graph
(aliases are shared nodes there, so the graph stays as small as the text), its expanded size is counted on
that graph with memoisation, and construction happens only below ``MAX_VALUES``. Duplicate keys in one
mapping, which PyYAML silently resolves to the last one, are an error naming the key and both lines; merge
keys (``<<: *base``) keep their meaning: explicit keys override merged ones. Booleans are YAML 1.2's, ``true``
and ``false`` only: YAML 1.1 (PyYAML's default) also reads an unquoted ``on``, ``off``, ``yes``, ``no`` as
booleans, so ``channels_last: on`` silently meant ``true``; here those stay the words they are. Numbers are
1.2's too: ``1e-3`` and ``+.5`` are floats, ``010`` is ten, ``1:30`` is a string.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 1_000_000       # a sweep spec is a few kB; this bounds composing
MAX_VALUES = 1_000_000      # values after alias expansion


class SpecYAMLError(ValueError):
    """A spec document that is not acceptable YAML (syntax, size, alias expansion, duplicate keys)."""


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        merge: int | None = None
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                line = key_node.start_mark.line + 1
                if merge is not None:  # PyYAML keeps one of them, silently
                    raise SpecYAMLError(f"two merge keys (<<) in one mapping, at lines {merge} and {line}; "
                                        "merge several mappings with one: <<: [*a, *b]")
                merge = line
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise SpecYAMLError(f"duplicate key {str(key)[:80]!r} at line {line} (first at line {first}); "
                                    "YAML would silently keep only the last one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 (core schema) numbers. Integers: 010 is ten (1.1: octal eight), 0o10 is eight (1.1: a string),
# 1:30 is a string (1.1: sexagesimal 90). Floats need no dot before an exponent (1e-3; 1.1 asks for 1.0e-3)
# nor a digit before the point (+.5, .5e3). Underscores between digits stay allowed, as they always were.
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*\.[0-9_]*|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: Node) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")  # type: ignore[arg-type]
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("-+")
    base = 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10
    return sign * int(text[2:] if base != 10 else text, base)


_Loader.add_constructor(_INT, _construct_int)


def expanded_size(root: Node, limit: int = MAX_VALUES) -> int:
    """Number of values the node graph expands to (aliases counted at every use), capped at ``limit + 1``;
    a recursive alias counts as over the limit. Linear in the graph: each shared node is sized once."""
    memo: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if not expanded:
            if key in memo:
                continue
            if key in active:  # reached again while its own children are open: a cycle
                memo[key] = limit + 1
                continue
            active.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node))
            continue
        active.discard(key)
        if key not in memo:
            memo[key] = min(limit + 1, 1 + sum(memo.get(id(c), limit + 1) for c in _children(node)))
    return memo[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load(text: str, source: str = "spec") -> Any:
    """The YAML document in ``text``, or :class:`SpecYAMLError` naming what is wrong with it."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise SpecYAMLError(f"{source} is {size:,} bytes; a sweep spec is at most {MAX_BYTES:,}")
    loader = _Loader(text)
    loader.name = source  # its marks say where: 'in "spec.yaml", line 3', not 'in "<unicode string>"'
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = expanded_size(node)
        if n > MAX_VALUES:
            raise SpecYAMLError(f"{source} expands to more than {MAX_VALUES:,} values through YAML aliases "
                                "(an alias bomb?); write the values out or use fewer aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise SpecYAMLError(f"YAML syntax: {str(err)[:300]}") from None
    except RecursionError:
        raise SpecYAMLError(f"{source} nests too deeply") from None
    finally:
        loader.dispose()

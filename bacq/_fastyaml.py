"""YAML documents read straight from libyaml's events, for files of many jobs. Touches nothing.

PyYAML's ``CSafeLoader`` parses in C but resolves and constructs every node in Python: 10,000
small job mappings took 1.3 s, of which libyaml's events are 0.12 s. ``load_all`` builds the
plain dicts, lists and scalars of a document from the events directly, resolving a plain scalar
with PyYAML's own implicit resolvers (looked up by its first character, as PyYAML does) and
constructors, so its result equals ``yaml.load_all(text, Loader=yaml.CSafeLoader)``.

Anchors and aliases are built as PyYAML builds them: an alias is the anchored object itself (a
list shared by every job of a file that was written by ``yaml.safe_dump`` is one list). Anything
less common (an explicit tag, a merge key ``<<``, a timestamp, a mapping or list used as a key,
an alias to no anchor or an anchor defined twice, whose errors are PyYAML's to word) makes it
give up (``Unusual``): the caller reads the text again with PyYAML's loader. Syntax errors are
libyaml's, as PyYAML's loader raises them.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

__all__ = ["AVAILABLE", "Unusual", "load_all"]

_LOADER: Any = getattr(yaml, "CSafeLoader", None)
AVAILABLE = _LOADER is not None  # libyaml is there (without it, PyYAML's loader is as good)

_STR = "tag:yaml.org,2002:str"
# the implicit tags built here; any other (timestamp, merge, value, yaml) gives up
_SIMPLE = frozenset(f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str"))
_RESOLVERS: dict[str, list[tuple[str, Any]]] = (
    {k: v for k, v in _LOADER.yaml_implicit_resolvers.items() if k is not None} if AVAILABLE else {}
)
_WILDCARD: list[tuple[str, Any]] = (
    list(_LOADER.yaml_implicit_resolvers.get(None, [])) if AVAILABLE else []
)
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_NO_KEY = object()  # a mapping waiting for its next key


class Unusual(Exception):  # not an error: a reason to read the text the long way
    """The text uses YAML this reader leaves to PyYAML's loader."""


def _scalar(event: ScalarEvent) -> Any:
    if event.tag is not None:
        raise Unusual("an explicit tag")
    value: str = event.value
    if not event.implicit[0]:
        return value  # quoted or block: a string
    resolvers = _RESOLVERS.get(value[0] if value else "")
    if resolvers is None and not _WILDCARD:
        return value
    for tag, pattern in (resolvers or []) + _WILDCARD:
        if pattern.match(value):
            if tag not in _SIMPLE:
                raise Unusual(f"a plain scalar resolved to {tag}")
            if tag == _STR:
                return value
            return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, ScalarNode(tag, value))
    return value


def load_all(text: str) -> list[Any]:
    """The documents of ``text``, as ``yaml.load_all`` with the safe loader gives them."""
    if not AVAILABLE:
        raise Unusual("no libyaml")
    loader = _LOADER(text)
    documents: list[Any] = []
    stack: list[Any] = []  # the containers being filled, innermost last
    keys: list[Any] = []  # per container: the key waiting for its value (mappings)
    document: Any = None
    anchors: dict[str, Any] = {}  # the document's anchors and what they name

    def anchor(name: str | None, value: Any) -> None:
        if name is not None:
            if name in anchors:
                raise Unusual("an anchor defined twice")
            anchors[name] = value

    def put(value: Any) -> None:
        nonlocal document
        if not stack:
            document = value
            return
        top = stack[-1]
        if type(top) is list:
            top.append(value)
        elif keys[-1] is _NO_KEY:
            if isinstance(value, (dict, list)):
                raise Unusual("a mapping or a list as a key")
            keys[-1] = value
        else:
            top[keys[-1]] = value
            keys[-1] = _NO_KEY

    try:
        while True:
            event = loader.get_event()
            kind = type(event)
            if kind is ScalarEvent:
                value = _scalar(event)
                anchor(event.anchor, value)
                put(value)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                if event.tag is not None:
                    raise Unusual("an explicit tag")
                container: Any = {} if kind is MappingStartEvent else []
                anchor(event.anchor, container)
                put(container)
                stack.append(container)
                keys.append(_NO_KEY)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                stack.pop()
                keys.pop()
            elif kind is DocumentEndEvent:
                documents.append(document)
                document = None
                anchors.clear()  # (an anchor names a node of its own document only)
            elif kind is AliasEvent:
                if event.anchor not in anchors:
                    raise Unusual("an alias to no anchor")
                put(anchors[event.anchor])
            elif kind is StreamEndEvent or event is None:
                return documents
            elif kind is not StreamStartEvent and kind is not DocumentStartEvent:
                raise Unusual(f"an event {kind.__name__}")
    finally:
        loader.dispose()

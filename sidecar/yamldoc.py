"""YAML documents that remember where each key and item came from (file:line).

Config and policy files are parsed with this loader so that every error can name the
exact line at fault. Duplicate keys are errors: a second `deny:` silently replacing the
first is exactly the kind of edit that must not pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class LocatedDict(dict[str, Any]):
    """A mapping from a YAML file, with the line of each key."""

    def __init__(self, source: str = "<memory>", line: int = 0) -> None:
        super().__init__()
        self.source = source
        self.line = line
        self.lines: dict[str, int] = {}

    def where(self, key: str | None = None) -> str:
        """`file:line` of `key`, or of the mapping itself."""
        line = self.lines.get(key, self.line) if key is not None else self.line
        return f"{self.source}:{line}"


class LocatedList(list[Any]):
    """A sequence from a YAML file, with the line of each item."""

    def __init__(self, source: str = "<memory>", line: int = 0) -> None:
        super().__init__()
        self.source = source
        self.line = line
        self.lines: list[int] = []

    def where(self, index: int | None = None) -> str:
        """`file:line` of item `index`, or of the sequence itself."""
        line = self.lines[index] if index is not None and index < len(self.lines) else self.line
        return f"{self.source}:{line}"


class YamlError(Exception):
    """A YAML file cannot be read or parsed; the message starts with file:line."""


def _make_loader(source: str) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> LocatedDict:
        loader.flatten_mapping(node)
        out = LocatedDict(source, node.start_mark.line + 1)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise YamlError(f"{source}:{line}: keys must be strings, got {key!r}")
            if key in out:
                raise YamlError(f"{source}:{line}: duplicate key '{key}'")
            out[key] = loader.construct_object(value_node, deep=True)
            out.lines[key] = line
        return out

    def sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> LocatedList:
        out = LocatedList(source, node.start_mark.line + 1)
        for item in node.value:
            out.append(loader.construct_object(item, deep=True))
            out.lines.append(item.start_mark.line + 1)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


def parse(text: str, source: str) -> Any:
    """Parse one YAML document; mappings become LocatedDict, sequences LocatedList."""
    try:
        return yaml.load(text, Loader=_make_loader(source))
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlError(f"{source}:{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: YAML error: {exc}") from None


def load_file(path: Path) -> Any:
    """Read and parse a YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise YamlError(f"{path}: not UTF-8 text") from None
    return parse(text, str(path))

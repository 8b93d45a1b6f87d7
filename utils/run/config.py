"""YAML reading that refuses a key given twice in one mapping.

PyYAML keeps the last of two equal keys without a word, so a config with ``lr`` set twice
trains with whichever came last; here that is an error naming the key and both lines.
"""
from __future__ import annotations

from typing import IO, Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a repeated key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(f"key '{key}' is set twice (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(stream: str | IO) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(stream, Loader=UniqueKeyLoader)

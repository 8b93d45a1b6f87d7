"""Config files: YAML files whose keys are a command's long flag names, read as the defaults
of its argument parser, each value checked and converted as the flag's command-line value would
be, and the resolved configuration written back in the same form.

PyYAML keeps the last of two equal keys without a word, so a config with ``lr`` set twice
would train with whichever came last; here that is an error naming the key and both lines.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import os
from typing import IO, Any, Optional, Sequence

import yaml

from ..errors import ConfigError

NOT_CONFIG = ("help", "config", "local_rank")  # keys a config file cannot set


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


class ModelKwargs(argparse.Action):
    """``KEY=VALUE ...`` -> dict; values are Python literals where they parse, else strings."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key.isidentifier():
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A config value checked and converted like the flag's command-line value."""
    where = f"{source}: key '{key}'"
    if value is None:
        return None
    if isinstance(action, ModelKwargs):
        if not (isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value)):
            raise ConfigError(f"{where} must be a mapping of argument names to values, got {value!r}")
        return dict(value)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs not in (None, "?")
    if many:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f"{where} must list {action.nargs} values, got {len(value)}")
        values = list(value)
    else:
        if isinstance(value, (list, tuple, dict)):
            raise ConfigError(f"{where} must be a single value, got {value!r}")
        values = [value]
    out = [_convert(action, v, where) for v in values]
    return out if many else out[0]


def _convert(action: argparse.Action, v: Any, where: str) -> Any:
    """One value of a config key, converted by the flag's ``type`` and checked against its choices."""
    convert = action.type or str
    kind = getattr(convert, "__name__", "value")
    try:
        if isinstance(v, str):
            v = convert(v)
        elif convert in (float, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = convert(v)
        elif not (convert is int and isinstance(v, int) and not isinstance(v, bool)):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {v!r} is not a valid {kind}") from None
    if action.choices is not None and v not in action.choices:
        raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
    return v


def config_key(action: argparse.Action) -> str:
    """The key of an option in a config file: its first long flag without the dashes
    (``--batch-size`` -> ``batch-size``), or its name for a positional argument."""
    flags = [f for f in action.option_strings if f.startswith("--")]
    return flags[0][2:] if flags else action.dest


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Defaults from a YAML file; raises ConfigError naming an unknown key or a bad value."""
    try:
        with open(path) as f:
            cfg = safe_load_unique(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_CONFIG}
    out = {}
    for key, value in cfg.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            keys = {config_key(action): d for d, action in actions.items()}  # spelled as the configs spell them
            close = difflib.get_close_matches(str(key).lstrip("-").replace("_", "-"), list(keys), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in config {path}{hint}")
        out[dest] = _coerce(actions[dest], str(key), value, f"config {path}")
    return out


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line over the ``--config`` file over the parser's built-in defaults."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as a config file would hold them (feeds back through --config)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}


def write_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """``config`` as YAML, in its own key order."""
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)

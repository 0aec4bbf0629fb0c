"""Load a tree of dataclasses from defaults, YAML files and dotted overrides.

The loader is deliberately generic: it knows nothing about models or training,
only about dataclasses and type annotations.  Resolution order (later wins):

1. defaults of the schema (or a ``base`` instance),
2. a YAML file, itself optionally built on ``_base_`` files,
3. ``dotted.key=value`` overrides from the command line,

after which the merged dict is type-checked and converted by :func:`from_dict`
and every ``validate()`` hook in the tree is run, children first.

Every user-facing error is a :class:`ConfigError` that names the dotted path
of the offending key, so a typo in a 200-line config is found in one read.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import os
import pathlib
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from cumo_megatron.errors import EXIT_CONFIG, UserError

__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_cli",
    "save_config",
    "to_dict",
    "validate_tree",
]

T = TypeVar("T")

# Key that lets a YAML file inherit from another one (path relative to itself).
BASE_KEY = "_base_"

_NoneType = type(None)
_BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_CLI_USAGE = "usage: [--config FILE] [dotted.key=value ...]"


class ConfigError(UserError, ValueError):
    """A configuration is malformed: bad YAML, unknown key, wrong type, failed check."""

    label = "configuration error"
    exit_status = EXIT_CONFIG


# --------------------------------------------------------------------------- #
# Formatting helpers for error messages
# --------------------------------------------------------------------------- #


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    """Readable name of an annotation: ``list[int]``, ``VisionConfig | None``."""
    if tp is _NoneType or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    if tp is Ellipsis:
        return "..."
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", repr(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", repr(tp))


def _value_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _type_error(path: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    where = path or "<root>"
    msg = f"{where}: expected {_type_name(tp)}, got {_value_repr(value)}"
    return ConfigError(msg + (f" ({hint})" if hint else ""))


# --------------------------------------------------------------------------- #
# dict -> dataclass
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=None)
def _init_fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """(field, resolved type) for every constructor field of ``cls``.

    ``get_type_hints`` resolves string annotations, so schemas may use
    ``from __future__ import annotations``.  Fields with ``init=False`` are
    derived values and cannot be set from a config.
    """
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking keys and types.

    Nested dataclasses, ``Optional``/unions, ``list``/``tuple``/``dict``
    containers, ``Literal`` and ``Enum`` annotations are followed recursively.
    Scalars are coerced only where it is lossless and unsurprising (int ->
    float, ``"1e-3"`` -> float, ``"yes"`` -> bool); everything else raises.

    Args:
        cls: the dataclass type to build.
        data: mapping of field name to value; missing fields take defaults.
        path: dotted prefix used in error messages (for nested calls).

    Raises:
        ConfigError: unknown key (with a "did you mean" suggestion), wrong
            type, or missing required field -- each naming the dotted path.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(data, dict):
        raise _type_error(path, cls, data, "expected a mapping of field names")

    fields = _init_fields(cls)
    types_by_name = {f.name: tp for f, tp in fields}
    for key in data:
        if key not in types_by_name:
            raise _unknown_key_error(cls, path, key, list(types_by_name))

    missing = [f.name for f, _ in fields if f.name not in data and not _has_default(f)]
    if missing:
        where = path or cls.__name__
        raise ConfigError(f"{where}: missing required field(s): {', '.join(missing)}")

    kwargs = {
        name: _convert(types_by_name[name], value, _join(path, name))
        for name, value in data.items()
    }
    return cls(**kwargs)


def _unknown_key_error(cls: type, path: str, key: Any, valid: list[str]) -> ConfigError:
    msg = f"unknown key '{_join(path, key)}'"
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        msg += f"; did you mean '{close[0]}'?"
    msg += f" Valid keys for {cls.__name__}: {', '.join(valid)}"
    return ConfigError(msg)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise a ConfigError at ``path``."""
    if tp is Any or tp is object:
        # Unchecked: copy so the config never aliases the caller's data.
        return copy.deepcopy(value)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is Union or origin is types.UnionType:
        return _convert_union(tp, args, value, path)
    if origin is Literal:
        # Match on type as well as value: True == 1 must not satisfy Literal[1].
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return choice
        raise _type_error(path, tp, value)

    if value is None:
        raise _type_error(path, tp, value, "only Optional fields accept null")

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(tp, value, path)
    if tp is bool:
        return _convert_bool(value, path)
    if tp is int:
        return _convert_int(value, path)
    if tp is float:
        return _convert_float(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        # No str() coercion: YAML would already have turned `1.10` into 1.1,
        # so silently stringifying hides data loss.
        raise _type_error(path, tp, value, "quote the value to pass a string")
    if tp is pathlib.Path:
        if isinstance(value, (str, pathlib.PurePath)):
            return pathlib.Path(value)
        raise _type_error(path, tp, value)

    # Containers, bare (`list`) or parameterised (`list[int]`, `typing.List`).
    container = origin if origin is not None else tp
    if container is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if container is tuple:
        return _convert_tuple(tp, args, value, path)
    if container is dict:
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, _join(path, k)): _convert(val_tp, v, _join(path, k))
            for k, v in value.items()
        }

    # Any other class: accept instances as they are, never guess a constructor.
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(path, tp, value)


def _convert_union(tp: Any, args: tuple, value: Any, path: str) -> Any:
    if value is None:
        if _NoneType in args:
            return None
        raise _type_error(path, tp, value)
    options = [a for a in args if a is not _NoneType]
    if len(options) == 1:
        return _convert(options[0], value, path)
    # Prefer an exact type match so coercion in an earlier member (e.g. float
    # accepting the string "1") cannot steal a value meant for a later one.
    for option in options:
        if isinstance(option, type) and type(value) is option:
            return _convert(option, value, path)
    for option in options:
        try:
            return _convert(option, value, path)
        except ConfigError:
            continue
    raise _type_error(path, tp, value)


def _convert_tuple(tp: Any, args: tuple, value: Any, path: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _type_error(path, tp, value)
    if not args:
        return tuple(copy.deepcopy(v) for v in value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if args == ((),):  # `tuple[()]`, the empty tuple
        args = ()
    if len(value) != len(args):
        raise _type_error(path, tp, value, f"expected {len(args)} items, got {len(value)}")
    return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_enum(tp: type[enum.Enum], value: Any, path: str) -> enum.Enum:
    if isinstance(value, tp):
        return value
    # By value first: that is what to_dict writes, so round trips are exact.
    try:
        return tp(value)
    except (ValueError, TypeError):
        pass
    if isinstance(value, str) and value in tp.__members__:
        return tp.__members__[value]
    choices = ", ".join(f"{m.name} ({m.value!r})" for m in tp)
    raise _type_error(path, tp, value, f"valid: {choices}")


def _convert_bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[value.strip().lower()]
    # Integers are rejected on purpose: `use_fp8: 2` is a mistake, not True.
    raise _type_error(path, bool, value, "use true/false")


def _convert_int(value: Any, path: str) -> int:
    # bool is a subclass of int; `num_layers: true` is always a mistake.
    if isinstance(value, bool):
        raise _type_error(path, int, value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        # YAML 1.1 reads `1e6` as a string; accept it when it is integral.
        try:
            as_float = float(text)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
    raise _type_error(path, int, value)


def _convert_float(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise _type_error(path, float, value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; float() understands it.
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _type_error(path, float, value)


# --------------------------------------------------------------------------- #
# dataclass -> dict
# --------------------------------------------------------------------------- #


def to_dict(obj: Any) -> dict:
    """Convert a dataclass instance to plain YAML-safe data (inverse of from_dict).

    Nested dataclasses become dicts, tuples become lists, enums their values and
    paths strings.  Only constructor fields are written, so the result can be
    fed back to :func:`from_dict`.

    Raises:
        TypeError: ``obj`` is not a dataclass instance, or holds a value that
            has no plain-data form (naming the field).
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {obj!r}")
    return _plain(obj, "")


def _plain(value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), _join(path, f.name))
            for f in dataclasses.fields(value)
            if f.init
        }
    if isinstance(value, enum.Enum):
        return _plain(value.value, path)
    # bool/int/float/str are checked after Enum: IntEnum/StrEnum members are
    # ints/strs too, but must be written as their plain value.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_plain(k, path): _plain(v, _join(path, k)) for k, v in value.items()}
    raise TypeError(f"{path or '<root>'}: cannot convert {_value_repr(value)} to plain data")


# --------------------------------------------------------------------------- #
# YAML
# --------------------------------------------------------------------------- #


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys.

    PyYAML silently keeps the last duplicate, which turns a copy-paste slip
    into a silently ignored setting.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` may legitimately be overridden
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable; the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(source: str, err: yaml.YAMLError) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark and (not mark or context_mark.line != mark.line):
        # e.g. an unclosed `[` is reported at end of file; point at its opening too.
        context += f" (started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    detail = f"{context}: {problem}" if context else problem
    return ConfigError(f"invalid YAML in {where}: {detail}")


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise _yaml_error(path, err) from None
    if data is None:  # an empty file is an empty config
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _load_yaml_tree(path: str, chain: tuple[str, ...] = ()) -> dict:
    """Read ``path`` and merge it over its ``_base_`` file(s), recursively."""
    real = os.path.realpath(path)
    if real in chain:
        cycle = " -> ".join([*chain[chain.index(real):], real])
        raise ConfigError(f"cycle in {BASE_KEY} includes: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    here = os.path.dirname(path)
    for base in bases:  # later bases win over earlier ones; the file wins over all
        merged = _deep_merge(merged, _load_yaml_tree(os.path.join(here, base), chain + (real,)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, top: dict) -> dict:
    """New dict: ``top`` over ``base``.  Mappings merge; everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- #
# Overrides
# --------------------------------------------------------------------------- #


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.key=value`` overrides to a nested dict, returning a new dict.

    Values are parsed as YAML, so ``24``, ``1e-4``, ``true``, ``null``,
    ``[0,2,4]`` and ``[{path: a.json, weight: 2}]`` all work; an empty value
    (``name=``) is the empty string rather than YAML's null.  Assignment
    replaces the value at the key (a dict value is not merged).  Keys may be
    created -- :func:`from_dict` validates them later against the schema --
    and a ``null`` intermediate (e.g. a disabled ``Optional`` sub-config) is
    replaced by a new mapping.  An all-digit segment indexes into a list
    (``data.files.0.weight=3``).

    Raises:
        ConfigError: an override without ``=``, with an empty key segment,
            with unparseable YAML, or that descends into a scalar.
    """
    out = copy.deepcopy(data)
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(out, key, value, text)
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"malformed override {text!r}: expected dotted.key=value")
    raw_key, raw_value = text.split("=", 1)
    parts = raw_key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"malformed override {text!r}: empty key or key segment")
    if raw_value.strip() == "":
        return [p.strip() for p in parts], ""
    try:
        value = yaml.load(raw_value, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(f"override {text!r}", err) from None
    return [p.strip() for p in parts], value


def _set_dotted(root: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = root
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            node = node[_list_index(node, part, here, text)]
        if not isinstance(node, (dict, list)):
            raise ConfigError(
                f"override {text!r}: '{here}' is {_value_repr(node)}, not a mapping"
            )
    last = parts[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, ".".join(parts), text)
        node[idx] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, here: str, text: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {text!r}: '{here}' indexes a list; use an integer index")
    idx = int(part)
    if idx >= len(node):
        raise ConfigError(f"override {text!r}: index {idx} out of range for list of {len(node)}")
    return idx


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def _iter_children(value: Any) -> Iterator[Any]:
    """Dataclass instances directly reachable from ``value`` (through containers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _iter_nodes(getattr(value, f.name))


def _iter_nodes(value: Any) -> Iterator[Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_nodes(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_nodes(v)


def validate_tree(obj: Any) -> None:
    """Call ``validate()`` on every dataclass node that has one, children first.

    Children first means a parent's cross-field checks can rely on its
    sub-configs being individually valid.  A node reachable twice is checked
    once.  Exceptions from a hook propagate unchanged.
    """
    seen: set[int] = set()

    def visit(node: Any) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for child in _iter_children(node):
            visit(child)
        hook = getattr(node, "validate", None)
        if callable(hook):
            hook()

    visit(obj)


def _defaults_dict(cls: type) -> dict:
    # A schema with required fields has no default instance; its YAML/overrides
    # must then supply them, and from_dict names whichever are missing.
    if all(_has_default(f) for f, _ in _init_fields(cls)):
        return to_dict(cls())
    return {}


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    base: T | None = None,
) -> T:
    """Resolve a config: defaults <- YAML file <- overrides, then validate.

    Args:
        cls: the root dataclass type.
        path: optional YAML file.  A top-level ``_base_: other.yaml`` (or a
            list of paths, relative to the file) is loaded first and the file
            is deep-merged over it; include cycles are rejected.
        overrides: ``dotted.key=value`` strings, see :func:`apply_overrides`.
        base: starting instance instead of ``cls()`` defaults.

    Returns:
        The built ``cls`` instance after every ``validate()`` hook has passed.

    Raises:
        ConfigError: any problem with the file, an override or a value; the
            message names the file and line or the dotted key.
    """
    if base is not None:
        if not isinstance(base, cls):
            raise TypeError(f"base must be a {cls.__name__}, got {type(base).__name__}")
        data = to_dict(base)
    else:
        data = _defaults_dict(cls)
    if path is not None:
        data = _deep_merge(data, _load_yaml_tree(os.fspath(path)))
    data = apply_overrides(data, overrides)
    cfg = from_dict(cls, data)
    validate_tree(cfg)
    return cfg


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as YAML in field order; ``load_config`` reads it back equal.

    The parent directory is created if needed, and the file is replaced
    atomically so a crash never leaves a half-written config next to outputs.
    """
    from cumo_megatron.files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False))


def parse_cli(cls: type[T], argv: Sequence[str]) -> T:
    """Build ``cls`` from command-line arguments.

    Accepts an optional ``--config FILE`` (or ``--config=FILE``) and any
    number of bare ``dotted.key=value`` overrides, applied in order.

    Raises:
        ConfigError: an unrecognised argument, a repeated or value-less
            ``--config``, or any error from :func:`load_config`.
    """
    config_path: str | None = None
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ConfigError(f"--config given more than once; {_CLI_USAGE}")
            if arg == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    raise ConfigError(f"--config needs a file argument; {_CLI_USAGE}")
                config_path = args[i + 1]
                i += 2
                continue
            config_path = arg.split("=", 1)[1]
            if not config_path:
                raise ConfigError(f"--config needs a file argument; {_CLI_USAGE}")
        elif arg.startswith("-"):
            hint = ""
            if "=" in arg:
                hint = f" (overrides take no dashes: {arg.lstrip('-')!r})"
            raise ConfigError(f"unrecognised argument {arg!r}{hint}; {_CLI_USAGE}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unrecognised argument {arg!r}; {_CLI_USAGE}")
        i += 1
    return load_config(cls, config_path, overrides)

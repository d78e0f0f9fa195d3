"""Typed configs: dataclasses loaded from YAML, overridable with ``key.sub=value`` from the CLI.

Every component owns its own config dataclass; this module only knows how to build any of them
from plain data, rejecting unknown keys and wrong types with a message that names the key.
A field states what it accepts where it is declared, with :func:`setting` (a range, choices, a
multiple, non-empty); :func:`validate` checks a whole config tree against those declarations and
every config dataclass calls it when it is built, so a config from a file, from the command line
or from Python is checked the same way. Checks that relate several fields stay in the
dataclass's ``__post_init__``, raising :class:`ConfigError` via :func:`check`.

A list value is a YAML list, ``key=[a, b]`` on the command line (quote an item that holds a comma:
``validation.prompts='["a red circle, white background"]'``). A bare string is a one-item list;
one holding a comma is refused, since it could be meant as one item or as several.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sspo.errors import ConfigError

T = TypeVar("T")

# Values a YAML document may stand for once its aliases are written out: a config holds hundreds,
# and thirty lines of aliases each naming the one before twice ("billion laughs") stand for 2^30.
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias written out (``sizes``: the nodes counted
    so far, as an alias is the node it names); a node met again inside itself counts once."""
    if id(node) not in sizes:
        sizes[id(node)] = 1
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so ``ssr: off`` stays the string 'off'; a key given twice
    in one mapping is an error (PyYAML keeps the last, so a second ``optim:`` section drops the first);
    aliases may not expand a document past :data:`MAX_YAML_VALUES` values (PyYAML shares the aliased
    value, but every walk over it, a check or an error message, would expand it)."""

    def construct_document(self, node):
        if (size := _expanded_size(node, {})) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(None, None, f"its aliases (*name) expand it to {size} values, more than the {MAX_YAML_VALUES} "
                                                    "a config may hold", node.start_mark)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first: dict = {}  # key -> its line
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be set again beside it
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice (first on line {first[key] + 1}); keep one",
                                                        key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str):
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:  # PyYAML parses each level of nesting a level deeper in Python's stack
        raise yaml.YAMLError(f"it is nested deeper than Python's recursion limit ({sys.getrecursionlimit()}) lets PyYAML read") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A PyYAML error on one line: where (line and column, counted from 1) and what, without the
    quoted source lines of its own message."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "cannot be parsed"
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + " ".join(what.split())
    return " ".join(str(exc).split())


def check(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming ``key`` when ``condition`` is false."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


def one_of(value: Any, choices: typing.Iterable[Any], key: str) -> None:
    choices = tuple(choices)
    check(value in choices, key, f"got {value!r}, expected one of {', '.join(map(repr, choices))}")


MAX_SEED = 2**32 - 1  # numpy takes 32-bit seeds (accelerate's set_seed seeds it), torch 64: one bound for every seed
# Image sides in pixels: SDXL trains at 1024, FLUX up to about 2 megapixels; past this a typo's
# image (1000000^2 pixels) fails allocating memory instead of as a config error.
MAX_RESOLUTION = 4096
# Frames of a clip, read or trained: 7 minutes at 10 fps, far more than a video model trains or is
# evaluated on, and a bound on the memory a small file (or a typo) can claim.
MAX_CLIP_FRAMES = 4096
ALLOWED = "sspo.allowed"  # the dataclass field metadata key of a field's Allowed


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What a config field accepts beyond its type. On a list field every constraint is about each
    of its items, except that ``nonempty`` also refuses the empty list."""

    choices: typing.Sequence[Any] | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    multiple_of: int | None = None
    nonempty: bool = False
    own_folder: bool = False  # a folder sspo writes into: never empty, root-like, home or current

    def admits(self, value: Any) -> bool:
        """Whether one value (an item, on a list field) is allowed; an empty list is refused by :func:`validate`."""
        try:
            return (
                not (isinstance(value, float) and not math.isfinite(value))  # inf passes every bound; nan none
                and (self.choices is None or value in self.choices)
                and (self.at_least is None or value >= self.at_least)
                and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most)
                and (self.below is None or value < self.below)
                and (self.multiple_of is None or value % self.multiple_of == 0)
                and not (self.nonempty and isinstance(value, str) and not value.strip())
                and not (self.own_folder and _root_like(value))
            )
        except TypeError:  # a wrong type built from Python (from_dict checks types first)
            return False

    def describe(self, item_type: Any) -> str:
        """What :meth:`admits` accepts, for an error message: "an integer >= 1", "one of 'a', 'b'"."""
        if self.own_folder:
            return "a folder of the run's own (not empty, '.', '/', '~', the home folder, the current folder or a folder holding them)"
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if item_type is str:
            return "a non-empty string" if self.nonempty else "a string"
        text = "an integer" if item_type is int else "a number"
        low = (self.at_least, "[", ">=") if self.at_least is not None else (self.above, "(", ">") if self.above is not None else None
        high = (self.at_most, "]", "<=") if self.at_most is not None else (self.below, ")", "<") if self.below is not None else None
        if low and high:
            text += f" in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
        elif low or high:
            bound, _, sign = low or high
            text += f" {sign} {_number(bound)}"
        if self.multiple_of is not None:
            text += f" that is a multiple of {self.multiple_of}"
        return text


class Registered(typing.Sequence[str]):
    """The names of a registry (a dict filled by ``register`` calls, or a function of registries
    that returns one), and ``extra`` names, as they are when read: as a field's choices, it admits
    what is registered after the field is declared."""

    def __init__(self, registry: typing.Mapping[str, Any] | typing.Callable[[], typing.Mapping[str, Any]], *extra: str):
        self.registry, self.extra = registry, extra

    def _names(self) -> tuple[str, ...]:
        return (*self.extra, *(self.registry() if callable(self.registry) else self.registry))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())


def setting(default: Any = dataclasses.MISSING, *, choices: typing.Iterable[Any] | None = None, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, below: float | None = None, multiple_of: int | None = None, nonempty: bool = False,
            own_folder: bool = False) -> Any:
    """A config field with ``default`` (none: a required field) that accepts only what the keywords
    allow (see :class:`Allowed`); :func:`validate` checks it whenever its dataclass is built.
    ``choices`` are fixed when declared, except :class:`Registered` ones."""
    fixed = choices if choices is None or isinstance(choices, Registered) else tuple(choices)
    allowed = Allowed(fixed, at_least, above, at_most, below, multiple_of, nonempty, own_folder)
    return dataclasses.field(default=default, metadata={ALLOWED: allowed})


def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` with its documentation: the comments on its declaration's lines,
    else the comment block right above it ("" for neither)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    found, source_lines = {}, source.splitlines()
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign):
            lines = [n for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if not lines:
                above = node.lineno - 1
                while above in comments and source_lines[above - 1].lstrip().startswith("#"):
                    lines.insert(0, above)
                    above -= 1
            found[node.target.id] = " ".join(comments[n] for n in lines)
    return found


def allowed(field: dataclasses.Field) -> Allowed | None:
    """What ``field`` was declared to accept with :func:`setting`; None for a field of any value of its type."""
    return field.metadata.get(ALLOWED)


@functools.cache
def field_type(cls: type, name: str) -> tuple[Any, bool, bool]:
    """(the type of a field's value or, on a list field, of its items; whether None is allowed; whether it is a list)."""
    tp = typing.get_type_hints(cls)[name]
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    is_list = typing.get_origin(tp) in (list, tuple)
    return (typing.get_args(tp)[0] if is_list else tp), optional, is_list


def validate(config: Any, prefix: str = "") -> None:
    """Check every field of dataclass ``config``, and of its sections, against what its declaration
    allows (:func:`setting`): a ConfigError names the key, the value and what is allowed."""
    for field in dataclasses.fields(config):
        value, key = getattr(config, field.name), f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
            continue
        rule = allowed(field)
        if rule is None:
            continue
        item_type, optional, is_list = field_type(type(config), field.name)
        if value is None and optional:
            continue
        expected = rule.describe(item_type) + (", or null" if optional else "")
        if is_list:
            check(not (rule.nonempty and not value), key, "got [], expected a non-empty list")
            for i, item in enumerate(value):
                check(rule.admits(item), f"{key}[{i}]", f"got {item!r}, expected {expected}")
        else:
            check(rule.admits(value), key, f"got {value!r}, expected {expected}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _root_like(path: str) -> bool:
    """An empty path, the filesystem root, the home or current folder, or a folder holding one of them."""
    if not str(path).strip():
        return True
    try:
        folder = Path(path).expanduser().resolve()
        anchors = {Path.home().resolve(), Path.cwd()}
    except (OSError, RuntimeError):  # no home folder, or a deleted current one: nothing to compare with
        return False
    return folder == Path(folder.anchor) or any(folder == a or folder in a.parents for a in anchors)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):  # a bare string is one item; a comma could mean one item or several
            check("," not in value, key, f"got {value!r}, a string holding a comma where a list goes; write a YAML list: "
                  f"{key}='[\"{value}\"]' for one item, {key}='[{value}]' for several")
            value = [value]
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):  # not a number: the check below names the key
                value = float(value)
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer past the float range
            raise ConfigError(f"config key '{key}': got an integer too large for a number (beyond 1.8e308); give a smaller value") from None
    if tp is str:
        check(value is not None, key, "expected a string, got null (YAML reads a bare ~ or null as no value: quote it)")
        check(isinstance(value, str), key, f"expected a string, got {value!r}{'; quote it to pass it as text' if isinstance(value, (bool, int, float)) else ''}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers, null or booleans
    if unknown:
        # A key of a section given at the top (learning_rate for optim.learning_rate) is named with its section.
        sections = [f"{prefix}{name}.{unknown[0]}" for name in fields
                    if dataclasses.is_dataclass(hints[name]) and unknown[0] in {f.name for f in dataclasses.fields(hints[name])}]
        meant = f" (did you mean '{sections[0]}'?)" if sections else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{meant}; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"config section '{prefix or cls.__name__}': {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def split_override(item: str) -> tuple[str, str]:
    """(key, raw value) of a ``key=value`` override; a ConfigError naming ``item`` when it is not one."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value; write e.g. optim.learning_rate=1e-5")
    key, raw = item.split("=", 1)
    if re.search(r"\[.*\]$", key.strip()):
        raise ConfigError(f"override {item!r}: list items cannot be set one at a time; give the whole list, "
                          f"e.g. {key.strip().partition('[')[0]}=[a,b]")
    return key, raw


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place; a mapping
    given for a section of dataclass ``cls`` merges into it (:func:`_merge`)."""
    for item in overrides:
        key, raw = split_override(item)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            example = f", e.g. {key}='\"{raw}\"'" if not {'"', "'"} & set(raw) else ""
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(exc)}); "
                              f"write it as a quoted YAML string to pass it as text{example}") from None
        node = data
        parts = key.strip().split(".")
        if isinstance(value, (bool, int, float)) and _takes_text(cls, parts):
            value = raw  # data.path=2024, tracker_run_name=0123: the text typed, not a number (0123 would be octal 83)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        _merge(node, parts[-1], value, section_type(cls, parts))
    return data


def _takes_text(cls: type | None, parts: typing.Sequence[str]) -> bool:
    """Whether key ``parts`` of dataclass ``cls`` is a string field (``str`` or ``str | None``)."""
    section = section_type(cls, parts[:-1]) if len(parts) > 1 else cls
    if section is None or not dataclasses.is_dataclass(section):
        return False
    hint = typing.get_type_hints(section).get(parts[-1])
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def section_type(cls: type | None, parts: typing.Sequence[str]) -> type | None:
    """The dataclass that key ``parts`` names in ``cls`` (a section), else None (a value, or a dict field)."""
    for part in parts:
        hint = typing.get_type_hints(cls).get(part) if cls is not None and dataclasses.is_dataclass(cls) else None
        cls = hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None
    return cls


def _merge(node: dict, key: str, value: Any, section: type | None) -> None:
    """``node[key] = value``, but a mapping given for a section merges into it, as its keys one by
    one would (``optim={learning_rate: 1e-4}`` keeps the config's other optim keys); a dict field's
    mapping (``validation.scorer_paths={}``) replaces it."""
    if section is not None and isinstance(value, dict) and isinstance(node.get(key), dict):
        for inner, inner_value in value.items():
            _merge(node[key], str(inner), inner_value, section_type(section, [str(inner)]))
    else:
        node[key] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; check the file and its permissions") from None
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}; correct the file there") from None
    if not isinstance(data, dict):
        given = {"list": "a list", "str": "a single value", "int": "a number", "float": "a number", "bool": "true or false"}.get(type(data).__name__, "another value")
        raise ConfigError(f"config file {path} must contain a mapping at the top level (key: value lines, e.g. method: sspo), not {given}")
    return data


def find_config(path: str | Path) -> Path:
    """The config file ``path`` names: a file there, a folder's ``config.yaml`` (a run folder: the
    config it trained with, overrides included, which ``--resume`` needs), else for a bare name
    ``sd15-lora`` the file ``sd15-lora.yaml`` here, else (for ``sd15-lora.yaml`` too) the shipped
    config of that name; a ConfigError listing the shipped names if none."""
    from sspo.paths import CONFIGS

    path = Path(path)
    if path.is_file():
        return path
    if (path / "config.yaml").is_file():
        return path / "config.yaml"
    if len(path.parts) == 1 and path.suffix != ".yaml" and path.with_name(f"{path.name}.yaml").is_file():
        return path.with_name(f"{path.name}.yaml")
    if len(path.parts) == 1:
        shipped = next((c for c in (CONFIGS / path, CONFIGS / f"{path}.yaml") if c.is_file()), None)
        if shipped is not None:
            return shipped
    names = ", ".join(sorted(c.stem for c in CONFIGS.glob("*.yaml")))
    what = f"{path} is a folder without a config.yaml" if path.is_dir() else f"config file {path} does not exist"
    raise ConfigError(f"{what}; pass a YAML file, a run folder, or a shipped config by name: {names}")


def load_config(cls: type[T], path: str | Path | None, overrides: typing.Sequence[str] = ()) -> T:
    """``cls`` from the YAML file ``path`` names (:func:`find_config`; None: the defaults) with ``key=value`` overrides applied."""
    found = find_config(path) if path else None
    data = load_yaml(found) if found else {}
    if found == Path(path or "") / "config.yaml" and "output_dir" in {f.name for f in dataclasses.fields(cls)}:
        data["output_dir"] = str(path)  # a run folder trains where it lies now, wherever it was first trained
    return from_dict(cls, apply_overrides(data, overrides, cls))


def yaml_text(obj: Any) -> str:
    """A config dataclass as YAML, every key in declaration order: what ``load_config`` reads back."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def save_yaml(obj: Any, path: str | Path) -> None:
    from sspo.io import atomic_write_text

    atomic_write_text(path, yaml_text(obj))

"""The one configuration loader: a typed dataclass per entry point, filled from defaults, YAML files, then flags.

Every entry point declares its settings as a dataclass whose fields carry `option(...)` metadata (help text and,
for named choices, the allowed values). `parse(cls, argv)` builds the command line from it, reads each
`--config FILE.yaml` (repeatable; later files win), applies the flags (flags win), checks every value against
the field's type and choices, and calls the dataclass's `validate()` for combinations. Everything happens before
any model is loaded, and every failure is one `UserError` line naming the flag, key or file:

- an unknown flag or key is an error with the closest known name (`--learning_rte`: did you mean
  `--learning_rate`?); a flag that belongs to another script is unknown to this one;
- no abbreviations (`--learning 1e-3` is an error, not `--learning_rate`);
- YAML numbers written as `1e-4` (a string to YAML 1.1) are read as numbers where the field is a float;
- floats must be finite; `nan` is never a setting.

A config may be composed: a field declared with `section(SubConfig)` holds another dataclass, owned by the module
of its concern (data, objective, optimizer, ...). Its fields stay flat on the command line and in YAML
(`--resolution`, not `--data.resolution`), so every leaf name is unique across the sections; in code they are
reached through their section (`cfg.data.resolution`), and a function takes the section it uses.

A field's metadata can say, besides its help and choices, what it means for the rest of the product: `resume`
(one of `RESUME_KINDS`: may a resumed run change it), `card` (does it go on the model card), `families` (the model
families or objectives it applies to; None: all) and `secret` (never logged or written). The training configs
require the first two on every field (tested), so no hand-kept list of field names is needed anywhere.

Flag names are the field names, underscores kept, as in diffusers' example scripts. Why not tyro or
simple_parsing: both produce multi-line, rich-formatted errors and dash-cased or nested flag names by default,
and neither reads the YAML files our users bring with the same strictness; what we need is ~150 lines of
`argparse` + `typing`, written once here.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from difftune.core.errors import UserError

# What a resumed run may do with a setting that differs from its checkpoint's:
PASSIVE = "passive"  # no effect on the trained weights (paths, logging, cadence): taken as it is
SETTABLE = "settable"  # acts from the resumed step on and is applied exactly (learning rate, its schedule, ...)
REFUSED = "refused"  # changes the trajectory: an error unless --resume_allow_changes
REFUSED_RESTARTS_EPOCH = "refused_restarts_epoch"  # as REFUSED; if allowed, the batch layout changed: epoch restarts
RESUME_KINDS = (PASSIVE, SETTABLE, REFUSED, REFUSED_RESTARTS_EPOCH)


def option(
    help: str,
    default: Any = dataclasses.MISSING,
    *,
    choices: Sequence[str] | None = None,
    repeatable: bool = False,
    resume: str | None = None,
    card: bool | None = None,
    families: Sequence[str] | None = None,
    secret: bool = False,
    **kwargs,
):
    """A dataclass field with its help text and, optionally, the values it may take and what it means for resume
    (`resume`, one of `RESUME_KINDS`), the model card (`card`) and the model families (`families`: names or
    objectives it applies to; None: all). `secret=True` keeps it out of logs, checkpoints and cards.

    A list default is given as `default_factory` (dataclasses' rule); pass `default=[...]` and it is wrapped.
    `repeatable=True` (list fields) lets the flag be given more than once, each adding to the list
    (`--set a=1 --set b=2`); otherwise a list flag takes its values after one flag and a repeated flag replaces."""
    if isinstance(default, (list, dict)):
        value = default
        kwargs["default_factory"] = lambda: type(value)(value)
        default = dataclasses.MISSING
    if resume is not None and resume not in RESUME_KINDS:
        raise ValueError(f"resume={resume!r}: one of {RESUME_KINDS}")
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "repeatable": repeatable,
                "resume": resume, "card": card, "families": tuple(families) if families is not None else None,
                "secret": secret}  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def require(checks: Sequence[tuple[bool, str]]) -> None:
    """A section's `validate()`: (condition, message) pairs; the first that fails is the `UserError`."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def section(cls, help: str = ""):
    """A field holding a sub-config (a dataclass owned by another module); its fields stay flat flags."""
    return dataclasses.field(default_factory=cls, metadata={"section": True, "help": help})


def _is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def leaf_fields(cls) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """Every setting of a (possibly composed) config class: flat name -> (section path, field, type annotation)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[tuple[str, ...], dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        if _is_section(f):
            for name, (path, leaf, tp) in leaf_fields(hints[f.name]).items():
                if name in out:
                    raise TypeError(f"{cls.__name__}: setting {name!r} is declared in two sections")
                out[name] = ((f.name, *path), leaf, tp)
        else:
            if f.name in out:
                raise TypeError(f"{cls.__name__}: setting {f.name!r} is declared in two sections")
            out[f.name] = ((), f, hints[f.name])
    return out


def field_types(cls) -> dict[str, Any]:
    """Flat setting name -> type annotation, through every section."""
    return {name: tp for name, (_, _, tp) in leaf_fields(cls).items()}


def leaves(cfg) -> dict[str, tuple[Any, dataclasses.Field]]:
    """A config instance's settings, flat: name -> (value, field)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_section(f):
            out.update(leaves(value))
        else:
            out[f.name] = (value, f)
    return out


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, optional?) of `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _scalar(value, tp, name: str):
    """`value` as the scalar type `tp` (bool, int, float, str); strings from the command line are converted."""
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise UserError(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # nothing downstream (torch, numpy) takes more than 64 bits
            raise UserError(f"{name} {value} out of range: more than 64 bits")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string; the command line gives strings
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a YAML `hub_model_id: 2024` or a numeric prompt
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")


def check_value(value, tp, name: str):
    """`value` checked and converted against the annotation `tp`: scalars, `X | None`, `list[X]`, `tuple[X, ...]`,
    `dict[str, X]`, and `Any` (taken as it is: for values another check owns, such as a model's options)."""
    if tp is Any:
        return value
    inner, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} must not be empty")
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list:
        value = [value] if not isinstance(value, list) else value
        return [check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:  # only the variable-length form, tuple[X, ...]; YAML and flags give lists
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported config type {tp!r} for {name}: use tuple[X, ...]")
        value = list(value) if isinstance(value, tuple) else [value] if not isinstance(value, list) else value
        return tuple(check_value(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a mapping, got {value!r}")
        return {str(k): check_value(v, args[1], f"{name}.{k}") for k, v in value.items()}
    return _scalar(value, inner, name)


def _check_choices(cfg) -> None:
    for value, f in leaves(cfg).values():
        allowed = f.metadata.get("choices")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if allowed is not None and v is not None and v not in allowed:
                close = difflib.get_close_matches(str(v), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"--{f.name} {v}: unknown{hint}; choose one of {', '.join(allowed)}")


def _unknown(name: str, known: Sequence[str], where: str) -> UserError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"{where}: unknown key {name!r}{hint}")


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error (SafeLoader keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: explicit keys may override merged ones
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, cls) -> dict:
    """The keys of a YAML config file, each checked against `cls`'s field types; unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        from difftune.core.paths import shipped_config

        path = shipped_config(str(path)) or path
    if path.is_dir():
        raise UserError(f"--config {path}: a folder, not a YAML file")
    if not path.is_file():
        raise UserError(f"--config {path}: no such file (nor a shipped preset of that name, e.g. gpu-8gb)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as err:
        raise UserError(
            f"--config {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); save it as "
            "UTF-8"
        ) from None
    except _DuplicateKey as err:
        raise UserError(f"--config {path}: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of keys to values")
    types_ = field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown(str(key), list(types_), f"--config {path}")
        out[key] = check_value(value, types_[key], f"--config {path}: {key}")
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (through `UserError`) and no abbreviations."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, argument_default=argparse.SUPPRESS, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            flags = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            if flags:
                known = [o[2:] for o in self._option_string_actions if o.startswith("--")]
                name = flags[0][2:].split("=")[0]
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean --{close[0]}?" if close else ""
                raise UserError(f"{self.prog}: unknown flag --{name}{hint} (see --help)")
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) of the same keys; repeatable.")
    for name, (_, f, tp) in leaf_fields(cls).items():
        meta = f.metadata
        help_ = meta.get("help", "")
        if meta.get("choices"):
            help_ = f"{help_} One of: {', '.join(meta['choices'])}."
        inner, _ = _unwrap(tp)
        if inner is bool:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_)
        elif typing.get_origin(inner) in (list, tuple):
            action = "extend" if meta.get("repeatable") else "store"
            parser.add_argument(f"--{name}", nargs="+", action=action, help=help_)
        elif typing.get_origin(inner) is dict:
            parser.add_argument(f"--{name}", type=yaml.safe_load, help=f"{help_} (a YAML/JSON mapping)")
        else:
            parser.add_argument(f"--{name}", help=help_)
    return parser


def compose(cls, values: dict, where: str = "config"):
    """An instance of the (possibly composed) config `cls` from flat `values`, each type-checked; unknown and
    missing required settings are errors. No choices or `validate()`: see `from_values`."""
    spec = leaf_fields(cls)
    unknown = [k for k in values if k not in spec]
    if unknown:
        raise _unknown(unknown[0], list(spec), where)
    required = [name for name, (_, f, _) in spec.items() if _is_required(f) and name not in values]
    if required:
        raise UserError(f"--{required[0]} is required (see --help)")
    by_section: dict[tuple[str, ...], dict] = {}
    for name, value in values.items():
        path, _, tp = spec[name]
        by_section.setdefault(path, {})[name] = check_value(value, tp, f"--{name}")
    return _build(cls, (), by_section)


def _build(cls, path: tuple[str, ...], by_section: dict[tuple[str, ...], dict]):
    hints = typing.get_type_hints(cls)
    kwargs = dict(by_section.get(path, {}))
    for f in dataclasses.fields(cls):
        if _is_section(f):
            kwargs[f.name] = _build(hints[f.name], (*path, f.name), by_section)
    return cls(**kwargs)


def with_settings(cfg, **values):
    """A copy of the composed `cfg` with some flat settings changed (`with_settings(cfg, max_train_steps=2)`)."""
    current = {name: value for name, (value, _) in leaves(cfg).items()}
    return compose(type(cfg), {**current, **values})


def from_values(cls, values: dict, where: str = "config", validate: bool = True):
    """`compose(cls, values)` with choices checked and (unless `validate=False`: the caller does) `validate()`
    called."""
    cfg = compose(cls, values, where)
    _check_choices(cfg)
    if validate and hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def parse(
    cls,
    argv: Sequence[str] | None,
    description: str = "",
    base: dict | None = None,
    prog: str | None = None,
    validate: bool = True,
):
    """`cls` from its defaults, then `base`, then each --config file, then flags; checked and (unless
    `validate=False`) validated."""
    args = vars(build_parser(cls, description, prog).parse_args(argv))
    values = dict(base or {})
    for path in args.pop("config"):
        values.update(load_yaml(path, cls))
    values.update(args)
    return from_values(cls, values, validate=validate)


def to_dict(cfg, exclude: Sequence[str] = ()) -> dict:
    """The config's settings as flat plain data (JSON-ready), without secret fields or those named in `exclude`."""
    return {name: _plain(value) for name, (value, f) in leaves(cfg).items()
            if not f.metadata.get("secret") and name not in exclude}  # fmt: skip


def _plain(value):
    return list(value) if isinstance(value, tuple) else value

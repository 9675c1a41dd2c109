"""The experiment config: validated once, against ``schema.yaml``, with its defaults filled in.

``schema.yaml`` (also at ``config/schema.yaml``) is the one place that says each key's type,
allowed values and default, including each strategy kind's own keys and a strategy's ``train:``
overrides. The workflow checks the config when it parses the Snakefile
(:func:`adaptune.experiment.validate_config`, which starts with :func:`check_schema`), so a
wrong value stops before any job starts, in one line that names the key path
(``strategies.head_only.train.lr``). The typed settings (:mod:`adaptune.settings`, the strategy
kinds, the modalities) then check only what a schema cannot say: rules between keys.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping, MutableMapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft202012Validator, validators
from referencing import Registry, Resource

from adaptune.errors import ConfigError

SCHEMA_FILE = "schema.yaml"

# Keys that were renamed or moved, by their old path (``NAME`` stands for any strategy's name):
# a config that still uses one stops with a message that names the new key. Add a line when a
# key of the schema is renamed or moved.
MOVED = {
    "importance.hessian_batches": (
        "importance.hessian_examples",
        "it counts calibration examples, not batches (default 8); renamed on 2026-11-24",
    ),
}


@functools.cache
def schema() -> dict[str, Any]:
    """The experiment schema (``config/schema.yaml``), as shipped inside the package."""
    return yaml.safe_load(files("adaptune").joinpath(SCHEMA_FILE).read_text())


def metric_names() -> tuple[str, ...]:
    """Every importance metric the schema allows, in its order."""
    return tuple(schema()["$defs"]["metric"]["enum"])


def strategy_kinds() -> tuple[str, ...]:
    """Every strategy kind the schema allows, in its order."""
    return tuple(schema()["$defs"]["strategy"]["properties"]["kind"]["enum"])


def _with_defaults(cls: type[jsonschema.protocols.Validator]) -> type:
    """A validator that fills in each property's ``default`` where the instance lacks it, as
    Snakemake's ``validate`` does (the jsonschema FAQ's recipe), so that the package sees the
    config exactly as the workflow does."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, MutableMapping):
            for name, subschema in properties.items():
                if isinstance(subschema, Mapping) and "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


_FillingValidator = _with_defaults(Draft202012Validator)


def _validator(pointer: str = "") -> jsonschema.protocols.Validator:
    """A default-filling validator of the part of the schema at ``pointer`` (``""``: all of
    it; ``"#/properties/train"``: one section), its ``$ref``s resolved in the whole schema."""
    root = schema()
    registry = Registry().with_resource("urn:adaptune", Resource.from_contents(root))
    # The root itself, not a reference to it: jsonschema validates a referenced schema that
    # names its dialect ($schema) with that dialect's own class, which fills no defaults.
    part = {"$ref": f"urn:adaptune{pointer}"} if pointer else root
    return _FillingValidator(part, registry=registry)


def _key_path(path: Iterator[Any] | Any) -> str:
    return ".".join(str(part) for part in path) or "the config"


def describe(error: jsonschema.ValidationError, prefix: str = "") -> str:
    """One line for a schema violation: the key path, what is wrong, and what is allowed."""
    where = _key_path([*([prefix] if prefix else []), *error.absolute_path])
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        for key in unknown:
            if moved := _moved(f"{where}.{key}"):
                return moved
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        keys = ", ".join(repr(k) for k in unknown)
        return f"{where}: unknown key {keys}; allowed here: {allowed}"
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"{where} = {error.instance!r} is not allowed; use one of: {allowed}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator in ("oneOf", "anyOf") and error.context:
        reasons = "; or ".join(sorted({e.message for e in error.context}))
        return f"{where} = {error.instance!r} is not allowed: {reasons}"
    if error.validator == "type" and isinstance(error.instance, str) and _is_number(error.instance):
        # PyYAML follows YAML 1.1: 1e-3 (no dot) is text, 1.0e-3 a number.
        return (
            f"{where} = {error.instance!r} is text, not a number: YAML reads an exponent "
            f"without a dot as text; write {_with_dot(error.instance)}"
        )
    return f"{where} = {error.instance!r}: {error.message}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _with_dot(text: str) -> str:
    """``1e-3`` as YAML reads it as a number: ``1.0e-3``."""
    mantissa, sep, exponent = text.lower().partition("e")
    if sep and "." not in mantissa:
        return f"{mantissa}.0e{exponent}"
    return text


def _moved(path: str) -> str | None:
    """The message for a key path of :data:`MOVED` (``strategies.<name>.`` matching
    ``strategies.NAME.``), or None."""
    parts = path.split(".")
    pattern = ".".join(["strategies", "NAME", *parts[2:]]) if parts[0] == "strategies" else path
    if pattern not in MOVED:
        return None
    new, why = MOVED[pattern]
    if parts[0] == "strategies":
        new = new.replace("NAME", parts[1])
    return f"{path} was renamed: use {new} ({why})"


def _check(values: Any, pointer: str, prefix: str) -> None:
    error = jsonschema.exceptions.best_match(_validator(pointer).iter_errors(values))
    if error is not None:
        raise ConfigError(describe(error, prefix))


def complete(values: Mapping[str, Any] | None, pointer: str, prefix: str) -> dict[str, Any]:
    """A copy of one section of the config (``values``, at ``pointer`` in the schema), checked
    and with its defaults filled in: how the package builds settings outside the workflow.
    ``prefix`` is the section's key path, for messages."""
    filled = copy.deepcopy(dict(values or {}))
    _check(filled, pointer, prefix)
    return filled


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping; a YAML mistake is a ConfigError naming the file, the line
    and the column (Snakemake itself says only that the file is not valid YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file: {err}") from err
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML: {err.problem or err.context}"
            f"{f' ({err.context})' if err.context and err.problem else ''}"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys (experiment:, data:, ...)")
    return loaded


def check_schema(config: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Check the whole config against the schema and fill in its defaults, in place, as the
    workflow's ``validate`` does; a violation raises a :class:`ConfigError` naming the key."""
    _check(config, "", "")
    return config

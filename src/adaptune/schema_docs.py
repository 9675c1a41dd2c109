"""The configuration reference, ``docs/configuration.md``, written from ``schema.yaml``.

The schema is the one place that says what a key means; this page is its rendering for
readers: every key with its type, allowed values, default and description, the sections in
the schema's order, a strategy's common keys, then each strategy kind's own block
(``$defs/kind_<name>``). ``tests/test_docs.py`` fails while the page differs from what
:func:`render` writes. From the repository root::

    python -m adaptune.schema_docs            # rewrite docs/configuration.md
    python -m adaptune.schema_docs --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from adaptune.config import schema

OUTPUT = Path("docs/configuration.md")
COMMAND = "python -m adaptune.schema_docs"
WIDTH = 100
# The keys every strategy takes, whatever its kind: they are described once, not per kind.
COMMON_STRATEGY_KEYS = ("kind", "train", "sweep")
TRAIN_OPTIONS = "#/$defs/train_options/"
# Definitions that have a section of their own, named instead of described where they are used.
LINKED = {"#/$defs/strategy": "a strategy ([its keys](#a-strategys-keys))"}


def _lookup(root: Mapping[str, Any], pointer: str) -> Mapping[str, Any]:
    node: Any = root
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    return node


def resolve(root: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with its ``$ref`` followed: the referenced schema, overridden by the node's own
    keys (a ``description`` or ``default`` beside a ``$ref`` wins)."""
    if "$ref" not in node:
        return dict(node)
    target = resolve(root, _lookup(root, node["$ref"]))
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but ``-`` and ``_``
    dropped, spaces to hyphens (links to a repeated heading get ``-1``, ``-2``, ...)."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def key_heading(path: str) -> str:
    return f"`{path}`"


def kind_heading(kind: str) -> str:
    return f"`kind: {kind}`"


def value(item: Any) -> str:
    """A value as it is written in a config, in flow style: ``[16]``, ``{}``, ``5.0e-05``."""
    if isinstance(item, str) and item and yaml.safe_load(item) == item and ": " not in item:
        return f"`{item}`"
    text = yaml.safe_dump(item, default_flow_style=True, width=1000, sort_keys=False)
    return f"`{text.strip().removesuffix('...').strip()}`"


def _bounds(node: Mapping[str, Any]) -> str:
    low = ("[", node["minimum"]) if "minimum" in node else None
    low = ("(", node["exclusiveMinimum"]) if "exclusiveMinimum" in node else low
    high = ("]", node["maximum"]) if "maximum" in node else None
    high = (")", node["exclusiveMaximum"]) if "exclusiveMaximum" in node else high
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'≥' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'≤' if high[0] == ']' else '<'} {high[1]}"
    return ""


def describe_type(root: Mapping[str, Any], node: Mapping[str, Any], links: bool = True) -> str:
    """What a value of ``node`` may be, in words: its type, bounds, allowed values, pattern."""
    node = resolve(root, node)
    if "const" in node:
        return value(node["const"])
    if "enum" in node:
        return "one of " + ", ".join(value(v) for v in node["enum"])
    if "oneOf" in node:
        base = {k: v for k, v in node.items() if k in ("type",)}
        return " or ".join(describe_type(root, {**base, **alt}, links) for alt in node["oneOf"])
    kind = node.get("type")
    if kind == "array":
        items = describe_type(root, node["items"], links) if node.get("items") else ""
        least = node.get("minItems", 0)
        words = "non-empty list" if least == 1 else "list"
        words += f" of at least {least}" if least > 1 else ""
        words += f" of {_grouped(items)}" if items else ""
        return words + (", without repeats" if node.get("uniqueItems") else "")
    if kind == "object":
        return _describe_object(root, node, links)
    words = {"integer": "integer", "number": "number", "string": "string"}.get(kind, kind or "")
    if kind == "boolean":
        return "`true` or `false`"
    words += _bounds(node)
    if "pattern" in node:
        words += f" matching `{node['pattern']}`"
    return words or "any value"


def _grouped(phrase: str) -> str:
    return f"({phrase})" if " or " in phrase or ", " in phrase else phrase


def _describe_object(root: Mapping[str, Any], node: Mapping[str, Any], links: bool) -> str:
    properties = node.get("properties", {})
    if properties and all(
        str(p.get("$ref", "")).startswith(TRAIN_OPTIONS) for p in properties.values()
    ):
        names = [
            f"[`{name}`](#{anchor(key_heading(f'train.{name}'))})" if links else f"`{name}`"
            for name in properties
        ]
        return "mapping of training settings, any of " + ", ".join(names)
    if properties:
        return "mapping with the keys below"
    extra = node.get("additionalProperties")
    if isinstance(extra, Mapping):
        keys = resolve(root, node.get("propertyNames", {}))
        if "pattern" in keys:
            name = f"names matching `{keys['pattern']}`"
        elif keys:
            name = f"keys ({describe_type(root, keys, links)})"
        else:
            name = "names"
        target = LINKED.get(str(extra.get("$ref")))
        to = target if target and links else _grouped(describe_type(root, extra, links))
        count = node.get("minProperties", 0)
        least = f" (at least {count} {'entry' if count == 1 else 'entries'})" if count else ""
        return f"mapping{least} from {name} to {to}"
    return "mapping"


def _escape(text: str) -> str:
    """Markdown-safe prose: ``<name>`` would be read as an HTML tag outside code spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=" " * len(indent),
        break_long_words=False,
        break_on_hyphens=False,
    )


def _facts(node: Mapping[str, Any], required: bool, overridable: bool) -> str:
    facts = []
    if required:
        facts.append("required")
    if "default" in node:
        facts.append(f"default {value(node['default'])}")
    elif not required:
        facts.append("optional")
    if overridable:
        facts.append("a strategy's `train:` may override it")
    return "; ".join(facts)


def _summary(
    root: Mapping[str, Any],
    node: Mapping[str, Any],
    required: bool,
    overridable: bool,
    what: str = "",
) -> list[str]:
    """The sentence before a key's description: what it may be, then its default."""
    what = what or describe_type(root, node)
    return _wrap(f"{what[:1].upper()}{what[1:]}; {_facts(node, required, overridable)}.")


def _description(node: Mapping[str, Any]) -> str:
    return _escape(" ".join(str(node.get("description", "")).split()))


def key_section(
    root: Mapping[str, Any],
    path: str,
    node: Mapping[str, Any],
    required: bool = False,
    overridable: bool = False,
    what: str = "",
) -> list[str]:
    """One key as a level-3 section: its path, what it may be (``what``, if given), its
    default, its meaning."""
    node = resolve(root, node)
    lines = [f"### {key_heading(path)}", "", *_summary(root, node, required, overridable, what)]
    if node.get("description"):
        lines += ["", *_wrap(_description(node))]
    return [*lines, ""]


def key_items(root: Mapping[str, Any], node: Mapping[str, Any], indent: str = "") -> Iterator[str]:
    """A mapping's keys as a markdown list (nested mappings as nested lists)."""
    node = resolve(root, node)
    required = set(node.get("required", ()))
    for name, child in node.get("properties", {}).items():
        child = resolve(root, child)
        text = f"`{name}`: {describe_type(root, child)}; {_facts(child, name in required, False)}."
        if child.get("description"):
            text += f" {_description(child)}"
        yield from _wrap(text, f"{indent}- ")
        if child.get("type") == "object" and child.get("properties"):
            yield from key_items(root, child, indent + "  ")


def _sections(root: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield from root["properties"].items()


def render(root: Mapping[str, Any] | None = None) -> str:
    """The configuration reference page for ``root`` (default: adaptune's own schema)."""
    root = schema() if root is None else root
    kinds = list(root["$defs"]["strategy"]["properties"]["kind"]["enum"])
    kind_links = ", ".join(f"[`{kind}`](#{anchor(kind_heading(kind))})" for kind in kinds)
    lines = [
        *_header(root, kind_links),
        *_top_level_keys(root),
        *_strategy_keys(root, kind_links),
        *_strategy_kinds(root, kinds),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _header(root: Mapping[str, Any], kind_links: str) -> list[str]:
    """The page's title, what it is and how it is made, and its map of the top-level keys."""
    top_required = set(root.get("required", ()))
    return [
        "# Configuration reference",
        "",
        f"<!-- Generated from src/adaptune/schema.yaml by `{COMMAND}`.",
        "     Edit the schema, then regenerate; do not edit this page by hand. -->",
        "",
        *_wrap(
            "Every key of an experiment config, generated from the schema "
            "[`src/adaptune/schema.yaml`](../src/adaptune/schema.yaml) (also at "
            "`config/schema.yaml`), the one place that says what a key means. The workflow "
            "validates a config against it and fills in the defaults before any job starts; "
            "`adaptune check CONFIG` does the same without running anything. After editing "
            f"the schema, run `{COMMAND}` from the repository root: `tests/test_docs.py` fails "
            "while this page is out of date."
        ),
        "",
        *_wrap(_description(root)),
        "",
        *_wrap(
            "Top-level keys: "
            + ", ".join(
                f"[`{name}`](#{anchor(key_heading(name))})"
                + (" (required)" if name in top_required else "")
                for name in root["properties"]
            )
            + "; then [a strategy's keys](#a-strategys-keys) and "
            + "[the strategy kinds](#strategy-kinds): "
            + kind_links
            + "."
        ),
        "",
    ]


def _top_level_keys(root: Mapping[str, Any]) -> list[str]:
    """A section per top-level key, with an entry for each of its own keys."""
    overridable = set(root["$defs"]["train_overrides"]["properties"])
    top_required = set(root.get("required", ()))
    lines: list[str] = []
    for name, node in _sections(root):
        node = resolve(root, node)
        lines += [f"## {key_heading(name)}", ""]
        properties = node.get("properties", {})
        if not properties:
            lines += _summary(root, node, name in top_required, False)
            if node.get("description"):
                lines += ["", *_wrap(_description(node))]
            lines.append("")
            continue
        if node.get("description"):
            lines += [*_wrap(_description(node)), ""]
        required = set(node.get("required", ()))
        for key, child in properties.items():
            lines += key_section(
                root,
                f"{name}.{key}",
                child,
                key in required,
                name == "train" and key in overridable,
            )
    return lines


def _strategy_keys(root: Mapping[str, Any], kind_links: str) -> list[str]:
    """The keys every strategy takes, whatever its kind."""
    defs = root["$defs"]
    strategy = defs["strategy"]
    lines = [
        "## A strategy's keys",
        "",
        *_wrap(
            "Each entry of [`strategies`](#strategies), `strategies.NAME`, takes these keys "
            "whatever its kind, and the keys of its kind's block below."
            + (f" {_description(strategy)}" if strategy.get("description") else "")
        ),
        "",
    ]
    first_kind = resolve(root, defs[f"kind_{strategy['properties']['kind']['enum'][0]}"])
    for key in COMMON_STRATEGY_KEYS:
        child = strategy["properties"].get(key) or first_kind["properties"][key]
        what = f"one of {kind_links}" if key == "kind" else ""
        lines += key_section(
            root, f"strategies.NAME.{key}", child, key in strategy["required"], what=what
        )
    return lines


def _strategy_kinds(root: Mapping[str, Any], kinds: list[str]) -> list[str]:
    """A section per strategy kind with its own keys."""
    lines = [
        "## Strategy kinds",
        "",
        *_wrap(
            "Each kind's own keys, besides `kind`, `train` and `sweep`. A key of another kind "
            "is an error that names it. What each kind does, and the paper it comes from: "
            "[strategies.md](strategies.md)."
        ),
        "",
    ]
    for kind in kinds:
        block = resolve(root, root["$defs"][f"kind_{kind}"])
        own = {k: v for k, v in block["properties"].items() if k not in COMMON_STRATEGY_KEYS}
        lines += [f"### {kind_heading(kind)}", ""]
        if block.get("description"):
            lines += [*_wrap(_description(block)), ""]
        if own:
            lines += [*key_items(root, {**block, "properties": own}), ""]
        else:
            lines += ["No keys of its own.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Write docs/configuration.md from the config schema."
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the page is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if not args.output.parent.is_dir():
        print(
            f"{args.output.parent}/ does not exist: run `{COMMAND}` from the repository root, "
            "or give --output",
            file=sys.stderr,
        )
        return 1
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

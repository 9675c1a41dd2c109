"""The documentation stays true: every link resolves, every page is reachable from the README,
the configuration reference is what the schema says, every strategy kind is documented, and the
README stays a front page."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from adaptune import config, schema_docs, strategies, sweeps
from adaptune.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
REGENERATE = f"run `{schema_docs.COMMAND}` from the repository root"

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may hold one level of brackets and span lines.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks, inline code replaced by a placeholder (so that a
    code span inside a link's text keeps the link whole)."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text: links reduced to their text, lower case, everything
    but letters, digits, spaces, hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor GitHub makes for the page's headings (repeats get -1, -2, ...)."""
    seen: Counter[str] = Counter()
    found = set()
    for _, text in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(text)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def relative_links(page: Path) -> list[str]:
    return [t for t in links(page) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return ((page.parent / path).resolve() if path else page), anchor


def test_the_link_checker_finds_links_anchors_and_skips_code(tmp_path):
    page = (
        "# A `code` title (see [x](y.md))\n## Twice\n## Twice\n"
        "[`data.shots`](configuration.md#datashots) and ![a figure](figures/f.png)\n"
        "a [link\nover two lines](other.md#a-code-title-see-x) `[not](a-link.md)`\n"
        "```\n[nor](this.md)\n# not a heading\n```\n<https://example.org> [web](https://x.org)\n"
    )
    assert LINK.findall(prose(page)) == [
        "y.md",
        "configuration.md#datashots",
        "figures/f.png",
        "other.md#a-code-title-see-x",
        "https://x.org",
    ]
    (tmp_path / "page.md").write_text(page)
    assert anchors(tmp_path / "page.md") == {"a-code-title-see-x", "twice", "twice-1"}
    assert slug("Importance through a probed head (`benchmarks/importance_head.py`)") == (
        "importance-through-a-probed-head-benchmarksimportance_headpy"
    )
    assert slug("`kind: lp_ft`") == "kind-lp_ft"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, anchor = resolve(page, target)
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not path.is_relative_to(ROOT):
                broken.append(f"{where} leaves the repository")
            elif not path.exists():
                broken.append(f"{where} names a file that does not exist")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{where}: no heading of {path.name} has the anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def reachable_from_readme() -> set[Path]:
    seen, todo = {README}, [README]
    while todo:
        page = todo.pop()
        for target in relative_links(page):
            path, _ = resolve(page, target)
            if path.suffix == ".md" and path.exists() and path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


def test_no_docs_page_is_orphaned():
    """Each page of docs/ is reached from the README's map by following links."""
    orphans = [p.name for p in DOCS.glob("*.md") if p.resolve() not in reachable_from_readme()]
    assert not orphans, f"docs pages no link from README.md leads to: {orphans}"


def test_every_figure_in_docs_is_shown_on_some_page():
    shown = {resolve(page, t)[0] for page in PAGES for t in relative_links(page)}
    unused = [p.name for p in (DOCS / "figures").glob("*") if p.resolve() not in shown]
    assert not unused, f"figures no page shows: {unused}"


def test_the_readme_links_own_data_strategies_results_and_keys_in_one_hop():
    direct = {resolve(README, t)[0] for t in relative_links(README)}
    for page in ("data.md", "models.md", "strategies.md", "results.md", "configuration.md"):
        assert (DOCS / page).resolve() in direct, f"README.md does not link docs/{page}"


def test_the_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md grew past 200 lines: move detail to docs/"
    assert "pip install -e . && snakemake --cores 2" in text
    assert 'pip install -e ".[test]" && pytest' in text
    # The default result keeps its date and its command.
    assert "2026-11-24" in text and "results/bbc-minilm/report/leaderboard.md" in text


def test_the_configuration_reference_is_generated_from_the_schema():
    page = DOCS / "configuration.md"
    assert page.exists(), f"docs/configuration.md is missing: {REGENERATE}"
    assert page.read_text(encoding="utf-8") == schema_docs.render(), (
        f"docs/configuration.md is out of date with src/adaptune/schema.yaml: {REGENERATE}"
    )


def test_the_configuration_reference_names_every_key_with_its_default():
    page = schema_docs.render()
    root = config.schema()
    for name, node in root["properties"].items():
        assert f"## `{name}`" in page, name
        for key in node.get("properties", {}):
            assert f"### `{name}.{key}`" in page, f"{name}.{key}"
    for key in ("kind", "train", "sweep"):
        assert f"### `strategies.NAME.{key}`" in page, key
    for kind in config.strategy_kinds():
        section = page.split(f"### `kind: {kind}`", 1)[1].split("\n### ", 1)[0]
        block = root["$defs"][f"kind_{kind}"]["properties"]
        for key in set(block) - {"kind", "train", "sweep"}:
            assert f"- `{key}`:" in section, f"kind {kind}: {key}"
    # Defaults, bounds and references come out as the schema says.
    assert "### `train.lr`\n\nNumber > 0; default `5.0e-05`; a strategy's `train:` may" in page
    assert "### `data.val_size`\n\nNumber in (0, 1); default `0.1`." in page
    assert "### `model.image_size`\n\n`0` or integer ≥ 16; default `0`." in page
    assert "- `dropout`: number in [0, 1); default `0.1`." in page
    assert "### `data.source`\n\nString matching\n`^(bundled:" in page
    assert "[`lr`](#trainlr)" in page  # a strategy's train: links the shared settings


def test_the_generator_describes_types_bounds_and_references():
    root = {
        "$defs": {"rate": {"type": "number", "exclusiveMinimum": 0, "description": "A rate."}},
        "properties": {},
    }
    describe = schema_docs.describe_type
    assert describe(root, {"$ref": "#/$defs/rate"}) == "number > 0"
    assert describe(root, {"type": "integer", "minimum": 1, "maximum": 5}) == "integer in [1, 5]"
    assert describe(root, {"type": "array", "minItems": 2, "items": {"enum": ["a", "b"]}}) == (
        "list of at least 2 of (one of `a`, `b`)"
    )
    assert describe(root, {"oneOf": [{"type": "integer"}, {"const": "all"}]}) == (
        "integer or `all`"
    )
    section = schema_docs.key_section(root, "x.rate", {"$ref": "#/$defs/rate", "default": 0.5})
    assert section == ["### `x.rate`", "", "Number > 0; default `0.5`.", "", "A rate.", ""]
    assert schema_docs.value("off") == "`'off'`"  # YAML would read a bare off as false
    assert schema_docs.anchor("`strategies.NAME.kind`") == "strategiesnamekind"


def test_the_generator_command_checks_and_rewrites_the_page(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text("stale\n")
    assert schema_docs.main(["--check", "--output", str(page)]) == 1
    assert schema_docs.COMMAND in capsys.readouterr().err
    assert schema_docs.main(["--output", str(page)]) == 0
    assert schema_docs.main(["--check", "--output", str(page)]) == 0
    assert page.read_text() == schema_docs.render()


def test_every_strategy_kind_has_its_section_naming_its_keys():
    text = (DOCS / "strategies.md").read_text(encoding="utf-8")
    kinds = set(strategies.kinds()) | set(config.strategy_kinds())
    for kind in sorted(kinds):
        heading = f"\n## `{kind}`\n"
        assert heading in text, f"docs/strategies.md has no section for kind {kind!r}"
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        block = config.schema()["$defs"][f"kind_{kind}"]["properties"]
        for key in set(block) - {"kind", "train", "sweep"}:
            assert f"`{key}`" in section, f"docs/strategies.md, kind {kind}: key {key!r}"
        assert "configuration.md#kind-" in section or not set(block) - {"kind", "train", "sweep"}


def test_every_benchmark_has_a_dated_section_with_its_command():
    """Each script of benchmarks/ has its section on docs/benchmarks.md: its measurements, the
    date they were made on, and the command that made them."""
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        name = f"benchmarks/{script.name}"
        heading = next((h for _, h in HEADING.findall(text) if f"(`{name}`)" in h), None)
        assert heading, f"docs/benchmarks.md has no section for {name}"
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        assert f"python {name}" in section, f"{name}: no command in its section"
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", section), f"{name}: no date in its section"


@pytest.mark.parametrize("page", ["README.md", "docs/strategies.md"])
def test_the_config_examples_are_valid(page):
    """The YAML examples users copy pass the schema, and every strategy in them is one the
    workflow accepts (its kind's keys and the rules between them)."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / page).read_text(), re.M | re.S)
    assert blocks, f"{page}: no yaml example"
    for block in blocks:
        example = yaml.safe_load(block)
        example.setdefault("experiment", "example")
        example.setdefault("data", {"source": "bundled:bbc-news"})
        example.setdefault("model", {"name": "bundled:all-MiniLM-L6-v2"})
        config.check_schema(example)
        sweeps.expand(example["strategies"])
        for name, spec in example["strategies"].items():
            train = TrainSettings.from_config(example["train"], spec.get("train"), name)
            strategies.check(name, spec, train)

"""The docs against the repository: numbers that prose repeats, the files and links it names, the tables it copies.

Fast: reads text, YAML and CSV only; no model runs.
"""

from __future__ import annotations

import glob
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks" / "README.md"
DOCS = [README, BENCHMARKS, *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
GRID_LISTS = ("allocations", "sparsities", "repairs", "seeds", "checkpoints")  # sweep.Grid's fields
REPO_DIRS = ("configs", "benchmarks", "tests", "scripts", "docs", "docker", "lightning_repair", "checkpoints")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def header(path: Path) -> str:
    """The leading comment block of a YAML file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def grid_size(path: Path) -> int | None:
    """Cells of a sweep config: the product of its grid's list lengths (a list left out counts 1)."""
    grid = (yaml.safe_load(path.read_text()) or {}).get("grid")
    if grid is None:
        return None
    return math.prod(len(grid[key]) for key in GRID_LISTS if grid.get(key) is not None)


def expand_braces(text: str) -> list[str]:
    """`a.{csv,md}` -> [`a.csv`, `a.md`], as a shell expands it."""
    parts = re.split(r"\{([^{}]*)\}", text)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def table_rows_after(text: str, marker: str) -> list[str]:
    """Data rows of the first markdown table after the first occurrence of ``marker``."""
    start = text.index(marker)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
    return rows[2:]  # after the header and the separator


def results_rows(path: Path) -> set[str]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return set(lines[2:])


# ------------------------------------------------------------------ cell counts

STATED = [(p, header(p)) for p in CONFIGS if re.search(r"\d+ cells", header(p))]


def test_cell_counts_are_stated_in_sweep_configs():
    assert len(STATED) >= 3, [rel(p) for p, _ in STATED]


@pytest.mark.parametrize("path, text", STATED, ids=[rel(p) for p, _ in STATED])
def test_cell_count_in_config_header_is_its_grid_size(path, text):
    match = re.search(r"(\d+(?:\s*x\s*\d+)*)\s*=\s*(\d+) cells|(\d+) cells", text)
    stated = int(match.group(2) or match.group(3))
    assert stated == grid_size(path), f"{rel(path)}: the header says {stated} cells, the grid has {grid_size(path)}"
    if match.group(1):  # "3 x 7 x 7 = 147 cells": the factors too
        factors = [int(f) for f in re.split(r"\s*x\s*", match.group(1))]
        assert math.prod(factors) == stated, f"{rel(path)}: {match.group(0)}"


DOC_COUNTS = [
    (doc, m.group(1), int(m.group(2)))
    for doc in DOCS
    for m in re.finditer(r"(configs/[\w/.-]+\.yaml)`?[^`\n]{0,40}?\b(\d+) cells", doc.read_text())
]


def test_docs_state_cell_counts():
    assert len(DOC_COUNTS) >= 3, DOC_COUNTS


@pytest.mark.parametrize("doc, config, stated", DOC_COUNTS, ids=[f"{rel(d)}:{c}" for d, c, _ in DOC_COUNTS])
def test_cell_count_in_docs_is_the_grid_size(doc, config, stated):
    assert stated == grid_size(ROOT / config), f"{rel(doc)} says {config} has {stated} cells"


# ------------------------------------------------------------------ files and links


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_paths_the_docs_name_exist(doc):
    text = doc.read_text()
    pattern = re.compile(rf"(?<![\w/.-])((?:{'|'.join(REPO_DIRS)})/[\w./{{}},*-]*)")
    named = {m.group(1).rstrip(".,") for m in pattern.finditer(text)}
    assert named, f"{rel(doc)} names no file"
    missing = []
    for name in named:
        for path in expand_braces(name):
            if "*" in path:
                if not glob.glob(str(ROOT / path), recursive=True):
                    missing.append(path)
            elif not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"{rel(doc)} names files that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{rel(doc)}: broken links {broken}"


# ------------------------------------------------------------------ README shape


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines"
    assert lines[0] == "# lightning-repair"
    first_block = lines[lines.index("```bash") + 1 :]
    commands = [line.split("#")[0].strip() for line in first_block[: first_block.index("```")]]
    assert commands == ["make quickstart", "make test"], commands
    assert lines.index("```bash") < 5, "the two commands come first"


def test_readme_points_to_the_rest():
    text = README.read_text()
    for target in ("benchmarks/README.md", "docs/architecture.md", "docs/methods.md", "docs/cluster.md"):
        assert f"]({target}" in text, target
    assert "## From Python" in text


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_make_targets_the_docs_name_exist(doc):
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", doc.read_text(), re.M))  # in code, not "make a model"
    assert named <= targets, f"{rel(doc)} names make targets the Makefile lacks: {sorted(named - targets)}"


@pytest.mark.parametrize("doc", [README, BENCHMARKS, ROOT / "docs" / "architecture.md"], ids=rel)
def test_no_history_prose(doc):
    text = doc.read_text().lower()
    for phrase in ("earlier version", "previous version", "this version", "the one before", "design.md"):
        assert phrase not in text, f"{rel(doc)}: {phrase!r}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_the_seeds_are_defined_where_used(doc):
    text = doc.read_text()
    if "seeds'" in text:
        assert "seed papers" in text, f'{rel(doc)} says "the seeds\'" without saying they are the seed papers'


# ------------------------------------------------------------------ tables copied from results files

COPIED = [
    (README, "benchmarks/results/transition.{csv,md,png}", "transition.md"),
    (BENCHMARKS, "benchmarks/results/transition.{csv,md,png}", "transition.md"),
    (BENCHMARKS, "benchmarks/results/vgg16_bn_transition.{csv,md,png}", "vgg16_bn_transition.md"),
    (BENCHMARKS, "benchmarks/results/reconstruct_masks.{csv,md,png}", "reconstruct_masks.md"),
    (BENCHMARKS, "benchmarks/results/regularizers.{csv,md,png}", "regularizers.md"),
    (BENCHMARKS, "benchmarks/results/fashion_mnist_mobilenetv2/", "fashion_mnist_mobilenetv2/results.md"),
]


@pytest.mark.parametrize("doc, marker, results", COPIED, ids=[f"{rel(d)}:{r}" for d, _, r in COPIED])
def test_tables_are_copied_from_results_files(doc, marker, results):
    rows = table_rows_after(doc.read_text(), marker)
    assert rows, f"no table after {marker} in {rel(doc)}"
    source = results_rows(ROOT / "benchmarks" / "results" / results)
    retyped = [r for r in rows if r not in source]
    assert not retyped, f"{rel(doc)}: rows not in benchmarks/results/{results}: {retyped}"


def test_claims_table_is_what_claims_py_prints():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "claims.py"), "--results", str(ROOT / "benchmarks" / "results")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    printed = [line for line in out.splitlines() if line.startswith("| (")]
    documented = [line for line in BENCHMARKS.read_text().splitlines() if line.startswith("| (")]
    assert printed and documented == printed

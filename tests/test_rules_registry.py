"""Every rule is declared once, with a unique code, a kebab-case name, a fix and a full doc page."""

from __future__ import annotations

import re

import pytest

from bnlint.rules import FAMILIES, all_rules
from bnlint.rules.registry import DOC_HEADINGS

RULES = all_rules()


def test_codes_and_names_are_unique() -> None:
    names = [spec.name for spec in RULES.values()]
    assert len(names) == len(set(names))
    assert all(code == spec.code for code, spec in RULES.items())


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_is_fully_documented(code: str) -> None:
    spec = RULES[code]
    assert re.fullmatch(r"BN\d{3}", code) and code[:3] in FAMILIES
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", spec.name)
    assert spec.summary.strip() and spec.fix.strip()
    positions = [spec.doc.find(heading) for heading in DOC_HEADINGS]
    assert all(p >= 0 for p in positions), f"{code} doc lacks a heading: {dict(zip(DOC_HEADINGS, positions))}"
    assert positions == sorted(positions), f"{code} doc headings out of order"
    for heading, start in zip(DOC_HEADINGS, positions):
        body = spec.doc[start + len(heading):].split("\n## ", 1)[0]
        assert body.strip(), f"{code}: empty section {heading}"


def test_no_rule_claims_eval_mode_updates_statistics() -> None:
    """The popular mistake: eval mode only reads running statistics."""
    wrong = re.compile(r"eval(uation)?[- ]mode (updates|keeps updating|accumulates)", re.IGNORECASE)
    for spec in RULES.values():
        assert not wrong.search(spec.doc + spec.summary + spec.fix), spec.code


def test_readme_rule_table_is_the_computed_one() -> None:
    """The README's rule table is `bnlint rules --format markdown`: computed from what rules read
    and what format records record, never kept by hand."""
    from pathlib import Path

    from click.testing import CliRunner

    from bnlint.cli import main

    table = CliRunner().invoke(main, ["rules", "--format", "markdown"]).output.strip()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert table in readme


def test_matrix_follows_facts() -> None:
    """Torch-only facts stay torch-only; statistics rules apply everywhere; a rule reading a fact no
    format records applies nowhere (so a new format's record decides, not the rule)."""
    from bnlint.formats import frameworks
    from bnlint.rules import all_rules

    rules = all_rules()
    assert rules["BN001"].frameworks == ("torch",) and rules["BN004"].frameworks == ("torch",)
    assert rules["BN101"].frameworks == frameworks()
    assert rules["BN409"].frameworks == ("caffe",)
    assert set(rules["BN601"].frameworks) == {"torch", "onnx", "keras", "tensorflow"}  # every format with a runner (not Caffe)


def test_every_rule_that_fires_on_a_fixture_is_declared_for_its_framework() -> None:
    """The rule matrix (README, `bnlint rules`) is computed from the facts formats record: a rule that
    finds something in a framework's file while the matrix says it does not apply there means a
    format record under-declares (BN501-BN505 fired on frozen TensorFlow graphs while the table
    showed them as ONNX/Caffe only)."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from bnlint.cli import main
    from bnlint.loaders import load_model
    from bnlint.rules import all_rules

    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(main, [str(root / "fixtures"), "--format", "json", "--exit-zero"], catch_exceptions=False)
    rules = all_rules()
    undeclared = set()
    checked = 0
    for entry in json.loads(result.stdout)["files"]:
        if entry["error"] or not entry["findings"]:
            continue
        framework = load_model(entry["path"]).framework
        checked += 1
        undeclared |= {(f["code"], framework) for f in entry["findings"] if framework not in rules[f["code"]].frameworks}
    assert checked > 40
    assert undeclared == set()

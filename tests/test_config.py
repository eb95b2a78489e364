"""Configuration: [tool.bnlint] discovery, validation, prefix selection and per-layer ignores."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlint.config import DEFAULT_THRESHOLDS, Config, load_config
from bnlint.errors import UsageError
from bnlint.selection import resolve


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_config_file(tmp_path: Path) -> None:
    config = load_config(start=tmp_path)
    assert config == Config()
    assert config.threshold("max_scale") == DEFAULT_THRESHOLDS["max_scale"]


def test_nearest_pyproject_with_a_bnlint_table_wins(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.bnlint]\nignore = ["BN108"]\nfail-on = "error"\n')
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    write(tmp_path / "a" / "pyproject.toml", "[project]\nname = 'x'\n")  # no [tool.bnlint]: skipped
    config = load_config(start=nested)
    assert config.ignore == ("BN108",) and config.fail_on == "error"
    assert config.source == str(tmp_path / "pyproject.toml")


def test_bnlint_toml_and_per_layer_ignores(tmp_path: Path) -> None:
    write(tmp_path / "bnlint.toml", '[per-layer-ignores]\n"backbone.*" = ["BN4"]\n[thresholds]\nmax_scale = 100\n')
    config = load_config(start=tmp_path)
    assert config.layer_ignored("backbone.layer1.bn", "BN403")
    assert not config.layer_ignored("head.bn", "BN403")
    assert not config.layer_ignored("backbone.bn", "BN101")
    assert config.threshold("max_scale") == 100


@pytest.mark.parametrize(
    "text, problem",
    [
        ('[tool.bnlint]\nselct = ["BN1"]\n', "unknown [tool.bnlint] key"),
        ('[tool.bnlint]\nfail-on = "sometimes"\n', "fail-on"),
        ('[tool.bnlint]\n[tool.bnlint.thresholds]\nmax_sacle = 1\n', "unknown threshold"),
        ("[tool.bnlint\n", "cannot read configuration"),
    ],
)
def test_bad_config_is_a_usage_error(tmp_path: Path, text: str, problem: str) -> None:
    write(tmp_path / "pyproject.toml", text)
    with pytest.raises(UsageError, match=problem.replace("[", r"\[")):
        load_config(tmp_path / "pyproject.toml")


@pytest.mark.parametrize(
    "select, ignore, code, enabled",
    [
        ((), (), "BN101", True),
        ((), ("BN1",), "BN101", False),
        (("BN1",), (), "BN201", False),
        (("BN1",), ("BN10",), "BN101", False),
        (("BN101",), ("BN1",), "BN101", True),  # the longer prefix wins
        (("BN1",), ("BN1",), "BN101", False),  # a tie goes to ignore
    ],
)
def test_longest_prefix_wins(select: tuple[str, ...], ignore: tuple[str, ...], code: str, enabled: bool) -> None:
    assert Config(select=select, ignore=ignore).code_enabled(code) is enabled


def test_flags_override_file_values() -> None:
    config = Config(ignore=("BN1",), fail_on="error").with_overrides(ignore=("BN2",), fail_on=None)
    assert config.ignore == ("BN2",) and config.fail_on == "error"


def test_explicit_config_of_any_name(tmp_path: Path) -> None:
    top = write(tmp_path / "strict-ci.toml", 'ignore = ["BN108"]\n[thresholds]\nmax_scale = 10\n')
    nested = write(tmp_path / "ci.toml", '[tool.bnlint]\nignore = ["BN109"]\n')
    assert load_config(top).ignore == ("BN108",) and load_config(top).threshold("max_scale") == 10
    assert load_config(nested).ignore == ("BN109",)
    assert load_config(write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")) == Config(source=str(tmp_path / "pyproject.toml"))


@pytest.mark.parametrize("value", ["nan", "inf", "-1", '"1e-8"', "[1]", "true"])
def test_thresholds_must_be_finite_non_negative_numbers(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "bnlint.toml", f"[thresholds]\nmin_var_plus_eps = {value}\n")
    with pytest.raises(UsageError, match=r"thresholds\.min_var_plus_eps: expected a finite number"):
        load_config(path)


def test_keys_in_either_spelling_and_rule_names_resolve_to_one_config(tmp_path: Path) -> None:
    dashes = write(tmp_path / "a.toml", 'fail-on = "error"\nignore = ["frozen-bn-in-train-mode", "bn1"]\n'
                   '[per-layer-ignores]\n"x.*" = ["dead_channels"]\n[thresholds]\nfew-updates = 3\n[dynamic]\ndrift-kl = 0.1\n')
    unders = write(tmp_path / "b.toml", 'fail_on = "error"\nignore = ["BN403", "BN1"]\n'
                   '[per_layer_ignores]\n"x.*" = ["BN108"]\n[thresholds]\nfew_updates = 3\n[dynamic]\ndrift_kl = 0.1\n')
    a, b = resolve(load_config(dashes)), resolve(load_config(unders))  # names resolve to codes before linting
    assert (a.fail_on, a.ignore, dict(a.per_layer_ignores), dict(a.thresholds), dict(a.dynamic)) == \
        (b.fail_on, b.ignore, dict(b.per_layer_ignores), dict(b.thresholds), dict(b.dynamic))
    assert a.ignore == ("BN403", "BN1") and a.threshold("few_updates") == 3 and a.layer_ignored("x.bn", "BN108")


@pytest.mark.parametrize(
    "text, problem",
    [
        ('[tool.bnlint]\nfail-on = "error"\nfail_on = "info"\n', "given twice"),
        ('[tool.bnlint]\nselect = ["no-such-rule"]\n', "unknown rule name 'no-such-rule'"),
        ('[tool.bnlint]\nignore = ["bn-folde"]\n', "did you mean 'bn-folded'"),
        ('[tool.bnlint.thresholds]\nmax-scal = 1\n', "did you mean 'max-scale'"),
    ],
)
def test_spelling_errors_name_the_key_and_the_closest_match(tmp_path: Path, text: str, problem: str) -> None:
    write(tmp_path / "pyproject.toml", text)
    with pytest.raises(UsageError, match=problem):
        resolve(load_config(tmp_path / "pyproject.toml"))  # as every run does: read, then resolve rule names


def test_validate_suggests_the_closest_code() -> None:
    with pytest.raises(UsageError, match="did you mean 'BN403'"):
        resolve(Config(ignore=("BN4O3",)))

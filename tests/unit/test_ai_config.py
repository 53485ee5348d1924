"""The AI settings in server.toml and the rules file, with their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import DEFAULT_AI_RULES, DEFAULT_CONFIG_DIR, load_settings
from server.errors import ConfigError


def _config(tmp_path: Path, server: str = "", rules: str | None = None) -> Path:
    (tmp_path / "server.toml").write_text(server)
    if rules is not None:
        (tmp_path / "ai_rules.toml").write_text(rules)
    return tmp_path


def test_shipped_rules_equal_the_built_in_defaults() -> None:
    assert load_settings(DEFAULT_CONFIG_DIR).ai_rules == DEFAULT_AI_RULES


def test_no_rules_file_means_the_defaults_and_an_empty_one_means_none(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path)).ai_rules == DEFAULT_AI_RULES
    assert load_settings(_config(tmp_path, rules="")).ai_rules == ()


def test_rules_are_read_with_their_types(tmp_path: Path) -> None:
    rules = '[[rule]]\nname = "ct"\nmodality = "CT"\nmin_instances = 20\n'
    settings = load_settings(_config(tmp_path, rules=rules))
    assert settings.ai_rules[0].modality == "CT" and settings.ai_rules[0].min_instances == 20


@pytest.mark.parametrize(
    ("rules", "message", "line"),
    [
        ('[[rule]]\nname = "x"\nseries_description = "t2("\n', "regular expression", 3),
        ('[[rule]]\nname = "x"\ncolour = "red"\n', "unknown rule setting 'colour'", 3),
        ('[[rule]]\nname = "x"\nmin_instances = "many"\n', "expected an integer", 3),
        ("rules = 1\n", "entries are [[rule]] tables", 1),
    ],
)
def test_rule_errors_name_the_line(tmp_path: Path, rules: str, message: str, line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, rules=rules))
    assert message in str(caught.value) and f"ai_rules.toml:{line}" in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[ai]\ndevice = 'tpu'\n", "auto, cpu or cuda"),
        ("[ai]\nstable_age = 0\n", "more than 0 seconds"),
        ("[ai]\nthreads = 0\n", "at least 1"),
        ("[ai]\nworker = 2\n", "unknown setting ai.worker"),
    ],
)
def test_ai_setting_errors(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(_config(tmp_path, server=toml))


def test_environment_switches_the_loop_off(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path), environ={"IMAGING_AI_ENABLED": "false"})
    assert settings.ai_enabled is False
    relative = load_settings(_config(tmp_path, server='[ai]\nmodel = "models/x"\n'))
    assert relative.ai_model == tmp_path.resolve().parent / "models" / "x"

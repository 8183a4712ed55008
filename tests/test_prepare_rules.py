"""Modality rules (regex -> modality, name templates, ambiguity, duplicates) and the prepare configs composing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import liverfusion
from liverfusion.errors import ConfigError
from liverfusion.prepare.rules import MatchReport, RuleSet, match_study

CONF = Path(liverfusion.__file__).resolve().parent / "conf"


def rules(**kw) -> RuleSet:
    base = {
        "modalities": {"t2w": ["t2.*tra", "^t2w$"], "adc": ["adc"], "dce_t{t}s": [r"^dce_t(?P<t>\d+)s$"]},
        "masks": ["^mask$"],
        "ignore": ["localizer"],
        "required": ["t2w"],
    }
    return RuleSet.from_config({**base, **kw})


def test_classify():
    r = rules()
    assert r.classify("T2_TSE_TRA").modality == "t2w"  # case-insensitive by default
    assert r.classify("dce_t021s").modality == "dce_t021s"
    assert r.classify("mask").status == "mask"
    assert r.classify("Localizer 3-plane").status == "ignored"
    assert r.classify("t1_vibe").status == "unmatched"
    amb = r.classify("t2_tra_adc")
    assert amb.status == "ambiguous" and amb.names == ("t2w", "adc")
    assert (
        RuleSet.from_config({"modalities": {"t2w": ["^t2w$"]}, "ignore_case": False}).classify("T2W").status
        == "unmatched"
    )


def test_bad_rules_are_config_errors():
    with pytest.raises(ConfigError, match="bad regex"):
        RuleSet.from_config({"modalities": {"t2w": ["(unclosed"]}})
    with pytest.raises(ConfigError, match="cannot be a file name"):
        RuleSet.from_config({"modalities": {"a/b": ["x"]}})
    with pytest.raises(ConfigError, match="named group"):
        RuleSet.from_config({"modalities": {"dce_{t}": ["dce"]}}).classify("dce")
    with pytest.raises(ConfigError, match="on_duplicate"):
        RuleSet.from_config({"modalities": {"a": ["a"]}, "on_duplicate": "both"})


def test_match_study_duplicates_missing_and_report():
    texts = ["t2_tse_tra", "ep2d_adc", "t2_tse_tra", "t1_sag", "mask"]
    m = match_study(rules(), texts, order=[5, 6, 7, 8, 9])
    assert m.duplicates == {"t2w": 2} and m.problems and "t2w" not in m.chosen
    assert m.missing_required == ["t2w"] and m.mask_index == 4
    last = match_study(rules(on_duplicate="last"), texts, order=[5, 6, 7, 8, 9])
    assert last.chosen == {"t2w": 2, "adc": 1} and not last.problems
    first = match_study(rules(on_duplicate="first"), texts, order=[5, 6, 7, 8, 9])
    assert first.chosen["t2w"] == 0
    report = MatchReport()
    report.add(last)
    report.add(match_study(rules(), ["adc"]))
    s = report.summary()
    assert s["studies_per_modality"] == {"adc": 2, "mask": 1, "t2w": 1}
    assert s["unmatched_texts"] == {"t1_sag": 1}
    assert s["studies_missing_required"] == {"t2w": 1}
    assert s["studies_with_duplicates"] == {"t2w": 1}
    assert "unmatched: 't1_sag' x1" in report.format_table()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "prepare" / "preset").glob("*.yaml")))
def test_presets_and_rule_sets_compose(preset: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("prepare", overrides=["input=/in", "out=/out", f"preset={preset}"])
        assert cfg.kind in ("dicom", "nifti", "lldmmri")
        RuleSet.from_config(cfg.rules)
        for name in sorted(p.stem for p in (CONF / "prepare" / "rules").glob("*.yaml")):
            rs = RuleSet.from_config(
                compose("prepare", overrides=["input=/in", "out=/out", f"rules={name}"]).rules
            )
            assert rs.modality_rules and rs.name == name

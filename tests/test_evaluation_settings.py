"""The evaluation settings groups (``conf/evaluation``, ``conf/inference``): one source of the scoring and inference
defaults for the classifier's test step, ``evaluate``, ``predict``, ``report`` and the library writers."""

from __future__ import annotations

import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from liverfusion.errors import ConfigError
from liverfusion.evaluate import _settings as evaluate_settings
from liverfusion.evaluation import write_evaluation
from liverfusion.predict import _settings as predict_settings
from liverfusion.reporting import make_report
from liverfusion.utils import evaluation_settings as settings
from liverfusion.utils.config_sections import model_config
from liverfusion.utils.help_pages import build_parser, primary_keys
from liverfusion.utils.hydra_utils import CONFIG_DIR, normalize_overrides


def _compose(config: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=normalize_overrides(config, overrides))


def test_every_consumer_composes_the_one_group():
    scores, running = settings.defaults("evaluation"), settings.defaults("inference")
    assert set(scores) == set(settings.SCORING_KEYS) and set(running) == set(settings.INFERENCE_KEYS)
    evaluate = OmegaConf.to_container(_compose("evaluate", ["ckpt_path=x"]))
    assert {k: evaluate[k] for k in scores} == scores
    assert {k: evaluate[k] for k in running} == running
    predict = OmegaConf.to_container(_compose("predict", ["ckpt_path=x", "input=a", "out=b"]))
    assert {k: predict[k] for k in running} == running
    assert not set(scores) & set(predict)  # predict scores nothing
    train = OmegaConf.to_container(_compose("train", ["+experiment=cgc_finetune"]))
    assert {k: train["model"]["evaluation"][k] for k in scores} == scores
    assert {k: model_config("classifier")["evaluation"][k] for k in scores} == scores


def test_a_user_config_dir_changes_the_defaults_everywhere(tmp_path, monkeypatch):
    group = tmp_path / "evaluation"
    group.mkdir()
    text = (settings.source("evaluation")).read_text().replace("n_boot: 1000", "n_boot: 77")
    assert "n_boot: 77" in text
    (group / "default.yaml").write_text(text)
    monkeypatch.setenv("LIVERFUSION_CONFIG_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert settings.source("evaluation") == group / "default.yaml"
    assert settings.scoring()["n_boot"] == 77
    assert "resamples, whole patients (default 77:" in " ".join(build_parser("report").format_help().split())
    assert dict((k, v) for k, v, _ in primary_keys("evaluate"))["n_boot"] == "77"


def test_overrides_win_and_none_means_the_yaml():
    assert settings.scoring(n_boot=5, seed=None)["n_boot"] == 5
    assert settings.scoring(seed=None)["seed"] == settings.defaults()["seed"]
    assert settings.inference({"tta": "flip"})["tta"] == "flip"


@pytest.mark.parametrize(
    "values, match",
    [
        ({"n_bot": 10}, r"unknown key\(s\) \['n_bot'\]"),
        ({"n_boot": 0}, r"n_boot=0: must be an integer in \[1, inf"),
        ({"alpha": 1.0}, r"alpha=1.0: must be a number in \(0, 1\)"),
        ({"threshold": "high"}, r"threshold='high'"),
        ({"robustness": "yes"}, r"robustness='yes': must be true or false"),
        ({"aggregate": "median"}, r"aggregate='median': choose one of \[None, 'mean', 'max'\]"),
    ],
)
def test_bad_scoring_values_are_refused_by_name(values, match):
    with pytest.raises(ConfigError, match=match):
        settings.scoring(values, where="evaluate")


@pytest.mark.parametrize(
    "values, match",
    [
        ({"tta": "rotate"}, r"tta='rotate': choose one of \['none', 'flip'\]"),
        ({"tta_axes": ["X"]}, r"tta_axes=\['X'\]"),
        ({"tta_axes": "HW"}, r"tta_axes='HW'"),
        ({"calibration": "always"}, r"calibration='always'"),
        ({"devices": "cpu"}, r"unknown key\(s\) \['devices'\]"),
    ],
)
def test_bad_inference_values_are_refused_by_name(values, match):
    with pytest.raises(ConfigError, match=match):
        settings.inference(values, where="predict")


def test_evaluate_and_predict_refuse_unknown_keys_and_check_the_groups():
    cfg = _compose("evaluate", ["ckpt_path=x", "+n_boots=3"])
    with pytest.raises(ConfigError, match=r"evaluate: unknown key\(s\) \['n_boots'\]"):
        evaluate_settings(cfg)
    with pytest.raises(ConfigError, match=r"evaluate.aggregate='median'"):
        evaluate_settings(_compose("evaluate", ["ckpt_path=x", "aggregate=median"]))
    s = evaluate_settings(_compose("evaluate", ["ckpt_path=x", "n_boot=9", "tta=flip"]))
    assert (s["n_boot"], s["tta"], s["tta_axes"]) == (9, "flip", ["H", "W"])
    with pytest.raises(ConfigError, match=r"predict.tta='rotate'"):
        predict_settings(_compose("predict", ["ckpt_path=x", "input=a", "out=b", "tta=rotate"]))
    cfg = OmegaConf.to_container(_compose("predict", ["ckpt_path=x", "input=a", "out=b"]))
    del cfg["device"]
    with pytest.raises(ConfigError, match=r"predict: missing key\(s\) \['device'\]"):
        predict_settings(cfg)


def test_the_classifier_checks_its_scoring_section():
    from liverfusion.modules.classifier import checked_sections

    assert set(settings.SCORING_KEYS) <= set(checked_sections(model_config("classifier"))["evaluation"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['n_bot'\]"):
        checked_sections(model_config("classifier", evaluation={"n_bot": 3}))


def test_the_library_writers_hold_no_copy_of_the_numbers():
    for func, keys in (
        (write_evaluation, ("n_boot", "alpha", "seed", "threshold")),
        (make_report, ("n_boot", "seed")),
    ):
        params = inspect.signature(func).parameters
        assert all(params[k].default is None for k in keys), func.__name__
    parser = build_parser("report")
    args = parser.parse_args(["somewhere"])
    assert args.n_boot is None and args.seed is None  # make_report reads the group

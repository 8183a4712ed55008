"""Hydra sweeper on Optuna >= 4 (``hydra/sweeper=optuna``, selected by every ``hparams_search/*`` config).

Why not hydra-optuna-sweeper: it pins optuna < 3 and is no longer maintained. This one uses Optuna's ask-and-tell
API, so any Hydra launcher (local, joblib, SLURM/submitit) runs the trials, and a shared storage (a journal file by
default, or any RDB URL) lets several workers or SLURM jobs fill one study: start the same command several times;
each asks the study for the next trial until it holds ``n_trials``.

Trials train with ``test=false``; when the composed config asks for a test (an experiment with ``test: true``), the
best trial is tested once after the study, from its selected checkpoint, in ``<sweep dir>/best_test``.
Settings (defaults in ``conf/hydra/sweeper/optuna.yaml``): ``study_name``, ``storage``, ``direction``,
``n_trials``, ``n_jobs`` (trials launched per batch), ``sampler``, ``params`` (Hydra sweep syntax:
``interval(a, b)``, ``tag(log, interval(a, b))``, ``range(a, b, step)``, ``choice(x, y)``; other values are
fixed), ``test_best``, ``max_failure_rate``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")
"""A storage path ending so is an Optuna journal file (several processes may share it); else an RDB URL."""


def make_storage(storage: str | None) -> Any:
    """None: in memory (one process); a path ending in ``JOURNAL_SUFFIXES``: a journal file (its folder is made);
    anything else: an RDB URL (``sqlite:///...``, ``postgresql://...``) as Optuna reads it."""
    if storage is None or str(storage) in ("", "null", "memory"):
        return None
    text = str(storage)
    if text.endswith(JOURNAL_SUFFIXES) and "://" not in text:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(text).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    return text


def search_space(arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optuna distributions of the sweep overrides, and the fixed overrides (``key -> value as typed``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.get_value_element_as_str()
            continue
        value = override.value()
        if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
            space[key] = CategoricalDistribution(
                list(override.sweep_iterator(transformer=Transformer.encode))
            )
        elif override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
                # range's stop is exclusive: the last value below stop
                n = int((value.stop - value.start) / value.step - 1e-9)
                space[key] = FloatDistribution(value.start, value.start + n * value.step, step=value.step)
            else:
                last = int(value.start) + ((int(value.stop) - 1 - int(value.start)) // int(value.step)) * int(
                    value.step
                )
                space[key] = IntDistribution(int(value.start), last, step=int(value.step))
        elif override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[key] = IntDistribution(int(value.start), int(value.end), log=log_scale)
            else:
                space[key] = FloatDistribution(float(value.start), float(value.end), log=log_scale)
        else:  # pragma: no cover  (Hydra has no other sweep kind)
            raise ValueError(f"hydra.sweeper.params: {key}: unsupported sweep {override.input_line!r}")
    return space, fixed


def selected_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a trial's model selection kept: the single ``*.ckpt`` that is neither ``last`` nor a
    mid-epoch ``step_*`` one, else ``last.ckpt``, else None."""
    folder = run_dir / "checkpoints"
    picked = sorted(
        p for p in folder.glob("*.ckpt") if p.name != "last.ckpt" and not p.name.startswith("step_")
    )
    if len(picked) == 1:
        return picked[0]
    last = folder / "last.ckpt"
    return last if last.is_file() else None


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        params: Mapping[str, Any] | None,
        test_best: bool,
        max_failure_rate: float,
    ) -> None:
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: expected minimize or maximize")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be >= 1")
        self.study_name = str(study_name)
        self.storage = storage
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler = sampler
        self.params = dict(params or {})
        self.test_best = bool(test_best)
        self.max_failure_rate = float(max_failure_rate)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def _sampler(self) -> Any:
        if self.sampler is None or not isinstance(self.sampler, Mapping | DictConfig):
            return self.sampler
        from hydra.utils import instantiate

        return instantiate(self.sampler)

    def sweep(self, arguments: list[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        for key in fixed:
            space.pop(key, None)
        wants_test = bool(OmegaConf.select(self.config, "test", default=False))
        fixed_args = [f"{k}={v}" for k, v in fixed.items()]
        if wants_test:
            fixed_args.append(
                "test=false"
            )  # the test split is touched once, by the best trial, after the study
        study = optuna.create_study(
            study_name=self.study_name,
            storage=make_storage(self.storage),
            sampler=self._sampler(),
            direction=self.direction,
            load_if_exists=True,
        )
        log.info(
            "Optuna study %r (%s, storage %s): %d trials",
            self.study_name,
            self.direction,
            self.storage,
            self.n_trials,
        )
        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        failures = launched = 0
        while True:
            left = self.n_trials - len(study.get_trials(deepcopy=False, states=done))
            if left <= 0:
                break
            trials = [study.ask(space) for _ in range(min(left, self.n_jobs))]
            batch = [[*(f"{k}={v}" for k, v in t.params.items()), *fixed_args] for t in trials]
            returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                launched += 1
                out = (
                    OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None)
                    if ret.hydra_cfg
                    else None
                )
                if out:
                    trial.set_user_attr("output_dir", str(out))
                try:
                    value = float(ret.return_value)
                except Exception as err:  # noqa: BLE001  a failed or value-less trial is told as failed
                    failures += 1
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning("trial %d failed: %s", trial.number, err)
                    if failures / launched > self.max_failure_rate:
                        raise RuntimeError(
                            f"{failures} of {launched} trials failed (hydra.sweeper.max_failure_rate="
                            f"{self.max_failure_rate}); the last: {err}"
                        ) from err
                    continue
                study.tell(trial, value)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise RuntimeError(f"Optuna study {self.study_name!r}: no trial completed")
        best = study.best_trial
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": None if self.storage is None else str(self.storage),
            "best_params": dict(best.params),
            "best_value": float(best.value),
            "best_trial": best.number,
            "best_output_dir": best.user_attrs.get("output_dir"),
            "n_complete": len(complete),
        }
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if wants_test and self.test_best and not running:  # the last worker to finish tests the best trial
            results["best_test"] = self._test_best(best, fixed_args[:-1], sweep_dir)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info("best trial %d: %s = %s (%s)", best.number, "value", best.value, best.params)
        return results

    def _test_best(self, best: Any, fixed_args: list[str], sweep_dir: Path) -> str | None:
        """One more job: the best trial's settings, no training, the test split scored from its checkpoint."""
        out = best.user_attrs.get("output_dir")
        ckpt = selected_checkpoint(Path(out)) if out else None
        if ckpt is None:
            log.warning("best trial %d left no checkpoint in %s: not tested", best.number, out)
            return None
        overrides = [
            *(f"{k}={v}" for k, v in best.params.items()),
            *fixed_args,
            "train=false",
            "test=true",
            "optimized_metric=null",  # nothing to optimise: the test job returns no value
            f"ckpt_path='{ckpt}'",
            "hydra.sweep.subdir=best_test",
        ]
        self.launcher.launch([overrides], initial_job_idx=self.job_idx)
        self.job_idx += 1
        return str(sweep_dir / "best_test")

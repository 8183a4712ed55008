"""SimSiam LightningModule: stop-gradient in the module's graph, collapse alarm, lr groups and scaling, kNN monitor,
online probe, NaN handling and the encoder.pt export. The loss, its stop-gradient and the collapse metric as such:
test_heads_losses.py."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from liverfusion.data.layouts import LLDMMRILayout
from liverfusion.data.mda import MDADataModule
from liverfusion.metrics.knn import knn_predict
from liverfusion.models import build_encoder
from liverfusion.models.losses import SimSiamLoss
from liverfusion.modules.encoder_file import ENCODER_FORMAT, load_encoder_payload
from liverfusion.modules.simsiam import SimSiam
from liverfusion.modules.ssl_health import TrainingDivergedError
from liverfusion.utils.config_sections import model_config
from tests.helpers import PHASES, TINY_ENCODER, data_module, write_lld_like

SHAPE = (6, 16, 16)


SPEC = {
    "modalities": PHASES,
    "class_names": ["a", "b", "c"],
    "input_shape": list(SHAPE),
    "preprocess": {"normalize": "percentile"},
    "dataset": "tiny",
}


def tiny_model(**kw) -> SimSiam:
    """conf/model/simsiam.yaml's values (the code has no defaults) with tiny heads and ``kw`` merged per section."""
    args = model_config(
        "simsiam", projector={"hidden_dim": 32, "out_dim": 16}, predictor={"hidden_dim": 8}, **kw
    )
    return SimSiam(build_encoder(**TINY_ENCODER), data_spec=SPEC, **args)


def views_batch(n: int = 4, **extra) -> dict:
    """A batch as the data side's contract has it (two one-phase views of each case)."""
    return {
        "views": [torch.randn(n, 1, *SHAPE), torch.randn(n, 1, *SHAPE)],
        "view_modalities": [torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)],
        "present": torch.ones(n, len(PHASES), dtype=torch.bool),
        **extra,
    }


@pytest.fixture(scope="module")
def tiny_dm_factory(tmp_path_factory):
    root = write_lld_like(tmp_path_factory.mktemp("ssl") / "lld", n_patients=24, shape=SHAPE)
    cache = tmp_path_factory.mktemp("cache")

    def make(**kw) -> MDADataModule:
        layout = LLDMMRILayout(root, modalities=PHASES, class_names=["a", "b", "c"], name="tiny")
        args = {
            "preprocess": {"shape": list(SHAPE)},
            "cache_dir": cache,
            "batch_size": 4,
            "num_workers": 0,
            "progress": False,
            "split": {"n_folds": 3, "test_fraction": 0.25, "seed": 0},
        }
        return data_module(MDADataModule, layout, **{**args, **kw})

    return make


def fit(model, dm, tmp_path: Path, epochs: int = 1, **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints")],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*set_vital.*")
        trainer.fit(model, datamodule=dm)
    return trainer


def metrics_rows(tmp_path: Path) -> list[dict]:
    path = next((tmp_path / "csv").rglob("metrics.csv"))
    return list(csv.DictReader(open(path)))


# ---- the loss and its stop-gradient ----


def test_in_the_model_z_gets_its_gradient_only_through_the_predictor():
    """The module's own graph (z1 also feeds p1): only the predictor path may carry z's gradient. The loss itself,
    its bounds and the collapse metric are tested in test_heads_losses.py."""
    model = tiny_model()
    batch = views_batch()
    z_grads = []
    handle = model.projector.register_full_backward_hook(lambda m, gi, go: z_grads.append(go[0].clone()))
    f1, f2 = model.encode(batch["views"][0]), model.encode(batch["views"][1])
    z1, z2 = model.projector(f1), model.projector(f2)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    model.criterion(p1, p2, z1, z2).backward()
    handle.remove()
    # reference: the gradient on z that flows back only through the predictor (targets as constants)
    z1r, z2r = z1.detach().requires_grad_(), z2.detach().requires_grad_()
    SimSiamLoss()(model.predictor(z1r), model.predictor(z2r), z1.detach(), z2.detach()).backward()
    assert torch.allclose(z_grads[1], z1r.grad, atol=1e-6) and torch.allclose(z_grads[0], z2r.grad, atol=1e-6)


# ---- optimiser groups and the lr rule ----


def attach(model: SimSiam, batch_size: int = 32, world_size: int = 1, accumulate: int = 1, steps: int = 100):
    model._trainer = SimpleNamespace(
        estimated_stepping_batches=steps,
        datamodule=SimpleNamespace(batch_size=batch_size),
        world_size=world_size,
        accumulate_grad_batches=accumulate,
    )
    return model.configure_optimizers()


def test_predictor_lr_fixed_while_the_rest_follows_the_schedule():
    model = tiny_model(optimizer={"base_lr": 0.5}, scheduler={"warmup_fraction": 0.1})
    conf = attach(model, batch_size=32, steps=100)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    names = [g["name"] for g in opt.param_groups]
    assert {"encoder", "projector", "predictor"} <= set(names)
    base = 0.5 * 32 / 256
    history = []
    for _ in range(100):
        opt.step()
        sched.step()
        history.append({g["name"]: g["lr"] for g in opt.param_groups})
    assert all(h["predictor"] == pytest.approx(base) for h in history)
    assert max(h["encoder"] for h in history) == pytest.approx(base)
    assert history[-1]["encoder"] == pytest.approx(0.0, abs=1e-9)
    assert history[-1]["projector"] == pytest.approx(0.0, abs=1e-9)
    not_fixed = tiny_model(fix_pred_lr=False, optimizer={"base_lr": 0.5})
    conf = attach(not_fixed)
    for _ in range(100):
        conf["optimizer"].step()
        conf["lr_scheduler"]["scheduler"].step()
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-9) for g in conf["optimizer"].param_groups)


def test_lr_scaling_counts_world_size_and_accumulation():
    lr = lambda **kw: attach(tiny_model(optimizer={"base_lr": 0.05}), **kw)["optimizer"].param_groups[0]["lr"]  # noqa: E731
    single = lr(batch_size=32)
    assert single == pytest.approx(0.05 * 32 / 256)
    assert lr(batch_size=32, world_size=4) == pytest.approx(4 * single)
    assert lr(batch_size=32, world_size=2, accumulate=3) == pytest.approx(6 * single)


def test_exclude_bn_bias_puts_norms_and_biases_in_no_decay_groups():
    model = tiny_model(optimizer={"exclude_bn_bias": True, "weight_decay": 1e-4})
    groups = {g["name"]: g for g in attach(model)["optimizer"].param_groups}
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0 and groups["encoder"]["weight_decay"] == 1e-4
    assert all(p.ndim <= 1 for p in groups["encoder_no_decay"]["params"])
    # the predictor's biases keep the fixed lr too
    assert groups["predictor_no_decay"].get("fixed_lr") is True


# ---- training-time behaviour ----


def test_nan_loss_raises_naming_step_and_cases():
    model = tiny_model()
    batch = views_batch(case_id=["P0001", "P0002", "P0003", "P0004"], label=torch.zeros(4, dtype=torch.long))
    batch["views"][0] = torch.full((4, 1, *SHAPE), float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"global step 0.*P0001.*P0004"):
        model.training_step(batch, 0)


def test_training_logs_loss_lr_z_std_and_knn_monitor_then_exports_encoder(tiny_dm_factory, tmp_path):
    L.seed_everything(123, workers=True)
    dm = tiny_dm_factory()
    model = tiny_model(probe={"enabled": True, "lr": 0.1})
    trainer = fit(model, dm, tmp_path, epochs=2)
    m = trainer.callback_metrics
    assert {
        "train/loss_epoch",
        "train/z_std",
        "train/collapse",
        "monitor/knn_f1",
        "monitor/knn_acc",
        "monitor/probe_f1",
    } <= set(m)
    assert 0.0 <= float(m["monitor/knn_f1"]) <= 1.0
    rows = metrics_rows(tmp_path)
    assert any(r.get("train/lr") for r in rows) and any(r.get("train/loss_step") for r in rows)
    z = float(m["train/z_std"])
    assert float(m["train/collapse"]) == pytest.approx(1 - math.sqrt(16) * z, abs=1e-5)
    # the monitor used every labelled train case as bank and every labelled val case as query, once each
    bank, query = dm.monitor_datasets()
    assert int(m["monitor/knn_bank"]) == len(bank) and int(m["monitor/knn_queries"]) == len(query)

    path = tmp_path / "checkpoints" / "encoder.pt"
    assert path.is_file() and any(p.suffix == ".ckpt" for p in path.parent.iterdir())
    payload = load_encoder_payload(path)
    assert payload["format"] == ENCODER_FORMAT and payload["seed"] == 123
    assert payload["modalities"] == PHASES and payload["input_shape"] == list(SHAPE)
    assert payload["preprocess"] == {"normalize": "percentile"} and payload["dataset"] == "tiny"
    assert payload["liverfusion_version"] and payload["encoder_config"]["widths"] == [4, 8, 8, 8]
    rebuilt = build_encoder(**payload["encoder_config"])
    rebuilt.load_state_dict(payload["state_dict"], strict=True)
    x = torch.randn(2, 1, *SHAPE)
    model.encoder.eval()
    rebuilt.eval()
    assert torch.allclose(rebuilt(x).pooled, model.encoder(x).pooled, atol=1e-5)


def test_probe_never_changes_the_encoder_gradient():
    torch.manual_seed(0)
    model = tiny_model(probe={"enabled": True})
    batch = views_batch(case_id=["a", "b", "c", "d"], label=torch.tensor([0, 1, -1, 2]))
    state = torch.get_rng_state()
    model.training_step(batch, 0).backward()
    with_probe = [p.grad.clone() for p in model.encoder.parameters()]
    assert model.probe.weight.grad is not None and model.probe.weight.grad.abs().sum() > 0  # the probe learns
    model.zero_grad()
    torch.set_rng_state(state)
    loss, _, _ = model.ssl_step(batch)
    loss.backward()
    without = [p.grad for p in model.encoder.parameters()]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(with_probe, without))


class ConstantEncoder(torch.nn.Module):
    """Collapsed on purpose: the same features for every input (but trainable, so SGD has parameters)."""

    def __init__(self):
        super().__init__()
        self.feature_dim, self.map_channels, self.in_channels = 8, 8, 1
        self.bias = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        from liverfusion.models import EncoderOutput

        pooled = self.bias.expand(x.shape[0], 8) + 0 * x.mean()
        return EncoderOutput(pooled, pooled[:, :, None, None, None])

    def config(self):
        return {"name": "constant"}


@pytest.mark.parametrize("stop", [False, True])
def test_collapse_alarm_warns_and_optionally_stops(tiny_dm_factory, tmp_path, stop):
    dm = tiny_dm_factory(monitor=False)
    model = SimSiam(
        ConstantEncoder(),
        **model_config(
            "simsiam",
            projector={"hidden_dim": 16, "out_dim": 16},
            predictor={"hidden_dim": 8},
            collapse={"alarm_fraction": 0.5, "stop": stop},
            knn={"enabled": False},
        ),
        data_spec={"modalities": PHASES, "class_names": ["a", "b", "c"]},
    )
    with pytest.warns(UserWarning, match="collapse alarm at epoch 0"):
        trainer = fit(model, dm, tmp_path, epochs=3)
    assert float(trainer.callback_metrics["train/collapse"]) > 0.99
    assert trainer.current_epoch == (1 if stop else 3)


def test_gather_unique_drops_padding_duplicates_single_process():
    model = tiny_model()
    model._trainer = SimpleNamespace(world_size=1)
    feats = torch.arange(12.0).reshape(6, 2)
    index = torch.tensor([3, 0, 1, 3, 2, 0])  # DistributedSampler-style repeats
    (out,) = model.gather_unique([feats], index)
    assert out.shape == (4, 2)
    assert out[:, 0].tolist() == [2.0, 4.0, 8.0, 0.0]  # index order 0, 1, 2, 3, first occurrence kept


def test_knn_predict_votes_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    scores = knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), num_classes=2, k=3)
    assert scores.argmax(1).tolist() == [0, 1]

"""The multi-GPU path on CPU with 2 processes (gloo): drop_last, the distributed sampler, and the kNN monitor
gathering ragged, padded shards without counting any case twice; SyncBatchNorm conversion of the whole model.

Two ways in: ``strategy=ddp_spawn`` inside pytest (module-level, picklable classes) and the real command line with
``trainer=ddp_cpu`` in a subprocess. torch's SyncBatchNorm runs on GPUs only (DDP on CPU refuses it: "SyncBatchNorm
layers only work with GPU modules"), so the CPU runs use plain BatchNorm and the conversion that ``trainer=ddp``
applies on GPUs is checked separately.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from liverfusion.data.layouts import LLDMMRILayout
from liverfusion.data.mda import MDADataModule
from liverfusion.models import build_encoder
from liverfusion.modules.simsiam import SimSiam
from liverfusion.utils.config_sections import model_config
from tests.helpers import PHASES, TINY_ENCODER, data_module, write_lld_like

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 16, 16)
CLASSES = ["a", "b", "c"]
SPLIT = {"n_folds": 3, "test_fraction": 0.25, "seed": 0}


class RecordDistributed(L.Callback):
    """Writes what each rank sees during training (checked by the test in the parent process)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.indices: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices += [int(i) for i in batch["index"]]

    def on_train_end(self, trainer, pl_module):
        loader = trainer.train_dataloader
        batch_sampler = loader.batch_sampler
        sampler = getattr(batch_sampler, "sampler", loader.sampler)
        info = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "distributed_sampler": isinstance(sampler, torch.utils.data.DistributedSampler),
            "drop_last": bool(getattr(batch_sampler, "drop_last", loader.drop_last)),
            "batches": len(loader),
            "indices": self.indices,
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


def make_dm(root: Path, cache: Path, fold: int) -> MDADataModule:
    layout = LLDMMRILayout(root, modalities=PHASES, class_names=CLASSES, name="tiny")
    return data_module(
        MDADataModule,
        layout,
        preprocess={"shape": list(SHAPE)},
        cache_dir=cache,
        batch_size=3,
        eval_batch_size=2,
        num_workers=0,
        progress=False,
        split=SPLIT,
        fold=fold,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    root = write_lld_like(base / "lld", n_patients=23, shape=SHAPE)
    cache = base / "cache"
    for fold in range(SPLIT["n_folds"]):  # a fold whose monitor sets are odd: 2 shards then need padding
        dm = make_dm(root, cache, fold)
        dm.setup("fit")
        bank, query = dm.monitor_datasets()
        if len(bank) % 2 and len(query) % 2:
            return root, cache, fold, len(bank), len(query), len(dm.pair_dataset())
    pytest.fail("no fold with odd bank and query sizes: change the tiny data set")


def test_ddp_spawn_two_processes(tiny, tmp_path):
    root, cache, fold, n_bank, n_query, n_pairs = tiny
    model = SimSiam(
        build_encoder(**TINY_ENCODER),
        **model_config("simsiam", projector={"hidden_dim": 32, "out_dim": 16}, predictor={"hidden_dim": 8}),
        data_spec={"modalities": PHASES, "class_names": CLASSES, "input_shape": list(SHAPE)},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        sync_batchnorm=False,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[RecordDistributed(str(tmp_path)), ModelCheckpoint(dirpath=tmp_path / "ckpt")],
    )
    L.seed_everything(0)  # the spawned ranks re-seed from it: the same shuffled order is split between them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=make_dm(root, cache, fold))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert info["world_size"] == 2 and info["rank"] in (0, 1)
        assert info["distributed_sampler"] and info["drop_last"]
        assert info["batches"] == (n_pairs // 2) // 3  # each rank: half the cases, full batches of 3 only
        assert len(info["indices"]) == 3 * info["batches"]
    assert len(set(ranks[0]["indices"]) & set(ranks[1]["indices"])) <= 1  # disjoint shards (1 padding repeat)
    m = trainer.callback_metrics
    assert int(m["monitor/knn_bank"]) == n_bank and int(m["monitor/knn_queries"]) == n_query
    assert 0.0 <= float(m["monitor/knn_f1"]) <= 1.0
    assert (tmp_path / "ckpt" / "encoder.pt").is_file()


@pytest.mark.slow  # two fresh interpreters importing torch + Lightning + MONAI: ~40 s on 2 busy cores
def test_cli_ddp_cpu_subprocess(tiny, tmp_path):
    root, cache, fold, n_bank, n_query, _ = tiny
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "liverfusion.train",
        "+experiment=simsiam_pretrain",
        "trainer=ddp_cpu",
        "data=lldmmri",
        f"data.layout.root={root}",
        f"data.layout.modalities=[{','.join(PHASES)}]",
        f"data.layout.class_names=[{','.join(CLASSES)}]",
        "data.layout.name=tiny",
        "data.layout.on_missing_modality=error",
        f"data.preprocess.shape=[{','.join(map(str, SHAPE))}]",
        "data.preprocess.normalize=percentile",
        f"data.cache_dir={cache}",
        "data.batch_size=3",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "data.prep_workers=0",
        f"data.fold={fold}",
        f"data.split.n_folds={SPLIT['n_folds']}",
        f"data.split.test_fraction={SPLIT['test_fraction']}",
        f"data.split.seed={SPLIT['seed']}",
        f"model.encoder.widths={TINY_ENCODER['widths']}",
        "model.encoder.stem_kernel=3",
        "model.projector.hidden_dim=32",
        "model.projector.out_dim=16",
        "model.predictor.hidden_dim=8",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "callbacks=none",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
        "trainer.sync_batchnorm=false",  # GPU-only in torch; see the module docstring
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_dirs = {p.parent for p in run_dir.rglob("*.ckpt")}
    assert {p.parent for p in run_dir.rglob("encoder.pt")} == ckpt_dirs and len(ckpt_dirs) == 1
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {k: v for r in rows for k, v in r.items() if v}
    assert (
        int(float(last["monitor/knn_bank"])) == n_bank and int(float(last["monitor/knn_queries"])) == n_query
    )
    assert "train/z_std" in last


def test_sync_batchnorm_conversion_covers_every_norm_of_simsiam():
    """What ``trainer=ddp`` (sync_batchnorm: true) does on GPUs: every BatchNorm, encoder and heads, becomes a
    SyncBatchNorm, and the projector's last BN stays non-affine."""
    from hydra import compose, initialize_config_dir

    from liverfusion.utils.hydra_utils import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=["+experiment=simsiam_pretrain_gpu", "trainer=ddp", "paths.output_dir=/x"]
        )
    assert cfg.trainer.sync_batchnorm is True and cfg.data.drop_last is True
    model = SimSiam(
        build_encoder(**TINY_ENCODER),
        **model_config("simsiam", projector={"hidden_dim": 32, "out_dim": 16}, predictor={"hidden_dim": 8}),
    )
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not synced.projector.layers[-1].affine

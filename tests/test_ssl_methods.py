"""The SSL seam (issue 15): config-only defaults, the list of views and the objectives built on it (every pair,
hybrid shared/specific, phase-ID head), the momentum base and BYOL, VICReg and its collapse metric, the stack
backbone (encoder + CGC block) with its export and fine-tuning, and every pre-training experiment composing and
running one step. Batches are made by hand as the data contract (notes: ssl_contract) has them."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.utils.data import DataLoader, Dataset, default_collate

from liverfusion.errors import CheckpointError, ConfigError
from liverfusion.models import FUSIONS, EncoderOutput, build_encoder, build_fusion_classifier
from liverfusion.models.fusion import CGCFusion
from liverfusion.models.ssl_backbone import NoHead
from liverfusion.modules.byol import BYOL
from liverfusion.modules.classifier import FusionClassifier
from liverfusion.modules.encoder_file import ENCODER_FORMAT, load_encoder_payload, read_encoder_file
from liverfusion.modules.encoder_loading import load_pretrained_network
from liverfusion.modules.momentum import cosine_tau
from liverfusion.modules.simsiam import SimSiam
from liverfusion.modules.ssl_health import RawStd
from liverfusion.modules.vicreg import VICReg
from liverfusion.utils.config_sections import model_config
from liverfusion.utils.hydra_utils import CONFIG_DIR
from tests.helpers import TINY_ENCODER as TINY

SHAPE = (8, 16, 16)
MODS = ["T2WI", "DWI", "C+A"]
PRE = {"shape": list(SHAPE), "mode": "resize", "normalize": "percentile", "percentiles": [0.5, 99.5]}
SPEC = {
    "modalities": MODS,
    "class_names": ["a", "b", "c"],
    "input_shape": list(SHAPE),
    "preprocess": PRE,
    "dataset": "tiny",
}
METHODS = {"simsiam": SimSiam, "byol": BYOL, "vicreg": VICReg}
SMALL = {  # tiny heads; every other value is conf/model/<method>.yaml's
    "simsiam": {"projector": {"hidden_dim": 16, "out_dim": 8}, "predictor": {"hidden_dim": 4}},
    "byol": {"projector": {"hidden_dim": 16, "out_dim": 8}, "predictor": {"hidden_dim": 16}},
    "vicreg": {"expander": {"hidden_dim": 16, "out_dim": 8, "num_layers": 2}},
}
STACK_CGC = {"kind": "stack", "fusion": {"name": "cgc", "width": 4}}


def build(method: str = "simsiam", encoder=None, spec=SPEC, seed: int = 0, **kw):
    torch.manual_seed(seed)
    args = model_config(method, **SMALL[method], knn={"enabled": False})
    args = model_config(method, **{**{k: {**args[k], **v} for k, v in SMALL[method].items()}, **kw})
    args["knn"] = {**args["knn"], "enabled": False, **kw.get("knn", {})}
    enc = encoder if encoder is not None else functools.partial(build_encoder, **TINY)
    return METHODS[method](enc, data_spec=spec, **args)


def contract_batch(n: int = 4, policy: str = "cross", m: int = len(MODS), seed: int = 0) -> dict:
    """A collated pre-training batch as liverfusion.data.mda emits it."""
    g = torch.Generator().manual_seed(seed)
    if policy == "stack":
        views = [torch.randn(n, m, *SHAPE, generator=g) for _ in range(2)]
        mods = [torch.full((n,), -1, dtype=torch.long)] * 2
    else:
        a = torch.arange(n) % m
        b = (a + 1) % m
        order = {"hybrid": [a, b, a], "same": [a, a]}.get(policy, [a, b])
        views = [torch.randn(n, 1, *SHAPE, generator=g) for _ in order]
        mods = [t.clone() for t in order]
    return {
        "views": views,
        "view_modalities": mods,
        "present": torch.ones(n, m, dtype=torch.bool),
        "label": torch.tensor([i % 3 - (i == n - 1) for i in range(n)]),  # the last case unlabelled
        "case_id": [f"C{i}" for i in range(n)],
        "patient_id": [f"P{i}" for i in range(n)],
        "index": torch.arange(n),
    }


class ContractViews(Dataset):
    """Items of the contract (before collate), for a tiny Trainer without a data module."""

    def __init__(self, n: int, policy: str, m: int):
        self.batch = contract_batch(n, policy, m)

    def __len__(self) -> int:
        return self.batch["index"].shape[0]

    def __getitem__(self, i: int) -> dict:
        b = self.batch
        return {
            "views": [v[i] for v in b["views"]],
            "view_modalities": torch.stack([t[i] for t in b["view_modalities"]]),
            "present": b["present"][i],
            "label": int(b["label"][i]),
            "case_id": b["case_id"][i],
            "patient_id": b["patient_id"][i],
            "index": i,
        }


def collate(items: list[dict]) -> dict:
    batch = default_collate(items)
    batch["view_modalities"] = list(batch["view_modalities"].unbind(1))
    return batch


def fast_fit(model, tmp_path: Path, policy: str, m: int = len(MODS)) -> L.Trainer:
    loader = DataLoader(ContractViews(4, policy, m), batch_size=4, collate_fn=collate)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        fast_dev_run=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*fast_dev_run.*")
        trainer.fit(model, train_dataloaders=loader)
    return trainer


def quiet_step(model, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        return model.training_step(batch, 0)


# ---- defaults live in YAML only; unknown keys and options are refused ----


@pytest.mark.parametrize("method", sorted(METHODS))
def test_yaml_gives_every_key_and_the_code_none(method):
    enc = build_encoder(**TINY)
    with pytest.raises(ConfigError, match=r"is missing \[.*'optimizer'.*\]"):
        METHODS[method](enc, data_spec=SPEC)
    args = model_config(method)
    model = METHODS[method](build_encoder(**TINY), data_spec=SPEC, **args)
    assert model.cfg["optimizer"] == args["optimizer"] and model.cfg["knn"] == args["knn"]
    short = {**args, "collapse": {"stop": False}}  # a section missing a key is refused, not completed in code
    with pytest.raises(ConfigError, match=r"model.collapse: missing key\(s\) \['alarm_fraction'\]"):
        METHODS[method](build_encoder(**TINY), data_spec=SPEC, **short)


def test_simsiam_head_sizes_come_from_the_yaml():
    model = SimSiam(build_encoder(**TINY), data_spec=SPEC, **model_config("simsiam"))
    widths = [m.out_features for m in model.projector.layers if isinstance(m, torch.nn.Linear)]
    assert (
        widths == [512, 512, 512] and model.predictor.layers[0].out_features == 128
    )  # simsiam.yaml, not 2048


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"projektor": {}}, r"unknown key\(s\) \['projektor'\] for SimSiam; known keys: \[.*'projector'"),
        ({"optimizer": {"lr": 0.1}}, r"model.optimizer: unknown key\(s\) \['lr'\]; known keys: \['name'"),
        (
            {"objective": {"name": "triplet"}},
            r"objective.name='triplet' is unknown; choose one of \['pair', 'hybrid'\]",
        ),
        (
            {"backbone": {"kind": "volume"}},
            r"backbone.kind='volume' is unknown; choose one of \['modality', 'stack'\]",
        ),
        (
            {"backbone": {"fusion": {"name": "cgc"}}},
            "model.backbone.kind=modality pre-trains the encoder alone",
        ),
        ({"phase_head": {"weight": -1}}, "phase_head.weight=-1.0: must be >= 0"),
        ({"objective": {"name": "hybrid", "shared_fraction": 0.01}}, "shared_fraction=0.01 gives 0 of 8"),
    ],
)
def test_bad_options_are_one_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        build("simsiam", **kw)


def test_unknown_method_lists_the_choices():
    with pytest.raises(
        ConfigError, match=r"model='simclr'.*choose one of \['byol', 'classifier', 'simsiam', 'vicreg'\]"
    ):
        model_config("simclr")


# ---- the list of views ----


def test_pair_objective_averages_every_pair_of_views():
    model = build("simsiam")
    batch = contract_batch(4, "cross")
    batch["views"].append(torch.randn(4, 1, *SHAPE))  # a third view (multi-crop style)
    batch["view_modalities"].append(torch.zeros(4, dtype=torch.long))
    loss, z, feats = model.ssl_step(batch)
    outs = [model.view_outputs("all", model.encode(v), i) for i, v in enumerate(batch["views"])]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(model.pair_loss("all", outs[a], outs[b]) for a, b in pairs) / 3
    torch.testing.assert_close(loss, expected)
    assert z["all"].shape == (12, 8) and feats.shape == (4, 8)
    two = model.ssl_step(contract_batch(4, "cross"))  # and two views: one pair
    assert two.z["all"].shape == (8, 8)


def test_views_a_module_cannot_use_are_refused_by_name():
    model = build("simsiam")
    with pytest.raises(
        ConfigError, match=r"model.backbone.kind=modality reads one phase per view.*policy=stack"
    ):
        model.ssl_step(contract_batch(4, "stack"))
    with pytest.raises(ConfigError, match=r"batch\['views'\]"):
        model.ssl_step({"view1": torch.randn(4, 1, *SHAPE), "view2": torch.randn(4, 1, *SHAPE)})
    stack = build("simsiam", backbone=STACK_CGC)
    with pytest.raises(
        ConfigError, match=r"model.backbone.kind=stack reads whole stacks.*data.pairs.policy=stack"
    ):
        stack.ssl_step(contract_batch(4, "cross"))
    hybrid = build("simsiam", objective={"name": "hybrid"})
    with pytest.raises(
        ConfigError, match=r"objective.name=hybrid needs the 3 views of data.pairs.policy=hybrid"
    ):
        hybrid.ssl_step(contract_batch(4, "cross"))
    # the data module's view_plan is checked before training
    with pytest.raises(
        ConfigError, match=r"data.pairs.policy='stack' gives stack views but model.backbone.kind"
    ):
        model.check_view_plan({"policy": "stack", "views": 2, "kind": "stack"})
    with pytest.raises(ConfigError, match=r"data.pairs.policy='cross' gives modality views.*kind='stack'"):
        stack.check_view_plan({"policy": "cross", "views": 2, "kind": "modality"})
    with pytest.raises(ConfigError, match=r"needs the 3 views of data.pairs.policy=hybrid.*'mixed' gives 2"):
        hybrid.check_view_plan({"policy": "mixed", "views": 2, "kind": "modality"})
    hybrid.check_view_plan({"policy": "hybrid", "views": 3, "kind": "modality"})
    model.check_view_plan({"policy": "hybrid", "views": 3, "kind": "modality"})  # pair: every pair of the 3


# ---- hybrid: shared part on the cross-phase pair, specific part on the same-phase pair ----


def test_hybrid_splits_the_features_and_each_part_sees_only_its_pair():
    model = build("simsiam", objective={"name": "hybrid", "shared_fraction": 0.25})
    assert model.part_slices == {"shared": slice(0, 2), "specific": slice(2, 8)}
    assert model.shared_heads["projector"].in_dim == 2 and model.specific_heads["projector"].in_dim == 6
    assert not hasattr(model, "projector")  # no whole-vector head
    batch = contract_batch(4, "hybrid")
    model.ssl_step(batch)
    first = dict(model.step_logs)
    batch["views"][2] = torch.randn(4, 1, *SHAPE) * 3  # only the same-phase view changes
    out = model.ssl_step(batch)
    assert torch.equal(model.step_logs["train/loss_shared"], first["train/loss_shared"])
    assert not torch.equal(model.step_logs["train/loss_specific"], first["train/loss_specific"])
    assert set(out.z) == {"shared", "specific"} and out.z["shared"].shape == (8, 8)
    torch.testing.assert_close(
        out.loss, (model.step_logs["train/loss_shared"] + model.step_logs["train/loss_specific"]) / 2
    )
    names = {g["name"] for g in model.method_parameter_groups()}
    assert names == {"projector", "predictor"}  # both parts' heads, one group per head name


# ---- phase-ID head ----


def test_phase_head_adds_its_cross_entropy_and_logs_accuracy():
    batch = contract_batch(4, "hybrid")
    with_head = build("simsiam", objective={"name": "hybrid"}, phase_head={"weight": 0.5})
    assert with_head.phase_head.out_features == len(MODS)
    total = with_head.ssl_step(batch).loss
    logs = dict(with_head.step_logs)
    with_head.phase_weight = 0.0
    base = with_head.ssl_step(batch).loss  # train-mode BatchNorm: the same numbers again, without the CE
    feats = torch.cat([with_head.encode(v) for v in batch["views"]])
    target = torch.cat(batch["view_modalities"])
    ce = F.cross_entropy(with_head.phase_head(feats), target)
    torch.testing.assert_close(total, base + 0.5 * ce)
    torch.testing.assert_close(logs["train/phase_loss"], ce.detach())
    with_head.phase_weight = 0.5
    total = with_head.ssl_step(batch).loss
    assert 0.0 <= float(logs["monitor/phase_acc"]) <= 1.0
    total.backward()
    assert with_head.phase_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in with_head.encoder.parameters())
    bad = contract_batch(4, "hybrid")
    bad["view_modalities"][0] = torch.full((4,), -1)
    with pytest.raises(ConfigError, match="view_modalities must be 0..2"):
        with_head.ssl_step(bad)
    with pytest.raises(ConfigError, match="phase_head.weight > 0 needs one phase per view"):
        build("simsiam", backbone=STACK_CGC, phase_head={"weight": 1.0})


# ---- momentum base and BYOL ----


def test_tau_follows_the_cosine_schedule():
    assert cosine_tau(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_tau(5, 10, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_tau(10, 10, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_tau(25, 10, 0.99, 1.0) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="base_tau <= final_tau"):
        build("byol", ema={"base_tau": 0.999, "final_tau": 0.9})


def test_byol_teacher_gets_no_gradient_and_ema_moves_it_by_tau():
    model = build("byol")
    teacher = list(model.teacher_backbone.parameters()) + list(model.teacher_heads.parameters())
    assert teacher and all(not p.requires_grad for p in teacher)
    assert "predictor" not in model.teacher_heads["all"]  # the teacher mirrors backbone + projector only
    loss = quiet_step(model, contract_batch(4, "cross"))
    loss.backward()
    assert all(p.grad is None for p in teacher)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    for p in model.teacher_heads.parameters():
        p.data.zero_()
    for p in model.projector.parameters():
        p.data.fill_(1.0)
    model.ema_update(0.75)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in model.teacher_heads.parameters())


def test_byol_one_training_step_updates_the_teacher_once(tmp_path):
    model = build("byol", ema={"base_tau": 0.9, "final_tau": 1.0})
    student0 = copy.deepcopy(model.backbone.state_dict())
    assert all(torch.equal(v, model.teacher_backbone.state_dict()[k]) for k, v in student0.items())
    fast_fit(model, tmp_path, "cross")
    assert model.tau == pytest.approx(0.9)  # step k = 0 of the cosine schedule: base_tau
    student1 = dict(model.backbone.named_parameters())
    moved = 0
    for name, p in model.teacher_backbone.named_parameters():
        expected = 0.9 * student0[name] + 0.1 * student1[name].detach()
        torch.testing.assert_close(p.detach(), expected)
        moved += int(not torch.equal(p.detach(), student0[name]))
    assert moved > 0  # the step changed the student, so the teacher followed a tenth of the way
    assert load_encoder_payload(tmp_path / "encoder.pt")["method"] == "BYOL"


# ---- VICReg ----


class ConstantEncoder(torch.nn.Module):
    """Collapsed on purpose: the same features for every input (trainable, so SGD has parameters)."""

    def __init__(self):
        super().__init__()
        self.feature_dim, self.map_channels, self.in_channels = 8, 8, 1
        self.bias = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        pooled = self.bias.expand(x.shape[0], 8) + 0 * x.mean()
        return EncoderOutput(pooled, pooled[:, :, None, None, None])

    def config(self):
        return {"name": "constant"}


def test_vicreg_collapse_metric_reads_the_raw_embedding():
    model = build("vicreg")
    assert isinstance(model.collapse_metrics["all"], RawStd) and model.collapse_scale() == 1.0
    out = model.ssl_step(contract_batch(8, "cross"))
    assert {"train/invariance", "train/variance", "train/covariance"} <= set(model.step_logs)
    c = model.criterion
    terms = c.terms(*out.z["all"].split(8))
    torch.testing.assert_close(
        out.loss, c.inv_weight * terms["invariance"] + c.var_weight * terms["variance"] + terms["covariance"]
    )
    healthy = RawStd(8)
    healthy.update(out.z["all"])
    assert float(healthy.compute()) > 0.3  # BN in the expander keeps a fresh embedding spread
    collapsed = build("vicreg", encoder=ConstantEncoder())
    model_z = collapsed.ssl_step(contract_batch(8, "cross")).z["all"]
    metric = RawStd(8)
    metric.update(model_z)
    std = float(metric.compute())
    assert std == pytest.approx(0.0, abs=1e-5)
    assert collapsed.collapse_from_std(std) == pytest.approx(1.0, abs=1e-5)
    assert collapsed.collapse_from_std(1.0) == pytest.approx(0.0)  # std at gamma: healthy


# ---- stack backbone: encoder + CGC block on whole stacks, exported and loaded into the classifier ----


def test_stack_backbone_needs_two_modalities_and_the_right_encoder():
    with pytest.raises(
        ConfigError, match=r"backbone.kind=stack needs a data set with two or more modalities.*\['T2WI'\]"
    ):
        build("simsiam", backbone=STACK_CGC, spec={**SPEC, "modalities": ["T2WI"]})
    with pytest.raises(
        ConfigError, match=r"needs an encoder with in_channels=3.*model.encoder._partial_=true"
    ):
        build(
            "simsiam", encoder=build_encoder(**TINY), backbone={"kind": "stack", "fusion": {"name": "early"}}
        )
    with pytest.raises(ConfigError, match=r"model.backbone.fusion='cgcx' is not a conf/fusion preset"):
        build("simsiam", backbone={"kind": "stack", "fusion": "cgcx"})
    early = build(
        "simsiam", backbone={"kind": "stack", "fusion": "early"}
    )  # a preset name, as on a command line
    assert early.encoder.in_channels == 3 and early.backbone.feature_dim == 8
    assert early.ssl_step(contract_batch(4, "stack")).z["all"].shape == (8, 8)


def classifier(path, fusion: str = "cgc", spec=SPEC, **fusion_kw) -> FusionClassifier:
    torch.manual_seed(1)
    return FusionClassifier(
        encoder=functools.partial(build_encoder, **TINY),
        fusion=functools.partial(FUSIONS[fusion], **fusion_kw),
        data_spec=spec,
        **model_config("classifier", init="pretrained", pretrained={"path": str(path)}),
    )


def test_stack_export_holds_the_fusion_block_and_the_classifier_loads_it(tmp_path):
    model = build("simsiam", backbone=STACK_CGC)
    assert isinstance(model.fusion.head, NoHead) and model.backbone.feature_dim == 3 * 4
    quiet_step(model, contract_batch(4, "stack")).backward()
    assert model.fusion.blocks[0].conv3d.weight.grad.abs().sum() > 0  # the CGC block is trained
    assert "fusion" in {g["name"] for g in model.method_parameter_groups()}
    path = tmp_path / "encoder.pt"
    torch.save(model.encoder_payload(), path)
    payload = load_encoder_payload(path)
    assert payload["format"] == ENCODER_FORMAT and payload["encoder_config"]["widths"] == [4, 8, 8, 8]
    assert payload["backbone"] == {"kind": "stack", "fusion": "cgc", "topology": "shared"}
    assert payload["fusion_config"]["name"] == "cgc" and payload["fusion_config"]["width"] == 4
    assert not {"num_classes", "dropout", "hidden_dims"} & set(payload["fusion_config"])
    assert payload["fusion_state_dict"] and not any(
        k.startswith("head.") for k in payload["fusion_state_dict"]
    )

    clf = classifier(path, width=4, dropout=0.3)  # another head option: the block still fits
    report = clf.load_report
    assert report["fusion"] == {
        "loaded": True,
        "name": "cgc",
        "tensors": len(payload["fusion_state_dict"]),
        "reason": None,
    }
    for k, v in payload["fusion_state_dict"].items():
        assert torch.equal(clf.net.fusion.state_dict()[k], v), k
    # the classifier's fused features are the pre-trained stack features (eval mode: same BN statistics)
    model.eval()
    clf.eval()
    b = contract_batch(2, "stack")
    with torch.no_grad():
        torch.testing.assert_close(
            clf.net(b["views"][0], b["present"]).features, model.encode(b["views"][0], b["present"])
        )

    wider = classifier(path, width=8)  # another block: encoder loaded, fusion from scratch, said so
    assert wider.load_report["fusion"]["loaded"] is False and "width" in wider.load_report["fusion"]["reason"]
    assert any("fusion block not loaded" in w for w in wider.load_report["warnings"])
    late = classifier(path, fusion="late_concat")
    assert "'cgc', the classifier's 'late_concat'" in late.load_report["fusion"]["reason"]
    reordered = classifier(path, spec={**SPEC, "modalities": ["DWI", "T2WI", "C+A"]}, width=4)
    assert "groups follow the modality order" in reordered.load_report["fusion"]["reason"]


def test_stack_fusion_is_read_from_a_lightning_checkpoint_too(tmp_path):
    model = build("simsiam", backbone=STACK_CGC)
    ckpt = {
        "state_dict": model.state_dict(),
        "pytorch-lightning_version": "2.5.0",
        "hyper_parameters": dict(model.hparams),
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    file = read_encoder_file(tmp_path / "last.ckpt")  # weights_only=True: the hyper-parameters are plain data
    assert file.kind == "lightning" and file.encoder_config["widths"] == [4, 8, 8, 8]
    assert set(file.fusion_state_dict) == set(model.backbone.export()["fusion_state_dict"])
    assert file.fusion_config["name"] == "cgc"


def test_early_stack_encoder_fine_tunes_the_early_classifier_in_the_same_channel_order(tmp_path):
    model = build("simsiam", backbone={"kind": "stack", "fusion": {"name": "early"}})
    torch.save(model.encoder_payload(), tmp_path / "encoder.pt")
    clf = classifier(tmp_path / "encoder.pt", fusion="early")
    assert (
        clf.net.encoder.in_channels == 3 and clf.load_report["fusion"]["loaded"] is True
    )  # nothing but a head
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(clf.net.encoder.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="reads the modalities as its 3 input channels in the order"):
        classifier(
            tmp_path / "encoder.pt", fusion="early", spec={**SPEC, "modalities": ["DWI", "T2WI", "C+A"]}
        )


def test_legacy_encoder_file_loads_without_fusion_keys():
    legacy = Path(__file__).parent / "fixtures" / "legacy_main" / "ssl" / "checkpoints" / "encoder.pt"
    file = read_encoder_file(legacy)
    assert file.fusion_state_dict is None and file.fusion_config is None
    mods = list(file.modalities)
    enc = build_encoder(**file.encoder_config)
    net = build_fusion_classifier(enc, functools.partial(CGCFusion, width=4), mods, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = load_pretrained_network(net, legacy, {"modalities": mods, "preprocess": file.preprocess})
    assert report.loaded_keys == len(enc.state_dict())
    assert report.fusion == {
        "loaded": False,
        "name": "cgc",
        "tensors": 0,
        "reason": "no fusion weights in the file",
    }


# ---- experiments: compose, instantiate, one step (hand-made batches), and a tiny fit ----

TINY_OVERRIDES = ["model.encoder.widths=[4,8,8,8]", "model.knn.enabled=false", "model.channels_last=false"]
HEAD_OVERRIDES = {
    "SimSiam": ["model.projector.hidden_dim=16", "model.projector.out_dim=8", "model.predictor.hidden_dim=4"],
    "BYOL": ["model.projector.hidden_dim=16", "model.projector.out_dim=8", "model.predictor.hidden_dim=16"],
    "VICReg": ["model.expander.hidden_dim=16", "model.expander.out_dim=8"],
}
EXPERIMENTS = {  # experiment -> (method, policy)
    "simsiam_pretrain": ("SimSiam", "cross"),
    "byol_pretrain": ("BYOL", "cross"),
    "vicreg_pretrain": ("VICReg", "cross"),
    "stack_pretrain": ("SimSiam", "stack"),
    "hybrid_pretrain": ("SimSiam", "hybrid"),
}


def compose_experiment(name: str, extra: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={name}", *extra])
    return cfg


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_and_runs_one_step(name, tmp_path):
    method, policy = EXPERIMENTS[name]
    extra = TINY_OVERRIDES + HEAD_OVERRIDES[method]
    if policy == "stack":
        extra.append("model.backbone.fusion.width=4")
    cfg = compose_experiment(name, extra)
    assert cfg.data.pairs.policy == policy
    with open_dict(cfg):
        cfg.model.export.wandb_artifact = False
    mods = list(cfg.data.layout.modalities)
    spec = {**SPEC, "modalities": mods, "class_names": list(cfg.data.layout.class_names)}
    torch.manual_seed(0)
    model = instantiate(cfg.model, data_spec=spec)
    assert type(model).__name__ == method
    plan = {
        "policy": policy,
        "views": 3 if policy == "hybrid" else 2,
        "kind": "stack" if policy == "stack" else "modality",
    }
    model.check_view_plan(plan)
    fast_fit(model, tmp_path, policy, m=len(mods))
    payload = load_encoder_payload(tmp_path / "encoder.pt")
    assert payload["method"] == method and payload["backbone"]["kind"] == plan["kind"]
    if name == "hybrid_pretrain":
        assert model.phase_head is not None and model.objective == "hybrid"
    if name == "stack_pretrain":
        assert payload["fusion_config"]["num_modalities"] == len(mods) and payload["fusion_state_dict"]


def test_stack_experiment_early_arm_composes():
    cfg = compose_experiment(
        "stack_pretrain", [*TINY_OVERRIDES, *HEAD_OVERRIDES["SimSiam"], "fusion@model.backbone.fusion=early"]
    )
    mods = list(cfg.data.layout.modalities)
    model = instantiate(cfg.model, data_spec={**SPEC, "modalities": mods})
    assert model.encoder.in_channels == len(mods) and model.backbone.fusion.name == "early"


@pytest.mark.parametrize("backbone,width", [(None, 3 * 8), (STACK_CGC, 3 * 4)])
def test_knn_monitor_features_follow_the_backbone(backbone, width):
    from types import SimpleNamespace

    kw = {"probe": {"enabled": True, "lr": 0.1}}
    model = build("simsiam", **({"backbone": backbone} if backbone else {}), **kw).eval()
    model._trainer = SimpleNamespace(world_size=1)
    n = 3
    present = torch.ones(n, len(MODS), dtype=torch.bool)
    present[0, 2] = False
    image = torch.randn(n, len(MODS), *SHAPE) * present[:, :, None, None, None]
    batch = {"image": image, "present": present, "label": torch.tensor([0, 1, 2]), "index": torch.arange(n)}
    for idx in (0, 1):
        model.validation_step(batch, 0, dataloader_idx=idx)
    feats, labels, probe = model._collected(1, with_probe=True)
    assert feats.shape == (n, width) and labels.tolist() == [0, 1, 2] and probe.shape == (n, 3)
    # the kNN input: each slot's features l2-normalised (a missing modality's slot zero), concatenated
    per_slot, mask = model.monitor_features(image, present)
    torch.testing.assert_close(feats.reshape(per_slot.shape).norm(dim=-1), mask.float())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("setup", ["pair", "hybrid", "stack"])
def test_every_method_runs_every_objective_and_backbone(method, setup):
    kw = {
        "pair": {},
        "hybrid": {"objective": {"name": "hybrid"}, "phase_head": {"weight": 0.1}},
        "stack": {"backbone": STACK_CGC},
    }[setup]
    model = build(method, **kw)
    policy = {"pair": "cross", "hybrid": "hybrid", "stack": "stack"}[setup]
    loss = quiet_step(model, contract_batch(4, policy))
    assert torch.isfinite(loss)
    loss.backward()
    trained = [p for p in model.encoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained, f"{method}/{setup}: no gradient reached the encoder"
    if method == "byol":
        assert set(model.teacher_heads) == set(model.part_slices)


def test_backbone_rebuilds_from_its_export(tmp_path):
    from liverfusion.models.ssl_backbone import backbone_from_export

    model = build("simsiam", backbone=STACK_CGC).eval()
    torch.save(model.encoder_payload(), tmp_path / "encoder.pt")
    rebuilt = backbone_from_export(load_encoder_payload(tmp_path / "encoder.pt")).eval()
    b = contract_batch(2, "stack")
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt.encode(b["views"][0], b["present"]), model.encode(b["views"][0], b["present"])
        )
    legacy = Path(__file__).parent / "fixtures" / "legacy_main" / "ssl" / "checkpoints" / "encoder.pt"
    assert backbone_from_export(load_encoder_payload(legacy)).kind == "modality"

"""What an SSL module accepts: its ``model`` sections (checked against the schemas of its classes) and the views
the data module gives (checked against its backbone and objective), each refused early with a ConfigError that
says which setting to change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from liverfusion.errors import ConfigError
from liverfusion.utils.config_sections import check_section, model_config
from liverfusion.utils.plain import to_plain

# model sections: (required keys, optional keys); None = a plain value, not a section
Schema = dict[str, "tuple[tuple[str, ...], tuple[str, ...]] | None"]
# the sections every SSL method takes (conf/model/_ssl.yaml); a method's class adds its own with ``SCHEMA``
BASE_SCHEMA: Schema = {
    "backbone": (("kind", "fusion"), ()),
    "objective": (("name", "shared_fraction"), ()),
    "phase_head": (("weight",), ()),
    "optimizer": (
        ("name", "base_lr", "momentum", "weight_decay", "exclude_bn_bias", "lr_reference_batch"),
        ("nesterov", "betas"),
    ),
    "scheduler": (("warmup_fraction", "min_lr_ratio"), ("warmup_steps",)),
    "knn": (("enabled", "k", "temperature"), ()),
    "probe": (("enabled", "lr"), ()),
    "collapse": (("alarm_fraction", "stop"), ()),
    "export": (("filename", "wandb_artifact"), ()),
    "channels_last": None,
}
OBJECTIVES = ("pair", "hybrid")


def checked_config(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as plain sections with exactly the keys of :data:`BASE_SCHEMA` plus the ``SCHEMA`` of every class
    in ``cls``'s MRO (a momentum base adds ``ema``); unknown or missing keys are a ConfigError."""
    schema = dict(BASE_SCHEMA)
    for klass in reversed(cls.__mro__):
        schema.update(klass.__dict__.get("SCHEMA", {}))
    name = cls.__name__
    unknown = sorted(set(config) - set(schema))
    if unknown:
        raise ConfigError(f"model: unknown key(s) {unknown} for {name}; known keys: {sorted(schema)}")
    missing = sorted(set(schema) - set(config))
    if missing:
        raise ConfigError(
            f"model: {name} is missing {missing}; the defaults live in conf/model/<method>.yaml (compose it, "
            "or build the arguments with liverfusion.utils.config_sections.model_config)"
        )
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        value = config[key]
        if spec is None:
            out[key] = to_plain(value)
        elif key == "backbone":  # its fusion is a Hydra partial: kept as given
            section = check_section(key, value, *spec)
            out[key] = {"kind": section["kind"], "fusion": section["fusion"]}
        else:
            section = to_plain(check_section(key, to_plain(value), *spec))
            absent = [k for k in spec[1] if k not in section]
            if (
                absent
            ):  # added since: a run configured before reads it from conf/model/_ssl.yaml, the one default
                base = model_config("_ssl")[key]
                section.update({k: base[k] for k in absent})
            out[key] = section
    return out


def check_view_plan(plan: Mapping[str, Any], backbone_kind: str, objective: str) -> None:
    """Refuse a data module's ``view_plan`` whose views a module with this backbone and objective cannot use."""
    policy, kind, views = plan.get("policy"), plan.get("kind"), int(plan.get("views", 2))
    mine = backbone_kind
    if kind is not None and kind != mine:
        fix = (
            "use model.backbone.kind=stack (+experiment=stack_pretrain), or another data.pairs.policy"
            if kind == "stack"
            else "set data.pairs.policy=stack, or model.backbone.kind=modality"
        )
        raise ConfigError(
            f"data.pairs.policy={policy!r} gives {kind} views but model.backbone.kind={mine!r} reads "
            f"{'one phase' if mine == 'modality' else 'whole stacks'} per view; {fix}"
        )
    if objective == "hybrid" and (policy != "hybrid" or views != 3):
        raise ConfigError(
            f"model.objective.name=hybrid needs the 3 views of data.pairs.policy=hybrid (anchor, another phase, "
            f"the anchor again), but data.pairs.policy={policy!r} gives {views}; set data.pairs.policy=hybrid "
            "(+experiment=hybrid_pretrain) or model.objective.name=pair"
        )
    if views < 2:
        raise ConfigError(f"data.pairs.policy={policy!r} gives {views} view(s); an SSL method needs >= 2")


def checked_views(
    batch: Mapping[str, Any], backbone_kind: str, objective: str, num_modalities: int
) -> list[torch.Tensor]:
    """``batch["views"]``, refused (ConfigError) when a module with this backbone and objective cannot use them."""
    views = batch.get("views") if isinstance(batch, Mapping) else None
    if not isinstance(views, list | tuple) or len(views) < 2:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(
            f"an SSL batch needs batch['views'], a list of >= 2 views (liverfusion.data.mda); got {keys}"
        )
    if objective == "hybrid" and len(views) != 3:
        raise ConfigError(
            f"model.objective.name=hybrid needs the 3 views of data.pairs.policy=hybrid, got {len(views)} views"
        )
    channels = sorted({int(v.shape[1]) if v.ndim == 5 else -1 for v in views})
    want = 1 if backbone_kind == "modality" else num_modalities
    if channels != [want]:
        if backbone_kind == "modality":
            msg = (
                f"model.backbone.kind=modality reads one phase per view (C=1), got views (N, C, D, H, W) with C "
                f"in {channels}: data.pairs.policy=stack gives whole stacks; use model.backbone.kind=stack "
                "(+experiment=stack_pretrain) or a pair policy (cross, same, mixed, hybrid)"
            )
        else:
            msg = (
                f"model.backbone.kind=stack reads whole stacks (C={want} modalities), got views with C in "
                f"{channels}: set data.pairs.policy=stack"
            )
        raise ConfigError(msg)
    return list(views)

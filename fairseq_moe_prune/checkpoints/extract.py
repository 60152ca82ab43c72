"""A task's sub-network of a task-level MoE, folded into dense FFNs (``fairseq-moe-prune extract``).

For a given task a task-routed layer always runs the same experts with the same weights: its output
is ``c1 * f1(x) + c2 * f2(x)`` with ``c = w * (1 - eom)`` (NLLB's expert output masking scales every
output at inference), which is exactly one dense FFN of the summed width: fc1 rows stacked, fc2
columns scaled by c, fc2 bias ``c1 * b1 + c2 * b2``. Task-routed layers never drop tokens for
capacity (see ``moe.gate.task_gating``), so there is nothing else to fold.

Where every MoE layer routes by task, the result is a plain fairseq ``transformer`` checkpoint that
stock fairseq loads without ``--user-dir``. fairseq's transformer has one FFN width per side, so the
side's dense layers are padded with zero units to the folded width (exact: a zero unit adds
``0 * act(0) = 0``). Where the encoder routes by token, the result keeps this plugin's
``moe_transformer`` with the encoder's MoE layers as they are and a dense decoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_moe_prune.checkpoints.layouts import (
    MoECheckpoint,
    checkpoint_files,
    is_expert_key,
    open_checkpoint,
    task_config,
)
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.checkpoints.streaming import Entry, materialize
from fairseq_moe_prune.checkpoints.surgery import CheckpointView, save_single
from fairseq_moe_prune.files import atomic_open, check_output, staged_directory
from fairseq_moe_prune.layout import MOE_CONFIG_FIELDS, MoEConfigError, MoELayerSpec, config_value, gate_layer, skip_betas
from fairseq_moe_prune.models.task_routing import TaskSpace, routes_by_task, split_pair, task_routing
from fairseq_moe_prune.moe.gate import GateOptions, gate_options, task_gating

LANGUAGE = re.compile(r"^[A-Za-z0-9_]+$")
FFN_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class ExtractError(CheckpointError):
    """A sub-network cannot be extracted; the message is one line meant for the user."""


@dataclass(frozen=True)
class Fold:
    """A task-routed layer for one task: the experts it runs and the factor each output gets."""

    experts: List[int]
    factors: List[float]  # combine weight x (1 - eom)


def parse_task(text: str, space: TaskSpace, encoder_routed: bool) -> Tuple[Optional[str], str]:
    """``LANG`` or ``SRC-TGT`` -> (source or None, target), every language known and trained in its role."""
    source, target = split_pair(text) if "-" in text else (None, text)
    for lang in (source, target):
        if lang is not None and not LANGUAGE.match(lang):
            raise ExtractError(f"not a language name: {lang!r}")
    if source is None and (encoder_routed or space.task == "pair"):
        what = "the encoder routes by source language" if encoder_routed else "the decoder routes by language pair"
        raise ExtractError(f"{text}: {what}; name the task as SRC-TGT")
    try:
        space.task_id("decoder", source, target)
        if source is not None:
            space.task_id("encoder", source, target)
    except MoEConfigError as error:
        raise ExtractError(f"{text}: {error}") from None
    return source, target


def task_fold(gate_weight: Tensor, task_row: Tensor, options: GateOptions, eom: float) -> Fold:
    """The experts and factors a task-routed gate gives one task, computed as the model computes them."""
    routing = task_gating(
        F.linear(task_row[None], gate_weight),
        top1=options.top1,
        use_fp32=options.use_fp32,
        second_expert_policy=options.second_expert_policy,
        normalize_gate_prob_before_dropping=options.normalize_gate_prob_before_dropping,
        training=False,
    )
    experts = [int(e) for e in routing.experts[0]]
    factors = [w * (1 - eom) for w in routing.weights[0].tolist()]
    if not all(math.isfinite(c) for c in factors):
        raise ExtractError("the task's gate weights are not finite (NaN or inf in the gate or the task embedding)")
    return Fold([e for e, c in zip(experts, factors) if c != 0], [c for c in factors if c != 0])


def task_row(checkpoint: MoECheckpoint, spec: MoELayerSpec, space: TaskSpace, task: int) -> Tensor:
    """Row ``task`` of the side's task embedding, checked against the config (one row per task) and the gate."""
    key = f"{spec.side}.moe_task_embed.weight"
    weights = checkpoint.state["model"]
    if key not in weights:
        raise ExtractError(f"{checkpoint.path}: the config routes the {spec.side} by task but the weights have no {key}")
    embed, gate = weights[key], weights[spec.gate_key]
    expected = (space.num_tasks(spec.side), int(gate.shape[1]))
    if tuple(embed.shape) != expected:
        raise ExtractError(f"{checkpoint.path}: {key} has shape {tuple(embed.shape)}, but the config's "
                           f"{expected[0]} tasks and the gate's width need {expected}")
    row = embed[task]
    if not bool(torch.isfinite(row).all()):
        raise ExtractError(f"{checkpoint.path}: {key} row {task} holds NaN or infinite values")
    return row


def fold_ffn(experts: List[Mapping[str, Tensor]], factors: List[float]) -> Dict[str, Tensor]:
    """One dense FFN computing sum_j factors[j] * expert_j(x)."""
    dtype = experts[0]["fc2.weight"].dtype
    fc2_weight = torch.cat([e["fc2.weight"].float() * c for e, c in zip(experts, factors)], dim=1)
    fc2_bias = sum(e["fc2.bias"].float() * c for e, c in zip(experts, factors))
    return {
        "fc1.weight": torch.cat([e["fc1.weight"] for e in experts], dim=0),
        "fc1.bias": torch.cat([e["fc1.bias"] for e in experts], dim=0),
        "fc2.weight": fc2_weight.to(dtype),
        "fc2.bias": fc2_bias.to(dtype),
    }


def pad_ffn(ffn: Mapping[str, Tensor], width: int) -> Dict[str, Tensor]:
    """The same FFN with zero units added up to ``width`` (exact: they contribute 0 * act(0))."""
    extra = width - ffn["fc1.weight"].shape[0]
    if extra == 0:
        return dict(ffn)
    return {
        "fc1.weight": torch.cat([ffn["fc1.weight"], ffn["fc1.weight"].new_zeros(extra, ffn["fc1.weight"].shape[1])]),
        "fc1.bias": torch.cat([ffn["fc1.bias"], ffn["fc1.bias"].new_zeros(extra)]),
        "fc2.weight": torch.cat([ffn["fc2.weight"], ffn["fc2.weight"].new_zeros(ffn["fc2.weight"].shape[0], extra)], 1),
        "fc2.bias": ffn["fc2.bias"],
    }


def set_value(config: Any, name: str, value: Any) -> None:
    if isinstance(config, dict):
        config[name] = value
    else:
        setattr(config, name, value)


def dense_config(config: Any, widths: Mapping[str, int]) -> Dict[str, Any]:
    """fairseq's plain ``transformer`` config (a dict: stock fairseq unpickles no Namespace)."""
    values = dict(config) if isinstance(config, dict) else dict(vars(config))
    for name in MOE_CONFIG_FIELDS:
        values.pop(name, None)
    values.update(_name="transformer", arch="transformer", user_dir=None,
                  encoder_ffn_embed_dim=widths["encoder"], decoder_ffn_embed_dim=widths["decoder"])
    return values


def moe_config(config: Any, specs: List[MoELayerSpec], kept: List[MoELayerSpec],
               dims: Mapping[str, Optional[List[int]]], widths: Mapping[str, int]) -> Any:
    """This plugin's config with only the ``kept`` (token-routed) MoE layers and the given FFN widths."""
    config = copy.copy(config)
    freq = max(int(config_value(config, "encoder_moe_freq", 0)), int(config_value(config, "moe_freq", 0)))
    betas = dict(zip((spec.prefix for spec in specs), skip_betas(config)))
    kept_betas = [betas[spec.prefix] for spec in kept]
    values: Dict[str, Any] = {"moe_freq": 0, "encoder_moe_freq": freq if kept else 0, "decoder_moe_freq": 0,
                              "encoder_moe_expert_counts": ",".join(str(s.num_experts) for s in kept) or None,
                              "decoder_moe_expert_counts": None, "moe_task_routing": "none",
                              "moe_task_langs": None, "moe_task_pairs": None,
                              # one beta per MoE layer left (the folded layers had none: they route by task)
                              "moe_skip_betas": ",".join(repr(b) for b in kept_betas) if any(kept_betas) else None}
    for side in ("encoder", "decoder"):
        values[f"{side}_ffn_dims"] = ",".join(map(str, dims[side])) if dims[side] else None
        values[f"{side}_ffn_embed_dim"] = widths[side]
    for name, value in values.items():
        set_value(config, name, value)
    return config


def plain_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The checkpoint's other entries with every Namespace a dict, and no plugin left in them."""
    out = {key: value for key, value in state.items() if key not in ("model", "last_optimizer_state")}
    if out.get("args") is not None:
        out["cfg"] = {"model": dict(vars(out["args"])), "task": dict(vars(out["args"]))}
        out["args"] = None
    cfg = dict(out.get("cfg") or {})
    for name, value in cfg.items():
        if isinstance(value, argparse.Namespace):
            cfg[name] = dict(vars(value))
    if isinstance(cfg.get("common"), dict):
        cfg["common"] = dict(cfg["common"], user_dir=None)
    out["cfg"] = cfg
    out["criterion"] = None
    return out


def name_direction(state: Dict[str, Any], source: Optional[str], target: str) -> None:
    """The sub-network serves one task: its task config names it (``convert --to hf`` reads it; fairseq-generate
    takes its own -s/-t)."""
    task = (state.get("cfg") or {}).get("task")
    if isinstance(task, dict):
        state["cfg"] = dict(state["cfg"], task=dict(task, source_lang=source, target_lang=target))


@dataclass
class Extracted:
    pruned: CheckpointView
    form: str  # "transformer" (plain fairseq) or "moe_transformer" (this plugin)
    folds: Dict[str, Fold]
    widths: Dict[str, List[int]]  # FFN width of each layer, per side
    zero_padding: int  # parameters added as zero units to reach one FFN width per side


def extract_task(checkpoint: MoECheckpoint, source: Optional[str], target: str, per_layer: bool = False,
                 namespace: bool = False) -> Extracted:
    """The sub-network of one task: task-routed layers folded, token-routed ones kept whole.

    Padded (default): each side's FFNs padded to one width, a plain ``transformer`` where no MoE layer is
    left. ``per_layer``: each layer keeps its own width (``{side}_ffn_dims``, this plugin's model).
    ``namespace``: the plain ``transformer``'s model config is an ``argparse.Namespace``, as fairseq-train
    writes it, for tools that read checkpoints themselves (CTranslate2's fairseq converter); torch >= 2.6
    then loads it only where Namespace is allowed (this plugin's --user-dir), so the default is a dict.
    """
    config = checkpoint.config
    space = TaskSpace.from_config(config)
    options = gate_options(config)
    eom = float(config_value(config, "moe_eom", 0.0))
    weights = checkpoint.state["model"]
    kept = [spec for spec in checkpoint.specs if not routes_by_task(config, spec.side)]
    kept_prefixes = {spec.prefix for spec in kept}

    folds: Dict[str, Fold] = {}
    ffns: Dict[str, Dict[str, Tensor]] = {}  # "{side}.layers.{i}" -> the dense FFN it gets
    for key in weights:
        match = re.match(r"^((?:en|de)coder\.layers\.\d+)\.fc1\.weight$", key)
        if match:
            ffns[match.group(1)] = {name: weights[f"{match.group(1)}.{name}"] for name in FFN_NAMES}
    for spec in checkpoint.specs:
        if spec.prefix in kept_prefixes:
            continue
        task = space.task_id(spec.side, source, target)
        fold = task_fold(weights[spec.gate_key], task_row(checkpoint, spec, space, task), options, eom)
        experts = {expert: materialize(tensors) for _, expert, tensors in checkpoint.experts({spec.prefix: fold.experts})}
        folds[spec.prefix] = fold
        ffns[f"{spec.side}.layers.{spec.layer}"] = fold_ffn([experts[e] for e in fold.experts], fold.factors)

    side_width: Dict[str, int] = {}
    dims: Dict[str, Optional[List[int]]] = {}
    for side in ("encoder", "decoder"):
        own = {int(layer.split(".")[2]): int(ffn["fc1.weight"].shape[0]) for layer, ffn in ffns.items()
               if layer.startswith(side)}
        default = int(config_value(config, f"{side}_ffn_embed_dim"))
        side_width[side] = default if per_layer or not own else max(own.values())
        count = int(config_value(config, f"{side}_layers"))
        layer_dims = [own.get(i, default) for i in range(count)]
        dims[side] = layer_dims if per_layer and set(layer_dims) != {default} else None

    model: Dict[str, Entry] = {}
    zero_padding = 0
    specs = {spec.prefix: spec for spec in checkpoint.specs}
    for key, value in weights.items():
        if key.endswith(".moe_task_embed.weight") or is_expert_key(key):
            continue
        match = re.match(r"^((?:en|de)coder\.layers\.\d+)\.fc1\.weight$", key)
        gate = gate_layer(key)
        if gate is not None and gate not in specs:
            raise ExtractError(f"{checkpoint.path}: {key} is the gate of no MoE layer of the model config")
        if match is None and gate is None:
            if not re.match(r"^(?:en|de)coder\.layers\.\d+\.fc[12]\.(weight|bias)$", key):
                model[key] = value
            continue
        layer = match.group(1) if gate is None else f"{specs[gate].side}.layers.{specs[gate].layer}"
        side = layer.split(".")[0]
        if gate in kept_prefixes:  # a token-routed MoE layer: kept whole
            spec = specs[gate]
            model[key] = value
            for _, expert, tensors in checkpoint.experts({spec.prefix: list(range(spec.num_experts))}):
                for name, tensor in tensors.items():
                    model[spec.expert_key(expert, name)] = tensor
            continue
        ffn = ffns[layer]
        width, dim = ffn["fc1.weight"].shape
        target_width = width if per_layer else side_width[side]
        zero_padding += (target_width - width) * (2 * dim + 1)
        ffn = pad_ffn(ffn, target_width)
        for name in FFN_NAMES:
            model[f"{layer}.{name}"] = ffn[name]

    widths = {side: [int(model[f"{side}.layers.{i}.fc1.weight"].shape[0]) if f"{side}.layers.{i}.fc1.weight" in model
                     else int(config_value(config, f"{side}_ffn_embed_dim"))
                     for i in range(int(config_value(config, f"{side}_layers")))] for side in ("encoder", "decoder")}
    if kept or per_layer:
        state = {key: value for key, value in checkpoint.state.items() if key not in ("model", "last_optimizer_state")}
        new_config = moe_config(config, checkpoint.specs, kept, dims, side_width)
        if state.get("cfg") is not None and state["cfg"].get("model") is not None:
            state["cfg"] = dict(state["cfg"], model=new_config)
        else:
            state["args"] = new_config
        form = "moe_transformer"
    else:
        state = plain_state(checkpoint.state)
        values = dense_config(config, side_width)
        state["cfg"]["model"] = argparse.Namespace(**values) if namespace else values
        form = "transformer"
    name_direction(state, source, target)
    return Extracted(CheckpointView(state, model), form, folds, widths, int(zero_padding))


def check_encoder_langtok(checkpoint: MoECheckpoint) -> None:
    """Folding reads a sentence's source language as the task of its encoder and of a decoder routed by pair,
    as the model does with ``--encoder-langtok src`` (the source language token in every source). A model
    trained with ``tgt`` sees the target language there instead: refused rather than folded wrongly."""
    task = task_config(checkpoint.state)
    langtok = config_value(task, "encoder_langtok") if task is not None else None
    needs_source = routes_by_task(checkpoint.config, "encoder") or TaskSpace.from_config(checkpoint.config).task == "pair"
    if needs_source and langtok is not None and str(langtok) != "src":
        raise ExtractError(f"{checkpoint.path}: the model was trained with --encoder-langtok {str(langtok)[:20]}, so "
                           "its encoder sees no source language token; extract needs --encoder-langtok src")


def extract(checkpoint_path: str, out_dir: str, tasks: List[str], per_layer: bool = False, fp16: bool = False,
            force: bool = False, namespace: bool = False) -> Dict[str, Any]:
    """Write one checkpoint per task (``LANG`` or ``SRC-TGT``) into ``out_dir`` (created whole, or not at all)."""
    check_output(out_dir, checkpoint_files(checkpoint_path), force)
    checkpoint = open_checkpoint(checkpoint_path)
    config = checkpoint.config
    if task_routing(config) == "none":
        raise ExtractError(f"{checkpoint_path}: the model routes by token (moe_task_routing none): "
                           "only a task-routed MoE has a fixed sub-network per task")
    space = TaskSpace.from_config(config)
    check_encoder_langtok(checkpoint)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ExtractError("name each task once: --task LANG_OR_PAIR[,...]")
    parsed = {task: parse_task(task, space, routes_by_task(config, "encoder")) for task in tasks}
    first = {spec.prefix: [0] for spec in checkpoint.specs}
    expert_sizes = {prefix: sum(int(torch.Size(t.shape).numel()) for t in tensors.values())
                    for prefix, _, tensors in checkpoint.experts(first)}
    total = sum(int(t.numel()) for t in checkpoint.dense_weights().values()) + sum(
        spec.num_experts * expert_sizes[spec.prefix] for spec in checkpoint.specs)
    manifest: Dict[str, Any] = {"source_checkpoint": os.path.abspath(checkpoint_path), "outputs": {}}
    with staged_directory(out_dir, force) as staging:
        for task, (source, target) in parsed.items():
            extracted = extract_task(checkpoint, source, target, per_layer, namespace)
            save_single(extracted.pruned, os.path.join(staging, f"{task}.pt"), fp16)
            parameters = sum(int(torch.Size(t.shape).numel()) for t in extracted.pruned.model.values())
            manifest["outputs"][task] = {
                "file": f"{task}.pt",
                "arch": extracted.form,
                "user_dir_needed": extracted.form != "transformer",
                "ffn_widths": extracted.widths,
                "parameters": parameters,
                "zero_padding_parameters": extracted.zero_padding,
                "source_parameters": total,
                "layers": {prefix: {"experts": fold.experts, "factors": [round(c, 8) for c in fold.factors]}
                           for prefix, fold in extracted.folds.items()},
            }
        with atomic_open(os.path.join(staging, "manifest.json"), "w") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest

"""Hugging Face ``NllbMoeForConditionalGeneration`` <-> fairseq: weight names, config fields, safetensors.

HF's NllbMoe is NLLB's model with fewer degrees of freedom: pre-norm layers with a final layer
norm, sinusoidal positions, encoder, decoder and output embeddings tied to ``model.shared``,
top-2 routing without a router bias, and one expert count for every MoE layer. A fairseq model
outside that (a non-uniformly pruned one, say) is refused with one line, not converted into a
different model.

Needs the ``hf`` extra (transformers, safetensors). Written against transformers 4.x: 5.x's
NllbMoe runs every token's top-1 choice through ``expert_1`` and its top-2 choice through
``expert_0`` (its ``NllbMoeExperts`` one-hot encodes the already one-hot router mask), so its
outputs are not NLLB's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fairseq_moe_prune import USER_DIR
from fairseq_moe_prune.checkpoints.layouts import model_config
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError, first_line
from fairseq_moe_prune.checkpoints.streaming import (
    Entry,
    SafetensorsFile,
    SourceTensor,
    cast_to_store,
    materialize,
    stored_dtype,
)
from fairseq_moe_prune.checkpoints.surgery import CheckpointView
from fairseq_moe_prune.files import is_plain_name, is_regular_file, open_regular, require_regular_file, umask
from fairseq_moe_prune.layout import (
    EXPERT_WEIGHTS,
    LAYER_PREFIX,
    MoEConfigError,
    config_value,
    expert_key,
    gate_key,
    moe_freq,
    moe_layers,
    skip_betas,
)

# An MoE layer's prefix with the table's placeholders: our names of its weights come from layout.py
_MOE_LAYER = LAYER_PREFIX.format(side="{side}", layer="{i}")

# One table for both directions: the fairseq name and the HF name of every weight.
KEY_TABLE: List[Tuple[str, str]] = [
    ("encoder.embed_tokens.weight", "model.shared.weight"),
    ("{side}.layers.{i}.self_attn.{proj}.{p}", "model.{side}.layers.{i}.self_attn.{proj}.{p}"),
    ("{side}.layers.{i}.self_attn_layer_norm.{p}", "model.{side}.layers.{i}.self_attn_layer_norm.{p}"),
    ("decoder.layers.{i}.encoder_attn.{proj}.{p}", "model.decoder.layers.{i}.cross_attention.{proj}.{p}"),
    ("decoder.layers.{i}.encoder_attn_layer_norm.{p}", "model.decoder.layers.{i}.cross_attention_layer_norm.{p}"),
    ("{side}.layers.{i}.{fc}.{p}", "model.{side}.layers.{i}.ffn.{fc}.{p}"),
    ("{side}.layers.{i}.final_layer_norm.{p}", "model.{side}.layers.{i}.ff_layer_norm.{p}"),
    (gate_key(_MOE_LAYER), "model.{side}.layers.{i}.ffn.router.classifier.weight"),
    (expert_key(_MOE_LAYER, "{j}", "{fc}.{p}"), "model.{side}.layers.{i}.ffn.experts.expert_{j}.{fc}.{p}"),
    ("{side}.layer_norm.{p}", "model.{side}.layer_norm.{p}"),
]
PLACEHOLDERS = {"side": "encoder|decoder", "i": r"\d+", "j": r"\d+", "fc": "fc1|fc2",
                "proj": "k_proj|v_proj|q_proj|out_proj", "p": "weight|bias"}
# other names of the table's first row (one tensor), and fairseq buffers that HF has no use for
FAIRSEQ_TIED = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
HF_TIED = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
FAIRSEQ_BUFFERS = re.compile(r"^(encoder|decoder)\.(version|embed_positions\._float_tensor)$")

# fairseq model field <-> NllbMoeConfig field, where the two are the same value under two names
CONFIG_TABLE: List[Tuple[str, str]] = [
    ("encoder_embed_dim", "d_model"),
    ("encoder_layers", "encoder_layers"),
    ("decoder_layers", "decoder_layers"),
    ("encoder_ffn_embed_dim", "encoder_ffn_dim"),
    ("decoder_ffn_embed_dim", "decoder_ffn_dim"),
    ("encoder_attention_heads", "encoder_attention_heads"),
    ("decoder_attention_heads", "decoder_attention_heads"),
    ("activation_fn", "activation_function"),
    ("dropout", "dropout"),
    ("attention_dropout", "attention_dropout"),
    ("activation_dropout", "activation_dropout"),
    ("encoder_layerdrop", "encoder_layerdrop"),
    ("decoder_layerdrop", "decoder_layerdrop"),
    ("moe_second_expert_policy", "second_expert_policy"),
    ("moe_normalize_gate_prob_before_dropping", "normalize_router_prob_before_dropping"),
    ("moe_batch_prioritized_routing", "batch_prioritized_routing"),
    ("moe_eval_capacity_token_fraction", "moe_eval_capacity_token_fraction"),
    ("moe_eom", "moe_token_dropout"),
]
# fairseq options that change the network in ways HF's NllbMoe cannot: refused when set
NOT_IN_HF = ("layernorm_embedding", "no_decoder_final_norm", "encoder_learned_pos", "decoder_learned_pos",
             "no_token_positional_embeddings", "adaptive_softmax_cutoff", "adaptive_input", "no_cross_attention",
             "cross_self_attention", "encoder_layers_to_keep", "decoder_layers_to_keep", "moe_top1_expert")
# fairseq's Dictionary puts <s>, <pad>, </s> first; its decoder starts from </s>
SPECIAL_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
ACTIVATIONS = ("relu", "gelu")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_POSITIONS = 1 << 16  # NLLB's is 1024
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def key_pattern(template: str) -> re.Pattern:
    """A weight-name template of the tables (``{side}.layers.{i}...``) as a pattern naming its placeholders."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return re.compile("".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{PLACEHOLDERS[part]})"
                              for n, part in enumerate(parts)))


def renames(table: List[Tuple[str, str]]) -> List[Tuple[re.Pattern, str]]:
    """(pattern of the first column, template of the second) for each row of a key table."""
    return [(key_pattern(source), target) for source, target in table]


def rename_by(rules: List[Tuple[re.Pattern, str]], key: str) -> Optional[str]:
    """``key`` renamed by the first rule whose pattern it matches, or None."""
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return None


# per target format: (pattern of the other format's name, template of this format's name)
_RENAMES = {"hf": renames(KEY_TABLE), "fairseq": renames([(hf, fairseq) for fairseq, hf in KEY_TABLE])}


def rename(key: str, to: str) -> Optional[str]:
    """A weight's name in the ``to`` format ("hf" or "fairseq"), or None when the table has no row for it."""
    return rename_by(_RENAMES[to], key)


def transformers_module() -> Any:
    try:
        import transformers  # optional extra (hf)
    except ImportError:
        raise CheckpointError("Hugging Face checkpoints need transformers: pip install 'fairseq-moe-prune[hf]'") from None
    return transformers


def shared_form_problem(config: Any) -> Optional[str]:
    """What neither of HF's NLLB classes (NllbMoe, M2M100) can hold in a fairseq config, as the end of a
    sentence naming the class, or None."""
    refused = [name for name in NOT_IN_HF if config_value(config, name)]
    if refused:
        return f"has no equivalent of --{refused[0].replace('_', '-')}"
    dim = config_value(config, "encoder_embed_dim")
    for name in ("decoder_embed_dim", "decoder_output_dim", "decoder_input_dim"):
        if config_value(config, name, dim) != dim:
            return f"has one model width; {name} is not {dim}"
    if config_value(config, "activation_fn", "relu") not in ACTIVATIONS:
        return f"has no activation {str(config_value(config, 'activation_fn'))[:20]} (only {', '.join(ACTIVATIONS)})"
    return None


def hf_config(config: Any, vocab_size: int, dtype: torch.dtype) -> Any:
    """The ``NllbMoeConfig`` of a fairseq model config, or a one-line error for what HF cannot express."""
    problem = shared_form_problem(config)
    if problem:
        raise CheckpointError(f"Hugging Face's NllbMoe {problem}")
    if str(config_value(config, "moe_task_routing", "none")) != "none":
        raise CheckpointError("Hugging Face's NllbMoe routes by token; this model routes by task "
                              "(fairseq-moe-prune extract writes its sub-networks as plain fairseq transformers)")
    if any(beta > 0 for beta in skip_betas(config)):
        raise CheckpointError("Hugging Face's NllbMoe has no dynamic expert skipping; this model skips second "
                              "experts (moe_skip_betas): convert a checkpoint pruned without --skip-beta")
    if config_value(config, "encoder_ffn_dims") or config_value(config, "decoder_ffn_dims"):
        raise CheckpointError("Hugging Face's NllbMoe has one FFN width per side; this model has per-layer widths")
    for name in ("encoder_normalize_before", "decoder_normalize_before", "share_all_embeddings"):
        if not config_value(config, name, False):
            raise CheckpointError(f"Hugging Face's NllbMoe needs --{name.replace('_', '-')} (pre-norm layers and "
                                  "one embedding shared by encoder, decoder and output)")
    counts = {spec.num_experts for spec in moe_layers(config)}
    if len(counts) != 1:
        raise CheckpointError(f"Hugging Face's NllbMoe has one expert count for all MoE layers; this model has "
                              f"{', '.join(map(str, sorted(counts)))} (keep it as a single-file fairseq checkpoint)")
    fields = {hf: config_value(config, fairseq) for fairseq, hf in CONFIG_TABLE}
    fields.update(
        vocab_size=vocab_size,
        num_experts=counts.pop(),
        encoder_sparse_step=moe_freq(config, "encoder"),
        decoder_sparse_step=moe_freq(config, "decoder"),
        max_position_embeddings=max(config_value(config, "max_source_positions", 1024),
                                    config_value(config, "max_target_positions", 1024)),
        scale_embedding=not config_value(config, "no_scale_embedding", False),
        # HF's router always computes in router_dtype; fairseq's fp32 gating is its NLLB setting
        router_dtype="float32",
        router_bias=False,
        # HF's flag is the opposite of fairseq's: False masks padding out of the routing
        router_ignore_padding_tokens=not config_value(config, "use_moe_pad_mask", False),
        tie_word_embeddings=True,
        architectures=["NllbMoeForConditionalGeneration"],
        torch_dtype=str(dtype).replace("torch.", ""),
        **SPECIAL_IDS,
    )
    return transformers_module().NllbMoeConfig(**fields)


SECOND_EXPERT_POLICIES = ("all", "sampling", "random")


def config_field(config: Any, name: str, kind: str) -> Any:
    """``config.name`` (a value from config.json), checked against what the field can be.

    ``kind``: "bool", "count" (an int >= 1), "fraction" (a finite number in [0, 1]) or "number"
    (any finite number). The value is returned as that type; anything else is a one-line error.
    """
    value = getattr(config, name, None)
    shown = repr(value)[:60]
    if kind == "bool":
        if not isinstance(value, bool):
            raise CheckpointError(f"config.json: {name} must be true or false, got {shown}")
        return value
    if kind == "count":
        if type(value) is not int or value < 1:
            raise CheckpointError(f"config.json: {name} must be a whole number >= 1, got {shown}")
        return value
    if type(value) not in (int, float) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {name} must be a number, got {shown}")
    if kind == "fraction" and not 0 <= value <= 1:
        raise CheckpointError(f"config.json: {name} must be in [0, 1], got {shown}")
    return float(value)


def config_choice(config: Any, name: str, choices: Tuple[str, ...]) -> str:
    value = getattr(config, name, None)
    if value not in choices:
        raise CheckpointError(f"config.json: {name} must be one of {', '.join(choices)}, got {repr(value)[:60]}")
    return value


def fairseq_model_values(config: Any) -> Dict[str, Any]:
    """fairseq model fields for the model an ``NllbMoeConfig`` describes, every value checked.

    Nothing read from config.json reaches a command line: each value is checked against its type
    and allowed choices, and set on the config object directly (see :func:`fairseq_state`).
    """
    if config.model_type != "nllb-moe":
        raise CheckpointError(f"not an NLLB-MoE model (model_type {config.model_type!r})")
    if config_field(config, "router_bias", "bool"):
        raise CheckpointError("fairseq's NLLB gate has no bias; this model's router has one")
    if not config_field(config, "tie_word_embeddings", "bool"):
        raise CheckpointError("fairseq's NLLB shares one embedding between encoder, decoder and output; "
                              "this model does not tie them")
    for name, value in SPECIAL_IDS.items():
        if getattr(config, name, None) != value:
            raise CheckpointError(f"{name} is {repr(getattr(config, name, None))[:60]}, but a fairseq dictionary has {value}")
    kinds = {
        "d_model": "count", "encoder_layers": "count", "decoder_layers": "count", "encoder_ffn_dim": "count",
        "decoder_ffn_dim": "count", "encoder_attention_heads": "count", "decoder_attention_heads": "count",
        "dropout": "fraction", "attention_dropout": "fraction", "activation_dropout": "fraction",
        "encoder_layerdrop": "fraction", "decoder_layerdrop": "fraction",
        "normalize_router_prob_before_dropping": "bool", "batch_prioritized_routing": "bool",
        "moe_eval_capacity_token_fraction": "number", "moe_token_dropout": "fraction",
    }
    hf_values: Dict[str, Any] = {name: config_field(config, name, kind) for name, kind in kinds.items()}
    hf_values["activation_function"] = config_choice(config, "activation_function", ACTIVATIONS)
    hf_values["second_expert_policy"] = config_choice(config, "second_expert_policy", SECOND_EXPERT_POLICIES)
    values = {fairseq: hf_values[hf] for fairseq, hf in CONFIG_TABLE}
    d_model = hf_values["d_model"]
    positions = config_field(config, "max_position_embeddings", "count")
    if positions > MAX_POSITIONS:  # fairseq builds a sinusoidal table of this many rows, of d_model floats each
        raise CheckpointError(f"config.json: max_position_embeddings must be at most {MAX_POSITIONS}, got {positions}")
    values.update(
        decoder_embed_dim=d_model,
        decoder_output_dim=d_model,
        decoder_input_dim=d_model,
        encoder_normalize_before=True,
        decoder_normalize_before=True,
        share_all_embeddings=True,
        no_scale_embedding=not config_field(config, "scale_embedding", "bool"),
        max_source_positions=positions,
        max_target_positions=positions,
        encoder_moe_freq=config_field(config, "encoder_sparse_step", "count"),
        decoder_moe_freq=config_field(config, "decoder_sparse_step", "count"),
        moe_expert_count=config_field(config, "num_experts", "count"),
        moe_gating_use_fp32=getattr(config, "router_dtype", None) == "float32",
        use_moe_pad_mask=not config_field(config, "router_ignore_padding_tokens", "bool"),
    )
    return values


def fairseq_state(values: Mapping[str, Any]) -> Dict[str, Any]:
    """Everything but the weights of a fairseq checkpoint for an HF model (its :func:`fairseq_model_values`),
    as ``fairseq-train`` lays it out.

    fairseq's own parser gives every field a stock fairseq expects (architecture ``moe_transformer``,
    task ``translation``) from a fixed command line; the model's values are then set on that config.
    """
    # start-up speed: fairseq (seconds) loads only where an HF model becomes a fairseq checkpoint
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    with quiet_hydra():
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, ["", "--task", "translation", "--arch", "moe_transformer",
                                                    "--user-dir", USER_DIR])
        for name, value in values.items():
            setattr(args, name, value)
        cfg = convert_namespace_to_omegaconf(args)
    return {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": None,
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {},
        "extra_state": {},
        "last_optimizer_state": None,
    }


@contextlib.contextmanager
def quiet_hydra() -> Iterator[None]:
    """fairseq's config conversion goes through hydra, which warns about its own deprecations (25 lines)."""
    loggers = [logging.getLogger(name) for name in ("hydra", "fairseq.utils")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def weight_files(folder: str) -> List[str]:
    """The safetensors files of an HF model folder: the index's shards, or ``model.safetensors``.

    The index's file names are data: each must be a plain file name, which names a regular file in the
    folder, or the folder is refused (without naming or opening anything else). A shard may be a symbolic
    link, as in Hugging Face's cache, whose snapshot folders link to its blobs; the overlap check of every
    writing command resolves it (see :func:`files.check_output`).
    """
    index = os.path.join(folder, INDEX_NAME)
    if os.path.lexists(index):
        try:
            with open_regular(index) as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else first_line(error)
            raise CheckpointError(f"{index}: not a safetensors index ({reason})") from None
        if not names or not all(isinstance(name, str) and is_plain_name(name) for name in names):
            raise CheckpointError(f"{index}: its weight_map names a file that is not a plain file name in "
                                  f"{folder} (an absolute path, a folder or ..): refused")
        return [require_regular_file(os.path.join(folder, name)) for name in names]
    if os.path.lexists(os.path.join(folder, WEIGHTS_NAME)):
        return [require_regular_file(os.path.join(folder, WEIGHTS_NAME))]
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors weights are read)")


def _natural(key: str) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def read_config(folder: str) -> Any:
    """The ``NllbMoeConfig`` in ``folder``/config.json (values still unchecked: see :func:`fairseq_model_values`)."""
    transformers = transformers_module()
    if not is_regular_file(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{folder}: a folder without config.json (neither a Hugging Face model nor a checkpoint)")
    try:
        with quiet_hydra():  # transformers' own warnings too
            return transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else first_line(error)[:200]
        raise CheckpointError(f"{folder}: no readable Hugging Face config.json ({reason})") from None


def describe_hf(folder: str) -> str:
    """A few lines on a Hugging Face NllbMoe folder, in the form ``info`` gives for fairseq checkpoints."""
    config = read_config(folder)
    values = fairseq_model_values(config)
    try:
        specs = moe_layers(values)
    except MoEConfigError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    files = weight_files(folder)
    lines = [f"{folder}: Hugging Face NllbMoe model, {len(specs)} MoE layers, "
             f"{sum(s.num_experts for s in specs)} experts ({len(files)} safetensors file{'s' * (len(files) > 1)}; "
             "convert it with `fairseq-moe-prune convert` to prune it)"]
    for spec in specs:
        ffn = values[f"{spec.side}_ffn_embed_dim"]
        lines.append(f"  {spec.prefix:<32} {spec.num_experts:>4} experts  ffn {ffn}  dim {values['encoder_embed_dim']}")
    return "\n".join(lines)


def read_hf(folder: str) -> CheckpointView:
    """An HF NllbMoe folder as a fairseq checkpoint to write: a fairseq config and references to its tensors.

    Only safetensors headers are read here; the tensors are read one at a time when written.
    """
    config = read_config(folder)
    tensors: Dict[str, SourceTensor] = {}
    for path in weight_files(folder):
        tensors.update(SafetensorsFile(path).source_tensors())

    embedding = next((tensors[key] for key in ("model.shared.weight", *HF_TIED) if key in tensors), None)
    if embedding is None:
        raise CheckpointError(f"{folder}: no embedding (model.shared.weight)")
    model: Dict[str, Entry] = {}
    for key in sorted(tensors, key=_natural):
        if key in HF_TIED:
            continue
        name = rename(key, "fairseq")
        if name is None:
            raise CheckpointError(f"{folder}: {key} has no counterpart in fairseq's NLLB model")
        model[name] = tensors[key]
    model["encoder.embed_tokens.weight"] = embedding
    for name in FAIRSEQ_TIED:
        model[name] = embedding
    for side in ("encoder", "decoder"):
        model[f"{side}.version"] = torch.tensor([3.0])  # what fairseq's own state dict holds
    values = fairseq_model_values(config)
    check_shapes(model, expected_shapes(values, config_field(config, "vocab_size", "count"), folder), folder)
    return CheckpointView(fairseq_state(values), model)


def expected_shapes(values: Mapping[str, Any], vocab: int, folder: str) -> Dict[str, Tuple[int, ...]]:
    """Every weight of the fairseq model ``values`` (from :func:`fairseq_model_values`) describes, with its shape."""
    try:
        moe = {(spec.side, spec.layer): spec for spec in moe_layers(values)}
    except MoEConfigError as error:
        raise CheckpointError(f"{folder}: {error}") from None
    dim = values["encoder_embed_dim"]
    square, vector = (dim, dim), (dim,)
    shapes: Dict[str, Tuple[int, ...]] = {name: (vocab, dim) for name in ("encoder.embed_tokens.weight", *FAIRSEQ_TIED)}
    for side in ("encoder", "decoder"):
        shapes.update({f"{side}.version": (1,), f"{side}.layer_norm.weight": vector, f"{side}.layer_norm.bias": vector})
        ffn = values[f"{side}_ffn_embed_dim"]
        fc = {"fc1.weight": (ffn, dim), "fc1.bias": (ffn,), "fc2.weight": (dim, ffn), "fc2.bias": vector}
        attentions = ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",)
        for layer in range(values[f"{side}_layers"]):
            head = f"{side}.layers.{layer}."
            for attention in attentions:
                for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                    shapes.update({f"{head}{attention}.{proj}.weight": square, f"{head}{attention}.{proj}.bias": vector})
                shapes.update({f"{head}{attention}_layer_norm.weight": vector, f"{head}{attention}_layer_norm.bias": vector})
            shapes.update({f"{head}final_layer_norm.weight": vector, f"{head}final_layer_norm.bias": vector})
            spec = moe.get((side, layer))
            if spec is None:
                shapes.update({head + name: shape for name, shape in fc.items()})
                continue
            shapes[spec.gate_key] = (spec.num_experts, dim)
            shapes.update({spec.expert_key(expert, name): fc[name] for expert in range(spec.num_experts)
                           for name in EXPERT_WEIGHTS})
    return shapes


def check_shapes(model: Mapping[str, Entry], shapes: Mapping[str, Tuple[int, ...]], folder: str) -> None:
    """The weights are exactly those config.json describes, each of its shape (fairseq would refuse them later)."""
    for key, shape in shapes.items():
        if key not in model:
            raise CheckpointError(f"{folder}: missing {rename(key, 'hf') or key} (config.json describes it)")
        if tuple(model[key].shape) != shape:
            raise CheckpointError(f"{folder}: {rename(key, 'hf') or key} has shape {tuple(model[key].shape)}, "
                                  f"but config.json describes {shape}")
    extra = sorted(set(model) - set(shapes), key=_natural)
    if extra:
        raise CheckpointError(f"{folder}: {rename(extra[0], 'hf')} is a weight config.json does not describe")


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5 * 10**9 (HF's convention; ``GiB`` for powers of two)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or (unit or "B") not in SIZE_UNITS:
        raise CheckpointError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit or "B"])


def plan_shards(model: Mapping[str, Entry], max_bytes: int, dtype: Optional[torch.dtype]) -> List[List[str]]:
    """Consecutive groups of keys of at most ``max_bytes`` each (a larger tensor gets a shard of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for key, entry in model.items():
        nbytes = torch.Size(entry.shape).numel() * stored_dtype(entry.dtype, dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_hf(checkpoint: CheckpointView, folder: str, fp16: bool = False, max_shard_size: str = "5GB") -> None:
    """Write a fairseq checkpoint into ``folder`` (new and empty) as HF's config.json and safetensors shards.

    One shard is in memory at a time.
    """
    dtype = torch.float16 if fp16 else None
    embedding = checkpoint.model["encoder.embed_tokens.weight"]
    config = hf_config(model_config(checkpoint.state), embedding.shape[0], dtype or embedding.dtype)
    model: Dict[str, Entry] = {}
    for key, entry in checkpoint.model.items():
        if key in FAIRSEQ_TIED or FAIRSEQ_BUFFERS.match(key):
            continue
        name = rename(key, "hf")
        if name is None:
            raise CheckpointError(f"{key} has no counterpart in Hugging Face's NllbMoe")
        model[name] = entry
    config.save_pretrained(folder)
    transformers_module().GenerationConfig.from_model_config(config).save_pretrained(folder)
    write_safetensors(model, folder, checkpoint.records, dtype, max_shard_size)


def write_safetensors(model: Mapping[str, Entry], folder: str, records: Any, dtype: Optional[torch.dtype],
                      max_shard_size: str) -> None:
    """HF-named weights into ``folder`` as ``model.safetensors`` or shards with their index, one shard in memory."""
    shards = plan_shards(model, parse_size(max_shard_size), dtype)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                                                      for n in range(1, len(shards) + 1)]
    weight_map: Dict[str, str] = {}
    total = 0
    for name, keys in zip(names, shards):
        tensors = {key: cast_to_store(tensor, dtype) for key, tensor in materialize({k: model[k] for k in keys}, records).items()}
        try:
            save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        except SafetensorError as error:  # a full disk, say: safetensors reports the OSError as its own error
            raise CheckpointError(f"cannot write {name} ({first_line(error)})") from None
        os.chmod(os.path.join(folder, name), 0o666 & ~umask())  # safetensors makes 0600; the usual permissions
        weight_map.update((key, name) for key in keys)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(shards) > 1:
        with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")

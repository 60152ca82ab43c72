"""The one definition of "the MoE layers of this model", computed from its config alone.

The recorder, the statistics fingerprint, checkpoint surgery and converters all ask this module
which layers are MoE layers, in which order, under which state-dict prefix, with how many
experts, so that a checkpoint can be understood without building the model. The state-dict
names of an MoE layer's weights (NLLB's: ``gate.wg.weight``, ``experts.{j}.fc1/fc2``) are spelled
here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from fairseq_moe_prune.errors import FairseqMoEPruneError

SIDES = ("encoder", "decoder")

# The model config's MoE fields, NLLB's and ours, in MoEConfig's order (models/moe_transformer.py declares each one's
# type, default and help; tests/models/test_moe_transformer.py checks the two agree). A dense model has none of them.
MOE_CONFIG_FIELDS = (
    "moe_freq", "encoder_moe_freq", "decoder_moe_freq", "moe_expert_count", "encoder_moe_expert_counts",
    "decoder_moe_expert_counts", "moe_gating_use_fp32", "moe_second_expert_policy",
    "moe_normalize_gate_prob_before_dropping", "moe_eval_capacity_token_fraction", "moe_batch_prioritized_routing",
    "use_moe_pad_mask", "moe_eom", "moe_top1_expert", "moe_skip_betas", "encoder_ffn_dims", "decoder_ffn_dims",
    "moe_task_routing", "moe_task", "moe_task_langs", "moe_task_pairs", "moe_expert_offload",
    "moe_offload_cache_experts", "moe_expert_devices",
)

# State-dict names of an MoE layer's weights (NLLB's); LAYER_PREFIX also takes placeholders (checkpoints/hf.py)
LAYER_PREFIX = "{side}.layers.{layer}.moe_layer"
GATE_WEIGHT = "gate.wg.weight"  # within the layer
EXPERT_TENSOR = "experts.{expert}.{name}"  # within the layer
EXPERT_WEIGHTS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")  # the names of one expert's tensors
# a prefix read from a file (statistics, calibration samples): at most 4 digits of layer index
PREFIX_PATTERN = re.compile(r"^(?P<side>encoder|decoder)\.layers\.(?P<layer>\d{1,4})\.moe_layer$")
GATE_KEY_PATTERN = re.compile(r"^(?P<prefix>.+\.moe_layer)\." + re.escape(GATE_WEIGHT) + "$")
EXPERT_KEY_PATTERN = re.compile(r"^(?P<prefix>.+\.moe_layer)\.experts\.(?P<expert>\d+)\.(?P<name>.+)$")


class MoEConfigError(FairseqMoEPruneError, ValueError):
    """The MoE fields of a model config are inconsistent."""


@dataclass(frozen=True)
class MoELayerSpec:
    side: str  # "encoder" or "decoder"
    layer: int  # index of the transformer layer within its side
    num_experts: int

    @property
    def prefix(self) -> str:
        """State-dict prefix of this MoE block, e.g. ``encoder.layers.3.moe_layer``."""
        return LAYER_PREFIX.format(side=self.side, layer=self.layer)

    @property
    def name(self) -> str:
        """Short human name, e.g. ``enc3``."""
        return f"{self.side[:3]}{self.layer}"

    @property
    def gate_key(self) -> str:
        """State-dict name of the gate's weight, e.g. ``encoder.layers.3.moe_layer.gate.wg.weight``."""
        return gate_key(self.prefix)

    def expert_key(self, expert: int, name: str) -> str:
        """State-dict name of tensor ``name`` (e.g. ``fc1.weight``) of expert ``expert``."""
        return expert_key(self.prefix, expert, name)

    @classmethod
    def from_prefix(cls, prefix: str, num_experts: int) -> "MoELayerSpec":
        """The layer a prefix read from a file names; a one-line error for anything else."""
        match = PREFIX_PATTERN.match(prefix) if isinstance(prefix, str) else None
        if match is None:
            raise MoEConfigError(f"{str(prefix)[:60]!r} is not an MoE layer prefix (e.g. encoder.layers.3.moe_layer)")
        return cls(match.group("side"), int(match.group("layer")), num_experts)


def gate_key(prefix: str) -> str:
    """The gate weight's name in the MoE layer at ``prefix``."""
    return f"{prefix}.{GATE_WEIGHT}"


def expert_key(prefix: str, expert: int, name: str) -> str:
    """The name of tensor ``name`` of expert ``expert`` in the MoE layer at ``prefix``."""
    return f"{prefix}.{EXPERT_TENSOR.format(expert=expert, name=name)}"


def expert_head(prefix: str, expert: int) -> str:
    """What the names of every tensor of expert ``expert`` of the layer at ``prefix`` start with."""
    return expert_key(prefix, expert, "")


def split_expert_key(key: str) -> Optional[Tuple[str, int, str]]:
    """``(layer prefix, expert, tensor name)`` of an expert's weight, or None for any other key."""
    match = EXPERT_KEY_PATTERN.match(key)
    if match is None:
        return None
    return match.group("prefix"), int(match.group("expert")), match.group("name")


def gate_layer(key: str) -> Optional[str]:
    """The layer prefix of a gate weight's name, or None for any other key."""
    match = GATE_KEY_PATTERN.match(key)
    return match.group("prefix") if match else None


def config_value(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of a model config (argparse Namespace, omegaconf or dict); ``default`` when unset or None."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    value = getattr(cfg, name, default)
    return default if value is None else value


def parse_counts(text: Optional[str]) -> Optional[List[int]]:
    """``"4,4,2"`` -> ``[4, 4, 2]``; empty or None -> None."""
    if text is None or str(text).strip() == "":
        return None
    try:
        counts = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise MoEConfigError(f"expert counts must be comma-separated integers, got {text!r}")
    if any(count < 1 for count in counts):
        raise MoEConfigError(f"every MoE layer needs at least one expert, got {text!r}")
    return counts


def format_counts(counts: Sequence[int]) -> str:
    return ",".join(str(count) for count in counts)


def moe_freq(cfg: Any, side: str) -> int:
    """Every how many layers the ``side`` has an MoE layer (0: none): max of the side's and the global field."""
    return max(int(config_value(cfg, f"{side}_moe_freq", 0)), int(config_value(cfg, "moe_freq", 0)))


def moe_layer_indices(cfg: Any, side: str) -> List[int]:
    """NLLB's rule: layer i is an MoE layer when ``(i + 1) % freq == 0``."""
    num_layers = int(config_value(cfg, f"{side}_layers", 0))
    freq = moe_freq(cfg, side)
    if freq <= 0:
        return []
    return [i for i in range(num_layers) if (i + 1) % freq == 0]


def skip_betas(cfg: Any) -> List[float]:
    """Dynamic skipping's beta of each MoE layer (layout order), from ``moe_skip_betas``; 0.0 = off."""
    specs = moe_layers(cfg)
    text = config_value(cfg, "moe_skip_betas")
    if text is None or str(text).strip() == "":
        return [0.0] * len(specs)
    try:
        betas = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise MoEConfigError(f"moe_skip_betas must be comma-separated numbers, got {text!r}") from None
    if len(betas) != len(specs):
        raise MoEConfigError(f"moe_skip_betas lists {len(betas)} betas but the model has {len(specs)} MoE layers")
    if any(not 0.0 <= beta <= 1.0 for beta in betas):
        raise MoEConfigError(f"moe_skip_betas must be in [0, 1], got {text!r}")
    return betas


def moe_layers(cfg: Any) -> List[MoELayerSpec]:
    """The MoE layers of a model config (argparse Namespace, omegaconf or dict), encoder first."""
    specs: List[MoELayerSpec] = []
    default_count = int(config_value(cfg, "moe_expert_count", 0))
    for side in SIDES:
        indices = moe_layer_indices(cfg, side)
        counts = parse_counts(config_value(cfg, f"{side}_moe_expert_counts"))
        if counts is None:
            counts = [default_count] * len(indices)
        if len(counts) != len(indices):
            raise MoEConfigError(
                f"{side}_moe_expert_counts lists {len(counts)} counts but the {side} has "
                f"{len(indices)} MoE layers"
            )
        for layer, count in zip(indices, counts):
            if count < 1:
                raise MoEConfigError(f"{side} layer {layer} is an MoE layer but has {count} experts")
            specs.append(MoELayerSpec(side, layer, count))
    return specs

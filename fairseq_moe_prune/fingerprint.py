"""Which model statistics and calibration samples were gathered on: its MoE layers and a hash of its gates.

The recorder takes it from a built model, offline pruning from a checkpoint's weights; both come here,
so the two always agree on one model.
"""

from __future__ import annotations

import hashlib
from typing import List, Mapping

import torch
from torch import Tensor

from fairseq_moe_prune.models.layout import MoELayerSpec, moe_layers
from fairseq_moe_prune.stats import Fingerprint


def model_layout(model: torch.nn.Module) -> List[MoELayerSpec]:
    """The MoE layers of a built model, from its config (legacy models keep it in ``args``)."""
    config = getattr(model, "args", None) or getattr(model, "cfg", None)
    return moe_layers(config)


def gate_fingerprint(gate_weights: List[Tensor], specs: List[MoELayerSpec]) -> Fingerprint:
    """Hash the gates as fp16 bytes, so fp32 and fp16 copies of one model agree."""
    digest = hashlib.sha256()
    for weight in gate_weights:
        digest.update(weight.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return Fingerprint([(spec.prefix, spec.num_experts) for spec in specs], digest.hexdigest())


def model_fingerprint(model: torch.nn.Module) -> Fingerprint:
    """The fingerprint of a built model."""
    specs = model_layout(model)
    return gate_fingerprint([model.get_parameter(spec.gate_key) for spec in specs], specs)


def weights_fingerprint(weights: Mapping[str, Tensor], specs: List[MoELayerSpec]) -> Fingerprint:
    """The fingerprint of a checkpoint's weights (its ``model`` entry) with MoE layers ``specs``."""
    return gate_fingerprint([weights[spec.gate_key] for spec in specs], specs)

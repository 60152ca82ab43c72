"""Which model statistics and calibration samples were gathered on: its MoE layers, its gates and its experts.

The recorder takes it from a built model, offline pruning from a checkpoint's weights; both come here,
so the two always agree on one model.

What is fingerprinted is what the methods depend on. Statistics are counts of the gates' decisions (every
metric) and of the experts' outputs (REAP); calibration samples hold each layer's output, which the
reconstruction search compares with outputs of the checkpoint's experts. So both fingerprint the gates
(``gate_sha256``: every weight, as before) and the experts (``experts_sha256``): statistics or samples of a
model with the same gates but other experts (another training run, fine-tuned experts) are refused.

Experts are many (NLLB-200: 1,536 of 64 MiB each), so each expert tensor contributes its name, its shape
and three runs of :data:`SAMPLE` elements (its start, middle and end) rather than all its bytes: reading
them touches a few pages of a memory-mapped checkpoint, and a training step or a different initialisation
changes all of them. It tells models apart; it is not a defence against an edit made to fool it. (A
sharded checkpoint's expert records are read whole, once, as pruning reads them.) The layers below an MoE
layer also shape its inputs; they are left out as they change only together with the experts in practice.
All values are hashed as fp16 bytes, so fp32 and fp16 copies of one model agree.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, List, Mapping, Tuple

import torch
from torch import Tensor

from fairseq_moe_prune.layout import MoELayerSpec, moe_layers
from fairseq_moe_prune.stats import Fingerprint

SAMPLE = 64  # elements of each expert tensor hashed at its start, middle and end
EXPERT_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

# (layer prefix, expert id, {tensor name: tensor}) for every expert of every MoE layer, in any order
ExpertTensors = Iterable[Tuple[str, int, Mapping[str, Tensor]]]


def model_layout(model: torch.nn.Module) -> List[MoELayerSpec]:
    """The MoE layers of a built model, from its config (legacy models keep it in ``args``)."""
    config = getattr(model, "args", None) or getattr(model, "cfg", None)
    return moe_layers(config)


def half_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()


def tensor_sample(tensor: Tensor) -> Tensor:
    """The start, middle and end of a tensor (all of it when short), flat."""
    flat = tensor.detach().reshape(-1)
    count = flat.shape[0]
    if count <= 3 * SAMPLE:
        return flat
    middle = (count - SAMPLE) // 2
    return torch.cat([flat[:SAMPLE], flat[middle:middle + SAMPLE], flat[count - SAMPLE:]])


def gate_digest(gate_weights: Iterable[Tensor]) -> str:
    digest = hashlib.sha256()
    for weight in gate_weights:
        digest.update(half_bytes(weight))
    return digest.hexdigest()


def experts_digest(experts: ExpertTensors) -> str:
    """One digest of every expert's samples, whatever order they come in (a sharded checkpoint gives them
    rank file by rank file)."""
    parts = {}
    for prefix, expert, tensors in experts:
        digest = hashlib.sha256()
        for name in EXPERT_TENSORS:
            tensor = tensors[name]
            digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
            digest.update(half_bytes(tensor_sample(tensor)))
        parts[(prefix, expert)] = digest.digest()
    total = hashlib.sha256()
    for (prefix, expert), part in sorted(parts.items()):
        total.update(f"{prefix}:{expert}:".encode() + part)
    return total.hexdigest()


def weights_fingerprint(gate_weights: Iterable[Tensor], experts: ExpertTensors, specs: List[MoELayerSpec]) -> Fingerprint:
    """The fingerprint of MoE layers ``specs`` from their gate weights (layout order) and their experts'
    tensors."""
    return Fingerprint([(spec.prefix, spec.num_experts) for spec in specs], gate_digest(gate_weights),
                       experts_digest(experts))


def model_fingerprint(model: torch.nn.Module) -> Fingerprint:
    """The fingerprint of a built model (experts offloaded to the host included)."""
    specs = model_layout(model)
    experts = ((spec.prefix, expert, {name: model.get_parameter(spec.expert_key(expert, name))
                                      for name in EXPERT_TENSORS})
               for spec in specs for expert in range(spec.num_experts))
    return weights_fingerprint([model.get_parameter(spec.gate_key) for spec in specs], experts, specs)

"""Accumulate the gate decisions of a model's MoE layers, on the model's device.

The recorder never recomputes a routing: each MoE layer hands it the :class:`Routing` it used.
Counts of a batch are staged and only committed when the whole batch (encoder and decoder) is
done, so a file written after an interruption covers exactly the finished batches.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import Tensor

from fairseq_moe_prune.fingerprint import model_fingerprint, model_layout
from fairseq_moe_prune.moe.gate import Routing
from fairseq_moe_prune.moe.layer import Dispatch, MoELayer, RoutingRecord
from fairseq_moe_prune.stats import (
    PROB_SCALE,
    REAP_SCALE,
    LayerCounts,
    MoEStats,
    PairStats,
)


def routing_counts(routing: Routing, padding: Optional[Tensor], dispatch: Dispatch) -> List[Tensor]:
    """[tokens, then each of stats.COUNT_FIELDS] over real tokens.

    Pure tensor ops with no host synchronisation: padding is excluded by a 0/1 weight.
    """
    probs = routing.probs.float()
    num_tokens, num_experts = probs.shape
    real = torch.ones(num_tokens, dtype=torch.long, device=probs.device)
    if padding is not None:
        real = (~padding).long()
    fixed = torch.round(probs * PROB_SCALE).long() * real[:, None]
    first, second = routing.experts[:, 0], routing.experts[:, -1]
    zeros = torch.zeros(num_experts, dtype=torch.long, device=probs.device)

    top1 = zeros.scatter_add(0, first, real)
    prob_first = zeros.scatter_add(0, first, fixed.gather(1, first[:, None]).squeeze(1))
    if routing.experts.shape[1] > 1:
        top2 = top1.scatter_add(0, second, real)
        prob_second = zeros.scatter_add(0, second, fixed.gather(1, second[:, None]).squeeze(1))
    else:
        top2, prob_second = top1.clone(), zeros
    # rank of each expert per token, 0 = most probable; ties broken by lower id, as argmax does
    ranks = torch.argsort(torch.argsort(-probs, dim=1, stable=True), dim=1)
    rank_sum = (ranks * real[:, None]).sum(dim=0)
    # REAP: what each expert actually contributed, weight * output norm, over the tokens it ran on
    dispatched_real = real[dispatch.token_ids]
    routed = zeros.scatter_add(0, dispatch.experts, dispatched_real)
    saliency = torch.round(dispatch.weights.float() * dispatch.output_norms * REAP_SCALE).long() * dispatched_real
    reap_sum = zeros.scatter_add(0, dispatch.experts, saliency)
    skipped = zeros.clone()  # a tensor of its own: totals are added to in place
    if routing.skipped is not None:  # dynamic skipping: count the skipped second experts
        skipped = zeros.scatter_add(0, second, routing.skipped.long() * real)
    return [real.sum(), top1, top2, fixed.sum(dim=0), prob_first, prob_second, rank_sum, routed, reap_sum, skipped]


class Recorder:
    """Counts the decisions of ``model``'s MoE layers while :meth:`recording` a side."""

    def __init__(self, model: torch.nn.Module, settings: Dict[str, Any]):
        self.specs = model_layout(model)
        if not self.specs:
            raise ValueError("the model has no MoE layers to record")
        self.layers: List[MoELayer] = [model.get_submodule(spec.prefix) for spec in self.specs]
        self.fingerprint = model_fingerprint(model)
        self.settings = settings
        # per layer index: [tokens, *COUNT_FIELDS] tensors on the device
        self.pending: Dict[int, List[Tensor]] = {}
        self.committed: Dict[str, Dict[int, List[Tensor]]] = {}
        self.sentences: Dict[str, int] = {}
        # calibration samples of the same tokens (--moe-calibration-out), set by the recording hook
        self.calibration: Optional[Any] = None

    def _observer(self, index: int):
        def observe(record: RoutingRecord) -> None:
            if self.calibration is not None:
                self.calibration.observe(index, record)
            counts = routing_counts(record.routing, record.padding, record.dispatch)
            if index in self.pending:
                for total, count in zip(self.pending[index], counts):
                    total += count
            else:
                self.pending[index] = counts

        return observe

    @contextlib.contextmanager
    def recording(self, side: str) -> Iterator[None]:
        """Count the decisions of ``side``'s MoE layers ("encoder" or "decoder") inside the block.

        Only then do those layers have an observer, so nothing is spent on them otherwise.
        """
        chosen = [i for i, spec in enumerate(self.specs) if spec.side == side]
        for index in chosen:
            self.layers[index].observer = self._observer(index)
        try:
            yield
        finally:
            for index in chosen:
                self.layers[index].observer = None

    def no_drop_output(self, index: int, inputs: Tensor, probs: Tensor) -> Tensor:
        """Layer ``index``'s output for ``inputs`` (host float32) routed as the reconstruction search assumes:
        each token to its top-k experts by argmax of ``probs`` (ties to the lower id), weights renormalised,
        nothing dropped for capacity, through the layer's own experts and expert output masking."""
        layer = self.layers[index]
        weight = layer.gate.wg.weight
        top_k = min(1 if layer.gate.options.top1 else 2, probs.shape[1])
        experts = torch.argsort(-probs.double(), dim=1, stable=True)[:, :top_k]
        chosen = probs.double().gather(1, experts)
        weights = chosen / torch.clamp(chosen.sum(dim=1, keepdim=True), min=torch.finfo(torch.float64).tiny)
        routing = Routing(probs=probs.to(weight.device), experts=experts.to(weight.device),
                          weights=weights.to(weight.device, weight.dtype), dispatch_mask=weights.to(weight.device) != 0,
                          l_aux=torch.zeros((), device=weight.device))
        with torch.no_grad():
            combined, _ = layer.dispatch_and_combine(inputs.to(weight.device, weight.dtype), routing)
        return combined.float().cpu()

    def commit(self, pair: str, sentences: int) -> None:
        """The batch is complete: add its staged counts to ``pair``'s totals (still on the device)."""
        committed = self.committed.setdefault(pair, {})
        for index, batch in self.pending.items():
            if index in committed:
                for total, count in zip(committed[index], batch):
                    total += count
            else:
                committed[index] = batch
        self.pending = {}
        self.sentences[pair] = self.sentences.get(pair, 0) + sentences
        if self.calibration is not None:
            self.calibration.commit(pair)

    def discard(self) -> None:
        """Forget an unfinished batch."""
        self.pending = {}
        if self.calibration is not None:
            self.calibration.discard()

    def snapshot(self) -> MoEStats:
        """The committed counts as a statistics object (this copies them to the host)."""
        stats = MoEStats(self.fingerprint, dict(self.settings), {})
        for pair, sentences in self.sentences.items():
            layers = {}
            committed = self.committed.get(pair, {})
            for index, spec in enumerate(self.specs):
                if index in committed:
                    host = [t.cpu().numpy().astype(np.int64) for t in committed[index]]
                    layers[spec.prefix] = LayerCounts(int(host[0]), *host[1:])
                else:
                    layers[spec.prefix] = LayerCounts.zeros(spec.num_experts)
            stats.pairs[pair] = PairStats(int(sentences), layers)
        return stats

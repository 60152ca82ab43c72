"""Expert pruning by reconstruction loss (Lu et al., "Not All Experts are Equal", ACL 2024).

For one MoE layer and calibration tokens (input X, gate softmax P, output Z), the layer pruned to a
kept set S gives Z'(S): each token goes to its top-2 experts among S (the softmax restricted to S,
i.e. the pruned gate's), with the two weights renormalised, times NLLB's ``1 - eom``. The loss is
``||Z - Z'(S)||_F`` in float64, and the kept set minimises it.

Restricting the softmax and renormalising the top two leaves weights ``p_a / (p_a + p_b)`` of the
full softmax, so a token's error depends only on its pair (a, b):
``||z||^2 - 2 sum_i w_i <z, y_i> + sum_ij w_i w_j <y_i, y_j>`` with ``y_e`` expert e's (scaled) output.
Those inner products are computed once per layer from the experts' weights, and every candidate set
is then judged without touching an expert again. Sets are enumerated exactly when there are few
(``C(E, k) <= exact_limit``); otherwise a beam search (greedy at width 1) removes one expert at a
time, re-evaluating only the tokens whose top two contained the removed expert, and then swaps a kept
expert for a removed one while that helps. The importance ranking of the same tokens is always a
candidate too, so the result is never worse than it.

At NLLB-200's size the experts' evaluation is nearly all the cost (8.6 GFLOP per token and layer): it runs
on ``--search-device`` (cpu or cuda); :func:`layer_problem` states the measured CPU rate and what NLLB-200
costs on a CPU and on one GPU. The tokens a layer is judged on are bounded by ``calibration.POOL_TOKENS``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_moe_prune.ranking import SelectionError, metric_values, order_by_value
from fairseq_moe_prune.stats import PROB_SCALE, LayerCounts

EXACT_LIMIT = 5000  # enumerate every kept set when there are at most this many
BEAM = 4  # kept sets the search carries from one size to the next (1: greedy)
CHUNK_BYTES = 64 * 2**20  # expert outputs of at most this many bytes exist at once (on the CPU)
DEVICE_CHUNK_BYTES = 2**30  # on a GPU: larger chunks, so that each expert's product is one large matrix product
CPU = torch.device("cpu")
ENUMERATION_ELEMENTS = 2**22  # sets x tokens x experts judged at once by the enumeration


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def identity(x: Tensor) -> Tensor:
    return x


# fairseq's --activation-fn names (fairseq.utils.get_activation_fn), without importing fairseq
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "gelu_fast": gelu_tanh, "gelu_accurate": gelu_tanh,
    "tanh": torch.tanh, "linear": identity, "swish": F.silu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise SelectionError(f"--metric reconstruction does not know the activation {name!r}")
    return ACTIVATIONS[name]


def expert_outputs(inputs: Tensor, experts: Sequence[Mapping[str, Tensor]], activation_fn: Callable) -> Tensor:
    """(tokens, experts, dim) float32: every expert's FFN (fc1, activation, fc2) on every token."""
    outputs = []
    for weights in experts:
        hidden = activation_fn(F.linear(inputs, weights["fc1.weight"].float(), weights["fc1.bias"].float()))
        outputs.append(F.linear(hidden, weights["fc2.weight"].float(), weights["fc2.bias"].float()))
    return torch.stack(outputs, dim=1)


@dataclass
class LayerProblem:
    """What the search needs to know about one layer on its calibration tokens, all float64."""

    order: Tensor  # (n, E) experts by descending probability, ties to the lower id (as argmax)
    rank: Tensor  # (n, E) position of each expert in ``order``
    probs: Tensor  # (n, E) the gate's softmax over all experts
    zz: Tensor  # (n,) ||z||^2
    zy: Tensor  # (n, E) <z, y_e>
    gram: Tensor  # (n, E, E) <y_e, y_f>
    weights: Tensor  # (n,) how many tokens of the runs each sampled token stands for

    @property
    def num_experts(self) -> int:
        return int(self.probs.shape[1])


def search_device(name: str) -> torch.device:
    """``--search-device``: where the experts are evaluated on the calibration tokens (cpu, cuda, cuda:N)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SelectionError(f"--search-device: {name!r} is not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        raise SelectionError(f"--search-device: {name}: only cpu and cuda devices are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = 0 if device.index is None else device.index
    if index >= count:
        raise SelectionError(f"--search-device: {name} does not exist (this machine has {count} CUDA "
                             f"device{'s' if count != 1 else ''})")
    return torch.device("cuda", index)


def layer_problem(inputs: Tensor, probs: Tensor, outputs: Tensor, token_weights: Tensor,
                  experts: Sequence[Mapping[str, Tensor]], activation_fn: Callable, eom: float = 0.0,
                  device: torch.device = CPU) -> LayerProblem:
    """Run every expert once on the tokens (a chunk at a time, on ``device``) and keep only their inner
    products, on the CPU, where the search runs.

    The experts' outputs are nearly all the arithmetic: at NLLB-200's size (d_model 2,048, FFN 8,192, 128
    experts) 2 x 2 x 2,048 x 8,192 x 128 = 8.6 GFLOP per token and layer, float32; the inner products add
    128 x 128 x 2,048 x 2 = 0.07 GFLOP in float64. Measured (``scripts/bench_reconstruction.py --rate``: 256
    tokens x 2 experts at that width, 2 threads of the project's shared 2-core CPU under ``nice``, best of 3,
    noisy): 146 GFLOP/s by wall time (110 GFLOP per CPU second), i.e. 0.06 s per token and layer. NLLB-200
    with 200 directions of 2,048 calibration tokens: per pair or per language every token is judged once per
    layer, 409,600 x 12 x 8.6 GFLOP = 42 PFLOP, about 80 hours on such a CPU; one global set is bounded by
    ``calibration.POOL_TOKENS`` (32,768) tokens per layer, 3.4 PFLOP, about 6.4 hours. On one GPU (estimates
    from peak rates, not measured: float32 without TF32, PyTorch's default, is 67 TFLOP/s on an H100 SXM and
    19.5 on an A100; at 70% of peak) 42 PFLOP take about 15 minutes on an H100 and 51 on an A100, 3.4 PFLOP
    one to four minutes; copying each layer's 128 experts to the GPU (8.6 GB in fp16) adds seconds. The
    search itself stays on the CPU: it judges sets from the inner products and never touches an expert again.

    On the CPU the result is the same, bit for bit, whatever ``device`` says there; on a GPU the products
    round differently, so losses differ in the last bits (and a set can change only where two tie that
    closely).
    """
    num_tokens, dim = inputs.shape
    num_experts = len(experts)
    if probs.shape != (num_tokens, num_experts):
        raise SelectionError(f"calibration has {probs.shape[1]} experts per token but the layer has {num_experts}")
    chunk_bytes = CHUNK_BYTES
    if device.type != "cpu":
        experts = [{name: tensor.to(device) for name, tensor in weights.items()} for weights in experts]
        chunk_bytes = DEVICE_CHUNK_BYTES
    chunk = max(1, chunk_bytes // max(1, num_experts * dim * 4))
    zy = torch.empty(num_tokens, num_experts, dtype=torch.float64)
    gram = torch.empty(num_tokens, num_experts, num_experts, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, num_tokens, chunk):
            end = min(start + chunk, num_tokens)
            y = expert_outputs(inputs[start:end].to(device).float(), experts, activation_fn).double() * (1.0 - eom)
            z = outputs[start:end].to(device).double()
            zy[start:end] = torch.bmm(y, z[:, :, None]).squeeze(2)
            gram[start:end] = torch.bmm(y, y.transpose(1, 2))
    probs = probs.double()
    order = torch.argsort(-probs, dim=1, stable=True)
    return LayerProblem(
        order=order,
        rank=torch.argsort(order, dim=1),
        probs=probs,
        zz=(outputs.double() ** 2).sum(dim=1),
        zy=zy,
        gram=gram,
        weights=token_weights.double(),
    )


def pair_loss(problem: LayerProblem, rows: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Squared error of each token in ``rows`` sent to experts (first, second); second -1: first alone."""
    single = second < 0
    second = torch.where(single, first, second)
    p_first = problem.probs[rows, first]
    p_second = torch.where(single, torch.zeros_like(p_first), problem.probs[rows, second])
    denom = torch.clamp(p_first + p_second, min=torch.finfo(torch.float64).tiny)
    w1 = torch.where(single, torch.ones_like(p_first), p_first / denom)
    w2 = torch.where(single, torch.zeros_like(p_first), p_second / denom)
    cross = problem.zy[rows, first] * w1 + problem.zy[rows, second] * w2
    g11 = problem.gram[rows, first, first]
    g12 = problem.gram[rows, first, second]
    g22 = problem.gram[rows, second, second]
    return problem.zz[rows] - 2 * cross + w1 * w1 * g11 + 2 * w1 * w2 * g12 + w2 * w2 * g22


def first_kept(order: Tensor, kept: Tensor, count: int = 3) -> Tensor:
    """(rows, count): each token's ``count`` most probable kept experts, -1 where there are fewer."""
    kept_in_order = kept[order]
    ranks = kept_in_order.cumsum(dim=1)
    columns = []
    for rank in range(1, count + 1):
        hit = kept_in_order & (ranks == rank)
        position = hit.to(torch.int8).argmax(dim=1)
        expert = order.gather(1, position[:, None]).squeeze(1)
        columns.append(torch.where(hit.any(dim=1), expert, torch.full_like(expert, -1)))
    return torch.stack(columns, dim=1)


@dataclass
class SearchState:
    kept: Tensor  # (E,) bool
    top: Tensor  # (n, 3) each token's three most probable kept experts (-1: none)
    token_loss: Tensor  # (n,) squared error of each token
    total: float  # weighted sum of token_loss

    @property
    def kept_ids(self) -> List[int]:
        return torch.nonzero(self.kept).squeeze(1).tolist()


def evaluate(problem: LayerProblem, kept: Tensor) -> SearchState:
    rows = torch.arange(problem.probs.shape[0])
    top = first_kept(problem.order, kept)
    token_loss = pair_loss(problem, rows, top[:, 0], top[:, 1])
    return SearchState(kept, top, token_loss, float((problem.weights * token_loss).sum()))


def removal_deltas(problem: LayerProblem, state: SearchState) -> Tensor:
    """(E,) how much the weighted loss grows when each kept expert is removed (+inf: not kept)."""
    num_experts = problem.num_experts
    deltas = torch.zeros(num_experts, dtype=torch.float64)
    if int(state.kept.sum()) >= 2:
        rows = torch.arange(problem.probs.shape[0])
        first, second, third = state.top[:, 0], state.top[:, 1], state.top[:, 2]
        without_first = pair_loss(problem, rows, second, third) - state.token_loss
        without_second = pair_loss(problem, rows, first, third) - state.token_loss
        deltas.scatter_add_(0, first, problem.weights * without_first)
        deltas.scatter_add_(0, second, problem.weights * without_second)
    return torch.where(state.kept, deltas, torch.full_like(deltas, math.inf))


def remove(problem: LayerProblem, state: SearchState, expert: int) -> SearchState:
    """The state without ``expert``: only tokens that had it among their first three kept change."""
    kept = state.kept.clone()
    kept[expert] = False
    rows = torch.nonzero((state.top == expert).any(dim=1)).squeeze(1)
    return reevaluate(problem, state, kept, rows)


def reevaluate(problem: LayerProblem, state: SearchState, kept: Tensor, rows: Tensor) -> SearchState:
    """The state for the kept set ``kept``, where only the tokens ``rows`` can have changed experts."""
    top = state.top.clone()
    token_loss = state.token_loss.clone()
    if len(rows):
        top[rows] = first_kept(problem.order[rows], kept)
        token_loss[rows] = pair_loss(problem, rows, top[rows, 0], top[rows, 1])
    return SearchState(kept, top, token_loss, float((problem.weights * token_loss).sum()))


def add(problem: LayerProblem, state: SearchState, expert: int) -> SearchState:
    """The state with ``expert`` back: only tokens that rank it above their third kept expert change."""
    kept = state.kept.clone()
    kept[expert] = True
    rank = problem.rank[:, expert]
    third = state.top[:, 2]
    third_rank = torch.where(third < 0, torch.full_like(rank, problem.num_experts),
                             problem.rank.gather(1, third.clamp(min=0)[:, None]).squeeze(1))
    rows = torch.nonzero(rank < third_rank).squeeze(1)
    return reevaluate(problem, state, kept, rows)


def addition_deltas(problem: LayerProblem, state: SearchState) -> Tensor:
    """(E,) how much the weighted loss changes when each removed expert comes back (+inf: kept)."""
    num_tokens, num_experts = problem.probs.shape
    first, second = state.top[:, 0], state.top[:, 1]
    first_rank = problem.rank.gather(1, first[:, None])
    second_rank = torch.where(second[:, None] < 0, torch.full_like(first_rank, num_experts),
                              problem.rank.gather(1, second.clamp(min=0)[:, None]))
    candidates = torch.arange(num_experts).expand(num_tokens, num_experts)
    above_first = problem.rank < first_rank
    new_first = torch.where(above_first, candidates, first[:, None].expand(num_tokens, num_experts))
    new_second = torch.where(above_first, first[:, None].expand(num_tokens, num_experts), candidates)
    changed = (problem.rank < second_rank) & ~state.kept[None, :]
    rows, experts = torch.nonzero(changed, as_tuple=True)
    deltas = torch.zeros(num_experts, dtype=torch.float64)
    if len(rows):
        loss = pair_loss(problem, rows, new_first[rows, experts], new_second[rows, experts])
        deltas.scatter_add_(0, experts, problem.weights[rows] * (loss - state.token_loss[rows]))
    return torch.where(state.kept, torch.full_like(deltas, math.inf), deltas)


def refine(problem: LayerProblem, state: SearchState, tries: int = 32, max_rounds: int = 100) -> SearchState:
    """Swap a kept expert for a removed one while that lowers the loss (first improvement among the
    ``tries`` swaps that look best when removal and addition are judged separately)."""
    for _ in range(max_rounds):
        removal = removal_deltas(problem, state).tolist()
        addition = addition_deltas(problem, state).tolist()
        swaps = sorted((removal[i] + addition[j], i, j) for i in range(problem.num_experts) if removal[i] != math.inf
                       for j in range(problem.num_experts) if addition[j] != math.inf)
        better = None
        for _, out, back in swaps[:tries]:
            candidate = add(problem, remove(problem, state, out), back)
            if candidate.total < state.total - 1e-12 * max(1.0, abs(state.total)):
                better = candidate
                break
        if better is None:
            return state
        state = better
    return state


def beam_search(problem: LayerProblem, keep: int, width: int = 1) -> SearchState:
    """Remove experts one at a time, keeping the ``width`` best sets at each size (width 1: greedy)."""
    beam = [evaluate(problem, torch.ones(problem.num_experts, dtype=torch.bool))]
    for _ in range(problem.num_experts - keep):
        candidates = []
        for index, state in enumerate(beam):
            for expert, delta in enumerate(removal_deltas(problem, state).tolist()):
                if delta != math.inf:
                    candidates.append((state.total + delta, index, expert))
        candidates.sort()
        chosen, seen = [], set()
        for _, index, expert in candidates:
            kept = beam[index].kept.clone()
            kept[expert] = False
            signature = bytes(kept.numpy())
            if signature not in seen:
                seen.add(signature)
                chosen.append((index, expert))
            if len(chosen) == width:
                break
        beam = [remove(problem, beam[index], expert) for index, expert in chosen]
    return min(beam, key=lambda state: (state.total, state.kept_ids))


def set_totals(problem: LayerProblem, kept: Tensor) -> Tensor:
    """(B,) weighted squared loss of each of B kept sets (B, E) of one size, judged all at once."""
    num_sets = kept.shape[0]
    num_tokens, num_experts = problem.probs.shape
    # each token's preference as a score without ties (lower id first among equal probabilities)
    score = (num_experts - problem.rank).double()[None].expand(num_sets, num_tokens, num_experts)
    top = score.masked_fill(~kept[:, None, :], -math.inf).topk(min(2, int(kept[0].sum())), dim=2).indices
    first = top[:, :, 0].reshape(-1)
    second = top[:, :, 1].reshape(-1) if top.shape[2] > 1 else torch.full_like(first, -1)
    rows = torch.arange(num_tokens).repeat(num_sets)
    return (pair_loss(problem, rows, first, second).view(num_sets, num_tokens) * problem.weights).sum(dim=1)


def enumerate_sets(problem: LayerProblem, keep: int) -> SearchState:
    """Every kept set of size ``keep``, in batches; the first of the best in lexicographic order wins ties."""
    num_tokens, num_experts = problem.probs.shape
    batch = max(1, ENUMERATION_ELEMENTS // max(1, num_tokens * num_experts))
    combinations = itertools.combinations(range(num_experts), keep)
    best_total, best_ids = math.inf, None
    while True:
        chunk = list(itertools.islice(combinations, batch))
        if not chunk:
            break
        kept = torch.zeros(len(chunk), num_experts, dtype=torch.bool)
        kept[torch.arange(len(chunk)).repeat_interleave(keep), torch.tensor(chunk).reshape(-1)] = True
        totals = set_totals(problem, kept)
        index = int(torch.argmin(totals))
        if float(totals[index]) < best_total:
            best_total, best_ids = float(totals[index]), chunk[index]
    kept = torch.zeros(num_experts, dtype=torch.bool)
    kept[list(best_ids)] = True
    return evaluate(problem, kept)


def importance_set(problem: LayerProblem, keep: int) -> List[int]:
    """The ``keep`` most important experts (ranking.py's importance) on the same tokens."""
    probs = problem.probs
    first = probs.argmax(dim=1)
    num_experts = problem.num_experts
    top1 = torch.bincount(first, minlength=num_experts).numpy().astype(np.int64)
    prob_first = torch.zeros(num_experts, dtype=torch.float64).scatter_add_(0, first, probs.max(dim=1).values)
    counts = LayerCounts.zeros(num_experts)
    counts.tokens = int(probs.shape[0])
    counts.top1 = top1
    counts.prob_first_sum = np.round(prob_first.numpy() * PROB_SCALE).astype(np.int64)
    return sorted(order_by_value(metric_values(counts, "importance"))[:keep])


@dataclass
class SearchResult:
    kept: List[int]  # ascending original ids
    loss: float  # ||Z - Z'(S)||_F over the (weighted) calibration tokens
    method: str  # "exact", "greedy", "beam-W" or "importance" (when the importance set was better)
    removal_cost: List[float]  # per kept expert: growth of the squared loss if it alone were removed


def search(problem: LayerProblem, keep: int, exact_limit: int = EXACT_LIMIT, beam: int = BEAM) -> SearchResult:
    """The kept set of size ``keep`` with the least reconstruction loss that the search finds."""
    num_experts = problem.num_experts
    if not 1 <= keep <= num_experts:
        raise SelectionError(f"cannot keep {keep} of {num_experts} experts in a layer")
    if problem.probs.shape[0] == 0:
        raise SelectionError("no calibration tokens to judge the layer on")
    if math.comb(num_experts, keep) <= exact_limit:
        state, method = enumerate_sets(problem, keep), "exact"
    else:
        state, method = beam_search(problem, keep, beam), "greedy" if beam == 1 else f"beam-{beam}"
        state = refine(problem, state)
        kept = torch.zeros(num_experts, dtype=torch.bool)
        kept[importance_set(problem, keep)] = True
        baseline = evaluate(problem, kept)
        if baseline.total < state.total:
            state, method = baseline, "importance"
    costs = removal_deltas(problem, state)
    ids = state.kept_ids
    return SearchResult(ids, math.sqrt(max(state.total, 0.0)), method,
                        [float(costs[e]) if keep > 1 else 0.0 for e in ids])


def set_loss(problem: LayerProblem, kept_ids: Sequence[int]) -> float:
    """||Z - Z'(S)||_F of a given kept set."""
    kept = torch.zeros(problem.num_experts, dtype=torch.bool)
    kept[list(kept_ids)] = True
    return math.sqrt(max(evaluate(problem, kept).total, 0.0))


def reconstruct(inputs: Tensor, probs: Tensor, experts: Sequence[Mapping[str, Tensor]], kept_ids: Sequence[int],
                activation_fn: Callable, eom: float = 0.0) -> Tensor:
    """Z'(S) itself, token by token in float64 (for tests and inspection; the search never forms it)."""
    kept = torch.zeros(len(experts), dtype=torch.bool)
    kept[list(kept_ids)] = True
    probs = probs.double()
    top = first_kept(torch.argsort(-probs, dim=1, stable=True), kept, 2)
    y = expert_outputs(inputs.float(), experts, activation_fn).double() * (1.0 - eom)
    rows = torch.arange(inputs.shape[0])
    first, second = top[:, 0], torch.where(top[:, 1] < 0, top[:, 0], top[:, 1])
    p1 = probs[rows, first]
    p2 = torch.where(top[:, 1] < 0, torch.zeros_like(p1), probs[rows, second])
    w1, w2 = p1 / (p1 + p2), p2 / (p1 + p2)
    return w1[:, None] * y[rows, first] + w2[:, None] * y[rows, second]


def skip_ratios(probs: Tensor, kept_ids: Sequence[int]) -> Tensor:
    """w2 / w1 of each token's two most probable experts among the kept (the pruned gate's softmax)."""
    kept = probs.double()[:, list(kept_ids)]
    if kept.shape[1] < 2:
        return torch.zeros(kept.shape[0], dtype=torch.float64)
    top = kept.topk(2, dim=1).values
    return top[:, 1] / torch.clamp(top[:, 0], min=torch.finfo(torch.float64).tiny)


def median_skip_beta(probs: Tensor, token_weights: Tensor, kept_ids: Sequence[int]) -> float:
    """beta for dynamic skipping: the (weighted, lower) median of w2/w1 over the calibration tokens."""
    if probs.shape[0] == 0:
        raise SelectionError("no calibration tokens to take the median of")
    ratios = skip_ratios(probs, kept_ids)
    order = torch.argsort(ratios, stable=True)
    cumulative = torch.cumsum(token_weights.double()[order], dim=0)
    index = int(torch.searchsorted(cumulative, cumulative[-1] / 2))
    return float(ratios[order][min(index, len(order) - 1)])

#!/usr/bin/env python
"""One MoE layer against a dense FFN of the same active width, timed side by side.

The MoE layer has 16 experts (model dim 128, FFN 512, top-2, the main job's gating: fp32 softmax,
second expert "all", eval capacity fraction 1.0); the dense FFN has width 1024, so both do the same
arithmetic per token. Cases: inference on one decoding step of 16, 64 and 256 tokens (one token
per sentence and beam), inference on 4,096 tokens (an encoder batch), and forward + backward on
4,096 tokens in training mode. Each case alternates the two modules call by call and reports the
median of repeated timings. Inference cases also time the layer's experts alone on the tokens its gate
routes to them (no gate, dispatch or combine): what is left of the gap to the dense FFN is then the
experts' own arithmetic, which at a decoding step reads all routed experts' weights (8 times the dense
FFN's bytes when all 16 experts are used) in small matrix products; and the same arithmetic as one
batched product over stacked weights (what a layer storing its experts stacked could approach).

The headline lines read ``ratio to dense, <case>: X`` where X = dense FFN time / MoE layer time:
higher is better, 1.0 means the MoE layer is as fast as the dense FFN it replaces (its routing
costs nothing), 0.5 means it takes twice as long. CPU runs use 2 threads; when CUDA is available
the same cases run on the GPU too (lines ``ratio to dense on GPU, ...``). Wall-clock times are the
headline; CPU-time ratios are printed beside them, since on a shared machine they are steadier.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_moe_prune.moe.layer import Expert, GateOptions, MoELayer  # noqa: E402

DIM, FFN, EXPERTS = 128, 512, 16
DENSE_FFN = 2 * FFN  # top-2: each token runs two experts of width FFN
CASES = [("decode 16 tokens", 16, False), ("decode 64 tokens", 64, False), ("decode 256 tokens", 256, False),
         ("inference 4096 tokens", 4096, False), ("training 4096 tokens", 4096, True)]


def build(device: str) -> Tuple[MoELayer, Expert]:
    torch.manual_seed(0)
    options = GateOptions(use_fp32=True, second_expert_policy="all", eval_capacity_token_fraction=1.0)
    moe = MoELayer(DIM, FFN, EXPERTS, options).to(device)
    dense = Expert(DIM, DENSE_FFN, "relu", 0.0).to(device)
    return moe, dense


def step(module: torch.nn.Module, x: torch.Tensor, training: bool) -> None:
    if training:
        output = module(x)
        if isinstance(module, MoELayer):
            output, _ = output  # (output, load-balancing loss)
        output.sum().backward()
    else:
        with torch.no_grad():
            module(x)


def timed(module: torch.nn.Module, x: torch.Tensor, training: bool, calls: int, device: str) -> Tuple[float, float]:
    """(wall, CPU) seconds per call over ``calls`` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        step(module, x, training)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


class ExpertsAlone(torch.nn.Module):
    """The layer's experts on the chunks its gate routes ``x`` to, without the gate, dispatch or combine:
    the floor of the MoE layer's time with per-expert kernels (at inference unused experts are skipped)."""

    def __init__(self, moe: MoELayer, x: torch.Tensor):
        super().__init__()
        self.moe = moe
        with torch.no_grad():
            tokens = x.reshape(-1, x.shape[-1])
            routing = moe.gate(tokens, None)
            keys, order = torch.sort(routing.experts.reshape(-1), stable=True)
            counts = torch.bincount(keys, minlength=moe.num_experts).tolist()
            top_k = routing.experts.shape[1]
            self.chunks = tokens[torch.div(order, top_k, rounding_mode="floor")].split(counts)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [expert(chunk) for expert, chunk in zip(self.moe.experts, self.chunks) if chunk.shape[0] > 0]


class BatchedExpertsAlone(ExpertsAlone):
    """The same arithmetic as one batched product per matrix (``torch.baddbmm``) over weights stacked once
    (experts, in, out) and each expert's tokens padded to the largest group, all built outside the timing:
    what a layer could approach if it kept its experts stacked instead of as NLLB's per-expert modules."""

    def __init__(self, moe: MoELayer, x: torch.Tensor):
        super().__init__(moe, x)
        experts = list(moe.experts)
        self.fc1_weight = torch.stack([e.fc1.weight.t() for e in experts])  # (E, dim, ffn)
        self.fc1_bias = torch.stack([e.fc1.bias for e in experts])[:, None, :]
        self.fc2_weight = torch.stack([e.fc2.weight.t() for e in experts])  # (E, ffn, dim)
        self.fc2_bias = torch.stack([e.fc2.bias for e in experts])[:, None, :]
        largest = max(chunk.shape[0] for chunk in self.chunks)
        self.padded = x.new_zeros(len(experts), largest, x.shape[-1])
        for j, chunk in enumerate(self.chunks):
            self.padded[j, : chunk.shape[0]] = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.baddbmm(self.fc1_bias, self.padded, self.fc1_weight))
        return torch.baddbmm(self.fc2_bias, hidden, self.fc2_weight)


def run_case(tokens: int, training: bool, device: str, repeats: int) -> Tuple[float, ...]:
    """Median (dense wall, MoE wall, dense CPU, MoE CPU, experts-alone wall, experts-alone batched wall)
    seconds per call (experts alone: inference cases only, else 0)."""
    moe, dense = build(device)
    moe.train(training)
    dense.train(training)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, 1, DIM, generator=generator).to(device).requires_grad_(training)
    calls = max(1, 512 // tokens) if not training else 1
    for _ in range(3):  # warm up both
        timed(dense, x, training, calls, device)
        timed(moe, x, training, calls, device)
    alone = None if training else ExpertsAlone(moe, x)
    batched = None if training else BatchedExpertsAlone(moe, x)
    samples: List[Tuple[float, ...]] = []
    for _ in range(repeats):
        dense_wall, dense_cpu = timed(dense, x, training, calls, device)
        moe_wall, moe_cpu = timed(moe, x, training, calls, device)
        alone_wall = 0.0 if alone is None else timed(alone, x, training, calls, device)[0]
        batched_wall = 0.0 if batched is None else timed(batched, x, training, calls, device)[0]
        samples.append((dense_wall, moe_wall, dense_cpu, moe_cpu, alone_wall, batched_wall))
    return tuple(statistics.median(s[i] for s in samples) for i in range(6))


def report(device: str, repeats: int, print_line: Callable[[str], None]) -> None:
    suffix = "" if device == "cpu" else " on GPU"
    for name, tokens, training in CASES:
        dense_wall, moe_wall, dense_cpu, moe_cpu, alone_wall, batched_wall = run_case(tokens, training, device, repeats)
        print_line(f"  {name}: dense {dense_wall * 1e3:.3f} ms, MoE {moe_wall * 1e3:.3f} ms per call"
                   + (f" (CPU time: dense {dense_cpu * 1e3:.3f} ms, MoE {moe_cpu * 1e3:.3f} ms, "
                      f"ratio {dense_cpu / moe_cpu:.2f})" if device == "cpu" else ""))
        if alone_wall > 0:
            print_line(f"  {name}: the experts alone on the same routed tokens {alone_wall * 1e3:.3f} ms "
                       f"(gate, dispatch and combine take {100 * (1 - alone_wall / moe_wall):.0f}% of the MoE layer); "
                       f"as one batched product over stacked weights {batched_wall * 1e3:.3f} ms "
                       f"(dense / that: {dense_wall / batched_wall:.2f})")
        print_line(f"ratio to dense{suffix}, {name}: {dense_wall / moe_wall:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="timings per case and module (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"MoE layer: {EXPERTS} experts, dim {DIM}, FFN {FFN}, top-2; dense FFN width {DENSE_FFN}; "
          f"CPU threads {args.threads}; ratio = dense time / MoE time (higher is better, 1.0 = as fast as dense)")
    report("cpu", args.repeats, print)
    if torch.cuda.is_available():
        report("cuda", args.repeats, print)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How long does the reconstruction-loss search take on an NLLB-shaped model, and in how much memory?

Builds a random checkpoint with NLLB-200's MoE layout (24+24 layers, an MoE layer every 4th: 12 MoE
layers of 128 experts) at small width, and calibration samples for one language pair whose outputs
come from the real MoE layer (inputs random, gate softmax and outputs computed by
``fairseq_moe_prune.moe.layer.MoELayer``). Then runs the real ``prune --metric reconstruction``
(80% pruned, 3:1: 36 experts kept per encoder layer, 12 per decoder layer, one global set) and prints
its wall time, and peak memory beside the size of one layer's search data. Then judges one layer on a
global view of ``--directions`` pairs (200, as NLLB-200's directions, of ``--tokens`` each: 409,600 tokens)
and prints the peak RSS of pooling, evaluating and searching it beside the stated bound
(``calibration.POOL_TOKENS`` tokens of search data and pooled samples).

``--rate`` instead times the experts' evaluation at NLLB-200's width (d_model 2,048, FFN 8,192) and projects
what the search's expert evaluation costs for NLLB-200 on this CPU.

Example: python scripts/bench_reconstruction.py --work /tmp/bench_reconstruction
"""

import argparse
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fairseq_moe_prune import calibration, reconstruction  # noqa: E402
from fairseq_moe_prune.layout import moe_layers  # noqa: E402
from fairseq_moe_prune.moe.layer import GateOptions, MoELayer  # noqa: E402
from fairseq_moe_prune.pruning import PruneOptions, prune  # noqa: E402
from fairseq_moe_prune.fingerprint import weights_fingerprint  # noqa: E402


def build(work: Path, dim: int, ffn: int, experts: int, tokens: int, seed: int) -> None:
    config = {"_name": "moe_transformer", "arch": "moe_transformer", "encoder_layers": 24, "decoder_layers": 24,
              "moe_freq": 4, "moe_expert_count": experts, "activation_fn": "relu", "moe_eom": 0.2,
              "moe_gating_use_fp32": True, "moe_second_expert_policy": "all",
              "moe_eval_capacity_token_fraction": 1.0}
    specs = moe_layers(config)
    options = GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True)
    torch.manual_seed(seed)
    weights, samples, gates, experts = {}, {}, [], []
    for spec in specs:
        layer = MoELayer(dim, ffn, experts, options, eom=0.2).eval()
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.normal_(0, 0.3)
            x = torch.randn(tokens, dim)
            probs = layer.gate(x, None).probs
            z = layer(x[None])[0][0]
        for name, tensor in layer.state_dict().items():
            weights[f"{spec.prefix}.{name}"] = tensor.clone()
        gates.append(layer.gate.wg.weight)
        experts.extend((spec.prefix, e, dict(expert.named_parameters())) for e, expert in enumerate(layer.experts))
        samples[spec.prefix] = calibration.LayerSample(x, probs, z, torch.rand(tokens, dtype=torch.float64).sort().values,
                                                       tokens)
    state = {"cfg": {"model": config}, "args": None, "model": weights, "optimizer_history": [],
             "extra_state": {}, "last_optimizer_state": None}
    torch.save(state, work / "model.pt")
    settings = {"beam": 1, "decoder_tokens": "hypothesis", "eval_capacity_token_fraction": 1.0, "tokens": tokens}
    fingerprint = weights_fingerprint(gates, experts, specs)
    calibration.save(calibration.Calibration(fingerprint, settings, {"eng_Latn-deu_Latn": samples}),
                     str(work / "calibration" / "eng_Latn-deu_Latn.safetensors"))


def rate(tokens: int, experts: int, dim: int = 2048, ffn: int = 8192) -> None:
    """Time reconstruction.expert_outputs at NLLB-200's width and project the search's expert evaluation."""
    generator = torch.Generator().manual_seed(0)
    weights = [{"fc1.weight": torch.randn(ffn, dim, generator=generator) * 0.02, "fc1.bias": torch.zeros(ffn),
                "fc2.weight": torch.randn(dim, ffn, generator=generator) * 0.02, "fc2.bias": torch.zeros(dim)}
               for _ in range(experts)]
    inputs = torch.randn(tokens, dim, generator=generator)
    activation = reconstruction.activation("relu")
    reconstruction.expert_outputs(inputs[:8], weights[:1], activation)  # warm-up
    runs, cpu = [], []
    for _ in range(3):
        start, start_cpu = time.perf_counter(), time.process_time()
        reconstruction.expert_outputs(inputs, weights, activation)
        runs.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    flop = 2 * 2 * dim * ffn * tokens * experts
    wall_rate = flop / min(runs) / 1e9
    # on a shared machine the wall time measures the other jobs too: the CPU time this process got is a
    # truer measure of what a core does, and an unshared machine has torch.get_num_threads() of them
    core_rate = flop / min(cpu) / 1e9
    threads = torch.get_num_threads()
    per_token = 2 * 2 * dim * ffn * 128 / 1e9  # GFLOP per token and layer, 128 experts
    nllb_tokens = 200 * 2048 * 12  # every calibration token of 200 directions, judged once per MoE layer
    bounded = calibration.POOL_TOKENS * 12  # one global set: the pool bound per layer
    print(f"expert evaluation at d_model {dim}, FFN {ffn}: {tokens} tokens x {experts} experts, {threads} threads: "
          f"wall {', '.join(f'{t:.2f}' for t in runs)} s, CPU {', '.join(f'{t:.2f}' for t in cpu)} s -> "
          f"{wall_rate:.1f} GFLOP/s by wall time, {core_rate:.1f} GFLOP per CPU second (best of 3)")
    for label, speed in (("wall-time rate", wall_rate), (f"{threads} cores at the CPU-time rate", core_rate * threads)):
        print(f"NLLB-200 (200 directions x 2,048 tokens, 12 MoE layers, {per_token:.1f} GFLOP per token and layer) "
              f"at the {label} ({speed:.1f} GFLOP/s): per pair or per language "
              f"{nllb_tokens * per_token / speed / 3600:.0f} h; one global set (pool bound {calibration.POOL_TOKENS}) "
              f"{bounded * per_token / speed / 3600:.1f} h")


def pooled_view(dim: int, experts: int, tokens: int, directions: int, limit: int, beam: int) -> None:
    """Peak RSS of judging one layer on a global view of ``directions`` pairs of ``tokens`` tokens each."""
    config = {"encoder_layers": 24, "decoder_layers": 24, "moe_freq": 4, "moe_expert_count": experts}
    spec = moe_layers(config)[0]
    options = GateOptions(second_expert_policy="all", eval_capacity_token_fraction=1.0, use_fp32=True)
    torch.manual_seed(1)
    layer = MoELayer(dim, 4 * dim, experts, options, eom=0.2).eval()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0, 0.3)
    languages = [f"l{chr(97 + i // 26)}{chr(97 + i % 26)}_Latn" for i in range(directions)]
    pairs = {}
    with torch.no_grad():
        for i, source in enumerate(languages):
            x = torch.randn(tokens, dim)
            sample = calibration.LayerSample(x, layer.gate(x, None).probs, layer(x[None])[0][0],
                                             torch.rand(tokens, dtype=torch.float64).sort().values, 4 * tokens)
            pairs[f"{source}-{languages[(i + 1) % directions]}"] = {spec.prefix: sample}
    experts_weights = [{name: tensor.detach() for name, tensor in expert.named_parameters()}
                       for expert in layer.experts]
    data = calibration.Calibration(None, {"tokens": tokens}, pairs)
    del pairs
    before = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    pooled, _ = calibration.view(data, "global", "global", spec.prefix, limit)
    problem = reconstruction.layer_problem(pooled.inputs, pooled.probs, pooled.outputs, pooled.weights,
                                           experts_weights, reconstruction.activation("relu"), 0.2)
    result = reconstruction.search(problem, 36, beam=beam)
    wall = time.perf_counter() - start
    peak = status("VmHWM") - before
    view_tokens = directions * tokens
    # stated bound: the search data and pooled samples of ``limit`` tokens, plus one chunk of expert outputs
    # in layer_problem (float32, its float64 copy and the scaled copy: 5 x CHUNK_BYTES, and the chunk's inner
    # products); at the toy's width a chunk is 2,048 tokens, at NLLB's 64
    chunk = min(limit, max(1, reconstruction.CHUNK_BYTES // (experts * dim * 4)))
    working = 5 * reconstruction.CHUNK_BYTES + chunk * experts * experts * 8
    bound = limit * experts * (experts + 4) * 8 + limit * (2 * dim + experts) * 4 + working
    unbounded = view_tokens * experts * (experts + 4) * 8
    print(f"pooled view: {directions} directions x {tokens} tokens = {view_tokens} tokens of one layer "
          f"({experts} experts, dim {dim}); pool bound {limit}: judged on {pooled.size} tokens (weight "
          f"{float(pooled.weights.sum()):.0f} = {directions * 4 * tokens} seen); search ({result.method}) {wall:.1f} s")
    verdict = "holds" if peak <= bound else "EXCEEDED"
    print(f"peak RSS above the loaded samples {peak / 2**20:.0f} MiB = {peak / bound:.2f} x the stated bound "
          f"({bound / 2**20:.0f} MiB: search data + pooled samples + one chunk of expert outputs, "
          f"{working / 2**20:.0f} MiB): the bound {verdict}; unbounded, the search data alone would be "
          f"{unbounded / 2**30:.1f} GiB")


def status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: now; VmHWM: peak since the last reset_peak)."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current RSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench_reconstruction")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens per layer")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", action="store_true",
                        help="instead: time expert evaluation at NLLB-200's width (d_model 2048, FFN 8192) and "
                             "project what the search's expert evaluation costs for NLLB-200")
    parser.add_argument("--rate-tokens", type=int, default=256)
    parser.add_argument("--rate-experts", type=int, default=2)
    parser.add_argument("--directions", type=int, default=200,
                        help="pairs of the pooled view whose peak RSS is measured after the search (0: skip)")
    parser.add_argument("--pool-tokens", type=int, default=calibration.POOL_TOKENS,
                        help="the pool bound for the pooled view (default calibration.POOL_TOKENS)")
    parser.add_argument("--pooled-view-only", action="store_true", help="measure only the pooled view")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rate:
        rate(args.rate_tokens, args.rate_experts)
        return
    if args.pooled_view_only:
        pooled_view(args.dim, args.experts, args.tokens, args.directions, args.pool_tokens, args.beam)
        return
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "calibration").mkdir(parents=True)
    build(work, args.dim, args.ffn, args.experts, args.tokens, seed=0)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    manifest = prune(str(work / "model.pt"), str(work / "pruned"),
                     PruneOptions(metric="reconstruction", granularity="global", prune_fraction=0.8, ratio="3:1",
                                  beam=args.beam),
                     calibration_path=str(work / "calibration"))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output = manifest["outputs"]["global"]
    kept = sorted({len(layer["kept"]) for layer in output["layers"].values()}, reverse=True)
    problem_bytes = args.tokens * args.experts * (args.experts + 2) * 8
    sample_bytes = args.tokens * (2 * args.dim + args.experts) * 4
    print(f"model: 12 MoE layers x {args.experts} experts, dim {args.dim}, ffn {args.ffn}; "
          f"{args.tokens} calibration tokens per layer; {args.threads} threads; beam {args.beam}")
    print(f"kept {output['kept_experts']} experts ({output['pruned_fraction'] * 100:.2f}% pruned; "
          f"{' / '.join(map(str, kept))} per encoder / decoder layer)")
    print(f"reconstruction search and pruned checkpoint, wall time: {wall:.1f} s")
    print(f"peak RSS {peak / 2**20:.0f} MiB (before the search {before / 2**20:.0f} MiB); one layer's search data "
          f"{problem_bytes / 2**20:.0f} MiB (tokens x experts^2 inner products, float64), its calibration sample "
          f"{sample_bytes / 2**20:.1f} MiB")
    if args.directions:
        pooled_view(args.dim, args.experts, args.tokens, args.directions, args.pool_tokens, args.beam)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""How long does the reconstruction-loss search take on an NLLB-shaped model, and in how much memory?

Builds a random checkpoint with NLLB-200's MoE layout (24+24 layers, an MoE layer every 4th: 12 MoE
layers of 128 experts) at small width, and calibration samples for one language pair whose outputs
come from the real MoE layer (inputs random, gate softmax and outputs computed by
``fairseq_moe_prune.moe.layer.MoELayer``). Then runs the real ``prune --metric reconstruction``
(80% pruned, 3:1: 36 experts kept per encoder layer, 12 per decoder layer, one global set) and prints
its wall time, and peak memory beside the size of one layer's search data.

Example: python scripts/bench_reconstruction.py --work /tmp/bench_reconstruction
"""

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fairseq_moe_prune import calibration  # noqa: E402
from fairseq_moe_prune.models.layout import moe_layers  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench_reconstruction")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens per layer")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()

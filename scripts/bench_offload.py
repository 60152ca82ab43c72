#!/usr/bin/env python3
"""What does expert offload cost, and how lean is loading into it?

Builds a random model with NLLB-200's layout (24+24 layers, an MoE layer every 4th, 128 experts in
each of the 12) at small width (scripts/bench_prune.py's builder), saved as one file and in NLLB's
sharded layout, and prints, side by side in this one run:
  - fairseq-generate tokens/s with experts offloaded / resident (same data, beam 4)
  - peak RSS of loading the model (fairseq's loader: build + weights in place) above the process's
    RSS before loading, / the size of the experts on disk: resident (stock loading), offloaded from
    one file, offloaded from the sharded release
  - peak RSS of the whole generation run, offloaded and resident

With ``--profile cuda:0`` (a GPU machine) it instead times teacher-forced forwards resident vs offloaded in one
process and prints the copy bandwidth of one expert, the share of copy time hidden behind compute and the
peak GPU memory; fairseq-generate itself uses the GPU when there is one.

Offload here runs with "host" and "device" both the CPU (no GPU on the machine this was written on):
each routed expert is still copied into its layer's device cache and computed from the copy, so the
ratio is the cost of that copying plus the cache bookkeeping, not of a PCIe transfer.

Example: python scripts/bench_offload.py --work /tmp/bench_offload
"""

import argparse
import ast
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import REPO, build_data_and_model, task_args  # noqa: E402  (one NLLB-shaped builder)

LOAD_SCRIPT = """
import ast, re, sys, time
import fairseq_moe_prune  # registers the model and our loading
from fairseq import checkpoint_utils
def status(field):  # kB -> bytes
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
start = time.perf_counter()
models, _ = checkpoint_utils.load_model_ensemble([sys.argv[1]], arg_overrides=ast.literal_eval(sys.argv[2]))
print("LOAD", before, status("VmHWM"), time.perf_counter() - start)
"""
RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)
OFFLOAD = "{'moe_expert_offload': True, 'moe_offload_cache_experts': %d}"


def run(command: List[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def load(checkpoint: Path, overrides: str) -> Tuple[int, int, float]:
    """(RSS before loading, peak RSS after, seconds) of fairseq's loader in a fresh process."""
    output = run([sys.executable, "-c", LOAD_SCRIPT, str(checkpoint), overrides])
    before, after, seconds = re.search(r"LOAD (\d+) (\d+) ([\d.]+)", output).groups()
    return int(before), int(after), float(seconds)


def generate(data: Path, checkpoint: Path, overrides: str) -> Tuple[float, int]:
    """(tokens/s as fairseq-generate reports it, peak RSS of the run) on the eng->deu test set."""
    command = ["fairseq-generate", *task_args(data), "--path", str(checkpoint), "--source-lang", "eng_Latn",
               "--target-lang", "deu_Latn", "--gen-subset", "test", "--beam", "4", "--max-len-a", "0",
               "--max-len-b", "20", "--batch-size", "16", "--required-batch-size-multiple", "1", "--quiet",
               "--model-overrides", overrides]
    output = run([sys.executable, "-c", RSS_WRAPPER, *command])
    speed = float(re.search(r"sentences/s, ([\d.]+) tokens/s", output).group(1))
    return speed, int(re.search(r"MAXRSS_KB (\d+)", output).group(1)) * 1024


def profile(checkpoint: Path, cache: int, device: str, batches: int) -> None:
    """Teacher-forced forwards of random batches, resident vs offloaded, in this process: time, copies, the time
    the copies would take alone, hence the share of copy time hidden behind compute; peak GPU memory."""
    import torch  # start-up speed: only --profile needs torch here; the other timings run in child processes

    import fairseq_moe_prune  # noqa: F401  (registers the model and our loading)
    from fairseq import checkpoint_utils

    from fairseq_moe_prune.moe.placement import LOOKAHEAD, StagingRing

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def load_model(overrides):
        model = checkpoint_utils.load_model_ensemble([str(checkpoint)], arg_overrides=overrides)[0][0].eval()
        return model.half().to(device) if cuda else model

    def timed(model) -> float:
        with torch.no_grad():
            model(*inputs[0])  # warm-up
            sync()
            start = time.perf_counter()
            for batch in inputs:
                model(*batch)
            sync()
        return time.perf_counter() - start

    generator = torch.Generator().manual_seed(0)
    resident = load_model({})
    vocab = resident.encoder.embed_tokens.num_embeddings
    inputs = [(torch.randint(4, vocab, (16, 30), generator=generator).to(device), torch.full((16,), 30).to(device),
               torch.randint(4, vocab, (16, 30), generator=generator).to(device)) for _ in range(batches + 1)]
    resident_seconds = timed(resident)
    del resident
    offloaded = load_model(ast.literal_eval(OFFLOAD % cache))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    layers = offloaded.moe_layers()
    with torch.no_grad():
        offloaded(*inputs[0])
    copies_before = sum(layer.placement.stats.copies for layer in layers)
    offload_seconds = timed(offloaded)
    copies = sum(layer.placement.stats.copies for layer in layers) - copies_before
    # one expert copied alone, host to device, as the cache does it (page-locked into the staging ring first)
    expert = layers[0].experts[0]
    host = dict(expert.named_parameters())
    buffers = {name: torch.empty(t.shape, dtype=layers[0].experts.compute_dtype, device=device) for name, t in host.items()}
    ring = StagingRing(LOOKAHEAD + 1, torch.Tensor.pin_memory if cuda else torch.Tensor.clone)
    sync()
    start = time.perf_counter()
    for _ in range(20):
        for name, tensor in ring.stage(host).items():
            buffers[name].copy_(tensor, non_blocking=True)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        ring.copied(event)
    ring.drain()
    sync()
    copy_seconds = (time.perf_counter() - start) / 20
    expert_bytes = sum(t.numel() * t.element_size() for t in buffers.values())
    visible = offload_seconds - resident_seconds
    hidden = 1 - visible / (copies * copy_seconds) if copies else 1.0
    tokens = batches * 16 * 30 * 2
    print(f"in-process forwards on {device}, {batches} batches of 16 x 30 source + 30 target tokens:")
    print(f"  tokens/s offloaded / resident: {tokens / offload_seconds:.0f} / {tokens / resident_seconds:.0f} = ratio "
          f"{resident_seconds / offload_seconds:.2f}")
    print(f"  expert copies {copies} ({expert_bytes / 2**20:.2f} MiB each, {copy_seconds * 1e3:.3f} ms each alone = "
          f"{expert_bytes / copy_seconds / 1e9:.1f} GB/s); copy time alone {copies * copy_seconds:.2f} s, time added "
          f"by offload {visible:.2f} s: share of copy time hidden behind compute {max(0.0, min(1.0, hidden)):.2f}")
    if cuda:
        print(f"  peak GPU memory, offloaded: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_offload"))
    parser.add_argument("--ffn", type=int, default=512, help="expert FFN width (512: 0.75 GiB of fp32 experts)")
    parser.add_argument("--cache", type=int, default=8, help="offloaded experts kept on the device per layer")
    parser.add_argument("--reuse", action="store_true", help="reuse the data and model of an earlier run in --work")
    parser.add_argument("--loading-only", action="store_true", help="measure loading, not generation")
    parser.add_argument("--profile", default=None, metavar="DEVICE",
                        help="instead: resident vs offloaded forwards in one process on DEVICE (cuda:0, cpu): "
                             "the share of copy time hidden behind compute, peak GPU memory")
    parser.add_argument("--batches", type=int, default=4, help="batches for --profile")
    args = parser.parse_args()
    work = args.work
    single, shared = work / "full.pt", work / "full-shared.pt"
    if not (args.reuse and shared.exists()):
        build_data_and_model(work, args.ffn)
    experts_bytes = sum(p.stat().st_size for p in work.glob("full-rank-*.pt"))
    mib = 2**20
    print(f"  12 MoE layers x 128 experts of 128x{args.ffn}: {experts_bytes / mib:.0f} MiB of experts on disk "
          f"(rank files), one file {single.stat().st_size / mib:.0f} MiB", flush=True)

    offload = OFFLOAD % args.cache
    if args.profile:
        profile(single, args.cache, args.profile, args.batches)
        return
    print("loading (fresh process each)", flush=True)
    loads = {
        "resident, one file (stock loading)": load(single, "{}"),
        "offloaded, one file": load(single, offload),
        "offloaded, sharded release": load(shared, offload),
    }
    print()
    for label, (before, after, seconds) in loads.items():
        print(f"peak RSS of loading / size of the experts on disk, {label}: {(after - before) / mib:.0f} MiB "
              f"above the {before / mib:.0f} MiB before loading / {experts_bytes / mib:.0f} MiB = ratio "
              f"{(after - before) / experts_bytes:.2f} (goal <= 1.1; {seconds:.1f} s)")
    if args.loading_only:
        return
    print("generation: resident, then offloaded", flush=True)
    start = time.perf_counter()
    resident_speed, resident_rss = generate(work / "data", single, "{}")
    offload_speed, offload_rss = generate(work / "data", single, offload)
    print(f"  both runs {time.perf_counter() - start:.0f} s")
    print(f"tokens/s offloaded / resident (cache {args.cache} experts per layer, host and device both CPU): "
          f"{offload_speed:.1f} / {resident_speed:.1f} = ratio {offload_speed / resident_speed:.2f}")
    print(f"peak RSS of the generation run / size of the experts on disk, offloaded: {offload_rss / mib:.0f} MiB / "
          f"{experts_bytes / mib:.0f} MiB = ratio {offload_rss / experts_bytes:.2f}")
    print(f"peak RSS of the generation run / size of the experts on disk, resident:  {resident_rss / mib:.0f} MiB / "
          f"{experts_bytes / mib:.0f} MiB = ratio {resident_rss / experts_bytes:.2f}")


if __name__ == "__main__":
    main()

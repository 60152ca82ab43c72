#!/usr/bin/env python3
"""How fast and how lean is pruning an NLLB-shaped, expert-sharded checkpoint?

Builds a random model with NLLB-200's layout (24+24 layers, an MoE layer every 4th, 128 experts in
each of the 12) at small width, so that its 128 rank files hold over 2 GB, saves it sharded (and as
one file for generation), records statistics with fairseq-generate, and prunes 80% of the experts
(per language, importance, 3:1). Prints, side by side in this one run:
  - pruning wall time / time to read the same bytes once (cat to /dev/null), on its own labelled
    line ``ratio prune / cat of input, cold cache (whole command, start-up included): X`` (lower is
    better; the page cache of the input files is dropped before each measurement with
    POSIX_FADV_DONTNEED, which needs no root), and the same without the command's start-up (Python and
    its imports), timed inside the same run: ``ratio prune without start-up (after its imports) / ...``
  - how much of the input prune read (the input's pages in the page cache afterwards, by fincore)
  - pruning peak RSS / (shared part + largest shard)
  - fairseq-generate throughput and peak RSS, pruned model vs full model, same test data

Example: python scripts/bench_prune.py --work /tmp/bench_prune
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from fairseq_moe_prune import USER_DIR

REPO = Path(__file__).resolve().parent.parent

LANGS = "eng_Latn,deu_Latn,fra_Latn"
PAIRS = "eng_Latn-deu_Latn,eng_Latn-fra_Latn,deu_Latn-eng_Latn,fra_Latn-eng_Latn"
RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('MAXRSS_KB', usage.ru_maxrss, 'CPU_SECONDS', usage.ru_utime + usage.ru_stime, file=sys.stderr); "
    "sys.exit(code)"
)
# the prune command as the console script runs it, its work after start-up (imports) timed in the same process
TIMED_CLI = (
    "import sys, time; from fairseq_moe_prune import cli, pruning; start = time.perf_counter(); "
    "code = cli.main(sys.argv[1:]); print('WORK_SECONDS', time.perf_counter() - start, file=sys.stderr); "
    "sys.exit(code)"
)


# this checkout's console script, whatever copy of the package is installed
CLI = [sys.executable, "-m", "fairseq_moe_prune.cli"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))


def run_measured(command: List[str]) -> Tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, output) of one command; its CPU seconds are in the output."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *command], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: {command[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    rss = int(re.search(r"MAXRSS_KB (\d+)", result.stderr).group(1)) * 1024
    return wall, rss, result.stdout + result.stderr


def drop_page_cache(paths: List[Path]) -> bool:
    """Start a measurement with the input files out of the page cache; returns False where not possible.

    Evicts exactly these files (fsync, then POSIX_FADV_DONTNEED), which needs no root and leaves the
    rest of a shared machine's cache alone (``echo 3 > /proc/sys/vm/drop_caches`` needs root).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def resident_bytes(paths: List[Path]) -> Optional[int]:
    """Bytes of these files in the page cache (util-linux ``fincore``), or None where it is missing."""
    if shutil.which("fincore") is None:
        return None
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                            capture_output=True, text=True)
    return sum(int(line) for line in result.stdout.split()) if result.returncode == 0 else None


def task_args(data: Path) -> List[str]:
    return [str(data / "bin"), "--user-dir", USER_DIR, "--task", "translation_multi_simple_epoch_moe",
            "--langs", LANGS, "--lang-pairs", PAIRS, "--encoder-langtok", "src", "--decoder-langtok"]


def build_data_and_model(work: Path, ffn: int) -> None:
    """A fresh ``work`` folder with the committed sample's data and a random NLLB-shaped model (single + sharded)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print("data: the committed LibreOffice help sample", flush=True)
    subprocess.run([sys.executable, str(REPO / "examples/libreoffice_help/prepare_data.py"), "--aligned-dir",
                    str(REPO / "tests/data/libreoffice_help"), "--out", str(work / "data"), "--vocab-size",
                    "1000", "--test-max", "48"], check=True, capture_output=True)
    print("model: random, NLLB-shaped, saved as one file and sharded", flush=True)
    build_model(work / "data", work, ffn)


def build_model(data: Path, out: Path, ffn: int) -> Tuple[Path, Path]:
    """A random NLLB-shaped model saved as one file and in NLLB's sharded layout."""
    # start-up speed: only building the model needs torch and fairseq; the timed runs are child processes
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    from fairseq_moe_prune.checkpoints.surgery import CheckpointView, save_sharded

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        *task_args(data), "--arch", "transformer_24_24_big", "--encoder-embed-dim", "128",
        "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", str(ffn), "--decoder-ffn-embed-dim", str(ffn),
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    ])
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(0)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    state = {"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
             "optimizer_history": [{"criterion_name": "x", "optimizer_name": "x", "lr_scheduler_state": {},
                                    "num_updates": 0}], "extra_state": {}}
    weights = dict(model.state_dict())
    single = out / "full.pt"
    torch.save(dict(state, model=weights), single)
    save_sharded(CheckpointView(state, weights), str(out / "full-shared.pt"))
    return single, out / "full-shared.pt"


def generate(data: Path, checkpoint: Path, stats_out: Path = None) -> Tuple[float, int]:
    """(sentences per second as fairseq reports it, peak RSS) on the eng->deu test set."""
    command = ["fairseq-generate", *task_args(data), "--path", str(checkpoint), "--source-lang", "eng_Latn",
               "--target-lang", "deu_Latn", "--gen-subset", "test", "--beam", "4", "--max-len-a", "0",
               "--max-len-b", "20", "--batch-size", "16", "--required-batch-size-multiple", "1", "--quiet"]
    if stats_out:
        command += ["--moe-stats-out", str(stats_out)]
    _, rss, output = run_measured(command)
    speed = float(re.search(r"\(([\d.]+) sentences/s", output).group(1))
    return speed, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_prune"))
    parser.add_argument("--ffn", type=int, default=1400, help="expert FFN width (1400 gives ~2.2 GB of experts)")
    parser.add_argument("--reuse", action="store_true", help="reuse the data and model of an earlier run in --work")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache before each measurement")
    parser.add_argument("--no-generation", action="store_true",
                        help="time pruning only (needs --reuse): skip generation with the full and pruned models")
    args = parser.parse_args()
    work = args.work
    single, shared = work / "full.pt", work / "full-shared.pt"
    if not (args.reuse and shared.exists() and (work / "stats.json").exists()):
        build_data_and_model(work, args.ffn)
    shards = sorted(work.glob("full-rank-*.pt"), key=lambda p: int(re.search(r"(\d+)\.pt$", p.name).group(1)))
    sizes = [p.stat().st_size for p in shards]
    total_bytes = shared.stat().st_size + sum(sizes)
    print(f"  {len(shards)} rank files, {sum(sizes) / 2**30:.2f} GiB of experts; shared part "
          f"{shared.stat().st_size / 2**20:.1f} MiB", flush=True)

    print("statistics and full-model generation", flush=True)
    if not args.no_generation:
        full_speed, full_rss = generate(work / "data", single, work / "stats.json")
    for folder in ("pruned", "pruned-sharded"):
        shutil.rmtree(work / folder, ignore_errors=True)

    inputs = [shared, *shards]
    cold = not args.warm and drop_page_cache(inputs)
    print(f"page cache: {'dropped before each measurement (cold)' if cold else 'as it is (warm)'}", flush=True)
    start = time.perf_counter()
    subprocess.run(["cat", str(shared), *map(str, shards)], stdout=subprocess.DEVNULL, check=True)
    cat_seconds = time.perf_counter() - start
    print("pruning 80%: per language, importance, 3:1, single-file output", flush=True)
    cold and drop_page_cache(inputs)
    prune_seconds, prune_rss, prune_output = run_measured([
        sys.executable, "-c", TIMED_CLI, "prune", str(shared), "--stats", str(work / "stats.json"), "--out", str(work / "pruned"),
        "--granularity", "language", "--metric", "importance", "--prune-fraction", "0.8", "--ratio", "3:1",
        "--directions", "eng_Latn-deu_Latn",
    ])
    read_by_prune = resident_bytes(inputs) if cold else None
    prune_work = float(re.search(r"WORK_SECONDS ([\d.]+)", prune_output).group(1))
    prune_cpu = float(re.search(r"CPU_SECONDS ([\d.]+)", prune_output).group(1))
    # NLLB's sharded layout needs equal counts per layer: 1:1 here (25 per layer, 300 kept)
    cold and drop_page_cache(inputs)
    sharded_seconds, sharded_rss, _ = run_measured([
        *CLI, "prune", str(shared), "--stats", str(work / "stats.json"), "--out",
        str(work / "pruned-sharded"), "--granularity", "language", "--prune-fraction", "0.8", "--ratio", "1:1",
        "--directions", "eng_Latn-deu_Latn", "--sharded",
    ])
    # the prune command's fixed cost: its imports, nothing read
    cold and drop_page_cache(inputs)
    baseline_seconds, baseline_rss, _ = run_measured([sys.executable, "-c", "import fairseq_moe_prune.pruning"])
    pruned = work / "pruned" / "eng_Latn-deu_Latn.pt"
    manifest = json.loads((work / "pruned" / "manifest.json").read_text())
    kept = manifest["outputs"]["eng_Latn-deu_Latn"]["kept_experts"]
    if not args.no_generation:
        pruned_speed, pruned_rss = generate(work / "data", pruned)

    mib = 2**20
    print(f"\ncheckpoint: {total_bytes / 2**30:.2f} GiB; kept {kept} of 1536 experts; "
          f"pruned file {pruned.stat().st_size / mib:.0f} MiB")
    print(f"read once (cat):              {cat_seconds:8.2f} s")
    print(f"prune, single-file output:    {prune_seconds:8.2f} s   ratio {prune_seconds / cat_seconds:5.2f} (goal <= 1.0)")
    print(f"prune, sharded output (1:1):  {sharded_seconds:8.2f} s   ratio {sharded_seconds / cat_seconds:5.2f}")
    if read_by_prune is not None:
        print(f"input read by prune:          {read_by_prune / mib:8.0f} MiB of {total_bytes / mib:.0f} MiB "
              f"({read_by_prune / total_bytes:.0%}, pages in the page cache after the cold single-file prune)")
    print(f"  its CPU time (user + sys):  {prune_cpu:8.2f} s; its work after start-up, timed inside it: "
          f"{prune_work:.2f} s")
    print(f"imports of prune alone:       {baseline_seconds:8.2f} s (a separate run)")
    goal = shared.stat().st_size + 2 * max(sizes)
    print(f"shared + 2 largest shards:    {goal / mib:8.0f} MiB (the goal for RSS above the baseline)")
    print(f"peak RSS of the prune command's imports alone: {baseline_rss / mib:.0f} MiB")
    for label, rss in (("single-file output", prune_rss), ("sharded output", sharded_rss)):
        print(f"peak RSS, {label + ':':<20}{rss / mib:8.0f} MiB; above baseline {(rss - baseline_rss) / mib:6.0f} MiB, "
              f"ratio to shared + 2 shards {(rss - baseline_rss) / goal:5.2f} (goal <= 1)")
    if not args.no_generation:
        print(f"generation, full:   {full_speed:7.2f} sentences/s, peak RSS {full_rss / mib:6.0f} MiB")
        print(f"generation, pruned: {pruned_speed:7.2f} sentences/s, peak RSS {pruned_rss / mib:6.0f} MiB  "
              f"(speed x{pruned_speed / full_speed:.2f}, memory x{pruned_rss / full_rss:.2f})")
    cache = "cold" if cold else "warm"
    print(f"ratio prune without start-up (after its imports) / cat of input, {cache} cache: {prune_work / cat_seconds:.2f}")
    print(f"ratio prune / cat of input, {cache} cache (whole command, start-up included): {prune_seconds / cat_seconds:.2f}")


if __name__ == "__main__":
    main()

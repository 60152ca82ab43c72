"""The ``fairseq-moe-prune`` console script: argument parsing and one-line errors only."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import List, Optional

from fairseq_moe_prune import USER_DIR, stats
from fairseq_moe_prune.checkpoints import FORMATS
from fairseq_moe_prune.errors import FairseqMoEPruneError
from fairseq_moe_prune.ranking import GRANULARITIES, METRICS, SELECTIONS


class Terminated(BaseException):
    """SIGTERM, raised wherever the program is, so that staging folders and temporary files are removed."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()


def cmd_user_dir(args: argparse.Namespace) -> None:
    """Print the folder to pass to fairseq's --user-dir."""
    print(USER_DIR)


def cmd_info(args: argparse.Namespace) -> None:
    """Print the MoE layout of a checkpoint (or Hugging Face model folder), read safely and without building the model."""
    from fairseq_moe_prune.checkpoints.layouts import describe_checkpoint  # start-up speed: torch

    if os.path.isdir(args.checkpoint):
        from fairseq_moe_prune.checkpoints.hf import describe_hf  # start-up speed: torch

        print(describe_hf(args.checkpoint))
    else:
        print(describe_checkpoint(args.checkpoint))


def cmd_stats_merge(args: argparse.Namespace) -> None:
    """Add up the statistics of several runs (per language pair, per GPU, per shard of the data)."""
    merged = stats.merge_files(args.out, args.inputs, args.force)
    print(f"merged {len(args.inputs)} files: {', '.join(f'{p} ({s.sentences} sentences)' for p, s in sorted(merged.pairs.items()))}")


def cmd_stats_show(args: argparse.Namespace) -> None:
    """Print a per-layer table of the most and least used experts."""
    print(stats.summary(stats.load(args.file), top=args.top))


def cmd_prune(args: argparse.Namespace) -> None:
    """Write checkpoints with the least useful experts removed (one per direction, pair or globally)."""
    from fairseq_moe_prune.pruning import PruneOptions, prune  # start-up speed: torch, which help and stats never load

    options = PruneOptions(
        metric=args.metric, granularity=args.granularity, selection=args.selection,
        prune_fraction=args.prune_fraction, keep=args.keep, ratio=args.ratio, threshold=args.threshold,
        min_per_layer=args.min_per_layer, directions=args.directions.split(",") if args.directions else None,
        fp16=args.fp16, sharded=args.sharded, seed=args.seed, skip_beta=args.skip_beta, beam=args.beam,
        shared=args.shared,
        search_device=args.search_device,
    )
    if args.calibration_pool_tokens is not None:
        options.calibration_pool_tokens = args.calibration_pool_tokens
    manifest = prune(args.checkpoint, args.out, options, stats_path=args.stats,
                     experts_json_in=args.experts_json, force=args.force, calibration_path=args.calibration)
    for name, output in manifest["outputs"].items():
        print(f"{os.path.join(args.out, output['files'][0])}: kept {output['kept_experts']} experts "
              f"({output['pruned_fraction'] * 100:.1f}% pruned)")


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert a checkpoint between NLLB's sharded layout, one fairseq file and Hugging Face's NllbMoe."""
    from fairseq_moe_prune.checkpoints.convert import convert  # start-up speed: torch

    paths = convert(args.input, args.output, args.to, source_format=args.source_format, fp16=args.fp16,
                    force=args.force, max_shard_size=args.max_shard_size, dict_path=args.dict, spm_path=args.spm,
                    direction=args.direction)
    print(f"wrote {args.output}" + (f" ({len(paths)} files)" if len(paths) > 1 else ""))
    summary = os.path.join(args.output, "conversion.json")
    if os.path.isfile(summary):  # a dense model written as M2M100: what it became
        with open(summary, encoding="utf-8") as f:
            done = json.load(f)
        print(f"  M2M100: {done['convention']}; FFN widths {done['ffn_widths']['encoder']}/{done['ffn_widths']['decoder']}, "
              f"{done['zero_units_dropped']} zero units dropped; " + ("with" if done["tokenizer"] else "no") + " tokenizer")


def cmd_extract(args: argparse.Namespace) -> None:
    """Write each task's sub-network of a task-routed MoE, its experts folded into dense FFNs."""
    from fairseq_moe_prune.checkpoints.extract import extract  # start-up speed: torch

    manifest = extract(args.checkpoint, args.out, [t for t in args.task.split(",") if t],
                       per_layer=args.per_layer_widths, fp16=args.fp16, force=args.force, namespace=args.namespace_config)
    for task, output in manifest["outputs"].items():
        loads = "needs --user-dir" if output["user_dir_needed"] else "stock fairseq, no --user-dir"
        print(f"{args.out}/{output['file']}: {output['arch']} ({loads}), "
              f"{output['parameters'] / 1e6:.2f} M of {output['source_parameters'] / 1e6:.2f} M parameters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairseq-moe-prune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    user_dir = commands.add_parser("user-dir", help=cmd_user_dir.__doc__)
    user_dir.set_defaults(run=cmd_user_dir)

    info = commands.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("checkpoint", help="a checkpoint file, X-shared.pt of an expert-sharded one, or an HF model folder")
    info.set_defaults(run=cmd_info)

    stats_parser = commands.add_parser("stats", help="statistics files written by --moe-stats-out")
    stats_commands = stats_parser.add_subparsers(dest="stats_command", required=True)
    merge = stats_commands.add_parser("merge", help=cmd_stats_merge.__doc__)
    merge.add_argument("out", help="statistics file to write (not one of the inputs)")
    merge.add_argument("inputs", nargs="+", help="statistics files to add up (each recording run at most once)")
    merge.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    merge.set_defaults(run=cmd_stats_merge)
    show = stats_commands.add_parser("show", help=cmd_stats_show.__doc__)
    show.add_argument("file", help="a statistics file")
    show.add_argument("--top", type=int, default=5, help="experts to list at each end")
    show.set_defaults(run=cmd_stats_show)

    prune = commands.add_parser("prune", help=cmd_prune.__doc__)
    prune.add_argument("checkpoint", help="a checkpoint file, or X-shared.pt of an expert-sharded one")
    prune.add_argument("--out", required=True, help="folder to create with the pruned checkpoints")
    source = prune.add_mutually_exclusive_group()
    source.add_argument("--stats", help="statistics file from --moe-stats-out")
    source.add_argument("--experts-json", help="apply expert sets chosen elsewhere (NLLB paper's format)")
    prune.add_argument("--calibration", help="calibration samples from --moe-calibration-out (a folder or a file), "
                       "for --metric reconstruction and --skip-beta median")
    prune.add_argument("--granularity", choices=GRANULARITIES, default="language",
                       help="one expert set for all directions, per language pair, or per language "
                            "(encoder from the source, decoder from the target); default language")
    prune.add_argument("--metric", choices=METRICS + ("reconstruction",), default="importance",
                       help="how experts are ranked (default importance); reconstruction: keep the set whose layer "
                            "output is closest to the full layer's (needs --calibration)")
    prune.add_argument("--beam", type=int, default=4,
                       help="kept sets the reconstruction search carries when it cannot enumerate them all")
    prune.add_argument("--calibration-pool-tokens", type=int,
                       help="most calibration tokens a layer is judged on per expert set: a view with more (a global "
                            "or per-language view over many directions) is reduced to a weighted reservoir of this "
                            "many (default fairseq_moe_prune.calibration.POOL_TOKENS: 4.1 GiB of search data per "
                            "layer of 128 experts)")
    prune.add_argument("--search-device", default="cpu",
                       help="where the reconstruction search evaluates the experts on the calibration tokens: cpu "
                            "(default) or cuda[:N]; the search itself runs on the CPU")
    prune.add_argument("--skip-beta", help="store dynamic skipping in the checkpoints: median (of the calibration "
                       "tokens, per layer), a number, or one number per MoE layer")
    prune.add_argument("--selection", choices=SELECTIONS, default="fixed",
                       help="fixed: a number per layer (--ratio); threshold: metric mass over all layers (default fixed)")
    prune.add_argument("--prune-fraction", type=float, help="fraction of all experts to remove, e.g. 0.8")
    prune.add_argument("--keep", type=int, help="number of experts to keep over all MoE layers")
    prune.add_argument("--ratio", default="3:1", help="encoder:decoder experts per layer (fixed selection)")
    prune.add_argument("--threshold", type=float, help="metric mass to keep (threshold selection)")
    prune.add_argument("--shared", type=int, default=0,
                       help="per language: this many of each layer's kept experts are the same for every language, "
                            "the most valuable over all pairs pooled (default 0)")
    prune.add_argument("--min-per-layer", type=int, default=2, help="fewest experts a layer keeps (default 2, top-2 routing)")
    prune.add_argument("--directions", help="comma-separated SRC-TGT to write (default: all in the statistics)")
    prune.add_argument("--fp16", action="store_true", help="store weights in half precision")
    prune.add_argument("--sharded", action="store_true", help="write NLLB's X-shared.pt + X-rank-N.pt layout")
    prune.add_argument("--seed", type=int, default=0, help="seed of the random metric")
    prune.add_argument("--force", action="store_true", help="replace --out if it exists")
    prune.set_defaults(run=cmd_prune)

    convert = commands.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    convert.add_argument("input", metavar="IN", help="X-shared.pt (sharded), a .pt file (single) or an HF model folder")
    convert.add_argument("output", metavar="OUT", help="a file (--to single) or a folder to create (sharded, hf)")
    convert.add_argument("--from", dest="source_format", choices=FORMATS, help="format of IN (default: detected)")
    convert.add_argument("--to", required=True, choices=FORMATS, help="format of OUT")
    convert.add_argument("--fp16", action="store_true", help="store weights in half precision")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors file for --to hf (default 5GB)")
    convert.add_argument("--dict", help="--to hf of a dense model (M2M100): the fairseq dictionary it was trained "
                         "with (the data folder's dict.txt; the task's language tokens are added as fairseq adds them)")
    convert.add_argument("--spm", help="--to hf of a dense model: the SentencePiece model, for a tokenizer that gives "
                         "fairseq's token ids and language tokens")
    convert.add_argument("--direction", help="--to hf of a dense model: SRC-TGT it translates, where the checkpoint "
                         "does not name it (extract's sub-networks do)")
    convert.add_argument("--force", action="store_true", help="replace OUT if it exists")
    convert.set_defaults(run=cmd_convert)

    extract = commands.add_parser("extract", help=cmd_extract.__doc__, description=cmd_extract.__doc__)
    extract.add_argument("checkpoint", help="a checkpoint of a task-routed MoE (--moe-task-routing decoder or both)")
    extract.add_argument("--task", required=True,
                         help="comma-separated tasks: a target language (LANG) or a pair (SRC-TGT), as the model routes")
    extract.add_argument("--out", required=True, help="folder to create with one checkpoint per task")
    extract.add_argument("--per-layer-widths", action="store_true",
                         help="keep each layer's own FFN width (this plugin's model, needs --user-dir) instead of "
                              "padding every FFN of a side to one width (a plain fairseq transformer where no MoE "
                              "layer is left)")
    extract.add_argument("--fp16", action="store_true", help="store weights in half precision")
    extract.add_argument("--namespace-config", action="store_true",
                         help="store a plain transformer's model config as argparse.Namespace, as fairseq-train does, "
                              "for tools that read checkpoints themselves (ct2-fairseq-converter); torch >= 2.6 then "
                              "loads it only with this plugin's --user-dir (default: a dict, which stock fairseq loads)")
    extract.add_argument("--force", action="store_true", help="replace --out if it exists")
    extract.set_defaults(run=cmd_extract)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    ours = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return run(args)
    finally:
        if ours:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; user mistakes, unusable inputs and signals end in one line on stderr."""
    try:
        args.run(args)
    except FairseqMoEPruneError as error:
        print(f"fairseq-moe-prune: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except OSError as error:  # a read-only folder, a full disk, a folder where a file should be, ...
        where = f"{error.filename}: " if error.filename else ""
        print(f"fairseq-moe-prune: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fairseq-moe-prune: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("fairseq-moe-prune: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``fairseq-moe-prune`` console script: argument parsing and one-line errors only."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from fairseq_moe_prune import stats
from fairseq_moe_prune.checkpoints.safe_load import CheckpointError
from fairseq_moe_prune.models.layout import MoEConfigError
from fairseq_moe_prune.stats import StatsError


def cmd_user_dir(args: argparse.Namespace) -> None:
    """Print the folder to pass to fairseq's --user-dir."""
    print(os.path.dirname(os.path.abspath(__file__)))


def cmd_info(args: argparse.Namespace) -> None:
    """Print the MoE layout of a checkpoint, read safely and without building the model."""
    from fairseq_moe_prune.checkpoints.inspect import describe_checkpoint

    print(describe_checkpoint(args.checkpoint))


def cmd_stats_merge(args: argparse.Namespace) -> None:
    """Add up the statistics of several runs (per language pair, per GPU, per shard of the data)."""
    if os.path.exists(args.out) and not args.force:
        raise StatsError(f"{args.out} exists (use --force to overwrite)")
    merged = stats.merge(stats.load(path) for path in args.inputs)
    stats.save(merged, args.out)
    print(f"merged {len(args.inputs)} files: {', '.join(f'{p} ({s.sentences} sentences)' for p, s in sorted(merged.pairs.items()))}")


def cmd_stats_show(args: argparse.Namespace) -> None:
    """Print a per-layer table of the most and least used experts."""
    print(stats.summary(stats.load(args.file), top=args.top))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairseq-moe-prune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    user_dir = commands.add_parser("user-dir", help=cmd_user_dir.__doc__)
    user_dir.set_defaults(run=cmd_user_dir)

    info = commands.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("checkpoint")
    info.set_defaults(run=cmd_info)

    stats_parser = commands.add_parser("stats", help="statistics files written by --moe-stats-out")
    stats_commands = stats_parser.add_subparsers(dest="stats_command", required=True)
    merge = stats_commands.add_parser("merge", help=cmd_stats_merge.__doc__)
    merge.add_argument("out")
    merge.add_argument("inputs", nargs="+")
    merge.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    merge.set_defaults(run=cmd_stats_merge)
    show = stats_commands.add_parser("show", help=cmd_stats_show.__doc__)
    show.add_argument("file")
    show.add_argument("--top", type=int, default=5, help="experts to list at each end")
    show.set_defaults(run=cmd_stats_show)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CheckpointError, MoEConfigError, StatsError) as error:
        print(f"fairseq-moe-prune: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fairseq-moe-prune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

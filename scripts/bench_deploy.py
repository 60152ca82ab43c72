#!/usr/bin/env python3
"""How fast does an extracted task-MoE sub-network translate where NLLB users serve dense models?

Takes a trained task-MoE (the main job's ``task_model``) and its data folder, extracts one direction's
sub-network (``fairseq-moe-prune extract``), writes it as Hugging Face's M2M100 (``convert --to hf``) and
converts that with CTranslate2's own converter to float32 and int8. Then the direction's test set is
translated by four engines side by side, in rotated order over ``--rounds`` rounds, each with the same
threads, beam and length limit (fairseq's default 200 tokens), each batched as it runs best here:
fairseq-generate's steps (evaluation.Translator) and HF ``generate`` in batches of ``--max-tokens`` sorted by
length, 2 torch threads; CTranslate2 float32 and int8 with 2 batches of 16 sentences in parallel, one thread
each (what CTranslate2 recommends on CPUs; one batch on 2 threads is 4-10x slower on this machine).
fairseq-generate's own best here: --max-tokens 4000 (36.5 sentences/s on the evidence model) beats batches
of 64 (37.3, the same) and of 16 (27.8). Prints each
engine's median sentences/s and chrF++, and one line per engine starting with ``ratio``, relative to
fairseq-generate. Goal (issue 25): CTranslate2 int8 >= 5x fairseq-generate with chrF++ within 0.5.

Example (after the main job):
  python scripts/bench_deploy.py --checkpoint work/libreoffice_help/task_model/checkpoint_last.pt \
      --data work/libreoffice_help/data --direction eng_Latn-deu_Latn --work /tmp/bench_deploy
"""

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import sacrebleu
import torch

from fairseq_moe_prune import USER_DIR, cli
from fairseq_moe_prune.deploy import CTranslate2Engine, HFEngine, Output, to_ctranslate2
from fairseq_moe_prune.evaluation import Translator

ENGLISH = "eng_Latn"


def languages(data: Path) -> List[str]:
    """English and every language with a test set in the data folder (the main job's --langs)."""
    others = sorted({name.split(".")[1].split("-")[1] for name in os.listdir(data / "raw") if name.startswith("test.")})
    return [ENGLISH, *others]


def fairseq_args(data: Path, langs: List[str], beam: int, max_tokens: int) -> List[str]:
    pairs = [f"{ENGLISH}-{x}" for x in langs[1:]] + [f"{x}-{ENGLISH}" for x in langs[1:]]
    return [str(data / "bin"), "--user-dir", USER_DIR, "--task", "translation_multi_simple_epoch",
            "--langs", ",".join(langs), "--lang-pairs", ",".join(pairs), "--encoder-langtok", "src",
            "--decoder-langtok", "--lang-tok-replacing-bos-eos", "--gen-subset", "test", "--beam", str(beam),
            "--max-len-b", "200", "--max-tokens", str(max_tokens), "--required-batch-size-multiple", "1",
            "--seed", "1", "--cpu"]  # pieces, detokenized by the same tokenizer as the other engines


def prepare(args: argparse.Namespace) -> Dict[str, Path]:
    """Sub-network, M2M100 folder and CTranslate2 models in --work (kept: a rerun reuses them)."""
    work, paths = args.work, {"sub": args.work / "sub" / f"{args.direction}.pt", "hf": args.work / "hf",
                              "ct2-float32": args.work / "ct2-float32", "ct2-int8": args.work / "ct2-int8"}
    work.mkdir(parents=True, exist_ok=True)
    steps = [(paths["sub"].parent, ["extract", str(args.checkpoint), "--task", args.direction, "--out", str(paths["sub"].parent)]),
             (paths["hf"], ["convert", str(paths["sub"]), str(paths["hf"]), "--to", "hf", "--dict",
                            str(args.data / "bin" / "dict.txt"), "--spm", str(args.data / "spm.model")])]
    for folder, command in steps:
        if not folder.exists() and cli.main(command) != 0:
            sys.exit(f"error: fairseq-moe-prune {command[0]} failed")
    for quantization in ("float32", "int8"):
        if not paths[f"ct2-{quantization}"].exists():
            to_ctranslate2(str(paths["hf"]), str(paths[f"ct2-{quantization}"]), quantization)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a task-MoE checkpoint (both sides routed by task)")
    parser.add_argument("--data", type=Path, required=True, help="the main job's data folder (bin/, raw/, spm.model)")
    parser.add_argument("--direction", default=f"{ENGLISH}-deu_Latn")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_deploy"))
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source, target = args.direction.split("-")
    pair = args.direction if source == ENGLISH else f"{target}-{source}"
    sentences = (args.data / "raw" / f"test.{pair}.{source}").read_text(encoding="utf-8").splitlines()
    references = (args.data / "raw" / f"test.{pair}.{target}").read_text(encoding="utf-8").splitlines()
    paths = prepare(args)

    torch.set_num_threads(args.threads)
    translator = Translator(fairseq_args(args.data, languages(args.data), args.beam, args.max_tokens))
    hf, ct2 = HFEngine(str(paths["hf"]), args.threads), {q: CTranslate2Engine(str(paths["hf"]), str(paths[f"ct2-{q}"]),
                                                                               args.threads) for q in ("float32", "int8")}
    def fairseq_generate() -> Output:
        output = translator.translate(str(paths["sub"]), source, target)
        return Output([hf.tokenizer.convert_tokens_to_string(text.split()) for text in output.hypotheses], output.seconds)

    engines = {
        "fairseq-generate": fairseq_generate,
        "hf-generate": lambda: hf.translate(sentences, args.beam, args.max_tokens),
        "ctranslate2-float32": lambda: ct2["float32"].translate(sentences, args.beam, args.max_tokens),
        "ctranslate2-int8": lambda: ct2["int8"].translate(sentences, args.beam, args.max_tokens),
    }
    names = list(engines)
    engines["fairseq-generate"]()  # builds the task and loads the model once, untimed
    speeds: Dict[str, List[float]] = {name: [] for name in names}
    chrf: Dict[str, float] = {}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            output = engines[name]()
            speeds[name].append(len(sentences) / output.seconds)
            chrf[name] = sacrebleu.corpus_chrf(output.hypotheses, [references], word_order=2).score

    load = os.getloadavg()[0]
    print(f"{args.direction}: {len(sentences)} sentences, beam {args.beam}, {args.threads} threads, fairseq and HF batches of "
          f"<= {args.max_tokens} tokens, {args.rounds} rounds; {platform.processor() or platform.machine()}, "
          f"load {load:.2f}, torch {torch.__version__}")
    median = {name: statistics.median(values) for name, values in speeds.items()}
    for name in names:
        print(f"{name:<22} {median[name]:8.2f} sentences/s  chrF++ {chrf[name]:6.2f}")
    for name in names[1:]:
        print(f"ratio {name}/fairseq-generate: {median[name] / median['fairseq-generate']:.2f}x sentences/s, "
              f"chrF++ {chrf[name] - chrf['fairseq-generate']:+.2f}")
    result = {"direction": args.direction, "sentences": len(sentences), "beam": args.beam, "threads": args.threads,
              "sentences_per_second": median, "chrf++": chrf, "load": load}
    (args.work / "bench_deploy.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

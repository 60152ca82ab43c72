"""The sweep's report: a markdown summary and PNG plots, from sweep.json and the statistics file.

Plots: quality vs share of experts pruned (one line per method), model size vs quality, and the
expert-usage heatmaps (languages x experts) of one encoder and one decoder MoE layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from prepare_data import ENGLISH  # noqa: E402
from sweep import mean, metrics  # noqa: E402

from fairseq_moe_prune import stats as stats_lib  # noqa: E402
from fairseq_moe_prune.files import atomic_open  # noqa: E402
from fairseq_moe_prune.layout import MoELayerSpec  # noqa: E402
from fairseq_moe_prune.significance import SAMPLES, Interval, difference, resample_many, seed_for  # noqa: E402

BEST = "importance per language"


def methods(results: Dict[str, dict]) -> List[str]:
    return list(dict.fromkeys(run["method"] for name, run in results.items() if name != "full"))


def runs_of(results: Dict[str, dict], method: str) -> List[dict]:
    return sorted((run for name, run in results.items() if name != "full" and run["method"] == method),
                  key=lambda run: run["level"])


def finish_chrf_plot(figure, ax, xlabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("chrF++ (mean over directions, test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(figure, path)


def save_figure(figure, path: Path) -> None:
    with atomic_open(str(path), "wb") as f:
        figure.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def plot_quality(results: Dict[str, dict], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    full = mean(results["full"], "chrf++")
    for method in methods(results):
        runs = runs_of(results, method)
        ax.plot([0] + [100 * r["pruned_fraction"] for r in runs], [full] + [mean(r, "chrf++") for r in runs],
                marker="o", label=method)
    ax.axhline(full, color="grey", linestyle="--", linewidth=1, label="full model")
    finish_chrf_plot(figure, ax, "% of experts pruned", "Quality vs pruning", path)


def plot_size(results: Dict[str, dict], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    full = results["full"]
    ax.scatter([mean(full, "parameters") / 1e6], [mean(full, "chrf++")], marker="*", s=150, color="black",
               label="full model", zorder=3)
    for method in methods(results):
        runs = runs_of(results, method)
        ax.plot([mean(r, "parameters") / 1e6 for r in runs], [mean(r, "chrf++") for r in runs], marker="o",
                label=method)
    finish_chrf_plot(figure, ax, "parameters of the model that translates (millions)", "Model size vs quality", path)


def usage(statistics: stats_lib.MoEStats, prefix: str) -> Tuple[List[str], np.ndarray]:
    """Per language, the share of its tokens whose first choice is each expert of one layer
    (as a source language for encoder layers, as a target for decoder layers)."""
    per_language = stats_lib.by_language(statistics)
    languages = sorted(language for language, layers in per_language.items() if prefix in layers)
    rows = [per_language[lang][prefix].top1 / max(per_language[lang][prefix].tokens, 1) for lang in languages]
    return languages, np.array(rows)


def specificity(shares: np.ndarray) -> float:
    """Mean Jensen-Shannon divergence (bits) between each language's expert usage and the average:
    0 when all languages use the experts alike, 1 when they share none."""
    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    average = shares.mean(axis=0)
    return float(np.mean([entropy((row + average) / 2) - (entropy(row) + entropy(average)) / 2 for row in shares]))


def plot_heatmaps(statistics: stats_lib.MoEStats, specs: List[MoELayerSpec], path: Path) -> Dict[str, float]:
    figure, axes = plt.subplots(len(specs), 1, figsize=(8, 2.2 + 2.2 * len(specs)))
    found = {}
    for ax, spec in zip(np.atleast_1d(axes), specs):
        prefix = spec.prefix
        languages, shares = usage(statistics, prefix)
        image = ax.imshow(shares, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(languages)), languages, fontsize=8)
        ax.set_xlabel("expert")
        side = "source" if spec.side == "encoder" else "target"
        found[prefix] = specificity(shares)
        ax.set_title(f"{prefix}: share of each {side} language's tokens routed first to each expert "
                     f"(JS specificity {found[prefix]:.2f})", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.03)
    figure.tight_layout()
    save_figure(figure, path)
    return found


def table(results: Dict[str, dict], key: str, noise: Noise | None = None) -> List[str]:
    full = mean(results["full"], key)
    levels = sorted({run["level"] for name, run in results.items() if name != "full"})
    lines = ["| method | " + " | ".join(f"{level:.0%}" for level in levels) + " |",
             "|---|" + "---|" * len(levels),
             f"| full model | {full:.2f} |" + " |" * (len(levels) - 1)]
    for method in methods(results):
        by_level = {run["level"]: mean(run, key) for run in runs_of(results, method)}
        changes = {run["level"]: change(noise, run, results["full"], key) for run in runs_of(results, method)}
        cells = [f"{by_level[level]:.2f} ({changes[level] or f'{by_level[level] - full:+.2f}'})"
                 if level in by_level else "" for level in levels]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def run_at(results: Dict[str, dict], method: str, level: float) -> dict | None:
    return next((run for run in runs_of(results, method) if abs(run["level"] - level) < 1e-9), None)


def verdict(results: Dict[str, dict], noise: Noise | None = None) -> List[str]:
    """The issue's targets, checked on the numbers."""
    full = mean(results["full"], "chrf++")
    lines = []
    if full < 20:
        lines.append(f"- The full model scores only chrF++ {full:.1f}: it has not learnt to translate yet, so "
                     "differences of about 1 chrF++ are noise; train longer (another preset) before concluding.")
    best75 = run_at(results, BEST, 0.75)
    if best75 is not None:
        loss = full - mean(best75, "chrf++")
        met = "met" if loss <= 0.5 else "NOT met"
        interval = change(noise, best75, results["full"], "chrf++")
        lines.append(f"- {BEST} at 75%: loses {loss:.2f} chrF++ (target <= 0.5: {met})"
                     + (f"; change vs the full model {interval}." if interval else "."))
    best80 = run_at(results, BEST, 0.8)
    for other in ("random", "importance global"):
        run = run_at(results, other, 0.8)
        if best80 is not None and run is not None:
            gain = mean(best80, "chrf++") - mean(run, "chrf++")
            wins = sum(best80["directions"][d]["chrf++"] > run["directions"][d]["chrf++"] for d in run["directions"])
            lines.append(f"- at 80%, {BEST} vs {other}: chrF++ {change(noise, best80, run, 'chrf++') or f'{gain:+.2f}'}, "
                         f"better in {wins} of {len(run['directions'])} directions.")
    return lines


def per_direction(results: Dict[str, dict], level: float) -> List[str]:
    shown = [("full model", results["full"])] + [
        (method, run) for method in methods(results) if (run := run_at(results, method, level)) is not None]
    lines = ["| direction | " + " | ".join(name for name, _ in shown) + " |", "|---|" + "---|" * len(shown)]
    for direction in results["full"]["directions"]:
        lines.append(f"| {direction} | " + " | ".join(f"{run['directions'][direction]['chrf++']:.2f}"
                                                      for _, run in shown) + " |")
    return lines


def plot_task_routing(usage: Dict[str, dict], path: Path) -> None:
    """The task-MoE's routing: the combine weight each language gives each expert of each MoE layer."""
    figure, axes = plt.subplots(len(usage), 1, figsize=(8, 2.2 + 2.2 * len(usage)))
    for ax, (prefix, layer) in zip(np.atleast_1d(axes), usage.items()):
        image = ax.imshow(np.array(layer["weights"]), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(layer["languages"])), layer["languages"], fontsize=8)
        ax.set_xlabel("expert")
        side = "source" if MoELayerSpec.from_prefix(prefix, len(layer["weights"][0])).side == "encoder" else "target"
        ax.set_title(f"task-MoE {prefix}: combine weight of each expert for every token of a {side} language",
                     fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.03)
    figure.tight_layout()
    save_figure(figure, path)


def task_moe_section(task_moe: dict, work: Path, references: Dict[str, List[str]] | None = None,
                     workers: int = 1) -> List[str]:
    """Token-MoE vs task-MoE vs its extracted sub-networks vs the token-MoE pruned to the same size."""
    from task_moe import CT2, EXTRACTED, MODELS, TOKEN, TASK, mean_over  # only a task-MoE section needs task_moe (extract, layouts)

    plot_task_routing(task_moe["usage"], work / "task_routing.png")
    models = task_moe["models"]
    shown = MODELS + ((CT2,) if CT2 in models else ())
    speed = models[TOKEN]["sentences_per_second"]
    lines = [
        "## Task-level MoE and its extracted sub-networks",
        "All four fairseq models translate every test set in the same two worker processes (one thread each), the "
        "same batch settings, in an order rotated per direction; sentences/s is generation time only (no loading). "
        "The last row: the same sub-networks written as Hugging Face M2M100 and converted to CTranslate2 int8 by "
        "CTranslate2's converter, in the same workers, one thread each, same beam and length limits (tokenizing "
        "included).",
        "",
        "| model | parameters that run (M) | chrF++ | BLEU | sentences/s | speed vs token-MoE |",
        "|---|---|---|---|---|---|",
    ]
    for name in shown:
        model = models[name]
        lines.append(f"| {name} | {mean_over(model, 'parameters') / 1e6:.2f} | {mean_over(model, 'chrf++'):.2f} | "
                     f"{mean_over(model, 'bleu'):.2f} | {model['sentences_per_second']:.1f} | "
                     f"{model['sentences_per_second'] / speed:.2f}x |")
    ratio = models[EXTRACTED]["sentences_per_second"] / speed
    gain = mean_over(models[TASK], "chrf++") - mean_over(models[TOKEN], "chrf++")
    lines += [
        "",
        f"- Throughput in batches, extracted sub-network / full token-MoE: {ratio:.2f}x (the paper: 1.9x peak "
        "throughput on WMT).",
    ]
    if "single_sentences_per_second" in models[EXTRACTED]:
        single = models[EXTRACTED]["single_sentences_per_second"] / models[TOKEN]["single_sentences_per_second"]
        lines.append(f"- One sentence at a time ({', '.join(models[EXTRACTED]['single_directions'])}, beam as above): "
                     f"token-MoE {models[TOKEN]['single_sentences_per_second']:.2f} sentences/s, sub-network "
                     f"{models[EXTRACTED]['single_sentences_per_second']:.2f}: {single:.2f}x (goal >= 1.9x: "
                     f"{'met' if single >= 1.9 else 'NOT met'}).")
    if CT2 in models:
        served = models[CT2]["sentences_per_second"] / models[EXTRACTED]["sentences_per_second"]
        lines.append(f"- CTranslate2 int8 / the sub-network in fairseq: {served:.2f}x sentences/s, chrF++ "
                     f"{mean_over(models[CT2], 'chrf++') - mean_over(models[EXTRACTED], 'chrf++'):+.2f} "
                     "(scripts/bench_deploy.py compares the engines at 2 threads, each batched as it runs best).")
    lines += [
        f"- chrF++, task-MoE - token-MoE: {task_interval(task_moe, references, workers) or f'{gain:+.2f}'} (the paper: "
        "+1.0 BLEU on WMT with 32 experts).",
        f"- The sub-network of a direction is a plain `{task_moe['extracted_arch']}`: the encoder's and decoder's "
        "task-routed layers folded into one dense FFN of twice the width, the other layers padded with "
        f"{task_moe['extracted_zero_padding'] / 1e6:.2f} M zero parameters to that width (counted above).",
        "",
        "![task routing](task_routing.png)",
        "",
        "| direction | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for direction in models[TOKEN]["directions"]:
        lines.append(f"| {direction} | " + " | ".join(f"{models[name]['directions'][direction]['chrf++']:.2f}"
                                                      for name in shown) + " |")
    return lines + [""]


def task_interval(task_moe: dict, references: Dict[str, List[str]] | None, workers: int) -> str:
    """task-MoE minus token-MoE chrF++ with its 95% paired-bootstrap interval, where hypotheses were kept."""
    from task_moe import TASK, TOKEN  # only a task-MoE section needs task_moe (extract, layouts)

    models = task_moe["models"]
    runs = {name: {"directions": models[name]["directions"]} for name in (TASK, TOKEN)}
    if references is None or not all("hypotheses" in d for run in runs.values() for d in run["directions"].values()):
        return ""
    return change(Noise(runs, references, workers), runs[TASK], runs[TOKEN], "chrf++")


def write_report(work: Path, results: Dict[str, dict], statistics_path: Path, setup: List[str],
                 task_moe: dict | None = None, references: Dict[str, List[str]] | None = None,
                 workers: int = 1, heldout: Dict[str, dict] | None = None) -> Path:
    """``references`` (direction -> test references) add 95% intervals to every compared number;
    ``heldout``: reconstruction losses of kept sets (heldout.py)."""
    noise = Noise(results, references, workers) if references is not None else None
    statistics = stats_lib.load(str(statistics_path))
    specs = statistics.fingerprint.specs
    encoder = next(spec for spec in specs if spec.side == "encoder")  # the first MoE layer and the last
    decoder = [spec for spec in specs if spec.side == "decoder"][-1]
    plot_quality(results, work / "quality_vs_pruning.png")
    plot_size(results, work / "size_vs_quality.png")
    found = plot_heatmaps(statistics, [encoder, decoder], work / "expert_usage.png")
    full = results["full"]
    lines = [
        "# Expert pruning on LibreOffice help: quality vs pruning",
        "",
        *setup,
        "",
        "## Targets",
        *verdict(results, noise),
        "",
        *curve_section(work / "curve.json", results, work / "learning_curve.png"),
        "## chrF++ (mean over directions; change vs the full model)",
        *noise_note(noise),
        *table(results, "chrf++", noise),
        "",
        "## BLEU (mean over directions)",
        *table(results, "bleu", noise),
        "",
        *directions_split(results, noise),
        *(over_generation(results, references) if references is not None else []),
        "![quality vs pruning](quality_vs_pruning.png)",
        "",
        "## Model size",
        f"The full model has {mean(full, 'parameters') / 1e6:.2f} M parameters.",
        "",
        "| method | level | experts pruned | parameters (M) |",
        "|---|---|---|---|",
        *[f"| {run['method']} | {run['level']:.0%} | {run['pruned_fraction']:.1%} | "
          f"{mean(run, 'parameters') / 1e6:.2f} |" for method in methods(results) for run in runs_of(results, method)],
        "",
        "![size vs quality](size_vs_quality.png)",
        "",
        "## Are experts language-specific?",
        "Share of each language's tokens whose first choice is each expert (dev set statistics). "
        "JS specificity: mean Jensen-Shannon divergence (bits) of a language's usage from the average; "
        "0 = all languages use the experts alike.",
        "",
        *[f"- {prefix}: {value:.3f}" for prefix, value in found.items()],
        "",
        "![expert usage](expert_usage.png)",
        "",
        "## chrF++ per direction at 80%",
        *per_direction(results, 0.8),
        "",
        *reconstruction_section(results, noise),
        *heldout_section(heldout),
        *skipping_section(work / "skipping.json"),
    ]
    if task_moe is not None:
        lines += task_moe_section(task_moe, work, references, workers)
    path = work / "report.md"
    with atomic_open(str(path), "w") as f:
        f.write("\n".join(lines))
    return path


# ------------------------------------------------------------------ noise: paired bootstrap intervals


class Noise:
    """Every run's chrF++ and BLEU on every direction, resampled over test sentences by sacrebleu's paired
    bootstrap (fairseq_moe_prune.significance); each direction has its own seed, shared by all runs, so
    any two runs are paired. Runs without stored hypotheses are left out."""

    def __init__(self, results: Dict[str, dict], references: Dict[str, List[str]], workers: int = 1):
        self.runs = [name for name, run in results.items()
                     if all("hypotheses" in scores for scores in run["directions"].values())]
        jobs, keys = [], []
        for name in self.runs:
            for direction, scores in results[name]["directions"].items():
                for key, metric in metrics(stats_lib.split_pair(direction)[1]).items():
                    jobs.append((metric, scores["hypotheses"], references[direction], SAMPLES, seed_for(direction)))
                    keys.append((name, direction, key))
        self.resampled = dict(zip(keys, resample_many(jobs, workers)))
        self.names = {id(run): name for name, run in results.items()}  # runs are looked up by identity

    def interval(self, a: dict, b: dict, key: str, directions: List[str] | None = None) -> Interval | None:
        """Run a minus run b, mean over ``directions`` (default: all), or None if either was not resampled."""
        name_a, name_b = self.names.get(id(a)), self.names.get(id(b))
        if name_a not in self.runs or name_b not in self.runs:
            return None
        chosen = directions if directions is not None else list(a["directions"])
        return difference([self.resampled[(name_a, d, key)] for d in chosen],
                          [self.resampled[(name_b, d, key)] for d in chosen])


def change(noise: Noise | None, run: dict, baseline: dict, key: str, directions: List[str] | None = None) -> str:
    """``+d [low, high]`` (with "within noise" when the interval holds 0), or "" without intervals."""
    interval = noise.interval(run, baseline, key, directions) if noise is not None else None
    return str(interval) if interval is not None else ""


def noise_note(noise: Noise | None) -> List[str]:
    if noise is None:
        return []
    return [f"Changes carry a 95% confidence interval from paired bootstrap resampling of the test sentences "
            f"(sacrebleu's implementation, {SAMPLES} resamples, the same for every model); \"within noise\" "
            "marks an interval that contains 0.", ""]


def out_of_english(direction: str) -> bool:
    return stats_lib.split_pair(direction)[0] == ENGLISH


def group_mean(run: dict, key: str, directions: List[str]) -> float:
    return float(np.mean([run["directions"][d][key] for d in directions]))


def directions_split(results: Dict[str, dict], noise: Noise | None) -> List[str]:
    """Out-of-English and into-English means side by side, with the length ratio (hypothesis/reference,
    BLEU tokens): NLLB's 80%-pruned model keeps out-of-English quality but loses 5.85 spBLEU into English,
    where it over-generates (length ratio 1.16)."""
    full = results["full"]
    if "length_ratio" not in next(iter(full["directions"].values())):
        return []
    groups = {"out of English": [d for d in full["directions"] if out_of_english(d)],
              "into English": [d for d in full["directions"] if not out_of_english(d)]}
    lines = ["## Out of English vs into English",
             "Means over the directions of each group; change vs the full model (95% interval); length ratio = "
             "hypothesis / reference length in BLEU tokens, mean over the group's directions. NLLB's released "
             "80%-pruned model keeps out-of-English quality (+0.16 spBLEU) but loses 5.85 spBLEU into English, "
             "with a length ratio of 1.16 there (it over-generates).", ""]
    shown = [full] + [run for method in methods(results) for run in runs_of(results, method)]
    for key, label in (("chrf++", "chrF++"), ("bleu", "BLEU")):
        lines += [f"| model | {label} out of English | change | {label} into English | change | "
                  "length ratio out | length ratio into |", "|---|---|---|---|---|---|---|"]
        for run in shown:
            name = "full model" if run is full else f"{run['method']} {run['level']:.0%}"
            cells = []
            for directions in groups.values():
                cells.append(f"{group_mean(run, key, directions):.2f}")
                cells.append("" if run is full else change(noise, run, full, key, directions) or
                             f"{group_mean(run, key, directions) - group_mean(full, key, directions):+.2f}")
            cells += [f"{group_mean(run, 'length_ratio', directions):.3f}" for directions in groups.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    best80 = run_at(results, BEST, 0.8)
    if best80 is not None:
        out, into = groups.values()
        lines.append(f"- {BEST} at 80% vs the full model: BLEU out of English "
                     f"{change(noise, best80, full, 'bleu', out) or 'n/a'}, into English "
                     f"{change(noise, best80, full, 'bleu', into) or 'n/a'}; length ratio into English "
                     f"{group_mean(full, 'length_ratio', into):.3f} -> {group_mean(best80, 'length_ratio', into):.3f}.")
        for name in [BEST, *(m for m in methods(results) if m.startswith(f"{BEST}, "))]:
            run = run_at(results, name, 0.8)
            if run is None:
                continue
            out, into = groups.values()
            lost_out = group_mean(full, "chrf++", out) - group_mean(run, "chrf++", out)
            lost_into = group_mean(full, "chrf++", into) - group_mean(run, "chrf++", into)
            drift = group_mean(run, "length_ratio", into) - group_mean(full, "length_ratio", into)
            met = lost_into <= lost_out and abs(drift) <= 0.1
            lines.append(f"- Goal for {name} at 80% (into English loses no more chrF++ than out of English, length "
                         f"ratio into English within 0.1 of the full model's): loses {lost_into:.2f} into vs "
                         f"{lost_out:.2f} out of English, length ratio {drift:+.3f}: {'met' if met else 'NOT met'}.")
        for other in ("importance global", "random"):
            run = run_at(results, other, 0.8)
            if run is not None:
                lines.append(f"- at 80%, {BEST} vs {other}: " + "; ".join(
                    f"{label} {group} {change(noise, best80, run, key, directions) or 'n/a'}"
                    for key, label in (("chrf++", "chrF++"), ("bleu", "BLEU"))
                    for group, directions in [("all directions", None), *groups.items()]) + ".")
        lines.append("")
    return lines


# --- reconstruction-loss pruning and dynamic skipping (Lu et al. 2024) ---------------------------------------

RECONSTRUCTION = "reconstruction per language"


def reconstruction_section(results: Dict[str, dict], noise: Noise | None = None) -> List[str]:
    """Reconstruction loss vs importance, both per language, at every level (chrF++ mean, its interval and
    directions won), for every calibration sample size the sweep ran."""
    variants = [method for method in methods(results) if method.startswith(RECONSTRUCTION)]
    if not variants:
        return []
    lines = ["## Reconstruction loss vs importance (both per language)",
             "Each layer keeps the experts whose pruned output is closest (Frobenius norm) to the full layer's on "
             "the calibration tokens of its language (encoder: as a source, decoder: as a target). Difference: "
             "reconstruction - importance, chrF++, with its 95% interval.", "",
             "| method | level | importance | reconstruction | difference | directions better / worse |",
             "|---|---|---|---|---|---|"]
    for variant in variants:
        for run in runs_of(results, variant):
            other = run_at(results, BEST, run["level"])
            if other is None:
                continue
            better = sum(run["directions"][d]["chrf++"] > other["directions"][d]["chrf++"] for d in run["directions"])
            worse = sum(run["directions"][d]["chrf++"] < other["directions"][d]["chrf++"] for d in run["directions"])
            ours, theirs = mean(run, "chrf++"), mean(other, "chrf++")
            lines.append(f"| {variant} | {run['level']:.0%} | {theirs:.2f} | {ours:.2f} | "
                         f"{change(noise, run, other, 'chrf++') or f'{ours - theirs:+.2f}'} | {better} / {worse} |")
    return lines + [""]


def heldout_section(heldout: Dict[str, dict] | None) -> List[str]:
    """The reconstruction loss of each method's kept sets on its own calibration tokens and on held-out ones."""
    if not heldout:
        return []
    samples = list(next(iter(heldout.values()))["loss"])
    lines = ["### Reconstruction loss of the kept sets, on the tokens they were chosen on and on held-out tokens",
             "Relative loss sqrt(sum ||Z - Z'(S)||^2 / sum ||Z||^2) over every MoE layer and language, with each "
             "language's kept set of the run (lower is closer to the full model's layer outputs). The held-out "
             "tokens come from the test sentences' own translation runs and are never used to choose.", "",
             "| method | level | chrF++ | " + " | ".join(samples) + " |", "|---|---|---|" + "---|" * len(samples)]
    for entry in sorted(heldout.values(), key=lambda e: (e["level"], e["method"])):
        lines.append(f"| {entry['method']} | {entry['level']:.0%} | {entry['chrf++']:.2f} | "
                     + " | ".join(f"{entry['loss'][sample]:.4f}" for sample in samples) + " |")
    return lines + [""]


def curve_section(path: Path, results: Dict[str, dict], plot: Path) -> List[str]:
    """chrF++ against training minutes: the checkpoints kept during training, and the final model."""
    if not path.exists():
        return []
    points = sorted(json.loads(path.read_text()).values(), key=lambda point: point["updates"])
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["minutes"] for p in points], [p["chrf++"] for p in points], marker="o", label="token-MoE")
    finish_chrf_plot(figure, ax, "minutes of training (one core)", "Learning curve", plot)
    lines = ["## Learning curve (token-MoE, test set, same decoding as below)", "",
             "| updates | minutes of training | chrF++ mean | chrF++ lowest direction |", "|---|---|---|---|"]
    lines += [f"| {p['updates']} | {p['minutes']:.1f} | {p['chrf++']:.2f} | {p['min_chrf++']:.2f} |" for p in points]
    full = results["full"]["directions"]
    lines += [f"| final | | {mean(results['full'], 'chrf++'):.2f} | {min(s['chrf++'] for s in full.values()):.2f} |",
              "", f"![learning curve]({plot.name})", ""]
    return lines


def words(text: str) -> int:
    return len(text.split())


def over_generation(results: Dict[str, dict], references: Dict[str, List[str]], level: float = 0.8,
                    runaway: float = 2.0) -> List[str]:
    """What the length ratio into English is made of: a few runaway hypotheses (over ``runaway`` times the
    reference's words), or every hypothesis a little longer (median per-sentence ratio)."""
    full = results["full"]
    if "hypotheses" not in next(iter(full["directions"].values())):
        return []
    into = [d for d in full["directions"] if not out_of_english(d)]
    shown = [("full model", full)] + [(f"{method} {level:.0%}", run) for method in methods(results)
                                      if (run := run_at(results, method, level)) is not None]
    lines = [f"### What over-generation into English is made of ({level:.0%})",
             f"Per test sentence into English, hypothesis words / reference words. Runaway: over {runaway:g} times "
             "the reference. Length ratio without runaways: the group's total words with those sentences left out.", "",
             "| model | length ratio (words) | runaway sentences | their share of the words | median sentence ratio | "
             "length ratio without runaways |", "|---|---|---|---|---|---|"]
    for name, run in shown:
        hyp, ref, ratios, wild_hyp, wild_ref, wild = 0, 0, [], 0, 0, 0
        for direction in into:
            for hypothesis, reference in zip(run["directions"][direction]["hypotheses"], references[direction]):
                h, r = words(hypothesis), max(words(reference), 1)
                hyp, ref = hyp + h, ref + r
                ratios.append(h / r)
                if h > runaway * r:
                    wild, wild_hyp, wild_ref = wild + 1, wild_hyp + h, wild_ref + r
        lines.append(f"| {name} | {hyp / ref:.3f} | {wild} of {len(ratios)} | {wild_hyp / max(hyp, 1):.1%} | "
                     f"{float(np.median(ratios)):.3f} | {(hyp - wild_hyp) / max(ref - wild_ref, 1):.3f} |")
    return lines + [""]


def skipping_section(path: Path) -> List[str]:
    """Dynamic skipping on / off: chrF++, speed measured side by side, share of second experts skipped."""
    if not path.exists():
        return []
    entries = sorted(json.loads(path.read_text()).values(), key=lambda entry: entry["level"])
    lines = ["## Dynamic skipping of the second expert",
             "A token's second expert is skipped when its gate value is below beta times the first's (beta per "
             "layer and language: the median ratio on the dev calibration tokens), the first then weighing 1. "
             "Models: the full model and importance per language. Speed: each timed direction (every 4th) is "
             "translated with and without skipping at the same time (one worker each), so both share the machine's "
             "load; chrF++ without skipping is the sweep's run of the same model.", "",
             "| model | chrF++ without | chrF++ with | sentences/s without | sentences/s with | speed ratio | "
             "one at a time: without | with | speed ratio | second experts skipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        on, off = entry["on"], entry["off"]
        model = "full model" if entry["level"] == 0 else f"importance per language, {entry['pruned_fraction']:.1%} pruned"
        single = (f"{off['single_sentences_per_second']:.2f} | {on['single_sentences_per_second']:.2f} | "
                  f"{on['single_sentences_per_second'] / off['single_sentences_per_second']:.3f}"
                  if "single_sentences_per_second" in on else " | | ")
        lines.append(f"| {model} | {off['chrf++']:.2f} | {on['chrf++']:.2f} | {off['sentences_per_second']:.2f} | "
                     f"{on['sentences_per_second']:.2f} | {on['sentences_per_second'] / off['sentences_per_second']:.3f} | "
                     f"{single} | {on['skipped_share']:.1%} |")
    return lines + ["Goal (issue 23): one sentence at a time >= 1.15x at most 0.5 chrF++ lost.", ""]

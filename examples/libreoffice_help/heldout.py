"""Why reconstruction-loss selection translates as it does: the reconstruction loss of each method's kept sets
on the tokens it was chosen on and on held-out tokens.

Lu et al. keep, in each layer, the experts whose pruned output is closest to the full layer's on calibration
tokens. If those sets are also closer than importance's on tokens the search never saw, yet translate worse,
the weakness is the method's on this model; if they are closer only on their own sample, the sample is too
small (the search overfits it). For every run of the sweep named here, each language's kept set of each layer
is read back from the run's experts.json and its loss computed on each calibration sample's tokens of that
language (encoder layers: as a source, decoder layers: as a target).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping

from fairseq_moe_prune import calibration as calibration_lib
from fairseq_moe_prune import reconstruction
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.files import atomic_open
from fairseq_moe_prune.layout import config_value
from fairseq_moe_prune.pruning import checkpoint_fingerprint, layer_experts, load_calibration, read_experts_json


def relative_losses(checkpoint_path: Path, samples: Mapping[str, Path], runs: Mapping[str, Path]) -> Dict[str, dict]:
    """{run: {sample: relative loss}}: sqrt(sum of squared errors / sum of ||Z||^2) over every layer and
    language, tokens weighted as the search weighs them. ``runs``: name -> the run's experts.json."""
    checkpoint = open_checkpoint(str(checkpoint_path))
    config = checkpoint.config
    activation_fn = reconstruction.activation(str(config_value(config, "activation_fn", "relu")))
    eom = float(config_value(config, "moe_eom", 0.0))
    fingerprint = checkpoint_fingerprint(checkpoint)
    calibrations = {name: load_calibration(str(path), checkpoint, fingerprint) for name, path in samples.items()}
    kept = {run: read_experts_json(str(path), checkpoint.specs) for run, path in runs.items()}
    errors = {run: {name: 0.0 for name in samples} for run in runs}
    norms = {name: 0.0 for name in samples}
    for spec in checkpoint.specs:
        experts = layer_experts(checkpoint, spec)
        languages = sorted({language for choices in kept.values() for language, choice in choices.items()
                            if spec.prefix in choice.kept})
        for language in languages:
            for name, calibration in calibrations.items():
                pool, _ = calibration_lib.view(calibration, "language", language, spec.prefix)
                if pool.size == 0:
                    continue
                problem = reconstruction.layer_problem(pool.inputs, pool.probs, pool.outputs, pool.weights, experts,
                                                       activation_fn, eom)
                norms[name] += float((problem.zz * problem.weights).sum())
                for run, choices in kept.items():
                    errors[run][name] += reconstruction.set_loss(problem, choices[language].kept[spec.prefix]) ** 2
    return {run: {name: round(math.sqrt(error / max(norms[name], 1e-300)), 6) for name, error in by_sample.items()}
            for run, by_sample in errors.items()}


def compare(work: Path, checkpoint: Path, samples: Mapping[str, Path], results: Mapping[str, dict],
            methods: List[str]) -> Dict[str, dict]:
    """The losses of every run of ``methods`` in the sweep's ``results``, kept in ``heldout.json``."""
    path = work / "heldout.json"
    if path.exists():
        return json.loads(path.read_text())
    runs = {name: work / run["folder"] / "experts.json" for name, run in results.items()
            if run.get("method") in methods and "folder" in run and (work / run["folder"] / "experts.json").exists()}
    losses = relative_losses(checkpoint, samples, runs)
    found = {name: {"method": results[name]["method"], "level": results[name]["level"],
                    "chrf++": round(sum(s["chrf++"] for s in results[name]["directions"].values())
                                    / len(results[name]["directions"]), 2), "loss": losses[name]} for name in runs}
    with atomic_open(str(path), "w") as f:
        f.write(json.dumps(found, indent=1, sort_keys=True) + "\n")
    return found

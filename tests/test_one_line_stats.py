"""Hostile statistics, calibration samples, task-routed checkpoints and recording options (issue 22): each ends
in one line on stderr and a non-zero exit, its inputs byte-identical and nothing left behind.

The ``fairseq-moe-prune`` cases run the real console script; the recording cases run stock ``fairseq-generate``
(slow, all at once). A full disk at the end of recording is simulated in a child process whose writes fail.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_moe_prune import calibration, stats
from fairseq_moe_prune.checkpoints.extract import extract
from fairseq_moe_prune.checkpoints.layouts import open_checkpoint
from fairseq_moe_prune.layout import moe_layers, skip_betas
from fairseq_moe_prune.ranking import SelectionError, metric_values
from tests.helpers import USER_DIR, tiny_checkpoint_with_stats, write_dictionaries

REPO = Path(__file__).resolve().parent.parent
ENC, DEC = "encoder.layers.1.moe_layer", "decoder.layers.1.moe_layer"
ONE_LINE = re.compile(r"^(fairseq-moe-prune: )?error: ")


def stats_variant(folder: Path, good: dict, name: str, edit) -> None:
    data = json.loads(json.dumps(good))
    edit(data)
    (folder / name).write_text(json.dumps(data))


def set_layer(**values):
    def edit(data):
        counts = data["pairs"]["src-tgt"]["layers"][ENC]
        for name, value in values.items():
            if isinstance(value, tuple):  # (index, value) in a per-expert array
                counts[name][value[0]] = value[1]
            else:
                counts[name] = value
    return edit


def good_calibration(fingerprint: stats.Fingerprint, width: int, tokens: int = 6, seed: int = 0) -> calibration.Calibration:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for prefix, experts in fingerprint.layers:
        probs = torch.softmax(torch.randn(tokens, experts, generator=generator), dim=1)
        layers[prefix] = calibration.LayerSample(
            torch.randn(tokens, width, generator=generator), probs, torch.randn(tokens, width, generator=generator),
            torch.rand(tokens, generator=generator, dtype=torch.float64).sort().values, 20)
    return calibration.Calibration(fingerprint, {"beam": 1, "tokens": 8, "outputs": calibration.TARGET_OUTPUTS},
                                   {"src-tgt": layers, "tgt-src": {p: s for p, s in layers.items()}})


def calibration_variant(folder: Path, good: calibration.Calibration, name: str, edit) -> None:
    variant = calibration.Calibration(good.fingerprint, dict(good.settings),
                                      {pair: {prefix: calibration.LayerSample(s.inputs.clone(), s.probs.clone(),
                                                                              s.outputs.clone(), s.keys.clone(), s.seen)
                                              for prefix, s in layers.items()} for pair, layers in good.pairs.items()})
    edit(variant.pairs["src-tgt"][ENC])
    calibration.save(variant, str(folder / name))


def raw_calibration(path: Path, metadata: dict) -> None:
    """A calibration file with the given metadata and no tensors."""
    path.write_bytes(calibration.safetensors_bytes({}, metadata))


def task_routed(folder: Path, name: str, edit=None, routing: str = "decoder", rows: int = 2) -> None:
    """The tiny checkpoint made a task-MoE (tasks: languages src and tgt), then ``edit(state)``."""
    state = torch.load(folder / "model.pt", weights_only=False)
    configure(state["cfg"]["model"], moe_task_routing=routing, moe_task="target", moe_task_langs="src,tgt",
              moe_task_pairs="src-tgt,tgt-src")
    width = state["model"][f"{DEC}.gate.wg.weight"].shape[1]
    generator = torch.Generator().manual_seed(1)
    for side in ("encoder", "decoder") if routing == "both" else ("decoder",):
        state["model"][f"{side}.moe_task_embed.weight"] = torch.randn(rows, width, generator=generator)
    if edit is not None:
        edit(state)
    torch.save(state, folder / name)


def configure(config, **values) -> None:
    """Set fields of a saved config (a dict, or the Namespace of a legacy model)."""
    for name, value in values.items():
        if isinstance(config, dict):
            config[name] = value
        else:
            setattr(config, name, value)


def set_embed(side: str, value):
    def edit(state):
        state["model"][f"{side}.moe_task_embed.weight"] = value(state["model"][f"{side}.moe_task_embed.weight"])
    return edit


def drop_embed(state):
    del state["model"]["decoder.moe_task_embed.weight"]


def nan_row(embed):
    embed = embed.clone()
    embed[1, 0] = float("nan")
    return embed


def encoder_langtok_tgt(state):
    configure(state["cfg"]["task"], encoder_langtok="tgt")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Inputs good and bad, shared by every case (which must leave them as they are)."""
    folder = tmp_path_factory.mktemp("inputs")
    checkpoint, stats_path = tiny_checkpoint_with_stats(folder)
    good = json.loads(stats_path.read_text())
    for name, edit in {
        "prob-first-max.json": set_layer(prob_first_sum=(3, 2**63 - 1)),
        "top1-over-tokens.json": set_layer(top1=(0, 10**6), top2=(0, 10**6)),
        "skipped-over-tokens.json": set_layer(skipped=(2, 10**6)),
        "tokens-0.json": set_layer(tokens=0),
        "sentences-over-subset.json": lambda data: data["pairs"]["src-tgt"].update(sentences=10**6),
        "other-experts.json": lambda data: data["model"].update(experts_sha256="0" * 64),
        "version-4.json": lambda data: data.update(version=4),
    }.items():
        stats_variant(folder, good, name, edit)

    fingerprint = stats.load(str(stats_path)).fingerprint
    width = int(open_checkpoint(str(checkpoint)).state["model"][f"{ENC}.gate.wg.weight"].shape[1])
    base = good_calibration(fingerprint, width)
    calibration.save(base, str(folder / "good.safetensors"))
    (folder / "twice").mkdir()
    for name in ("src-tgt.seed-1.safetensors", "src-tgt.copy.safetensors"):
        shutil.copy(folder / "good.safetensors", folder / "twice" / name)

    def put(field, index, value):
        def edit(sample):
            getattr(sample, field)[index] = value
        return edit

    def replace(field, value):
        return lambda sample: setattr(sample, field, value(getattr(sample, field)))

    for name, edit in {
        "nan-input.safetensors": put("inputs", (2, 0), float("nan")),
        "nan-input-row.safetensors": put("inputs", 1, float("nan")),
        "inf-output.safetensors": put("outputs", (0, 1), float("inf")),
        "nan-probs.safetensors": put("probs", (1, 2), float("nan")),
        "inf-probs.safetensors": put("probs", (1, 2), float("inf")),
        "negative-probs.safetensors": put("probs", (0, 0), -0.5),
        "keys-0d.safetensors": replace("keys", lambda keys: keys[0]),
        "keys-2d.safetensors": replace("keys", lambda keys: keys[:, None]),
        "seen-10e400.safetensors": lambda sample: setattr(sample, "seen", 10**400),
        "wide-inputs.safetensors": lambda sample: (setattr(sample, "inputs", torch.zeros(6, width + 1)),
                                                   setattr(sample, "outputs", torch.zeros(6, width + 1))),
    }.items():
        calibration_variant(folder, base, name, edit)
    metadata = {"format": calibration.FORMAT, "version": str(calibration.VERSION),
                "model": json.dumps(fingerprint.to_json()), "settings": json.dumps(base.settings), "seen": "{}"}
    raw_calibration(folder / "deep.safetensors", dict(metadata, seen="[" * 100_000 + "]" * 100_000))
    raw_calibration(folder / "version-1.safetensors", dict(metadata, version="1"))

    task_routed(folder, "task.pt")
    task_routed(folder, "task-no-embed.pt", drop_embed)
    task_routed(folder, "task-one-row.pt", rows=1)
    task_routed(folder, "task-narrow.pt", set_embed("decoder", lambda embed: embed[:, :-1].contiguous()))
    task_routed(folder, "task-nan.pt", set_embed("decoder", nan_row))
    task_routed(folder, "task-langtok-tgt.pt", encoder_langtok_tgt, routing="both")
    return folder


def prune_stats(name, *extra):
    return ["prune", "{in}/model.pt", "--stats", f"{{in}}/{name}", "--out", "{out}/pruned", "--prune-fraction", "0.5",
            "--ratio", "1:1", *extra]


def prune_calibration(name, *extra):
    return ["prune", "{in}/model.pt", "--calibration", f"{{in}}/{name}", "--metric", "reconstruction", "--out",
            "{out}/pruned", "--prune-fraction", "0.5", "--ratio", "1:1", *extra]


def extract_task(name):
    return ["extract", f"{{in}}/{name}", "--task", "src-tgt", "--out", "{out}/extracted"]


# argv ({in}: the inputs' folder, {out}: an empty folder) and a part of the one line expected
CASES = {
    "stats prob_first_sum 2**63-1 (show)": (["stats", "show", "{in}/prob-first-max.json"], "do not fit together"),
    "stats prob_first_sum 2**63-1 (prune)": (prune_stats("prob-first-max.json"), "do not fit together"),
    "stats top1 > tokens": (["stats", "show", "{in}/top1-over-tokens.json"], "top1 counts add up to more than its 10"),
    "stats skipped > tokens": (["stats", "show", "{in}/skipped-over-tokens.json"], "do not fit together"),
    "stats tokens 0 with counts": (["stats", "show", "{in}/tokens-0.json"], "more than its 0 tokens"),
    "stats merge of counts that do not fit": (["stats", "merge", "{out}/m.json", "{in}/stats.json", "{in}/skipped-over-tokens.json"],
                                              "do not fit together"),
    "stats sentences > the subset's": (["stats", "show", "{in}/sentences-over-subset.json"], "is more than its runs were given"),
    "stats of other experts": (prune_stats("other-experts.json"), "another model"),
    "stats format 4": (["stats", "show", "{in}/version-4.json"], "version 4 is not supported"),
    "calibration NaN input": (prune_calibration("nan-input.safetensors"), "inputs holds NaN or infinite values"),
    "calibration NaN input row": (prune_calibration("nan-input-row.safetensors"), "inputs holds NaN or infinite values"),
    "calibration inf output": (prune_calibration("inf-output.safetensors"), "outputs holds NaN or infinite values"),
    "calibration NaN probs": (prune_calibration("nan-probs.safetensors"), "probs holds NaN or infinite values"),
    "calibration inf probs": (prune_calibration("inf-probs.safetensors"), "probs holds NaN or infinite values"),
    "calibration negative probs": (prune_calibration("negative-probs.safetensors"), "not probabilities"),
    "calibration NaN to --skip-beta median": (
        ["prune", "{in}/model.pt", "--stats", "{in}/stats.json", "--calibration", "{in}/nan-probs.safetensors",
         "--prune-fraction", "0", "--skip-beta", "median", "--out", "{out}/pruned"], "probs holds NaN"),
    "calibration 0-d keys": (prune_calibration("keys-0d.safetensors"), "keys must be a list (1-D), got 0-D"),
    "calibration 2-D keys": (prune_calibration("keys-2d.safetensors"), "keys must be a list (1-D), got 2-D"),
    "calibration seen 10**400": (prune_calibration("seen-10e400.safetensors"), "must be a whole number >= 0"),
    "calibration of another width": (prune_calibration("wide-inputs.safetensors"), "the checkpoint's layer takes"),
    "calibration metadata nested 100k deep": (prune_calibration("deep.safetensors"), "malformed calibration file"),
    "calibration format 1": (prune_calibration("version-1.safetensors"), "calibration format version 1 is not supported"),
    "calibration run twice in a folder": (prune_calibration("twice"), "one run twice"),
    "extract without moe_task_embed": (extract_task("task-no-embed.pt"), "no decoder.moe_task_embed.weight"),
    "extract with fewer rows than tasks": (extract_task("task-one-row.pt"), "has shape (1, "),
    "extract with a narrower embedding": (extract_task("task-narrow.pt"), "the gate's width need"),
    "extract a NaN task embedding": (extract_task("task-nan.pt"), "holds NaN or infinite values"),
    "extract with --encoder-langtok tgt": (extract_task("task-langtok-tgt.pt"), "needs --encoder-langtok src"),
}


def digests(folder: Path):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def assert_one_error_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if ONE_LINE.match(line)]
    assert len(errors) == 1 and message in errors[0], stderr[-3000:]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(workspace, tmp_path, case):
    argv, message = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    before = digests(workspace)
    result = subprocess.run(["fairseq-moe-prune", *(arg.replace("{in}", str(workspace)).replace("{out}", str(out))
                                                    for arg in argv)], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE.match(lines[0]) and message in lines[0], result.stderr[-3000:]
    assert digests(workspace) == before
    assert os.listdir(out) == []


def test_extract_keeps_the_skip_betas_of_the_remaining_moe_layers_only(workspace, tmp_path):
    """A decoder routed by task and a skipping token-routed encoder: the extracted model lists one beta, for
    its one MoE layer (the encoder's), so that it loads."""
    shutil.copy(workspace / "model.pt", tmp_path / "model.pt")
    task_routed(tmp_path, "skipping.pt", lambda state: configure(state["cfg"]["model"], moe_skip_betas="0.25,0"))
    extract(str(tmp_path / "skipping.pt"), str(tmp_path / "out"), ["src-tgt"])
    config = open_checkpoint(str(tmp_path / "out" / "src-tgt.pt")).config
    assert [spec.prefix for spec in moe_layers(config)] == [ENC] and skip_betas(config) == [0.25]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the overflow being refused
def test_a_metric_that_is_not_finite_is_refused_not_ranked():
    """Counts built in memory skip the file checks: a NaN importance still never chooses the experts."""
    counts = stats.LayerCounts.zeros(4)
    counts.tokens, counts.top1[:], counts.top2[:] = 10, [1, 2, 3, 4], [1, 2, 3, 4]
    counts.prob_first_sum[3] = 2**63 - 1
    with pytest.raises(SelectionError, match="importance metric is not finite"):
        metric_values(counts, "importance")


# Two writers whose final write (at exit) fails as on a full disk: the process must exit non-zero, one line.
FULL_DISK_AT_EXIT = """
import errno, sys
from fairseq_moe_prune import calibration, stats
from fairseq_moe_prune.tasks.recording_hook import StatsWriter
folder = sys.argv[1]
fingerprint = stats.Fingerprint([("encoder.layers.1.moe_layer", 4)], "0" * 64, "0" * 64)

class Recorder:
    def snapshot(self):
        return stats.MoEStats(fingerprint, {}, {})

class Sampler:
    seed = 1
    def snapshot(self):
        return calibration.Calibration(fingerprint, {"tokens": 4}, {})

StatsWriter(Recorder(), folder + "/s.json", 1e9, "test", 1)
calibration.CalibrationWriter(Sampler(), folder + "/calibration", "src-tgt")

def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

stats.save = calibration.save = full
print("translated")
"""


def test_a_failed_final_write_at_exit_fails_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-c", FULL_DISK_AT_EXIT, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
    assert result.returncode == 1 and "translated" in result.stdout, result.stderr[-3000:]
    assert_one_error_line(result.stderr, "--moe-stats-out")
    assert "--moe-calibration-out" in result.stderr and "No space left on device" in result.stderr
    assert "Exception ignored" not in result.stderr


def generate(data: Path, checkpoint: Path, *extra: str, source: str = "src") -> subprocess.Popen:
    return subprocess.Popen(["fairseq-generate", str(data), "--user-dir", USER_DIR, "--task", "translation_moe_recording",
                             "-s", source, "-t", "tgt", "--path", str(checkpoint), "--dataset-impl", "raw",
                             "--gen-subset", "test", "--beam", "1", "--max-len-b", "5", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_bad_recording_options_are_one_line_and_change_nothing(workspace, tmp_path):
    data = tmp_path / "data"
    for source in ("src", "srç"):
        write_dictionaries(data, src=source)
        (data / f"test.{source}-tgt.{source}").write_text("w1 w2\nw3\n")
        (data / f"test.{source}-tgt.tgt").write_text("w3 w4\nw5\n")
    model = workspace / "model.pt"
    first = tmp_path / "calibration"
    run = generate(data, model, "--moe-calibration-out", str(first), "--seed", "3")
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    (written,) = first.iterdir()
    kept = written.read_bytes()
    before = digests(workspace)
    cases = {  # name: (extra arguments, source language, a part of the line expected)
        "non-ASCII source language": (["--moe-stats-out", f"{tmp_path}/s.json"], "srç", "is not a language name"),
        "calibration into a file": (["--moe-calibration-out", f"{workspace}/stats.json"], "src", "is a file"),
        "calibration into a read-only place": (["--moe-calibration-out", "/proc/fmp-calibration"], "src", "/proc/"),
        "calibration of a direction twice": (["--moe-calibration-out", str(first), "--seed", "3"], "src", "exists"),
        "offload override as a string": (["--model-overrides", "{'moe_expert_offload': 'False'}"], "src",
                                         "moe_expert_offload must be true or false"),
        "cache size 1e999": (["--model-overrides", "{'moe_offload_cache_experts': 1e999}"], "src",
                             "moe_offload_cache_experts must be a whole number"),
    }
    processes = {name: generate(data, model, *extra, source=source) for name, (extra, source, _) in cases.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode != 0, (name, stderr[-3000:])
        assert_one_error_line(stderr, cases[name][2])
    assert digests(workspace) == before
    assert written.read_bytes() == kept and os.listdir(first) == [written.name]
    assert sorted(os.listdir(tmp_path)) == ["calibration", "data"]

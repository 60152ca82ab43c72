"""Bad input of every kind ends in one line on stderr and a non-zero exit: no traceback, no stray file.

The CLI runs in-process (cli.main); fairseq-generate, where a traceback could come from fairseq
itself, runs as the stock console script.
"""

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest

from fairseq_moe_prune import cli
from tests.helpers import USER_DIR, build_tiny_model, save_like_trainer, tiny_checkpoint_with_stats, write_dictionaries


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Inputs good and bad, shared by every case (which must leave them as they are)."""
    folder = tmp_path_factory.mktemp("inputs")
    checkpoint, stats_path = tiny_checkpoint_with_stats(folder)
    data = checkpoint.read_bytes()
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    (folder / "text.pt").write_text("not a checkpoint\n")
    cfg, _, dense = build_tiny_model(folder / "dense-data", "--moe-freq", "0")
    save_like_trainer(cfg, dense, folder / "dense.pt")
    (folder / "a-folder").mkdir()
    (folder / "a-file").write_text("x\n")
    good = json.loads(stats_path.read_text())

    def stats_variant(name, edit):
        variant = json.loads(json.dumps(good))
        edit(variant)
        (folder / name).write_text(json.dumps(variant))

    enc = "encoder.layers.1.moe_layer"
    layer = good["pairs"]["src-tgt"]["layers"][enc]
    stats_variant("string.json", lambda d: d["pairs"]["src-tgt"]["layers"][enc].update(top1=["1"] * 4))
    stats_variant("nan.json", lambda d: d["pairs"]["src-tgt"]["layers"][enc].update(prob_sum=[float("nan")] * 4))
    stats_variant("huge.json", lambda d: d["pairs"]["src-tgt"]["layers"][enc].update(top2=[2**70] * 4))
    stats_variant("negative.json", lambda d: d["pairs"]["src-tgt"].update(sentences=-1))
    stats_variant("short.json", lambda d: d["pairs"]["src-tgt"]["layers"][enc].update(routed=layer["routed"][:2]))
    stats_variant("unknown-layer.json", lambda d: d["pairs"]["src-tgt"]["layers"].update({"decoder.layers.0.moe_layer": layer}))
    stats_variant("no-pairs.json", lambda d: d.update(pairs={}, runs=[]))
    stats_variant("traversal.json", lambda d: d["pairs"].update({"../../x-src": d["pairs"].pop("src-tgt")}))
    stats_variant("other-model.json", lambda d: d["model"].update(gate_sha256="0" * 64))
    stats_variant("version-1.json", lambda d: d.update(version=1))
    (folder / "cut.json").write_text(stats_path.read_text()[:100])
    for name, content in {"string-ids.json": {"src": ["1", "2"]}, "list.json": [1, 2, 3], "float-ids.json": {"src": [1.0]},
                          "bad-language.json": {"../src": [1]}, "nested.json": {"src": [[1]]}}.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def prune(*extra):
    return ["prune", "{in}/model.pt", "--out", "{out}/pruned", *extra]


def stats_prune(stats_name, *extra):
    return prune("--stats", f"{{in}}/{stats_name}", "--prune-fraction", "0.5", "--ratio", "1:1", *extra)


# argv (with {in} the inputs' folder, {out} an empty folder), and a part of the one line expected
CASES = {
    "ratio nan:1": (prune("--stats", "{in}/stats.json", "--prune-fraction", "0.5", "--ratio", "nan:1"), "ratio must be positive numbers"),
    "ratio inf:1": (prune("--stats", "{in}/stats.json", "--prune-fraction", "0.5", "--ratio", "inf:1"), "ratio must be positive numbers"),
    "ratio 3": (prune("--stats", "{in}/stats.json", "--prune-fraction", "0.5", "--ratio", "3"), "ratio looks like 3:1"),
    "ratio -1:1": (prune("--stats", "{in}/stats.json", "--prune-fraction", "0.5", "--ratio=-1:1"), "ratio must be positive"),
    "fraction nan": (prune("--stats", "{in}/stats.json", "--prune-fraction", "nan"), "fraction to prune must be in [0, 1)"),
    "keep 0": (prune("--stats", "{in}/stats.json", "--keep", "0"), "cannot keep 0 of 8 experts"),
    "keep too many": (prune("--stats", "{in}/stats.json", "--keep", "99"), "cannot keep 99 of 8 experts"),
    "impossible ratio": (prune("--stats", "{in}/stats.json", "--keep", "5", "--ratio", "3:1"), "keep at least 8 of 8"),
    "threshold 2": (prune("--stats", "{in}/stats.json", "--selection", "threshold", "--threshold", "2"), "threshold must be in (0, 1]"),
    "min per layer 0": (prune("--stats", "{in}/stats.json", "--keep", "1", "--min-per-layer", "0"), "kept ids must be"),
    "no budget": (prune("--stats", "{in}/stats.json"), "give a budget"),
    "bad direction": (stats_prune("stats.json", "--directions", "src-../x"), "is not a language name"),
    "unknown direction": (stats_prune("stats.json", "--directions", "src-xx"), "xx has no statistics as a target"),
    "stats missing": (stats_prune("absent.json"), "no such statistics file"),
    "stats a folder": (stats_prune("a-folder"), "cannot read the statistics file (Is a directory)"),
    "stats not JSON": (stats_prune("text.pt"), "not a statistics file"),
    "stats cut short": (stats_prune("cut.json"), "not a statistics file"),
    "stats strings": (stats_prune("string.json"), "must hold whole numbers >= 0"),
    "stats NaN": (stats_prune("nan.json"), "must hold whole numbers >= 0"),
    "stats 2**70": (stats_prune("huge.json"), "must hold whole numbers >= 0"),
    "stats negative": (stats_prune("negative.json"), "sentences must be a whole number >= 0"),
    "stats short array": (stats_prune("short.json"), "must list 4 counts"),
    "stats unknown layer": (stats_prune("unknown-layer.json"), "are not the model's MoE layers"),
    "stats no pairs": (stats_prune("no-pairs.json"), "holds no language pairs"),
    "stats path traversal": (stats_prune("traversal.json"), "is not a language name"),
    "stats of another model": (stats_prune("other-model.json"), "another model"),
    "stats version 1": (stats_prune("version-1.json"), "version 1 is not supported"),
    "experts.json string ids": (prune("--experts-json", "{in}/string-ids.json", "--directions", "src-src"), "whole-number ids"),
    "experts.json float ids": (prune("--experts-json", "{in}/float-ids.json", "--directions", "src-src"), "whole-number ids"),
    "experts.json nested ids": (prune("--experts-json", "{in}/nested.json", "--directions", "src-src"), "whole-number ids"),
    "experts.json a list": (prune("--experts-json", "{in}/list.json", "--directions", "src-src"), "must map languages"),
    "experts.json bad language": (prune("--experts-json", "{in}/bad-language.json", "--directions", "src-src"), "not a language name"),
    "experts.json not JSON": (prune("--experts-json", "{in}/text.pt", "--directions", "src-src"), "cannot read experts.json"),
    "experts.json a folder": (prune("--experts-json", "{in}/a-folder", "--directions", "src-src"), "cannot read experts.json"),
    "checkpoint missing": (["prune", "{in}/absent.pt", "--stats", "{in}/stats.json", "--out", "{out}/p", "--keep", "4"], "no such checkpoint file"),
    "checkpoint truncated": (["prune", "{in}/truncated.pt", "--stats", "{in}/stats.json", "--out", "{out}/p", "--keep", "4"], "truncated or corrupt"),
    "checkpoint is text": (["prune", "{in}/text.pt", "--stats", "{in}/stats.json", "--out", "{out}/p", "--keep", "4"], "truncated or corrupt"),
    "checkpoint a folder": (["prune", "{in}/a-folder", "--stats", "{in}/stats.json", "--out", "{out}/p", "--keep", "4"], "no such checkpoint file"),
    "checkpoint without MoE": (["prune", "{in}/dense.pt", "--stats", "{in}/stats.json", "--out", "{out}/p", "--keep", "4"], "no MoE layers"),
    "out is the checkpoint": (prune("--stats", "{in}/stats.json", "--keep", "4", "--force", "--out", "{in}/model.pt"), "overlap"),
    "out is the stats": (prune("--stats", "{in}/stats.json", "--keep", "4", "--force", "--out", "{in}/stats.json"), "overlap"),
    "out is the inputs' folder": (prune("--stats", "{in}/stats.json", "--keep", "4", "--force", "--out", "{in}"), "overlap"),
    "out exists": (prune("--stats", "{in}/stats.json", "--keep", "4", "--out", "{in}/a-folder"), "exists (use --force"),
    "out under a file": (prune("--stats", "{in}/stats.json", "--keep", "4", "--ratio", "1:1", "--out", "{in}/a-file/pruned"), "Not a directory"),
    "out on a read-only file system": (prune("--stats", "{in}/stats.json", "--keep", "4", "--ratio", "1:1", "--out", "/proc/fmp-test/out"), "/proc/"),
    "merge into an input": (["stats", "merge", "{in}/stats.json", "{in}/stats.json", "--force"], "overlap"),
    "merge one run twice": (["stats", "merge", "{out}/m.json", "{in}/stats.json", "{in}/stats.json"], "merging it twice"),
    "merge into a folder": (["stats", "merge", "{in}/a-folder", "{in}/stats.json"], "is a folder"),
    "merge a missing file": (["stats", "merge", "{out}/m.json", "{in}/absent.json"], "no such statistics file"),
    "merge different models": (["stats", "merge", "{out}/m.json", "{in}/stats.json", "{in}/other-model.json"], "different models"),
    "merge into a read-only place": (["stats", "merge", "/proc/m.json", "{in}/stats.json"], "/proc/"),
    "show a folder": (["stats", "show", "{in}/a-folder"], "Is a directory"),
    "show a checkpoint": (["stats", "show", "{in}/model.pt"], "not a statistics file"),
    "info missing": (["info", "{in}/absent.pt"], "no such checkpoint file"),
    "info truncated": (["info", "{in}/truncated.pt"], "truncated or corrupt"),
    "info text": (["info", "{in}/text.pt"], "truncated or corrupt"),
    "info a folder without config.json": (["info", "{in}/a-folder"], "folder without config.json"),
    "info a dense checkpoint": (["info", "{in}/dense.pt"], "no MoE layers"),
    "convert bad shard size": (["convert", "{in}/model.pt", "{out}/hf", "--to", "hf", "--max-shard-size", "lots"], "not a size"),
    "convert into its own folder": (["convert", "{in}/model.pt", "{in}", "--to", "sharded", "--force"], "overlap"),
    "convert single into a folder": (["convert", "{in}/model.pt", "{in}/a-folder", "--to", "single", "--force"], "is a folder"),
    "convert a truncated file": (["convert", "{in}/truncated.pt", "{out}/x.pt", "--to", "single"], "truncated or corrupt"),
    "convert wrong --from": (["convert", "{in}/model.pt", "{out}/x.pt", "--to", "single", "--from", "hf"], "not hf"),
    "convert a folder without config.json": (["convert", "{in}/a-folder", "{out}/x.pt", "--to", "single"], "folder without config.json"),
}


def snapshot(folder: Path):
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(workspace, tmp_path, capsys, case):
    argv, message = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(workspace)
    code = cli.main([arg.replace("{in}", str(workspace)).replace("{out}", str(out)) for arg in argv])
    captured = capsys.readouterr()
    assert code == 1, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fairseq-moe-prune: error: "), lines
    assert message is None or message in lines[0]
    assert "Traceback" not in captured.err and "weights_only" not in captured.err
    assert snapshot(workspace) == before
    assert os.listdir(out) == []


@pytest.mark.slow
def test_bad_input_to_stock_fairseq_generate_is_one_line(workspace, tmp_path):
    data = tmp_path / "data"
    write_dictionaries(data)
    (data / "test.src-tgt.src").write_text("w1 w2\n")
    (data / "test.src-tgt.tgt").write_text("w3 w4\n")
    base = ["fairseq-generate", str(data), "--user-dir", USER_DIR, "--task", "translation_moe_recording", "-s", "src", "-t", "tgt",
            "--dataset-impl", "raw", "--gen-subset", "test", "--beam", "1"]
    (tmp_path / "stats").mkdir()
    cases = {  # name: (extra arguments, the line expected)
        "model without MoE layers": (["--path", f"{workspace}/dense.pt", "--moe-stats-out", f"{tmp_path}/s.json"],
                                     "error: --moe-stats-out: the model has no MoE layers to record"),
        "truncated checkpoint": (["--path", f"{workspace}/truncated.pt"], f"error: {workspace}/truncated.pt: not a readable"),
        "statistics into a folder": (["--path", f"{workspace}/model.pt", "--moe-stats-out", f"{tmp_path}/stats"],
                                     f"error: --moe-stats-out {tmp_path}/stats is a folder"),
    }
    processes = {name: subprocess.Popen([*base, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, (extra, _) in cases.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0 and "Traceback" not in stderr, (name, stderr)
        assert stderr.strip().splitlines()[-1].startswith(cases[name][1]), (name, stderr)
    assert sorted(os.listdir(tmp_path)) == ["data", "stats"] and os.listdir(tmp_path / "stats") == []


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_option_has_help_text():
    missing = [f"{parser.prog} {action.dest}" for parser in parsers(cli.build_parser()) for action in parser._actions
               if action.help is None and not isinstance(action, argparse._SubParsersAction)]
    assert missing == []

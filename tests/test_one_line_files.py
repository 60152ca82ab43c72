"""Hostile or unusable files given to the writing commands (extract, prune, convert, stats merge) end in one line
on stderr and a non-zero exit, with every input byte-identical and nothing left behind; never a traceback, a hang,
or a file read or written outside what the user named.

The commands run in-process through ``cli.main`` (as in test_cli_errors.py), so that a case can simulate a full
disk. A FIFO is watched from another thread: if a command still waits on one after a few seconds, the watcher
opens it for writing (which lets the reader go on) and the case fails.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fairseq_moe_prune import cli
from fairseq_moe_prune.checkpoints.convert import convert
from fairseq_moe_prune.checkpoints import hf as hf_writer
from fairseq_moe_prune.checkpoints.hf import INDEX_NAME
from tests.helpers import import_extra, tiny_checkpoint_with_stats, tiny_hf_model

safetensors = import_extra("safetensors")
safetensors_torch = import_extra("safetensors.torch")
import_extra("transformers")

DEEP = 100_000
ROUTER = "model.encoder.layers.1.ffn.router.classifier.weight"
EXPERT_FC1 = "model.encoder.layers.1.ffn.experts.expert_0.fc1.weight"
LAYER_NORM_BIAS = "model.encoder.layers.0.self_attn_layer_norm.bias"


def task_routed_copy(source: Path, target: Path) -> None:
    """The tiny token-routed checkpoint made task-routed (both sides, by target language) with task embeddings."""
    state = torch.load(source, weights_only=False)
    config = state["cfg"]["model"]
    config.moe_task_routing, config.moe_task = "both", "target"
    config.moe_task_langs, config.moe_task_pairs = "src,tgt", "src-tgt,tgt-src"
    dim = state["model"]["encoder.embed_tokens.weight"].shape[1]
    generator = torch.Generator().manual_seed(0)
    for side in ("encoder", "decoder"):
        state["model"][f"{side}.moe_task_embed.weight"] = torch.randn(2, dim, generator=generator)
    target.parent.mkdir()
    torch.save(state, target)


def deeply_nested_copy(source: Path, target: Path) -> None:
    """The checkpoint with its extra_state a list nested DEEP times (its pickle written by hand: torch.save
    itself cannot write it)."""
    import io
    import zipfile

    state = torch.load(source, weights_only=False)
    state["extra_state"] = "DEEPDEEP"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(buffer) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"X\x08\x00\x00\x00DEEPDEEP", b"]" * DEEP + b"a" * (DEEP - 1))
            out.writestr(info, data)


def hf_variant(folder: Path, name: str, config=None, tensors=None, index=None) -> Path:
    """A copy of the HF folder: config.json fields changed, a tensor edited (``tensors``: key -> new tensor, or
    None to drop it) or the index's weight_map edited (``index``: a function of it)."""
    copy = folder.parent / name
    shutil.copytree(folder, copy, symlinks=True)
    if config is not None:
        (copy / "config.json").write_text(config if isinstance(config, str)
                                          else json.dumps({**json.loads((copy / "config.json").read_text()), **config}))
    weight_map = json.loads((copy / INDEX_NAME).read_text())
    for key, tensor in (tensors or {}).items():
        shard = copy / weight_map["weight_map"][key]
        content = safetensors_torch.load_file(shard)
        if tensor is None:
            del content[key], weight_map["weight_map"][key]
        else:
            content[key] = tensor(content[key])
        safetensors_torch.save_file(content, shard, metadata={"format": "pt"})
    if index is not None:
        weight_map = index(weight_map)
    (copy / INDEX_NAME).write_text(weight_map if isinstance(weight_map, str) else json.dumps(weight_map))
    return copy


def names_moved(weight_map, first_shard_name):
    """The index with the first shard's keys pointing at ``first_shard_name``."""
    first = sorted(set(weight_map["weight_map"].values()))[0]
    weight_map["weight_map"] = {key: first_shard_name if shard == first else shard
                                for key, shard in weight_map["weight_map"].items()}
    return weight_map


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Every input of every case (the cases must leave it exactly as it is)."""
    folder = tmp_path_factory.mktemp("inputs")
    checkpoint, _ = tiny_checkpoint_with_stats(folder)
    task_routed_copy(checkpoint, folder / "task" / "model.pt")
    deeply_nested_copy(checkpoint, folder / "deep.pt")
    convert(str(checkpoint), str(folder / "sharded"), "sharded")  # model-shared.pt, model-rank-{0..3}.pt

    hf = folder / "hf"
    tiny_hf_model().save_pretrained(hf, max_shard_size="20KB")  # several shards and an index
    first = sorted(set(json.loads((hf / INDEX_NAME).read_text())["weight_map"].values()))[0]
    shutil.copy(hf / first, folder / "outside.safetensors")
    hf_variant(hf, "hf-absolute", index=lambda m: names_moved(m, str(folder / "outside.safetensors")))
    hf_variant(hf, "hf-parent", index=lambda m: names_moved(m, "../outside.safetensors"))
    sub = hf_variant(hf, "hf-subfolder", index=lambda m: names_moved(m, f"sub/{first}"))
    (sub / "sub").mkdir()
    shutil.copy(hf / first, sub / "sub" / first)
    linked = hf_variant(hf, "hf-linked")  # a shard linked elsewhere, as in Hugging Face's cache
    (linked / first).unlink()
    (linked / first).symlink_to(folder / "outside.safetensors")
    hf_variant(hf, "hf-deep-index", index=lambda m: '{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    hf_variant(hf, "hf-deep-config", config='{"model_type": "nllb-moe", "x": ' + "[" * DEEP + "]" * DEEP + "}")
    hf_variant(hf, "hf-d-model", config={"d_model": 32})
    hf_variant(hf, "hf-more-layers", config={"encoder_layers": 3})
    hf_variant(hf, "hf-fewer-layers", config={"decoder_layers": 1})
    hf_variant(hf, "hf-positions", config={"max_position_embeddings": 10**9})
    hf_variant(hf, "hf-router-1d", tensors={ROUTER: lambda t: t[:, 0].contiguous()})
    hf_variant(hf, "hf-fc1", tensors={EXPERT_FC1: lambda t: t[:-1].contiguous()})
    hf_variant(hf, "hf-missing", tensors={LAYER_NORM_BIAS: None})
    fifo_shard = hf_variant(hf, "hf-fifo")
    (fifo_shard / first).unlink()
    os.mkfifo(fifo_shard / first)

    (folder / "calibration").mkdir()
    os.mkfifo(folder / "calibration" / "src-tgt.safetensors")
    os.mkfifo(folder / "fifo.json")
    return folder


def prune(*extra):
    return ["prune", "{in}/model.pt", "--stats", "{in}/stats.json", "--keep", "4", "--ratio", "1:1", *extra]


def convert_hf(name, *extra):
    return ["convert", f"{{in}}/{name}", "{out}/model.pt", "--to", "single", *extra]


def full_disk(monkeypatch, error):
    """safetensors' writer on a full disk: part of the file written, then the error."""
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise error

    monkeypatch.setattr(hf_writer, "save_file", save_file)  # the name the HF writer calls


def failing_rename(monkeypatch):
    """The last rename of an atomic write fails (as on a file system that refuses it): the error names the output."""
    rename = os.replace

    def replace(source, target):
        if ".tmp-" in os.path.basename(str(source)):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(source), str(target))
        rename(source, target)

    monkeypatch.setattr(os, "replace", replace)


LONG_OUT = "{out}/" + "/".join(["d" * 249] * 20)  # 5,000 bytes, each name legal
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

# name: (argv with {in} the inputs' folder and {out} an empty folder, a part of the one line, a monkeypatch)
CASES = {
    # names from files are data (security)
    "hf index names an absolute path": (convert_hf("hf-absolute"), "not a plain file name", None),
    "hf index names ../": (convert_hf("hf-parent"), "not a plain file name", None),
    "hf index names a path in a folder": (convert_hf("hf-subfolder"), "not a plain file name", None),
    "hf index names the output, --force": (["convert", "{in}/hf-absolute", "{in}/outside.safetensors", "--to",
                                            "single", "--force"], "not a plain file name", None),
    # one overlap check, over every file an input consists of
    "extract --out the checkpoint's folder": (["extract", "{in}/task/model.pt", "--task", "src-tgt", "--out", "{in}/task",
                                               "--force"], "overlap", None),
    "extract --out a folder above it": (["extract", "{in}/task/model.pt", "--task", "src-tgt", "--out", "{in}", "--force"],
                                        "overlap", None),
    "extract --out the checkpoint": (["extract", "{in}/task/model.pt", "--task", "src-tgt", "--out", "{in}/task/model.pt",
                                      "--force"], "overlap", None),
    "convert into a rank file of its input": (["convert", "{in}/sharded/model-shared.pt", "{in}/sharded/model-rank-0.pt",
                                               "--to", "single", "--force"], "overlap", None),
    "prune into a rank file of its input": (["prune", "{in}/sharded/model-shared.pt", "--stats", "{in}/stats.json",
                                             "--keep", "4", "--ratio", "1:1", "--out", "{in}/sharded/model-rank-1.pt",
                                             "--force"], "overlap", None),
    "convert onto where an hf shard links": (["convert", "{in}/hf-linked", "{in}/outside.safetensors", "--to", "single",
                                              "--force"], "overlap", None),
    "prune into the calibration folder": (prune("--calibration", "{in}/calibration", "--out", "{in}/calibration/p",
                                                "--force"), "overlap", None),
    "stats merge into its input": (["stats", "merge", "{in}/stats.json", "{in}/stats.json", "--force"], "overlap", None),
    # paths checked before anything is created; temporary names never shown
    "--out of 5,000 characters": (prune("--out", LONG_OUT), "the output path is", None),
    "--out with a 300-byte name": (["convert", "{in}/model.pt", "{out}/" + "n" * 300, "--to", "single"],
                                   "a file name has at most 255", None),
    "the final rename fails": (["stats", "merge", "{out}/merged.json", "{in}/stats.json"], "{out}/merged.json",
                               failing_rename),
    # a full disk
    "convert --to hf on a full disk": (["convert", "{in}/hf", "{out}/hf", "--to", "hf"], "No space left",
                                       lambda mp: full_disk(mp, ENOSPC)),
    "convert --to hf on a full disk (safetensors' error)": (
        ["convert", "{in}/hf", "{out}/hf", "--to", "hf"], "No space left",
        lambda mp: full_disk(mp, safetensors.SafetensorError("Error while serializing: I/O error: No space left on "
                                                             "device (os error 28)"))),
    # nested 100k deep
    "hf index nested 100k deep": (convert_hf("hf-deep-index"), "nested too deeply", None),
    "hf config.json nested 100k deep": (convert_hf("hf-deep-config"), "nested too deeply", None),
    "checkpoint nested 100k deep": (["convert", "{in}/deep.pt", "{out}/model.pt", "--to", "single"], "nested more than",
                                    None),
    "prune a checkpoint nested 100k deep": (["prune", "{in}/deep.pt", "--stats", "{in}/stats.json", "--keep", "4",
                                             "--ratio", "1:1", "--out", "{out}/p"], "nested more than", None),
    # config.json disagrees with the weights
    "hf d_model": (convert_hf("hf-d-model"), "model.shared.weight has shape (44, 16), but config.json describes (44, 32)",
                   None),
    "hf more encoder layers": (convert_hf("hf-more-layers"), "missing model.encoder.layers.2.", None),
    "hf fewer decoder layers": (convert_hf("hf-fewer-layers"), "model.decoder.layers.1.", None),
    "hf positions": (convert_hf("hf-positions"), "max_position_embeddings must be at most", None),
    "hf 1-D router": (convert_hf("hf-router-1d"), f"{ROUTER} has shape (4,)", None),
    "hf fc1 shape": (convert_hf("hf-fc1"), f"{EXPERT_FC1} has shape (31, 16)", None),
    "hf missing tensor": (convert_hf("hf-missing"), f"missing {LAYER_NORM_BIAS}", None),
    # FIFOs are never waited on
    "a FIFO in the calibration folder": (prune("--calibration", "{in}/calibration", "--metric", "reconstruction",
                                               "--out", "{out}/p"), "not a regular file", None),
    "a FIFO as an hf shard": (convert_hf("hf-fifo"), "not a regular file", None),
    "a FIFO as statistics": (["prune", "{in}/model.pt", "--stats", "{in}/fifo.json", "--keep", "4", "--ratio", "1:1",
                              "--out", "{out}/p"], "not a regular file", None),
    "a FIFO as experts.json": (["prune", "{in}/model.pt", "--experts-json", "{in}/fifo.json", "--directions", "src-src",
                                "--out", "{out}/p"], "not a regular file", None),
}


def snapshot(folder: Path):
    """Every entry under ``folder``: a file's SHA-256, a link's target, or what else it is."""
    entries = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if os.path.islink(path):
                entries[path] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                entries[path] = ("folder",)
            elif not os.path.isfile(path):
                entries[path] = ("special", mode)
            else:
                entries[path] = ("file", hashlib.sha256(Path(path).read_bytes()).hexdigest())
    return entries


# Run as a process of its own: a reader blocked in a library that holds the GIL would stop a thread of ours too.
WATCHER = """
import os, sys, time
patience, fifos = float(sys.argv[1]), sys.argv[2:]
time.sleep(patience)
while True:
    for path in fifos:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
            print(path, flush=True)
        except OSError:
            pass
    time.sleep(0.05)
"""


@contextlib.contextmanager
def fifos_watched(folder: Path, patience: float = 5.0):
    """Yields a list that, once the block ends, names every FIFO under ``folder`` a reader still waited on after
    ``patience`` seconds; the watcher opens such a FIFO for writing and closes it, so that the reader sees an
    empty file and goes on."""
    fifos = [path for path, entry in snapshot(folder).items() if entry[0] == "special"]
    waited_on = []
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(patience), *fifos], stdout=subprocess.PIPE, text=True)
    try:
        yield waited_on
    finally:
        watcher.kill()
        waited_on.extend(watcher.communicate()[0].split())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_files_end_in_one_line_and_change_nothing(workspace, tmp_path, capsys, monkeypatch, case):
    argv, message, patch = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    if patch is not None:
        patch(monkeypatch)
    before = snapshot(workspace)
    with fifos_watched(workspace) as waited_on:
        code = cli.main([arg.replace("{in}", str(workspace)).replace("{out}", str(out)) for arg in argv])
    captured = capsys.readouterr()
    assert waited_on == [], f"waited on {waited_on}"
    assert code == 1, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fairseq-moe-prune: error: "), lines
    assert message.replace("{out}", str(out)) in lines[0], lines[0]
    assert ".tmp-" not in lines[0] and ".staging-" not in lines[0]
    if case.startswith("hf index names"):
        assert "outside" not in lines[0]  # the file outside the folder is neither opened nor named
    assert snapshot(workspace) == before
    assert os.listdir(out) == []


@pytest.mark.parametrize("existing", ["file", "link to a folder", "link to a file", "dangling link"])
def test_force_replaces_an_existing_file_or_link_whole_and_leaves_nothing_else(workspace, tmp_path, existing):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep\n")
    outputs = {"prune": tmp_path / "pruned", "convert": tmp_path / "sharded", "extract": tmp_path / "extracted"}
    for out in outputs.values():
        if existing == "file":
            out.write_text("old\n")
        else:
            out.symlink_to({"link to a folder": elsewhere, "link to a file": elsewhere / "keep.txt",
                            "dangling link": elsewhere / "absent"}[existing])
    before = snapshot(workspace)
    assert cli.main([arg.replace("{in}", str(workspace)) for arg in prune("--out", str(outputs["prune"]), "--force")]) == 0
    assert cli.main(["convert", str(workspace / "model.pt"), str(outputs["convert"]), "--to", "sharded", "--force"]) == 0
    assert cli.main(["extract", str(workspace / "task" / "model.pt"), "--task", "src-tgt", "--out",
                     str(outputs["extract"]), "--force"]) == 0
    for out in outputs.values():
        assert out.is_dir() and not out.is_symlink() and os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "extracted", "pruned", "sharded"]  # no .staging-*-old
    assert sorted(os.listdir(elsewhere)) == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "keep\n"
    assert snapshot(workspace) == before


def test_a_legal_240_byte_output_name_is_written(workspace, tmp_path):
    single = tmp_path / ("n" * 237 + ".pt")
    assert cli.main(["convert", str(workspace / "model.pt"), str(single), "--to", "single"]) == 0
    merged = tmp_path / ("m" * 235 + ".json")
    assert cli.main(["stats", "merge", str(merged), str(workspace / "stats.json")]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([single.name, merged.name])

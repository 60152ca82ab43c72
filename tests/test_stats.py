"""Statistics files are input like any other: names, numbers and shapes are checked; runs are merged once."""

import json

import pytest

from fairseq_moe_prune import cli, stats
from tests.helpers import tiny_checkpoint_with_stats


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny checkpoint and a statistics file for it (pairs src-tgt and tgt-src)."""
    return tiny_checkpoint_with_stats(tmp_path_factory.mktemp("stats"))


def edited(path, tmp_path, edit):
    """A copy of the statistics file at ``path`` after ``edit(data)``."""
    data = json.loads(path.read_text())
    edit(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return out


ENC = "encoder.layers.1.moe_layer"


def set_pair(data, name):
    data["pairs"][name] = data["pairs"].pop("src-tgt")


def set_value(field, value):
    def edit(data):
        data["pairs"]["src-tgt"]["layers"][ENC][field] = value
    return edit


def set_count(value):
    def edit(data):
        data["pairs"]["src-tgt"]["layers"][ENC]["top1"][0] = value
    return edit


BAD_FILES = {
    "path traversal in a pair": (lambda data: set_pair(data, "./../../x-tgt"), "is not a language name"),
    "slash in a language": (lambda data: set_pair(data, "src-a/b"), "is not a language name"),
    "pair without a dash": (lambda data: set_pair(data, "srctgt"), "is not of the form SRC-TGT"),
    "string count": (set_count("7"), "must hold whole numbers >= 0"),
    "float count": (set_count(1.5), "must hold whole numbers >= 0"),
    "NaN count": (set_count(float("nan")), "must hold whole numbers >= 0"),
    "2**70": (set_count(2**70), "must hold whole numbers >= 0"),
    "negative count": (set_count(-1), "must hold whole numbers >= 0"),
    "list as count": (set_count([1]), "must hold whole numbers >= 0"),
    "short array": (lambda data: data["pairs"]["src-tgt"]["layers"][ENC]["top1"].pop(), "must list 4 counts"),
    "string tokens": (set_value("tokens", "10"), "tokens must be a whole number"),
    "unknown layer": (lambda data: data["pairs"]["src-tgt"]["layers"].update(
        {"encoder.layers.0.moe_layer": data["pairs"]["src-tgt"]["layers"][ENC]}), "are not the model's MoE layers"),
    "missing field": (lambda data: data["pairs"]["src-tgt"]["layers"][ENC].pop("routed"), "missing 'routed'"),
    "negative sentences": (lambda data: data["pairs"]["src-tgt"].update(sentences=-3), "sentences must be a whole number"),
    "pairs as a list": (lambda data: data.update(pairs=[]), "pairs is not an object"),
    "run with a bad subset": (lambda data: data["runs"][0].update(subset="../x"), "is not a subset name"),
    "version 1": (lambda data: data.update(version=1), "statistics format version 1 is not supported"),
    "not an object": (lambda data: data.clear(), "not a fairseq-moe-prune statistics file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_files_are_refused_with_one_line(recorded, tmp_path, case):
    edit, message = BAD_FILES[case]
    path = edited(recorded[1], tmp_path, edit)
    with pytest.raises(stats.StatsError, match=message) as error:
        stats.load(str(path))
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))


@pytest.mark.parametrize("version", [2, 3, 4])
def test_files_of_older_versions_are_refused_as_they_do_not_fingerprint_the_experts(recorded, tmp_path, version):
    def to_old_version(data):
        data.update(version=version)
        del data["model"]["experts_sha256"]

    with pytest.raises(stats.StatsError, match=f"version {version} is not supported .need 5.; record them again"):
        stats.load(str(edited(recorded[1], tmp_path, to_old_version)))


def test_runs_are_identified_by_what_they_recorded(recorded):
    loaded = stats.load(str(recorded[1]))
    assert sorted(run.pair for run in loaded.runs) == ["src-tgt", "tgt-src"]
    again = stats.identify_runs(stats.MoEStats(loaded.fingerprint, loaded.settings, loaded.pairs), "valid", 3)
    assert sorted(run.id for run in again.runs) == sorted(run.id for run in loaded.runs)  # deterministic
    other = stats.identify_runs(stats.MoEStats(loaded.fingerprint, loaded.settings, loaded.pairs), "test", 3)
    assert not {run.id for run in other.runs} & {run.id for run in loaded.runs}
    assert "src-tgt: 3 sentences of 3 in valid (100.0% covered)" in stats.summary(loaded)


def test_merge_refuses_its_output_among_the_inputs_and_one_run_twice(recorded, tmp_path, capsys):
    path = recorded[1]
    before = path.read_bytes()
    assert cli.main(["stats", "merge", str(path), str(path), "--force"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"fairseq-moe-prune: error: {path} and the input {path} overlap (inputs are never modified)")
    assert path.read_bytes() == before

    (tmp_path / "copy.json").write_bytes(before)
    assert cli.main(["stats", "merge", str(tmp_path / "all.json"), str(path), str(tmp_path / "copy.json")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "merging it twice would count its sentences twice" in error
    assert str(path) in error and str(tmp_path / "copy.json") in error
    assert not (tmp_path / "all.json").exists()

    # a merged file carries its runs: merging it with one of its parts is refused as well
    halves = stats.load(str(path))
    for pair in ("src-tgt", "tgt-src"):
        part = stats.MoEStats(halves.fingerprint, halves.settings, {pair: halves.pairs[pair]},
                              [run for run in halves.runs if run.pair == pair])
        stats.save(part, str(tmp_path / f"{pair}.json"))
    assert cli.main(["stats", "merge", str(tmp_path / "m.json"), str(tmp_path / "src-tgt.json"),
                     str(tmp_path / "tgt-src.json")]) == 0
    assert (tmp_path / "m.json").read_bytes() == before  # the parts add up to the very bytes of the whole
    capsys.readouterr()
    assert cli.main(["stats", "merge", str(tmp_path / "m2.json"), str(tmp_path / "m.json"),
                     str(tmp_path / "src-tgt.json")]) == 1
    assert "merging it twice" in capsys.readouterr().err


def test_counts_that_overflow_when_added_are_refused(recorded, tmp_path):
    def huge_count_of_another_run(data):
        set_value("tokens", 2**63 - 1)(data)
        data["runs"] = []

    big = edited(recorded[1], tmp_path, huge_count_of_another_run)
    with pytest.raises(stats.StatsError, match="overflow"):
        stats.merge([stats.load(str(big)), stats.load(str(recorded[1]))])

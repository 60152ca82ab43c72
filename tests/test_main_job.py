"""README's main command, shrunk to CI's preset: data -> train -> record -> sweep -> report."""

import json
import re
import sys

import pytest

from fairseq_moe_prune import stats
from tests.conftest import PAIRS, REPO, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_main_job_ci_preset(tmp_path):
    work = tmp_path / "work"
    result = run_cli([sys.executable, str(REPO / "examples/libreoffice_help/run.py"), "--preset", "ci",
                      "--work", str(work)])
    assert "5/5 report" in result.stdout

    recorded = stats.load(str(work / "stats.json"))
    assert sorted(recorded.pairs) == sorted(PAIRS)
    assert all(pair.sentences == 10 for pair in recorded.pairs.values())  # every dev sentence

    sweep = work / "sweep"
    results = json.loads((sweep / "sweep.json").read_text())
    assert len(results) == 1 + 5 * 5  # the full model, then 5 methods x 5 levels
    for run in results.values():
        assert sorted(run["directions"]) == sorted(PAIRS)
        assert all(scores["sentences"] == 10 for scores in run["directions"].values())
    # the pruned models that translated really are smaller, by the planned share of experts
    parameters = {name: run["directions"]["eng_Latn-deu_Latn"]["parameters"] for name, run in results.items()}
    assert parameters["full"] > parameters["importance-language-25"] > parameters["importance-language-90"]
    assert parameters["random-global-75"] == parameters["importance-language-75"]
    assert parameters["reconstruction-language-75"] == parameters["importance-language-75"]
    assert results["importance-language-80"]["pruned_fraction"] == pytest.approx(0.8125)
    # per-language expert sets were written in the NLLB paper's format; checkpoints were cleaned up
    experts = json.loads((sweep / "importance-language-75" / "experts.json").read_text())
    assert sorted(experts) == ["deu_Latn", "eng_Latn", "fra_Latn"]
    assert not list(sweep.rglob("*.pt"))

    report = (sweep / "report.md").read_text()
    for heading in ("## Targets", "## chrF++", "## BLEU", "## Model size", "## Are experts language-specific?",
                    "## Reconstruction loss vs importance", "## Dynamic skipping of the second expert"):
        assert heading in report
    # every change vs the full model with its 95% interval; out of English and into English apart
    assert "paired bootstrap resampling of the test sentences" in report and "## Out of English vs into English" in report
    assert all("hypotheses" in scores for run in results.values() for scores in run["directions"].values())
    # skipping on / off at 0, 50 and 80%: the rule fired on some tokens, and without betas on none
    skipping = json.loads((sweep / "skipping.json").read_text())
    assert sorted(skipping) == ["skip-0", "skip-50", "skip-80"]
    assert all(0 < entry["on"]["skipped_share"] < 1 and entry["off"]["skipped_share"] == 0 for entry in skipping.values())
    assert sorted(path.name.split(".")[0] for path in (work / "calibration").iterdir()) == sorted(PAIRS)
    for name in ("quality_vs_pruning.png", "size_vs_quality.png", "expert_usage.png"):
        assert (sweep / name).read_bytes().startswith(PNG)

    # the task-MoE beside the token-MoE: four models scored on every direction, routing pictured, and the
    # sub-networks again in CTranslate2 int8 (through their M2M100 form)
    task_moe = json.loads((work / "task_moe" / "task_moe.json").read_text())
    assert sorted(task_moe["models"]) == sorted(["token-MoE", "token-MoE pruned per language", "task-MoE",
                                                 "task-MoE sub-network", "task-MoE sub-network, CTranslate2 int8"])
    for model in task_moe["models"].values():
        assert sorted(model["directions"]) == sorted(PAIRS) and model["sentences_per_second"] > 0
    sizes = {name: model["directions"]["eng_Latn-deu_Latn"]["parameters"] for name, model in task_moe["models"].items()}
    assert sizes["task-MoE sub-network"] < sizes["task-MoE"]
    for direction, scores in results["full"]["directions"].items():  # the same token-MoE translates alike in both
        assert task_moe["models"]["token-MoE"]["directions"][direction]["chrf++"] == scores["chrf++"]
    assert "## Task-level MoE and its extracted sub-networks" in report
    assert (sweep / "task_routing.png").read_bytes().startswith(PNG)
    assert not list((work / "task_moe").rglob("*.pt")) and not (work / "task_moe" / "deploy").exists()
    served = [task_moe["models"][name]["directions"] for name in ("task-MoE sub-network", "task-MoE sub-network, CTranslate2 int8")]
    assert abs(sum(d["chrf++"] for d in served[0].values()) - sum(d["chrf++"] for d in served[1].values())) / len(PAIRS) <= 1.0


def test_a_bad_ratio_is_refused_before_any_work(tmp_path):
    result = run_cli([sys.executable, str(REPO / "examples/libreoffice_help/run.py"), "--ratio", "3",
                      "--work", str(tmp_path / "work")], check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "run.py: error: an encoder:decoder ratio looks like 3:1, got '3'"
    assert not (tmp_path / "work").exists()


def test_gpu_settings_and_overrides():
    sys.path.insert(0, str(REPO / "examples/libreoffice_help"))
    import run

    gpu, default = run.PRESETS["gpu"], run.PRESETS["default"]
    assert run.device_args(gpu, cpu=False) == ["--fp16"] and run.device_args(default, cpu=False) == []
    assert run.device_args(gpu, cpu=True) == ["--cpu"]
    budget = run.training_time_args(gpu)
    assert budget[:2] == ["--stop-time-hours", f"{float(gpu['train_minutes']) / 60:.6f}"]
    assert run.training_time_args(run.PRESETS["ci"]) == []  # a number of updates, no time budget
    assert run.training_time_args(default)[:2] == ["--stop-time-hours", f"{13 / 60:.6f}"]
    evidence = run.training_time_args(run.PRESETS["evidence"])
    assert evidence[2:] == ["--num-workers", "0", "--no-save-optimizer-state",
                            "--save-interval-updates", "500", "--keep-interval-updates", "-1"]
    assert run.setting(default, "workers") == 2 and run.setting(gpu, "workers") > 2
    assert run.warmup_updates(default) == 400 and run.warmup_updates(gpu) == gpu["warmup"]
    assert run.warmup_updates(run.PRESETS["ci"]) == 7  # a quarter of its 30 updates
    assert run.setting(default, "task_moe") is True and run.setting(gpu, "task_moe") is False
    assert run.apply_overrides(gpu, ["task_moe=true"])["task_moe"] is True

    shrunk = run.apply_overrides(gpu, ["updates=20", "test_max=10", "fp16=false", "train_minutes=0.5", "langs=deu_Latn"])
    assert (shrunk["updates"], shrunk["test_max"], shrunk["fp16"], shrunk["train_minutes"], shrunk["langs"]) == \
        (20, 10, False, 0.5, "deu_Latn")
    assert gpu["updates"] != 20  # the preset itself is left alone
    assert run.apply_overrides(default, ["workers=3"])["workers"] == 3  # a setting the preset leaves at its default
    assert run.sweep_levels(gpu) == [] and run.sweep_levels(run.apply_overrides(gpu, ["levels=0.5,0.8"])) == [0.5, 0.8]
    with pytest.raises(ValueError, match="--set levels takes fractions"):
        run.sweep_levels(run.apply_overrides(gpu, ["levels=0.5,80"]))
    for bad, message in [("updates=many", "--set updates takes a whole number, got 'many'"),
                         ("fp16=yes", "--set fp16 takes true or false, got 'yes'"),
                         ("dims=1", "--set takes KEY=VALUE"), ("colour=red", "--set takes KEY=VALUE"),
                         ("updates", "--set takes KEY=VALUE")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            run.apply_overrides(gpu, [bad])


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    result = run_cli([sys.executable, str(REPO / "examples/libreoffice_help/run.py"), "--set", "updates=many",
                      "--work", str(tmp_path / "work")], check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "run.py: error: --set updates takes a whole number, got 'many'"
    assert not (tmp_path / "work").exists()


def test_learning_curve_points_are_spread_over_the_kept_checkpoints_with_their_wall_minutes(tmp_path):
    sys.path.insert(0, str(REPO / "examples/libreoffice_help"))
    import run

    log = tmp_path / "train.log"
    log.write_text("".join(f"| train_inner | epoch 001: loss=1.0, num_updates={u}, lr=0.001, train_wall=1, wall={u * 6}\n"
                           for u in range(10, 4010, 10)))
    for updates in range(500, 4001, 500):
        (tmp_path / f"checkpoint_1_{updates}.pt").write_bytes(b"")
    (tmp_path / "checkpoint_last.pt").write_bytes(b"")
    points = run.curve_points(tmp_path, log)
    # 8 kept, at most CURVE_POINTS scored: every 2nd, always ending at the last one; minutes from fairseq's wall
    assert [(u, m, p.name) for u, m, p in points] == [(u, u / 10, f"checkpoint_1_{u}.pt") for u in (1000, 2000, 3000, 4000)]
    assert run.curve_points(tmp_path, tmp_path / "missing.log") == []

"""Runner, resume, report-from-JSON and CLI of the BH routing experiment on a tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from experiments.bh_routing import analyze_bh_results, run_bh_experiments
from experiments.bh_routing.adapters import patch_model
from experiments.bh_routing.models import build_tiny, load_model, tiny_tokenizer
from experiments.bh_routing.selector import RoutingConfig

ARGS = [
    "--model",
    "tiny-olmoe",
    "--device",
    "cpu",
    "--max-tokens",
    "4",
    "--max-prompts",
    "2",
    "--only",
    "topk_8,bh_moderate,bh_adaptive",
    "--checkpoint-interval",
    "2",
    # A small sensitivity grid: enough to see which null moves with alpha and with temperature.
    "--grid-nulls",
    "empirical,unselected,probability",
    "--grid-alphas",
    "0.01,0.1",
    "--grid-temperatures",
    "1,2",
    "--heldout-max-tokens",
    "640",
]
GRID_JOBS = 3 * 2 * 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bh_run")
    assert run_bh_experiments.main([*ARGS, "--output", str(out)]) == 0
    return out


def _finished(out: Path) -> dict[str, str]:
    return {
        f.name: json.loads(f.read_text())["finished_at"]
        if "__perplexity" not in f.name
        else f.read_text()
        for f in (out / "checkpoints" / "experiments").glob("*.json")
    }


def test_cli_end_to_end_writes_seed_outputs(run_dir: Path) -> None:
    for name in (
        "bh_routing_results.csv",
        "analysis_summary.json",
        "REPORT.md",
        "experiment_log.txt",
        "checkpoints/latest_checkpoint.json",
        "per_layer_k_histograms.csv",
        "perplexity.csv",
    ):
        assert (run_dir / name).is_file(), name
    for plot in (
        "avg_experts_comparison.png",
        "inference_time_comparison.png",
        "expert_utilization_cv.png",
        "experts_by_category.png",
        "experts_vs_latency.png",
    ):
        assert (run_dir / "plots" / plot).stat().st_size > 1000
    rows = list(csv.DictReader((run_dir / "bh_routing_results.csv").open(newline="")))
    assert len(rows) == 6
    topk = [r for r in rows if r["config_name"] == "topk_8"]
    assert all(float(r["avg_experts_per_token"]) == 8.0 for r in topk)
    assert all(r["experts_implementation"] for r in rows)
    bh = [float(r["avg_experts_per_token"]) for r in rows if r["config_name"] == "bh_moderate"]
    assert all(1.0 <= k <= 8.0 for k in bh)
    summary = json.loads((run_dir / "analysis_summary.json").read_text())
    tested = {r["config"] for r in summary["tests"]["avg_experts_per_token"]}
    assert tested == {"bh_moderate", "bh_adaptive"}
    # bh_adaptive (probability null, T = 2) vs bh_moderate (unselected = probability at T = 1):
    # on identical first-layer inputs, temperature now changes the selection.
    pair = summary["temperature"][0]
    assert (pair["low_t"], pair["high_t"]) == ("bh_moderate", "bh_adaptive")
    assert pair["first_layer_same_k"] < pair["first_layer_tokens"]
    report = (run_dir / "REPORT.md").read_text()
    assert "What temperature does and does not change" in report
    assert "tiny random model" in report
    assert "experts per token against" in report
    log = (run_dir / "experiment_log.txt").read_text()
    assert "bh_moderate__p01" in log
    from experiments.common.provenance import git_commit

    commit = git_commit()
    assert commit
    one = json.loads(
        (run_dir / "checkpoints" / "experiments" / "bh_moderate__p00.json").read_text()
    )
    assert one["git_commit"] == commit == summary["git_commit"]
    assert (
        json.loads((run_dir / "checkpoints" / "run_meta.json").read_text())["git_commit"] == commit
    )


def test_sensitivity_and_quality_from_saved_json(run_dir: Path) -> None:
    """Done-when: the sensitivity table and the quality columns come from the saved JSON; under
    the new nulls alpha moves k, under the probability null temperature changes selection."""
    summary = json.loads((run_dir / "analysis_summary.json").read_text())
    verdicts = {v["p_value"]: v for v in summary["sensitivity"]["verdicts"]}
    assert verdicts["empirical"]["pinned_at_min_k"] and not verdicts["empirical"]["alpha_matters"]
    for null in ("unselected", "probability"):
        v = verdicts[null]
        assert v["alpha_matters"] and not v["pinned_at_min_k"]
        assert v["mean_k_high_alpha"] >= v["mean_k_low_alpha"] > 1.5
    assert verdicts["probability"]["temperature_matters"]
    assert not verdicts["unselected"]["temperature_matters"]
    rows = summary["sensitivity"]["rows"]
    assert len(rows) >= GRID_JOBS
    for r in rows:
        assert r["delta_nll"] is not None and r["mean_kl"] is not None and r["mean_kl"] >= 0
        assert 0.0 <= r["share_at_min_k"] <= 1.0 and r["q10"] <= r["q50"] <= r["q90"]
    quality = {r["config"]: r for r in summary["perplexity"]}
    assert quality["topk_8"]["mean_kl"] == 0.0 and quality["topk_8"]["delta_nll"] == 0.0
    assert quality["bh_moderate"]["p_value"] == "unselected"
    report = (run_dir / "REPORT.md").read_text()
    assert "## Sensitivity: null × alpha × temperature" in report
    assert "temperature changes which experts are kept under `probability`" in report
    assert "| unselected | 0.01 | 1 |" in report
    assert (run_dir / "sensitivity.csv").is_file()
    assert (run_dir / "plots" / "sensitivity_null_alpha_temperature.png").stat().st_size > 1000
    # Two prompts: below the documented minimum, so nothing may be called significant.
    for metric_rows in summary["tests"].values():
        for r in metric_rows:
            assert r["p_t"] is None and r["no_test"].startswith("n = 2")
    assert "significant after Holm" not in report


def test_resume_skips_finished_experiments(run_dir: Path) -> None:
    before = _finished(run_dir)
    victim = run_dir / "checkpoints" / "experiments" / "bh_moderate__p01.json"
    victim.unlink()
    assert run_bh_experiments.main([*ARGS, "--output", str(run_dir)]) == 0
    after = _finished(run_dir)
    assert set(after) == set(before)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"bh_moderate__p01.json"}
    log = (run_dir / "experiment_log.txt").read_text()
    total = 9 + GRID_JOBS
    assert f"{total} experiments in total, {total - 1} already done, 1 to run" in log


def test_resume_refuses_different_settings(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a if a != "4" else "5" for a in ARGS]  # --max-tokens 5
    assert run_bh_experiments.main([*args, "--output", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "Traceback" not in err


def test_report_rebuilt_from_json_without_model(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def _no_model(*_a: object, **_k: object) -> None:
        raise AssertionError("the report must not load a model")

    monkeypatch.setattr("experiments.bh_routing.models.load_model", _no_model)
    monkeypatch.setattr("experiments.bh_routing.runner.load_model", _no_model)
    (run_dir / "REPORT.md").unlink()
    (run_dir / "bh_routing_results.csv").unlink()
    assert analyze_bh_results.main(["--output", str(run_dir)]) == 0
    report = (run_dir / "REPORT.md").read_text()
    assert "## Statistical tests against the baseline" in report
    assert "## Sensitivity: null × alpha × temperature" in report
    quality = report.split("## Quality against native top-k")[1].split("##")[0]
    assert "| bh_moderate | unselected |" in quality
    assert len(list(csv.DictReader((run_dir / "bh_routing_results.csv").open(newline="")))) == 6


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "tiny-olmoe", "--max-tokens", "0"], "--max-tokens"),
        (["--model", "tiny-nope", "--device", "cpu"], "unknown tiny model"),
        (["--model", "tiny-olmoe", "--only", "bh_nonexistent"], "unknown config"),
        (["--model", "tiny-olmoe", "--device", "tpu"], "--device"),
    ],
)
def test_bad_input_gives_clear_error(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_bh_experiments.main([*argv, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_configs_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"mine": {"method": "bh", "alpha": 2}}')
    assert run_bh_experiments.main(["--configs", str(bad), "--output", str(tmp_path)]) == 2
    assert "alpha must be in (0, 1]" in capsys.readouterr().err
    bad.write_text("{not json")
    assert run_bh_experiments.main(["--configs", str(bad), "--output", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert analyze_bh_results.main(["--output", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("main", [run_bh_experiments.main, analyze_bh_results.main])
def test_help(main: object, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])  # type: ignore[operator]
    assert exc.value.code == 0
    assert "--output" in capsys.readouterr().out


def test_loading_path_via_save_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The from_pretrained path a hub id takes, exercised on a saved tiny model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny("tiny-mixtral", seed=3).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu", fp16=False)
    ids = lm.tokenizer("saved and loaded", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        ctl = patch_model(lm.model)
        ctl.set_config(RoutingConfig("k2", method="bh", p_value="gaussian", min_k=2, max_k=2))
        assert torch.allclose(lm.model(ids).logits, ref, atol=1e-6)
    with pytest.raises(ValueError, match="cannot load model"):
        load_model(str(tmp_path / "nothing-here"), device="cpu")


def test_no_significance_from_zero_variance_or_small_n() -> None:
    """The audit's case: n = 3 identical differences was reported as significant. Now: no test."""
    import numpy as np

    from experiments.bh_routing.analysis import MIN_N, paired_test, verdict

    base = np.array([8.0, 8.0, 8.0])
    r = paired_test(base, base - 7.0)
    assert r["p_t"] is None and r["p_wilcoxon"] is None and verdict(r).startswith("no test")
    assert r["n"] == 3 and r["mean_diff"] == -7.0 and r["ci_low"] == r["ci_high"] == -7.0
    n = MIN_N + 4
    flat = paired_test(np.full(n, 8.0), np.full(n, 1.0))
    assert flat["no_test"] == "the differences have zero variance" and flat["d_z"] is None
    rng = np.random.default_rng(0)
    b = rng.normal(size=n)
    ok = paired_test(b, b + 1.0 + rng.normal(scale=0.1, size=n))
    assert ok["no_test"] is None and ok["p_t"] is not None and ok["p_t"] < 0.05
    assert ok["d_z"] > 1 and ok["ci_low"] < ok["mean_diff"] < ok["ci_high"]


def test_k_distribution_quantiles_and_shares() -> None:
    from experiments.bh_routing.runner import k_distribution, pooled_hist

    total = pooled_hist({"0": [0, 1, 2, 1], "1": [0, 1, 1, 4]})
    assert total == [0, 2, 3, 5]
    d = k_distribution(total, min_k=1, max_k=3)
    assert d["n"] == 10 and d["mean"] == pytest.approx(2.3)
    assert (d["q10"], d["q25"], d["q50"], d["q75"], d["q90"]) == (1, 2, 2, 3, 3)
    assert d["share_at_min_k"] == pytest.approx(0.2) and d["share_at_max_k"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no routing decisions"):
        k_distribution([0, 0], 0, 1)

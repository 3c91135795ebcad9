"""Invariants of the analytical multi-GPU MoE model, the DeepEP check, and the two CLIs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from experiments.multi_gpu_model import analyze_multi_gpu_results as analyzer
from experiments.multi_gpu_model import multi_gpu_model as cli
from experiments.multi_gpu_model.model import (
    DEFAULT_CONFIG,
    ConfigError,
    alltoall_bytes_per_token,
    cost_per_million_tokens,
    deepep_check,
    deepep_validation,
    evaluate,
    expected_experts_touched,
    load_config,
    memory_check,
    step_time,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():  # type: ignore[no-untyped-def]
    return load_config()


def test_single_gpu_has_no_communication(cfg) -> None:  # type: ignore[no-untyped-def]
    for dedup in (False, True):
        assert alltoall_bytes_per_token(4096, 2, 2, 1, experts=8, dedup=dedup) == 0.0
    s = cfg.systems[0]
    st = step_time(cfg.workload, s.gpu, s.interconnect, 1)
    assert st.comm_total_s == 0.0
    assert st.comm_exposed_s == 0.0
    assert st.comm_overhead == 0.0
    st_pf = step_time(cfg.workload, s.gpu, s.interconnect, 1, cfg.prefetch)
    assert st_pf.comm_total_s == 0.0


@pytest.mark.parametrize(("experts", "k"), [(8, 2), (64, 8), (128, 8), (256, 8), (512, 10)])
def test_dedup_never_exceeds_no_dedup(experts: int, k: int) -> None:
    for g in (g for g in (2, 4, 8, 10, 16) if g <= experts):
        plain = alltoall_bytes_per_token(7168, k, 1, g, experts=experts)
        dedup = alltoall_bytes_per_token(7168, k, 1, g, experts=experts, dedup=True)
        assert 0 < dedup <= plain + 1e-9
        assert plain == pytest.approx(k * 7168 * (g - 1) / g)
    # k = 1: a token goes to at most one GPU, so dedup changes nothing.
    assert alltoall_bytes_per_token(10, 1, 1, 4, experts=8, dedup=True) == pytest.approx(
        alltoall_bytes_per_token(10, 1, 1, 4, experts=8)
    )
    with pytest.raises(ValueError, match="experts >= ep"):
        alltoall_bytes_per_token(10, 2, 1, 16, experts=8, dedup=True)


def test_data_parallel_is_g_times_one_gpu(cfg) -> None:  # type: ignore[no-untyped-def]
    s = next(x for x in cfg.systems if x.name == "8xA100")
    rows = evaluate(s, cfg.workload, cfg.prefetch, cfg.tokens_per_month)
    dp = next(r for r in rows if r["strategy"] == "data_parallel" and r["variant"] == "baseline")
    one = step_time(cfg.workload, s.gpu, s.interconnect, 1)
    single_tps = cfg.workload.sequences_per_gpu / one.step_s
    assert dp["throughput_tok_s"] == pytest.approx(8 * single_tps)
    assert dp["comm_overhead"] == 0.0
    assert dp["scaling_efficiency"] == pytest.approx(1.0)
    # Cost per token is the same as one GPU's: G times the price for G times the tokens.
    assert dp["cost_per_1m_tokens_usd"] == pytest.approx(
        cost_per_million_tokens(1, s.gpu.price_per_gpu_hour_usd, single_tps)
    )


def test_memory_check_rejects_mixtral_bf16_on_one_80gb_gpu() -> None:
    c = load_config(model="mixtral-8x7b")
    a100 = next(s.gpu for s in c.systems if s.gpu.memory_gb == 80)
    assert c.workload.model.total_params == pytest.approx(46.7e9, rel=0.01)
    one = memory_check(c.workload, a100, 1)
    assert not one.fits
    assert one.weights_gb > 80
    assert "needs" in one.reason
    # Sharding the experts over 2 GPUs makes it fit.
    assert memory_check(c.workload, a100, 2).fits
    # fp8 weights (1 byte) fit on one GPU with a smaller batch.
    fp8 = replace(c.workload, weight_bytes=1.0, sequences_per_gpu=4)
    assert memory_check(fp8, a100, 1).fits


def test_param_counts_match_published_sizes(cfg) -> None:  # type: ignore[no-untyped-def]
    assert cfg.models["qwen3-30b-a3b"].total_params == pytest.approx(30.5e9, rel=0.01)
    assert cfg.models["qwen3-30b-a3b"].active_params_per_token == pytest.approx(3.3e9, rel=0.1)
    assert cfg.models["olmoe-1b-7b"].total_params == pytest.approx(6.9e9, rel=0.01)


def test_deepep_published_times_within_5_percent(cfg) -> None:  # type: ignore[no-untyped-def]
    chk = deepep_check(cfg.validation["deepep_low_latency"])
    assert abs(chk["dispatch_rel_err"]) < 0.05
    assert abs(chk["combine_rel_err"]) < 0.05
    assert chk["dispatch_pred_us"] == pytest.approx(74.9, abs=0.1)
    assert chk["combine_pred_us"] == pytest.approx(115.6, abs=0.1)


def test_deepep_out_of_sample_validation(cfg) -> None:  # type: ignore[no-untyped-def]
    """Done-when: per-row errors against DeepEP's public tables, with the fitting rows named."""
    spec = cfg.validation["deepep"]
    v = deepep_validation(spec)
    assert v["fit_rows"] == ["low_latency/EP16", "normal/intranode/EP8"]
    rows = v["rows"]
    ll = {(r["ep"], r["phase"]): r for r in rows if r["row"].startswith("low_latency")}
    assert sorted({ep for ep, _ in ll}) == [8, 16, 32, 64, 128, 256]
    assert {r["row"] for r in rows if r["row"].startswith("normal")} == {
        "normal/intranode/EP8",
        "normal/internode/EP16",
        "normal/internode/EP32",
        "normal/internode/EP64",
    }
    # The public figures themselves (DeepEP README), not numbers fitted to anything.
    assert (ll[(8, "dispatch")]["published_us"], ll[(256, "combine")]["published_us"]) == (77, 360)
    fitted = [r for r in rows if r["used_for_fit"]]
    assert {r["row"] for r in fitted} == set(v["fit_rows"])
    # Exactly fitted times; the bandwidth column differs only by DeepEP's rounding of its figures.
    assert all(abs(r["time_err_pct"]) < 1e-6 for r in fitted if r["time_err_pct"] is not None)
    assert all(abs(r["bw_err_pct"]) < 3 for r in fitted)
    others = [r for r in rows if not r["used_for_fit"]]
    assert len(others) == 16 and all(math.isfinite(r["bw_err_pct"]) for r in others)
    p = v["params"]
    assert p["latency_us"] > 0 and p["rdma_gb_s"] > 0 and p["nvlink_gb_s"] > 0
    # Another pair of fitting rows gives other parameters: the fit is not hard-wired.
    alt = deepep_validation(spec, ["low_latency/EP8", "normal/intranode/EP8"])
    assert alt["params"]["rdma_gb_s"] != p["rdma_gb_s"]
    with pytest.raises(ValueError, match="at most two rows"):
        deepep_validation(spec, ["low_latency/EP8", "low_latency/EP16", "normal/intranode/EP8"])
    with pytest.raises(ValueError, match="one low_latency row"):
        deepep_validation(spec, ["low_latency/EP8", "low_latency/EP16"])


def test_experts_touched_and_prefetch_monotonicity(cfg) -> None:  # type: ignore[no-untyped-def]
    assert expected_experts_touched(128, 8, 128, 0) == 0.0
    assert expected_experts_touched(128, 8, 128, 1) == pytest.approx(8)
    assert expected_experts_touched(128, 8, 128, 10_000) == pytest.approx(128)
    s = next(x for x in cfg.systems if x.name == "10xA6000")
    base = step_time(cfg.workload, s.gpu, s.interconnect, 10)
    no_overhead = replace(cfg.prefetch, predictor_overhead=0.0)
    prev = math.inf
    for acc in (0.0, 0.4, 0.8, 1.0):
        pf = step_time(
            cfg.workload, s.gpu, s.interconnect, 10, replace(no_overhead, prediction_accuracy=acc)
        )
        assert pf.comm_exposed_s <= prev + 1e-12
        prev = pf.comm_exposed_s
    # Accuracy 0 and no overhead is exactly the baseline.
    zero = step_time(
        cfg.workload, s.gpu, s.interconnect, 10, replace(no_overhead, prediction_accuracy=0.0)
    )
    assert zero.step_s == pytest.approx(base.step_s)


def test_config_errors_are_clear(tmp_path: Path) -> None:
    raw = json.loads(DEFAULT_CONFIG.read_text())
    raw["systems"][0]["hybrid"] = [3, 1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="must equal count"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown model"):
        load_config(model="gpt-9")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "broken.json")


def test_cli_end_to_end_and_analyzer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mgm"
    assert cli.main(["--output-dir", str(out), "--systems", "2xA100", "8xA100", "10xA6000"]) == 0
    for name in ("results_2xA100.csv", "results_8xA100.csv", "all_systems_comparison.csv"):
        assert (out / "data" / name).is_file()
    assert (out / "SUMMARY_8xA100.md").is_file()
    summary = (out / "SUMMARY_10xA6000.md").read_text()
    assert "does not fit" in summary  # data parallel: 61 GB of weights on a 48 GB GPU
    for stem in (
        "throughput_comparison_2xA100",
        "throughput_comparison_8gpu",  # the seed's figure name
        "throughput_comparison_2gpu",
        "communication_overhead_8xA100",
        "cost_efficiency_2xA100",
        "cross_system_comparison",
    ):
        assert (out / "figures" / f"{stem}.pdf").is_file()
        assert (out / "figures" / f"{stem}.png").is_file()
    logs = list((out / "logs").glob("multi_gpu_analysis_*.log"))
    assert len(logs) == 1
    assert "ANALYSIS COMPLETED SUCCESSFULLY" in logs[0].read_text()
    df = pd.read_csv(out / "data" / "all_systems_comparison.csv")
    assert set(df["system"]) == {"2xA100", "8xA100", "10xA6000"}
    # The 2xA100 hybrid row is there, labelled, and says why it equals expert parallel.
    two = df[df.system == "2xA100"]
    assert set(two["strategy"]) == {"expert_parallel", "data_parallel", "hybrid_2x1"}
    hyb = two[two.strategy == "hybrid_2x1"].iloc[0]
    assert "same split as expert_parallel" in hyb["strategy_note"]
    ep = two[(two.strategy == "expert_parallel") & (two.variant == hyb["variant"])].iloc[0]
    assert hyb["throughput_tok_s"] == ep["throughput_tok_s"]
    from experiments.common.provenance import git_commit

    used = json.loads((out / "data" / "config_used.json").read_text())
    assert used["git_commit"] == git_commit() and used["git_commit"]
    tables = pd.read_csv(out / "data" / "validation_deepep_tables.csv")
    assert len(tables) == 2 * (6 + 4)
    assert set(df["variant"]) == {"baseline", "prefetch"}
    capsys.readouterr()
    assert analyzer.main(["--results-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "10xA6000: best prefetch vs best baseline" in text
    assert "DeepEP check" in text
    assert "DeepEP out-of-sample validation" in text and "low_latency/EP256" in text
    assert (out / "ANALYSIS.md").is_file()


def test_cli_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    script = REPO / "experiments" / "multi_gpu_model" / "multi_gpu_model.py"
    r = subprocess.run(
        [sys.executable, str(script), "--systems", "3xTPU", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 2
    assert "unknown system" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            "--prediction-accuracy",
            "1.5",
            "--no-plots",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 2
    assert "prediction-accuracy" in r.stderr
    assert "Traceback" not in r.stderr
    ana = REPO / "experiments" / "multi_gpu_model" / "analyze_multi_gpu_results.py"
    r = subprocess.run(
        [sys.executable, str(ana), "--results-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 2
    assert "run multi_gpu_model.py" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0
    assert "--output-dir" in r.stdout

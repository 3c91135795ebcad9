"""Outlier features end to end on tiny random MoE models: planted dims, backends, CLIs, loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from experiments.outlier_features import compare, run
from experiments.outlier_features.analysis import analyze
from experiments.outlier_features.configs import get_spec
from experiments.outlier_features.data import load_chunks
from experiments.outlier_features.extract import extract
from experiments.outlier_features.models import build_tiny_moe, load_model, tiny_tokenizer

PLANTED = [7, 42, 99]


@pytest.fixture(scope="module")
def planted_ids() -> torch.Tensor:
    return load_chunks(tiny_tokenizer(), num_sequences=8, seq_len=128,
                       corpus="packaged").input_ids


@pytest.fixture(scope="module")
def planted_stats(planted_ids: torch.Tensor):  # type: ignore[no-untyped-def]
    lm = load_model(get_spec("tiny-moe-planted"), device="cpu", backend="nnsight")
    return extract(lm, planted_ids, backend="nnsight")


def test_planted_dims_found_exactly_with_zero_width_ci(planted_stats) -> None:  # type: ignore[no-untyped-def]
    assert planted_stats.shape == (8, 128, 4, 128)
    summary, table = analyze(planted_stats, n_resamples=1000, k=2)
    for tag in ("with_pos0", "without_pos0"):
        r = summary["results"][tag]
        assert r["dims"] == PLANTED
        b = r["bootstrap"]
        assert b["n_dims_ci"] == [3.0, 3.0]
        assert b["share_resamples_with_same_set"] == 1.0
        assert b["layers_affected_ci"] == [1.0, 1.0]
        xb = r["cross_batch"]  # two disjoint halves of 4 sequences each
        assert xb["batch_sizes"] == [4, 4]
        assert xb["pairwise_jaccard"] == [1.0]
        assert xb["stable_dims"] == PLANTED
    assert table.loc[table["is_outlier"], "dim"].tolist() == PLANTED
    assert (table.loc[PLANTED, "layer_frac"] == 1.0).all()
    # gain 8 on ~unit-RMS inputs: |x| >= 6 wherever |x/rms| >= 0.75 — most positions.
    assert (table.loc[PLANTED, "seq_frac"] > 0.3).all()


def test_unit_gains_give_no_outliers(planted_ids: torch.Tensor) -> None:
    lm = load_model(get_spec("tiny-moe"), device="cpu", backend="hooks")
    stats = extract(lm, planted_ids, backend="hooks")
    summary, table = analyze(stats, n_resamples=200, k=2)
    for tag in ("with_pos0", "without_pos0"):
        assert summary["results"][tag]["n_dims"] == 0
        assert summary["results"][tag]["bootstrap"]["n_dims_ci"] == [0.0, 0.0]
    assert not table["is_outlier"].any()
    assert summary["max_abs_overall"] < 6.0


def test_nnsight_and_hooks_agree_and_chunking_is_invisible(planted_ids, planted_stats) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(get_spec("tiny-moe-planted"), device="cpu", backend="nnsight")
    ids = planted_ids[:2]
    ref = extract(lm, ids, backend="nnsight")
    hooks = extract(lm, ids, backend="hooks", chunk_layers=3)
    chunked = extract(lm, ids, backend="nnsight", chunk_layers=1)
    for other in (hooks, chunked):
        np.testing.assert_array_equal(ref.tok_max, other.tok_max)
        np.testing.assert_array_equal(ref.seq_max, other.seq_max)
        np.testing.assert_array_equal(ref.seq_max_nopos0, other.seq_max_nopos0)
        np.testing.assert_allclose(ref.sumsq, other.sumsq, rtol=1e-6)
    np.testing.assert_array_equal(ref.tok_max, planted_stats.tok_max[:2])
    # Batching changes the matmul blocking (float rounding only), not the per-sequence layout.
    batched = extract(lm, ids, backend="nnsight", batch_size=2)
    np.testing.assert_allclose(batched.tok_max, ref.tok_max, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batched.seq_max, ref.seq_max, rtol=1e-4, atol=1e-5)
    # A layer subset observes only those blocks.
    sub = extract(lm, ids, layers=[1, 3])
    np.testing.assert_array_equal(sub.seq_max, ref.seq_max[:, [1, 3]])


def _run_args(out: Path, model: str, *extra: str) -> list[str]:
    return ["--model", model, "--device", "cpu", "--num-sequences", "4", "--seq-len", "96",
            "--bootstrap", "200", "--xbatch-k", "2", "--output-dir", str(out), "--quiet", *extra]


def test_real_loading_path_via_save_pretrained(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved checkpoint dir goes through from_pretrained exactly as a hub id would."""
    ckpt = tmp_path / "ckpt"
    spec = get_spec("tiny-moe-planted")
    build_tiny_moe(spec, seed=3).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for backend in ("nnsight", "hooks"):
        out = tmp_path / f"out-{backend}"
        assert run.main(_run_args(out, str(ckpt), "--dtype", "float32",
                                  "--backend", backend)) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["results"]["with_pos0"]["dims"] == PLANTED
        assert s["model"]["family"] == "moe" and s["model"]["num_experts"] == 8
        assert s["model"]["architecture"] == "OlmoeForCausalLM"
        assert s["run"]["corpus"]["source"] == "packaged"  # auto + offline hub
        assert s["run"]["backend"] == backend


def test_run_end_to_end_then_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = tmp_path / "results"
    assert run.main(_run_args(res / "planted", "tiny-moe-planted")) == 0
    assert run.main(_run_args(res / "plain", "tiny-moe", "--backend", "hooks")) == 0
    printed = capsys.readouterr().out
    assert "outlier dims: 3 [3, 3] [7, 42, 99]" in printed
    s = json.loads((res / "planted" / "summary.json").read_text())
    assert s["denominators"]["values"] == {
        "B_sequences": 4, "S_positions": 96, "L_blocks": 4, "sites_per_block": 2,
        "H_hidden": 128, "positions_total": 384, "positions_without_pos0": 380}
    assert len(s["sensitivity_grid"]) == 36
    from experiments.common.provenance import git_commit

    assert s["git_commit"] == s["run"]["git_commit"] == git_commit() and s["git_commit"]
    assert s["model"]["total_params"] == s["model"]["total_params_counted"] > 0
    assert 0 < s["model"]["active_params"] < s["model"]["total_params"]
    table = pd.read_csv(res / "planted" / "per_dim.csv")
    assert len(table) == 128 and table["is_outlier"].sum() == 3

    # compare: PNGs + CSV on disk, then each stdout format.
    assert compare.main([str(res)]) == 0
    out = res / "sweep_analysis"
    for name in ("outlier_scaling.png", "outlier_counts.png", "comparison.csv"):
        assert (out / name).stat().st_size > 1000 or name == "comparison.csv"
    assert (out / "outlier_scaling.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert compare.main([str(res), "--terminal", "--format", "csv"]) == 0
    csv_text = capsys.readouterr().out
    assert csv_text.startswith("model,")
    rows = {r.split(",")[0]: r for r in csv_text.strip().splitlines()[1:]}
    assert set(rows) == {"tiny-moe", "tiny-moe-planted"}
    assert compare.main([str(res), "--terminal", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    planted = next(d for d in data if d["model"] == "tiny-moe-planted")
    assert planted["n_dims"] == 3 and planted["layers_affected_pct"] == 100.0
    assert compare.main([str(res), "--terminal"]) == 0
    text = capsys.readouterr().out
    assert "layers affected (%) vs total_params" in text and "M" in text

    # The seed's entry point, as a real process from another directory, with the seed's flags:
    # the same program as compare.py, so the same bytes on stdout.
    script = Path(compare.__file__).with_name("generate_comparison_plots.py")
    for fmt in ("csv", "json"):
        proc = subprocess.run(
            [sys.executable, str(script), str(res), "--terminal", "--format", fmt],
            capture_output=True, text=True, cwd=tmp_path, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert compare.main([str(res), "--terminal", "--format", fmt]) == 0
        assert proc.stdout == capsys.readouterr().out
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, check=False)
    assert helped.returncode == 0 and "generate_comparison_plots.py" in helped.stdout
    assert "--terminal" in helped.stdout and "--format" in helped.stdout


def test_bad_input_gives_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert run.main(["--model", str(tmp_path)]) == 2  # a dir without config.json
    assert "config.json" in capsys.readouterr().err
    assert run.main(["--model", "tiny-moe", "--layer-pct", "250"]) == 2
    assert "percentage" in capsys.readouterr().err
    assert run.main(["--model", "03", "--plant-dims", "1,2"]) == 2
    assert "tiny" in capsys.readouterr().err
    assert run.main(["--model", "tiny-moe", "--plant-dims", "1,x"]) == 2
    assert "integers" in capsys.readouterr().err
    assert run.main(["--model", "tiny-moe", "--plant-dims", "500", "--quiet"]) == 2
    assert "outside hidden size" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert "no such results" in capsys.readouterr().err
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text("{}")
    assert compare.main([str(bad.parent)]) == 2
    assert "not an outlier_features summary" in capsys.readouterr().err


def test_dry_run_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--model", "06", "--dry-run", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vram_plan"]["gpu_count"] == 4
    assert info["broker_query"].startswith("gpu~H100")

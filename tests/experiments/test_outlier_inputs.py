"""Bad input to run.py / deploy.py / deploy_sweep.py fails before anything is loaded or rented.

A cloud box costs money and ~15 minutes of setup: every flag the job would reject must be
rejected on the laptop, with exit 2 and a message that says what would be right.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.launch import LaunchStore
from experiments.outlier_features import compare, deploy, deploy_sweep, run
from experiments.outlier_features.analysis import cross_batch
from experiments.outlier_features.extract import ActivationStats

#: The `journal` fixture (tests/experiments/conftest.py): all broker journal entries.
Journal = Callable[[], list[Any]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", ""], "--model is empty"),
        (["--model", "  "], "--model is empty"),
        (["--model", "tiny-moe", "--layers", "9"], "has blocks 0-"),
        (["--model", "tiny-moe", "--layers", "2,1"], "increasing order"),
        (["--model", "tiny-moe", "--layers", "1,1"], "distinct block indices"),
        (["--model", "tiny-moe", "--layers", "a"], "comma-separated integers"),
        (["--model", "tiny-moe", "--threshold", "nan"], "finite number > 0"),
        (["--model", "tiny-moe", "--threshold", "inf"], "finite number > 0"),
        (["--model", "tiny-moe", "--plant-gain", "30"], "--plant-gain does nothing"),
        (["--model", "tiny-moe", "--device", "gpu"], "auto, cpu, cuda or cuda:N"),
        (["--model", "tiny-moe", "--corpus", "/nonexistent/text.txt"], "existing text file"),
        (["--model", "tiny-moe", "--max-memory-per-gpu", "-1"], "GiB > 0"),
    ],
)
def test_run_refuses_bad_flags_before_loading(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr("experiments.outlier_features.models.load_model", no_load)
    assert run.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_refuses_an_output_dir_that_is_a_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("checked before loading")

    monkeypatch.setattr("experiments.outlier_features.models.load_model", no_load)
    f = tmp_path / "afile"
    f.write_text("x")
    assert run.main(["--model", "tiny-moe", "--output-dir", str(f), "--quiet"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert run.main(["--model", "tiny-moe", "--output-dir", str(f / "sub"), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_run_records_whether_bos_was_really_added(tmp_path: Path) -> None:
    # ByT5 (the tiny models' tokenizer) has no BOS token: nothing was prepended.
    assert run.main(["--model", "tiny-moe", "--num-sequences", "2", "--seq-len", "16",
                     "--xbatch-k", "1", "--bootstrap", "10", "--output-dir", str(tmp_path),
                     "--quiet"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["run"]["bos"] is False
    # K = 1 compares no batches: no agreement figure instead of a perfect one.
    xb = s["results"]["with_pos0"]["cross_batch"]
    assert xb["k"] == 1 and xb["mean_jaccard"] is None and xb["min_jaccard"] is None


def test_cross_batch_with_one_batch_has_no_jaccard() -> None:
    b, s, h = 4, 8, 16
    stats = ActivationStats(
        seq_max=np.zeros((b, 1, 2, h), np.float32),
        seq_max_nopos0=np.zeros((b, 1, 2, h), np.float32),
        tok_max=np.zeros((b, s, h), np.float32), sumsq=np.zeros((1, 2, h)),
        massive_count=np.zeros((1, h), np.int64), out_absmax=np.zeros(1, np.float32),
        out_max_ratio=np.zeros(1, np.float32), layer_indices=[0])
    assert cross_batch(stats, k=1)["mean_jaccard"] is None
    assert cross_batch(stats, k=2)["mean_jaccard"] == 1.0  # two empty sets agree


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--corpus", "/nonexistent/corpus.txt"], "existing text file"),
        (["--device", "gpu"], "auto, cpu, cuda or cuda:N"),
        (["--ttl", "banana"], "--ttl"),
        (["--ready-timeout", "-1"], "--ready-timeout must be a number > 0"),
        (["--min-vram", "-5"], "--min-vram must be a number > 0"),
        (["--max-price", "nan"], "--max-price must be a number > 0"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
    ],
)
def test_deploy_refuses_bad_job_flags_before_renting(env: Path, journal: Journal, extra: list[str],
                                                     message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = deploy.main(["--provider", "local", "--model", "tiny-moe", "--results-dir", str(env),
                      *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "Traceback" not in err
    assert journal() == []  # nothing rented


def test_deploy_model_names(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy.main(["--provider", "local", "--model", " "]) == 2
    assert "--model is empty" in capsys.readouterr().err
    # A hub id outside the tables is accepted, but its size must be given.
    assert deploy.main(["--provider", "local", "--model", "allenai/OLMoE-1B-7B-0125-Instruct"]) == 2
    assert "--min-vram GB" in capsys.readouterr().err
    spec = deploy.resolve_model("allenai/OLMoE-1B-7B-0125-Instruct")
    assert spec.family == "unknown" and spec.hf_id == "allenai/OLMoE-1B-7B-0125-Instruct"
    parser = argparse.ArgumentParser()
    deploy.add_deploy_flags(parser)
    args = parser.parse_args(["--min-vram", "40", "--gpu-count", "2", "--min-cpu-ram", "64"])
    task = deploy.build_task(spec, args)
    query = task.resources.query_text()
    assert task.resources.gpus == 2 and "vram>=40" in query and "ram>=64" in query
    # A real model runs with --device cuda: no silent CPU fallback on a rented box.
    argv = deploy.run_args(spec, args, "out")
    assert argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--corpus") + 1] == "auto"
    assert task.extras == ["experiments", "fineweb"]
    tiny = deploy.resolve_model("tiny-moe")
    targv = deploy.run_args(tiny, parser.parse_args([]), "out")
    assert targv[targv.index("--device") + 1] == "auto"
    assert targv[targv.index("--corpus") + 1] == "packaged"


def test_a_job_that_rejects_its_input_is_bad_input_and_not_retried(
        env: Path, journal: Journal, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The file exists (so the pre-flight passes) but is far too short: run.py on the box
    # exits 2 ("corpus has N tokens"), which no other box would change.
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    rc = deploy_sweep.main(["--provider", "local", "--models", "tiny-moe", "-y", "--retries", "2",
                            "--sweep-id", "outlier-short", "--results-dir", str(env),
                            "--num-sequences", "4", "--seq-len", "64", "--corpus", str(short)])
    out = capsys.readouterr().out
    assert rc == 1, out
    [rec] = LaunchStore.default(os.environ["BROKER_STATE_DIR"]).of_sweep("outlier-short")
    # Exit 2 is the job's own verdict on its input: never retried on another box.
    assert rec.exit_code == 2 and rec.state == "failed" and rec.attempts == 1
    assert "exit code 2" in (rec.error or "")
    assert "corpus has" in (env / "tiny-moe" / "job.log").read_text()
    assert "retry" not in out
    assert all(not e.is_open for e in journal())


def test_sweep_refuses_bad_flags_before_launching(env: Path, journal: Journal,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = deploy_sweep.main(["--provider", "local", "--models", "tiny-moe", "-y",
                            "--results-dir", str(env), "--corpus", "/nonexistent/c.txt"])
    assert rc == 2
    assert "existing text file" in capsys.readouterr().err
    rc = deploy_sweep.main(["--provider", "local", "--models", "tiny-moe", "-y",
                            "--results-dir", str(env), "--sweep-id", "../../x"])
    assert rc == 2
    assert "'../../x' is not usable" in capsys.readouterr().err
    assert journal() == [] and not env.exists()


def _summary(model: str, corpus: str, threshold: float) -> dict[str, object]:
    res = {"n_dims": 1, "bootstrap": {"n_dims_ci": [1, 1], "layers_affected": 0.5,
                                      "layers_affected_ci": [0.4, 0.6],
                                      "positions_affected": 0.1,
                                      "positions_affected_ci": [0.05, 0.2]},
           "cross_batch": {"mean_jaccard": None, "stable_dims": [3]}}
    return {
        "model": {"name": model, "id": model, "family": "moe", "total_params": 1e9,
                  "active_params": 1e8, "hidden_size": 64, "num_layers": 2},
        "denominators": {"values": {"B_sequences": 4, "S_positions": 16}},
        "criteria": {"threshold": threshold, "layer_pct": 0.25, "seq_pct": 0.06},
        "run": {"corpus": {"source": corpus}},
        "results": {"with_pos0": res, "without_pos0": res},
        "massive_activations": {"n_dims": 0},
        "kurtosis": {"attn_input": {"median": 3.0}, "ffn_input": {"median": 3.0}},
    }


def test_compare_warns_about_mixed_corpora_and_criteria(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    for name, corpus, t in (("a", "fineweb-edu", 6.0), ("b", "packaged", 4.0)):
        d = tmp_path / "res" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(_summary(name, corpus, t)))
    old = os.umask(0o022)
    try:
        assert compare.main([str(tmp_path / "res"), "--output-dir", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    cap = capsys.readouterr()
    assert "different detection criteria" in cap.err and "different corpora" in cap.err
    assert "fineweb-edu: a" in cap.err and "packaged: b" in cap.err
    csv = (tmp_path / "out" / "comparison.csv").read_text()
    assert "|x|>=6, >=25% layers, >=6% positions" in csv and "|x|>=4," in csv
    # PNGs were renamed into place (no temp files left) and are readable like a plain file.
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["comparison.csv", "outlier_counts.png", "outlier_scaling.png"]
    for n in names:
        assert stat.S_IMODE((tmp_path / "out" / n).stat().st_mode) == 0o644

"""PEFT sweep: strategies train on tiny models, synthetic data is learnable, analyzer, CLIs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.common.sweep import load_results
from experiments.peft_sweep import train as trainer
from experiments.peft_sweep.analyze import analyze
from experiments.peft_sweep.data import RUDIMENTS, synthetic_dataset
from experiments.peft_sweep.features import log_mel, mel_filterbank, num_frames
from experiments.peft_sweep.models import build_classifier, save_backbone

REPO = Path(__file__).resolve().parents[2]


def _args(**kw: object) -> argparse.Namespace:
    base = [
        "--model",
        "ast",
        "--strategy",
        "lora",
        "--per-class",
        "3",
        "--max-epochs",
        "2",
        "--max-steps-per-epoch",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]
    ns = trainer.build_parser().parse_args(base)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.mark.parametrize(
    ("model", "strategy"),
    [("ast", "lora"), ("htsat", "adalora"), ("beats", "ia3"), ("efficientat", "adalora")],
)
def test_each_strategy_trains_a_few_steps(model: str, strategy: str) -> None:
    before = build_classifier(model, "tiny", len(RUDIMENTS), 197)
    total_plain = sum(p.numel() for p in before.parameters())
    out = trainer.train(_args(model=model, strategy=strategy, augmentation=strategy == "adalora"))
    m, e = out["metrics"], out["efficiency"]
    assert set(m) == {
        "val_acc",
        "val_f1_macro",
        "test_acc",
        "test_f1_macro",
        "best_epoch",
        "final_train_loss",
        "final_val_loss",
    }
    assert 0 <= m["test_acc"] <= 1
    assert m["best_epoch"] in (1, 2)
    assert torch.isfinite(torch.tensor(m["final_train_loss"]))
    # Only adapters and the head train: far fewer than all parameters.
    assert 0 < e["trainable_params"] < 0.5 * total_plain
    assert e["param_efficiency"] == pytest.approx(e["trainable_params"] / e["total_params"])


def test_adalora_schedule_and_peft_targets() -> None:
    cfg = trainer.peft_config("ast", "adalora", 10)
    assert cfg.total_step == 10
    assert cfg.tinit < cfg.total_step - cfg.tfinal
    with pytest.raises(ValueError, match="at least 2"):
        trainer.peft_config("ast", "adalora", 1)
    ia3 = trainer.peft_config("htsat", "ia3", 10)
    assert ia3.feedforward_modules in ia3.target_modules or "output" in ia3.feedforward_modules


def test_macro_f1() -> None:
    y = torch.tensor([0, 0, 1, 1])
    assert trainer.macro_f1(y, y, 2) == 1.0
    assert trainer.macro_f1(torch.tensor([0, 0, 0, 0]), y, 2) == pytest.approx((2 / 3 + 0) / 2)


def test_mel_filterbank_and_frames() -> None:
    fb = mel_filterbank(32, 512, 16000)
    assert fb.shape == (257, 32)
    assert (fb >= 0).all()
    assert (fb.sum(0) > 0).all()  # every filter covers at least one bin
    peaks = fb.argmax(0)
    assert (peaks[1:] >= peaks[:-1]).all()  # centres increase with the mel index
    x = log_mel(torch.randn(2, 32000), n_mels=32)
    assert x.shape == (2, num_frames(32000), 32)
    assert log_mel(torch.randn(1, 32000), n_mels=32, frames=256).shape == (1, 256, 32)


def _ac(x: torch.Tensor, lags: int = 120) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True)
    t = x.shape[1]
    a = torch.fft.irfft(torch.fft.rfft(x, n=2 * t).abs() ** 2)[:, :t]
    return a[:, 1:lags] / a[:, :1].clamp_min(1e-9)


def _rhythm_features(w: torch.Tensor) -> torch.Tensor:
    """Autocorrelations of onset flux, frame energy and a low-band 'which hand' tone ratio."""
    m = log_mel(w, n_mels=32)
    env = m.exp().sum(-1).clamp_min(1e-10).log()
    flux = torch.relu(env[:, 1:] - env[:, :-1])
    s = (
        torch.stft(
            w,
            n_fft=1024,
            hop_length=160,
            win_length=640,
            window=torch.hann_window(640),
            center=False,
            return_complex=True,
        ).abs()
        ** 2
    )  # 15.6 Hz bins
    hand = (s[:, 9:12].sum(1) + 1e-8).log() - (s[:, 12:15].sum(1) + 1e-8).log()
    return torch.cat([_ac(flux), _ac(hand), _ac(env)], 1)


def test_synthetic_rudiments_are_separable_by_logistic_regression() -> None:
    d = synthetic_dataset(20, seed=1)
    assert len(d.classes) == len(RUDIMENTS)
    assert set(d.test.labels.tolist()) == set(range(len(d.classes)))
    xtr = _rhythm_features(d.train.waves)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    w = torch.zeros(xtr.shape[1], len(d.classes), requires_grad=True)
    b = torch.zeros(len(d.classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(((xtr - mu) / sd) @ w + b, d.train.labels)
        loss = loss + 1e-2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    held = torch.cat([d.val.waves, d.test.waves])
    y = torch.cat([d.val.labels, d.test.labels])
    acc = float(((((_rhythm_features(held) - mu) / sd) @ w + b).argmax(1) == y).float().mean())
    assert acc >= 0.9, acc  # chance is 0.1


def test_pretrained_path_loads_a_saved_checkpoint(tmp_path: Path) -> None:
    for kind in ("ast", "beats"):
        src = build_classifier(kind, "tiny", 10, 197)
        save_backbone(src.backbone, tmp_path / kind)
        loaded = build_classifier(kind, "pretrained", 10, 198, checkpoint=str(tmp_path / kind))
        for (n1, p1), (_, p2) in zip(
            src.backbone.state_dict().items(), loaded.backbone.state_dict().items(), strict=True
        ):
            assert torch.equal(p1, p2), n1
    with pytest.raises(ValueError, match="checkpoint"):
        build_classifier("efficientat", "pretrained", 10, 197)


def _fake_result(
    d: Path, key: str, model: str, strategy: str, aug: bool, status: str, acc: float | None
) -> None:
    ok = status == "completed"
    r = {
        "experiment_id": f"{key}_20260101_000000",
        "config": {
            "model": model,
            "strategy": strategy,
            "augmentation": aug,
            "data": "tiny",
            "max_epochs": 1,
        },
        "metrics": {
            "val_acc": acc,
            "val_f1_macro": acc,
            "test_acc": acc,
            "test_f1_macro": acc,
            "best_epoch": 1,
            "final_train_loss": 1.0,
            "final_val_loss": 1.1,
        }
        if ok
        else {},
        "efficiency": {
            "total_params": 1000,
            "trainable_params": int(100 * (acc or 1)),
            "param_efficiency": 0.1,
            "training_time_seconds": 60 * (acc or 1),
            "avg_epoch_time": 60.0,
        }
        if ok
        else {},
        "status": status,
        "error": None if ok else "exit status 1: boom",
        "timestamp": "2026-01-01T00:00:00",
        "git_commit": "abc",
    }
    (d / "runs").mkdir(parents=True, exist_ok=True)
    (d / "runs" / f"{key}.json").write_text(json.dumps(r))


def test_analyzer_on_partial_results(tmp_path: Path) -> None:
    sw = tmp_path / "sweep"
    _fake_result(sw, "a", "ast", "lora", True, "completed", 0.9)
    _fake_result(sw, "b", "ast", "lora", False, "completed", 0.7)
    _fake_result(sw, "c", "htsat", "ia3", True, "completed", 0.8)
    _fake_result(sw, "d", "beats", "adalora", True, "failed", None)
    (sw / "runs" / "torn.json").write_text('{"experiment_id": ')
    out = analyze(sw, tmp_path / "out")
    report = (tmp_path / "out" / "summary_report.md").read_text()
    assert "1. **ast + lora** (with aug): Acc=0.9000" in report
    assert "**ast**: Avg Acc=0.8000 ± 0.1414, Best=0.9000 (2 runs)" in report
    assert "**With augmentation**: Avg Acc=0.8500 (2 runs)" in report
    assert "Paired difference" in report and "+0.2000" in report
    assert "d_20260101_000000: failed" in report and "torn.json" in report
    assert {p.name for p in out["plots"]} == {
        "accuracy_comparison.png",
        "efficiency_scatter.png",
        "training_time.png",
    }
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "comparison_table.csv")
    assert len(table) == 4
    out2 = analyze(sw, tmp_path / "f", models=["ast"], augmentation=True, plots=False)
    assert out2["rows"] == 1
    assert out2["plots"] == []
    with pytest.raises(FileNotFoundError):
        analyze(tmp_path / "empty", tmp_path / "x")


def test_cli_end_to_end(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run = [
        sys.executable,
        "experiments/peft_sweep/scripts/run_sweep.py",
        "--models",
        "beats",
        "--strategies",
        "ia3",
        "adalora",
        "--augmentation",
        "false",
        "--per-class",
        "3",
        "--max-epochs",
        "1",
        "--max-steps-per-epoch",
        "2",
        "--batch-size",
        "8",
        "--output-dir",
        str(sweep),
        "--workers",
        "2",
        "--timeout",
        "240",
    ]
    r = subprocess.run(run, capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Completed: 2, Failed: 0, Skipped: 0" in r.stdout
    results, bad = load_results(sweep)
    assert sorted(x["config"]["strategy"] for x in results) == ["adalora", "ia3"]
    assert not bad
    r = subprocess.run([*run, "--resume"], capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 0
    assert "Nothing to run: 2/2 already completed" in r.stdout
    r = subprocess.run(run, capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 2
    assert "--resume" in r.stderr
    assert "Traceback" not in r.stderr
    ana = [
        sys.executable,
        "experiments/peft_sweep/scripts/analyze_sweep.py",
        "--sweep-dir",
        str(sweep),
        "--no-plots",
        "--filter-status",
        "completed",
    ]
    r = subprocess.run(ana, capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    assert (sweep / "summary_report.md").is_file()
    r = subprocess.run(
        [
            sys.executable,
            "experiments/peft_sweep/scripts/analyze_sweep.py",
            "--sweep-dir",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 2
    assert "run the sweep first" in r.stderr


def test_official_beats_efficientat_checkpoints_are_refused_and_help_says_so(
    tmp_path: Path,
) -> None:
    """Issue 18 item 5: only AST and HTS-AT use published weights, and the CLIs say so."""
    from experiments.peft_sweep.models import PRETRAINED_NOTE, load_pretrained_backbone

    official = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    official.write_bytes(b"not ours")
    for kind, source in (("beats", official), ("efficientat", tmp_path)):
        with pytest.raises(ValueError, match="official .* checkpoints cannot be loaded") as e:
            load_pretrained_backbone(kind, str(source))
        assert PRETRAINED_NOTE in str(e.value)
    for script in ("experiments/peft_sweep/train.py", "experiments/peft_sweep/scripts/run_sweep.py"):
        r = subprocess.run(
            [sys.executable, script, "--help"], capture_output=True, text=True, check=False,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert r.returncode == 0
        assert "Only AST and HTS-AT use published pretrained weights" in " ".join(r.stdout.split())

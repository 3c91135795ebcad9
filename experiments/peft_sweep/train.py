"""Train one (model, PEFT strategy, augmentation, data) combination and report its metrics.

Run by the sweep harness as a subprocess; usable on its own::

    uv run --extra experiments python -m experiments.peft_sweep.train --model ast --strategy \
        lora --augmentation true \
        --data tiny --max-epochs 5 --size tiny

Writes ``{"metrics": ..., "efficiency": ...}`` to ``$SWEEP_METRICS_FILE`` (set by the harness)
and/or ``--output-json``. Metrics are those of the best epoch by validation accuracy.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import experiments.common.extras_torch  # noqa: F401  (exits with an install hint)

# isort: split

import numpy as np
import torch
from torch import nn

from experiments.common.io import atomic_write_json
from experiments.common.provenance import git_commit
from experiments.common.sweep import parse_bool, write_metrics
from experiments.peft_sweep.data import (
    CLIP_SECONDS,
    DATA_PRESETS,
    SAMPLE_RATE,
    augment_waves,
    load_data,
    spec_augment,
)
from experiments.peft_sweep.features import log_mel, num_frames
from experiments.peft_sweep.models import (
    MODELS,
    PRETRAINED_NOTE,
    SIZES,
    TARGETS,
    build_classifier,
)

STRATEGIES = ("lora", "adalora", "ia3")


def peft_config(kind: str, strategy: str, total_steps: int) -> Any:
    """The peft config for ``strategy`` on model ``kind``; the head is always fully trained.

    AdaLoRA's budget schedule: ranks start at ``init_r``, stay fixed for ``tinit`` warm-up steps,
    are pruned towards ``target_r`` every ``deltaT`` steps, and are frozen for the last ``tfinal``
    steps; peft requires ``tinit < total_step - tfinal``.
    """
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    t = TARGETS[kind]
    if strategy == "lora":
        return LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=t["lora"],
            modules_to_save=["classifier"],
        )
    if strategy == "adalora":
        if total_steps < 2:
            raise ValueError("AdaLoRA needs at least 2 optimizer steps")
        tinit = int(0.1 * total_steps)
        tfinal = int(0.2 * total_steps)
        return AdaLoraConfig(
            init_r=12,
            target_r=4,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=max(1, total_steps // 20),
            total_step=total_steps,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=t["lora"],
            modules_to_save=["classifier"],
        )
    if strategy == "ia3":
        return IA3Config(
            target_modules=t["ia3"], feedforward_modules=t["ia3_ff"], modules_to_save=["classifier"]
        )
    raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


def macro_f1(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1 = 2PR/(P+R); a class absent from both counts as 0."""
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1s))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; peft's adapter and saved-head copies included."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_parser() -> argparse.ArgumentParser:
    """The CLI of one training run."""
    p = argparse.ArgumentParser(
        description="Fine-tune an audio classifier with one PEFT strategy "
        "on rudiment audio and report val/test metrics. " + PRETRAINED_NOTE
    )
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--augmentation", type=parse_bool, default=False, help="true or false")
    p.add_argument("--data", default="tiny", choices=list(DATA_PRESETS))
    p.add_argument(
        "--data-source",
        default="auto",
        choices=["auto", "sousa", "synthetic"],
        help="auto: SOUSA if $SOUSA_DIR (or data/sousa) holds it, else synthetic",
    )
    p.add_argument("--per-class", type=int, help="override the preset's clips per class")
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--max-steps-per-epoch", type=int, help="cap batches per epoch (smoke tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size",
        default="tiny",
        choices=SIZES,
        help="tiny/base: random init at that size; pretrained: load --checkpoint (AST and "
        "HTS-AT: published weights; BEATs/EfficientAT: only a save_backbone directory)",
    )
    p.add_argument(
        "--checkpoint",
        help="hub id or directory for --size pretrained (BEATs/EfficientAT: a directory "
        "written by save_backbone; their official checkpoints cannot be loaded)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-json", type=Path, help="also write the metrics payload here")
    return p


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training; returns ``{"metrics": ..., "efficiency": ...}``."""
    from peft import get_peft_model

    if args.max_epochs < 1 or args.batch_size < 1:
        raise ValueError("--max-epochs and --batch-size must be >= 1")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)

    data = load_data(args.data, args.seed, args.per_class, args.data_source)
    frames = num_frames(int(CLIP_SECONDS * SAMPLE_RATE))
    model = build_classifier(args.model, args.size, len(data.classes), frames, args.checkpoint)
    spec = model.input_spec

    def fbank(w: torch.Tensor) -> torch.Tensor:
        return log_mel(w, SAMPLE_RATE, spec.n_mels, frames=spec.frames)

    # Standardise with train-set statistics (AST does the same with AudioSet's mean and std).
    train_fb = fbank(data.train.waves)
    mu, sd = train_fb.mean().item(), train_fb.std().item() + 1e-6
    val_x = ((fbank(data.val.waves) - mu) / sd).to(device)
    test_x = ((fbank(data.test.waves) - mu) / sd).to(device)
    train_x = ((train_fb - mu) / sd) if not args.augmentation else None
    n = len(data.train.labels)
    steps = math.ceil(n / args.batch_size)
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    total_steps = steps * args.max_epochs

    model = get_peft_model(model, peft_config(args.model, args.strategy, total_steps))
    model.to(device)
    total, trainable = count_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    print(
        f"data: {data.source}, {len(data.classes)} classes, train/val/test = {n}/"
        f"{len(data.val.labels)}/{len(data.test.labels)}; input {spec.frames}x{spec.n_mels}; "
        f"params {total:,} total, {trainable:,} trainable",
        flush=True,
    )

    def evaluate(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        model.eval()
        with torch.no_grad():
            out = model(input_features=x, labels=y.to(device))
        pred = out.logits.argmax(-1).cpu()
        return (
            float(out.loss),
            float((pred == y).float().mean()),
            macro_f1(pred, y, len(data.classes)),
        )

    best: dict[str, Any] = {"val_acc": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    epoch_times, train_loss, val_loss = [], math.nan, math.nan
    global_step = 0
    t_start = time.monotonic()
    for epoch in range(1, args.max_epochs + 1):
        t0 = time.monotonic()
        model.train()
        order = torch.randperm(n, generator=gen)
        losses = []
        for s in range(steps):
            idx = order[s * args.batch_size : (s + 1) * args.batch_size]
            y = data.train.labels[idx]
            if args.augmentation:
                xb = spec_augment((fbank(augment_waves(data.train.waves[idx], gen)) - mu) / sd, gen)
            else:
                assert train_x is not None
                xb = train_x[idx]
            out = model(input_features=xb.to(device), labels=y.to(device))
            out.loss.backward()
            opt.step()
            if args.strategy == "adalora":
                # Rank reallocation reads the gradients, so it runs before zero_grad.
                model.base_model.update_and_allocate(global_step)
            opt.zero_grad(set_to_none=True)
            global_step += 1
            losses.append(float(out.loss.detach()))
        train_loss = float(np.mean(losses))
        val_loss, val_acc, val_f1 = evaluate(val_x, data.val.labels)
        epoch_times.append(time.monotonic() - t0)
        print(
            f"epoch {epoch}/{args.max_epochs}: train_loss={train_loss:.4f} "
            f"val_loss={val_loss:.4f} val_acc={val_acc:.4f} val_f1={val_f1:.4f} "
            f"({epoch_times[-1]:.1f} s)",
            flush=True,
        )
        if val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "val_f1_macro": val_f1, "best_epoch": epoch}
            best_state = {
                k: v.detach().clone()
                for k, v in model.state_dict().items()
                if _is_trainable_key(model, k)
            }
    training_time = time.monotonic() - t_start
    model.load_state_dict(best_state, strict=False)
    _, test_acc, test_f1 = evaluate(test_x, data.test.labels)
    metrics = {
        "val_acc": best["val_acc"],
        "val_f1_macro": best["val_f1_macro"],
        "test_acc": test_acc,
        "test_f1_macro": test_f1,
        "best_epoch": best["best_epoch"],
        "final_train_loss": train_loss,
        "final_val_loss": val_loss,
    }
    efficiency = {
        "total_params": total,
        "trainable_params": trainable,
        "param_efficiency": trainable / total,
        "training_time_seconds": training_time,
        "avg_epoch_time": float(np.mean(epoch_times)),
        "data_source": data.source,
        "device": str(device),
    }
    print(
        f"best epoch {best['best_epoch']}: val_acc={best['val_acc']:.4f} "
        f"test_acc={test_acc:.4f} test_f1_macro={test_f1:.4f}",
        flush=True,
    )
    return {"metrics": metrics, "efficiency": efficiency}


def _is_trainable_key(model: nn.Module, key: str) -> bool:
    # Adapter weights, IA3 vectors, AdaLoRA's rank masks (buffers) and the saved head copy: all
    # the state that training changes. Frozen backbone weights are not copied.
    markers = ("lora_", "ia3_", "modules_to_save", "ranknum")
    return any(m in key for m in markers)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input -> one-line error and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        payload = train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_metrics(payload["metrics"], payload["efficiency"])
    if args.output_json:
        atomic_write_json(args.output_json, {**payload, "git_commit": git_commit()})
    if not os.environ.get("SWEEP_METRICS_FILE") and not args.output_json:
        print("(no $SWEEP_METRICS_FILE or --output-json: metrics printed only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

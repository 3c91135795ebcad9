"""Rudiment audio: the SOUSA rudiment set when it is on disk, else an offline synthetic generator.

Synthetic generator: each rudiment is one bar of strokes (position in beats, hand, accent, grace);
a clip repeats the bar at a random tempo, renders every stroke as a snare hit (a decaying noise
burst through a one-pole filter plus a damped drum-head tone), with humanised timing, velocity and
a noise floor. Grace notes (flams, drags) sit 20-45 ms before their main stroke at low velocity;
accents are louder. Classes differ only in timing, sticking and accents, as real rudiments do.

SOUSA (local only, never downloaded): a directory with ``metadata.csv`` (or ``.parquet``) whose
rows name an audio file and its rudiment; see :func:`load_sousa`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
CLIP_SECONDS = 2.0

# (beat position within the bar, hand, accent, grace_kind); grace_kind: "" none, "flam", "drag".
Stroke = tuple[float, str, bool, str]


def _grid(
    sticking: str,
    step: float,
    accents: set[int] | None = None,
    graces: dict[int, str] | None = None,
) -> list[Stroke]:
    """Strokes on an even grid: ``sticking`` like "RLRR LRLL" (spaces are rests)."""
    accents = accents or set()
    graces = graces or {}
    out: list[Stroke] = []
    for i, h in enumerate(sticking):
        if h in "RL":
            out.append((i * step, h, i in accents, graces.get(i, "")))
    return out


# One bar (4 beats) per rudiment, after the PAS International Drum Rudiments sheet.
RUDIMENTS: dict[str, list[Stroke]] = {
    "single_stroke_roll": _grid("RLRLRLRLRLRLRLRL", 0.25),
    "double_stroke_roll": _grid("RRLLRRLLRRLLRRLL", 0.25),
    "single_paradiddle": _grid("RLRRLRLLRLRRLRLL", 0.25, accents={0, 4, 8, 12}),
    "double_paradiddle": _grid("RLRLRRLRLRLLRLRLRRLRLRLL", 1 / 6, accents={0, 6, 12, 18}),
    "paradiddle_diddle": _grid("RLRRLLRLRRLLRLRRLLRLRRLL", 1 / 6, accents={0, 6, 12, 18}),
    "five_stroke_roll": _grid("RRLLR   LLRRL   ", 0.25, accents={4, 12}),
    "six_stroke_roll": _grid("RLLRRLRLLRRL", 1 / 3, accents={0, 5, 6, 11}),
    "flam": _grid(
        "R L R L ", 0.5, accents={0, 2, 4, 6}, graces={0: "flam", 2: "flam", 4: "flam", 6: "flam"}
    ),
    "flam_tap": _grid(
        "RRLLRRLLRRLLRRLL",
        0.25,
        accents={0, 2, 4, 6, 8, 10, 12, 14},
        graces={
            0: "flam",
            2: "flam",
            4: "flam",
            6: "flam",
            8: "flam",
            10: "flam",
            12: "flam",
            14: "flam",
        },
    ),
    "single_drag_tap": _grid("R L R L ", 0.5, accents={2, 6}, graces={0: "drag", 4: "drag"}),
}
RUDIMENT_NAMES = list(RUDIMENTS)

# Samples per class for the presets: total clips = classes x per_class, split 70/15/15.
DATA_PRESETS = {"tiny": 20, "small": 80, "full": 300}


@dataclass
class Split:
    """Waveforms ``(n, samples)`` float32 and integer labels for one split."""

    waves: torch.Tensor
    labels: torch.Tensor


@dataclass
class RudimentData:
    """Train/val/test splits and the class names; ``source`` is ``synthetic`` or ``sousa``."""

    train: Split
    val: Split
    test: Split
    classes: list[str]
    source: str
    sample_rate: int = SAMPLE_RATE


def _hit(rng: np.random.Generator, velocity: float, hand: str, sr: int) -> np.ndarray:
    """One snare stroke: noise (the wires) + a damped ~190 Hz tone (the head), ~120 ms long."""
    n = int(0.12 * sr)
    t = np.arange(n) / sr
    noise = rng.standard_normal(n)
    # One-pole low-pass smooths the wire noise; its coefficient varies a little per stroke.
    from scipy.signal import lfilter

    a = 0.35 + 0.1 * rng.random()
    wires = lfilter([1 - a], [1, -a], noise)
    wires *= np.exp(-t / (0.035 + 0.01 * rng.random()))
    # The two sticks hit slightly different spots: the left hand's tone sits a bit lower.
    f0 = (200.0 if hand == "R" else 170.0) * (1 + 0.02 * rng.standard_normal())
    tone = np.sin(2 * np.pi * f0 * t) * np.exp(-t / 0.05)
    return velocity * (0.7 * wires / (np.abs(wires).max() + 1e-9) + 0.5 * tone)


def render_rudiment(
    name: str,
    rng: np.random.Generator,
    sr: int = SAMPLE_RATE,
    seconds: float = CLIP_SECONDS,
    bpm_range: tuple[float, float] = (105.0, 115.0),
) -> np.ndarray:
    """Render ``name`` to a float32 clip: random tempo, start offset, humanisation and noise."""
    pattern = RUDIMENTS[name]
    bpm = rng.uniform(*bpm_range)
    beat = 60.0 / bpm
    n = int(seconds * sr)
    out = np.zeros(n + int(0.2 * sr))
    start = rng.uniform(0, 0.5) * beat  # clips do not all start on the downbeat
    bar = 0
    while True:
        base = start + bar * 4 * beat
        if base >= seconds:
            break
        prev_hand = ""
        for pos, hand, accent, grace in pattern:
            t0 = base + pos * beat + rng.normal(0, 0.004)  # ~4 ms human timing jitter
            vel = (1.0 if accent else 0.55) * rng.uniform(0.9, 1.1)
            # The second stroke of a diddle is a bounce: softer. The weak hand plays a bit softer.
            if hand == prev_hand and not accent:
                vel *= 0.8
            if hand == "L":
                vel *= 0.92
            prev_hand = hand
            events = [(t0, hand, vel)]
            other = "L" if hand == "R" else "R"
            if grace == "flam":
                events.append((t0 - rng.uniform(0.02, 0.035), other, 0.25 * vel))
            elif grace == "drag":
                gap = rng.uniform(0.03, 0.045)
                events += [(t0 - 2 * gap, other, 0.3 * vel), (t0 - gap, other, 0.3 * vel)]
            for te, h, v in events:
                if 0 <= te < seconds:
                    hit = _hit(rng, v, h, sr)
                    i = int(te * sr)
                    out[i : i + len(hit)] += hit
        bar += 1
    out = out[:n] + rng.normal(0, 10 ** rng.uniform(-3.0, -2.0), n)  # noise floor -60..-40 dB
    return (out / (np.abs(out).max() + 1e-9) * 0.9).astype(np.float32)


def _stratified_split(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """70/15/15 per class so every split holds every class (at least one each when n >= 3)."""
    tr, va, te = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(0.15 * len(idx)))
        n_test = max(1, round(0.15 * len(idx)))
        va += list(idx[:n_val])
        te += list(idx[n_val : n_val + n_test])
        tr += list(idx[n_val + n_test :])
    return np.array(tr), np.array(va), np.array(te)


def synthetic_dataset(
    per_class: int, seed: int = 0, classes: list[str] | None = None, seconds: float = CLIP_SECONDS
) -> RudimentData:
    """``per_class`` rendered clips of every rudiment, split 70/15/15 per class (seeded)."""
    classes = classes or RUDIMENT_NAMES
    unknown = [c for c in classes if c not in RUDIMENTS]
    if unknown:
        raise ValueError(f"unknown rudiment(s) {unknown}")
    if per_class < 3:
        raise ValueError("need at least 3 clips per class (one per split)")
    rng = np.random.default_rng(seed)
    waves, labels = [], []
    for ci, name in enumerate(classes):
        for _ in range(per_class):
            waves.append(render_rudiment(name, rng, seconds=seconds))
            labels.append(ci)
    w = torch.from_numpy(np.stack(waves))
    y = torch.tensor(labels)
    tr, va, te = _stratified_split(np.array(labels), rng)
    return RudimentData(
        Split(w[tr], y[tr]), Split(w[va], y[va]), Split(w[te], y[te]), list(classes), "synthetic"
    )


# --------------------------------------------------------------------------- SOUSA (local)

_PATH_COLS = ("audio_path", "audio_file", "path", "file", "filename")
_LABEL_COLS = ("rudiment_slug", "rudiment", "label")


def sousa_dir() -> Path | None:
    """``$SOUSA_DIR`` or ``data/sousa`` if it holds metadata, else None."""
    for cand in (os.environ.get("SOUSA_DIR"), "data/sousa"):
        if cand and Path(cand).is_dir() and _metadata_file(Path(cand)) is not None:
            return Path(cand)
    return None


def _metadata_file(root: Path) -> Path | None:
    for name in ("metadata.csv", "metadata.parquet"):
        if (root / name).is_file():
            return root / name
    return None


def _read_audio(path: Path, sr: int, seconds: float) -> np.ndarray:
    """Read a WAV (scipy), mix to mono, resample linearly to ``sr``, crop/pad to ``seconds``."""
    from scipy.io import wavfile

    file_sr, data = wavfile.read(path)
    x = data.astype(np.float32)
    if data.dtype.kind in "iu":
        x /= float(np.iinfo(data.dtype).max)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if file_sr != sr:
        t_new = np.arange(int(len(x) * sr / file_sr)) / sr
        x = np.interp(t_new, np.arange(len(x)) / file_sr, x).astype(np.float32)
    n = int(seconds * sr)
    return np.pad(x[:n], (0, max(0, n - len(x))))


def load_sousa(
    root: Path, per_class: int | None, seed: int = 0, seconds: float = CLIP_SECONDS
) -> RudimentData:
    """Load SOUSA from ``root/metadata.{csv,parquet}``.

    Needs a column naming the audio file (one of ``audio_path, audio_file, path, file,
    filename``; relative to ``root`` or ``root/audio``) and one naming the class (``rudiment_slug,
    rudiment, label``). A ``split`` column (train/val/validation/test) is used when present, else a
    seeded stratified 70/15/15 split. ``per_class`` caps clips per class (the tiny/small presets).
    """
    import pandas as pd

    meta_path = _metadata_file(root)
    if meta_path is None:
        raise FileNotFoundError(f"no metadata.csv or metadata.parquet in {root}")
    meta = pd.read_parquet(meta_path) if meta_path.suffix == ".parquet" else pd.read_csv(meta_path)
    pcol = next((c for c in _PATH_COLS if c in meta.columns), None)
    lcol = next((c for c in _LABEL_COLS if c in meta.columns), None)
    if pcol is None or lcol is None:
        raise ValueError(
            f"{meta_path}: need a path column {_PATH_COLS} and a label column "
            f"{_LABEL_COLS}; found {list(meta.columns)}"
        )
    rng = np.random.default_rng(seed)
    if per_class is not None:
        meta = meta.groupby(lcol, group_keys=False).apply(
            lambda g: g.sample(n=min(len(g), per_class), random_state=seed)
        )
    classes = sorted(meta[lcol].astype(str).unique())
    index = {c: i for i, c in enumerate(classes)}

    def resolve(p: str) -> Path:
        for cand in (root / p, root / "audio" / p, Path(p)):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"audio file {p!r} not found under {root}")

    waves = np.stack([_read_audio(resolve(str(p)), SAMPLE_RATE, seconds) for p in meta[pcol]])
    labels = np.array([index[str(v)] for v in meta[lcol]])
    w, y = torch.from_numpy(waves), torch.from_numpy(labels)
    if "split" in meta.columns:
        s = meta["split"].astype(str).str.lower().replace({"validation": "val", "valid": "val"})
        parts = [np.flatnonzero(s.to_numpy() == k) for k in ("train", "val", "test")]
        if any(len(p) == 0 for p in parts):
            raise ValueError(f"{meta_path}: split column must contain train, val and test")
        tr, va, te = parts
    else:
        tr, va, te = _stratified_split(labels, rng)
    return RudimentData(
        Split(w[tr], y[tr]), Split(w[va], y[va]), Split(w[te], y[te]), classes, "sousa"
    )


def load_data(
    preset: str, seed: int = 0, per_class: int | None = None, source: str = "auto"
) -> RudimentData:
    """Data for a run: ``source`` auto (SOUSA if on disk, else synthetic), sousa or synthetic."""
    if preset not in DATA_PRESETS:
        raise ValueError(f"unknown data preset {preset!r}; choose from {list(DATA_PRESETS)}")
    n = per_class or DATA_PRESETS[preset]
    root = sousa_dir()
    if source == "sousa" and root is None:
        raise FileNotFoundError("SOUSA not found: set SOUSA_DIR to a directory with metadata.csv")
    if source in ("auto", "sousa") and root is not None:
        return load_sousa(root, n, seed)
    return synthetic_dataset(n, seed)


# --------------------------------------------------------------------------- augmentation


def augment_waves(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per clip: gain of +-6 dB, circular shift up to 100 ms, white noise at 20-40 dB SNR."""
    b, n = w.shape
    gain = 10 ** ((torch.rand(b, 1, generator=gen) * 12 - 6) / 20)
    shifts = (torch.rand(b, generator=gen) * 0.1 * SAMPLE_RATE).long()
    out = torch.stack([torch.roll(w[i], int(shifts[i])) for i in range(b)]) * gain
    snr_db = 20 + 20 * torch.rand(b, 1, generator=gen)
    rms = out.pow(2).mean(dim=1, keepdim=True).sqrt()
    noise = torch.randn(b, n, generator=gen) * rms / 10 ** (snr_db / 20)
    return out + noise


def spec_augment(
    x: torch.Tensor, gen: torch.Generator, max_f: float = 0.125, max_t: float = 0.1
) -> torch.Tensor:
    """One frequency mask (<= 12.5 % of bins) and one time mask (<= 10 % of frames) per clip."""
    x = x.clone()
    b, t, f = x.shape
    fill = x.mean()
    for i in range(b):
        fw = int(torch.randint(0, max(1, int(f * max_f)) + 1, (1,), generator=gen))
        f0 = int(torch.randint(0, f - fw + 1, (1,), generator=gen))
        tw = int(torch.randint(0, max(1, int(t * max_t)) + 1, (1,), generator=gen))
        t0 = int(torch.randint(0, t - tw + 1, (1,), generator=gen))
        x[i, :, f0 : f0 + fw] = fill
        x[i, t0 : t0 + tw, :] = fill
    return x

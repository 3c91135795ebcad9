"""Log-mel filterbank features computed with torch only (no torchaudio).

Kaldi-style settings used by AST and BEATs: 25 ms Hann window, 10 ms hop, power spectrum, HTK mel
scale, log with a floor. The filterbank is built here from the mel formula so that nothing depends
on torchaudio (which does not load with this torch).
"""

from __future__ import annotations

import math

import torch


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, f_min: float = 20.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, shape ``(n_fft // 2 + 1, n_mels)``.

    Filter m rises linearly from mel point m-1 to m and falls to m+1; points are equally spaced in
    mel between f_min and f_max (default Nyquist).
    """
    f_max = f_max if f_max is not None else sample_rate / 2
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2}, got {f_min}, {f_max}")
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_pts = torch.linspace(
        float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64
    )
    hz_pts = mel_to_hz(mel_pts)
    lower, center, upper = hz_pts[:-2], hz_pts[1:-1], hz_pts[2:]
    f = freqs[:, None]
    rising = (f - lower) / (center - lower)
    falling = (upper - f) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


def log_mel(
    wave: torch.Tensor,
    sample_rate: int = 16000,
    n_mels: int = 64,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    frames: int | None = None,
) -> torch.Tensor:
    """``(batch, samples)`` waveform -> ``(batch, frames, n_mels)`` log-mel power.

    Frames are cut without centre padding (as Kaldi does); ``frames`` pads with the minimum value
    or truncates to a fixed length, which fixed-size models (AST) need.
    """
    if wave.dim() == 1:
        wave = wave[None]
    win = round(sample_rate * win_ms / 1000)
    hop = round(sample_rate * hop_ms / 1000)
    n_fft = 1 << math.ceil(math.log2(win))
    spec = torch.stft(
        wave - wave.mean(dim=-1, keepdim=True),  # remove DC like Kaldi's dither-free path
        n_fft=n_fft,
        hop_length=hop,
        win_length=win,
        window=torch.hann_window(win, device=wave.device, dtype=wave.dtype),
        center=False,
        return_complex=True,
    )
    power = spec.abs().pow(2).transpose(1, 2)  # (B, T, n_fft/2+1)
    fb = mel_filterbank(n_mels, n_fft, sample_rate).to(wave.device, wave.dtype)
    mel = torch.log(torch.clamp(power @ fb, min=1e-10))
    if frames is not None:
        t = mel.shape[1]
        if t < frames:
            pad = mel.amin(dim=(1, 2), keepdim=True).expand(-1, frames - t, n_mels)
            mel = torch.cat([mel, pad], dim=1)
        else:
            mel = mel[:, :frames]
    return mel


def num_frames(
    samples: int, sample_rate: int = 16000, win_ms: float = 25.0, hop_ms: float = 10.0
) -> int:
    """Frames :func:`log_mel` yields for ``samples`` samples (no centre padding).

    torch.stft frames span ``n_fft`` samples (the window is zero-padded to it), so the count uses
    n_fft, not the window length.
    """
    win = round(sample_rate * win_ms / 1000)
    hop = round(sample_rate * hop_ms / 1000)
    n_fft = 1 << math.ceil(math.log2(win))
    return 1 + (samples - n_fft) // hop

"""One pass over the model that reduces activations inside the trace.

Nothing per activation leaves the GPU except reductions: for every block ``l`` and site
(``input_layernorm`` / ``post_attention_layernorm`` outputs) of every sequence ``b``:

    seq_max[b, l, site, h]        max_s |x[b, s, h]|           (and the same over s >= 1)
    sumsq[l, site, h]            += sum_s x[b, s, h]^2          (per-dim RMS -> kurtosis)
    tok_max[b, s, h]              max over blocks and sites of |x[b, s, h]|

and for every block output (residual stream, for massive activations, Sun et al. 2024):

    massive_count[l, h]          += #{s : |x| > 100 and |x| >= 1000 x median_h |x[b, s, :]|}
    out_absmax[l], out_max_ratio[l]

Every threshold test of the analysis is a comparison against these maxima, so one pass serves
the whole sensitivity grid (``|x| >= t`` for some x  <=>  max |x| >= t). ``tok_max`` holds one
value per (b, s, h) — the size of ONE layer's activations, not of all of them — and stays in
memory; nothing per activation is written to disk.

Backends: ``nnsight`` (default; ``TransformersModel.trace`` with ``tracer.stop()`` after the
chunk's last block) and ``hooks`` (plain ``register_forward_hook`` with the same reduction and
an exception to stop the forward), kept as a cross-check and for architectures nnsight cannot
trace.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import SITES, LoadedModel, decoder_layers

log = logging.getLogger(__name__)

#: Sun et al. (2024) massive activation: |x| > 100 and about 1000x the median of its hidden state.
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0


@dataclass
class ActivationStats:
    """Per-sequence reductions of one run; the input to ``analysis``."""

    seq_max: np.ndarray  # [B, L, 2, H] float32: max over positions s
    seq_max_nopos0: np.ndarray  # [B, L, 2, H] float32: max over positions s >= 1
    tok_max: np.ndarray  # [B, S, H] float16/32: max over blocks and sites
    sumsq: np.ndarray  # [L, 2, H] float64: sum over (b, s) of x^2
    massive_count: np.ndarray  # [L, H] int64: massive events on block outputs
    out_absmax: np.ndarray  # [L] float32: max |x| of the block output
    out_max_ratio: np.ndarray  # [L] float32: max over tokens of max|x| / median|x|
    layer_indices: list[int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B sequences, S positions, L blocks, H hidden)."""
        b, s, h = self.tok_max.shape
        return b, s, len(self.layer_indices), h

    def subset(self, seqs: np.ndarray) -> ActivationStats:
        """Stats restricted to some sequences (for cross-batch validation).

        ``sumsq``/massive counts are run totals and are kept as they are (not used per batch).
        """
        return ActivationStats(
            self.seq_max[seqs], self.seq_max_nopos0[seqs], self.tok_max[seqs], self.sumsq,
            self.massive_count, self.out_absmax, self.out_max_ratio, self.layer_indices,
        )


class _Reducer:
    """Accumulates reductions for one sequence batch on the model's devices."""

    def __init__(self, n_layers: int, tok_dtype: torch.dtype) -> None:
        self.n_layers = n_layers
        self.tok_dtype = tok_dtype
        self.tok: torch.Tensor | None = None
        self.site: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.out: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def site_output(self, layer_pos: int, site: int, x: torch.Tensor) -> None:
        a = x.detach().abs()
        seq_max = a.amax(dim=1).float()
        seq_max1 = a[:, 1:].amax(dim=1).float()
        sumsq = x.detach().float().pow(2).sum(dim=1)
        self.site.append((layer_pos, site, seq_max.cpu(), seq_max1.cpu(), sumsq.cpu()))
        a = a.to(self.tok_dtype)
        # Blocks may sit on different GPUs under device_map="balanced": keep the running max
        # on the device of the first site and move each new |x| there.
        if self.tok is None:
            self.tok = a.clone()
        else:
            torch.maximum(self.tok, a.to(self.tok.device), out=self.tok)

    def block_output(self, layer_pos: int, out: Any) -> None:
        x = out[0] if isinstance(out, tuple) else out
        a = x.detach().abs().float()
        med = a.median(dim=-1).values  # [b, S] median |x| over the hidden dim of each token
        top = a.amax(dim=-1)
        massive = (a > MASSIVE_ABS) & (a >= MASSIVE_RATIO * med.unsqueeze(-1))
        ratio = (top / med.clamp_min(torch.finfo(torch.float32).tiny)).amax()
        self.out.append((layer_pos, massive.sum(dim=(0, 1)).cpu(), top.amax().cpu(), ratio.cpu()))


class _StopForward(Exception):
    """Raised by the hooks backend after the chunk's last block to skip the rest."""


def _chunks(layer_indices: list[int], chunk_layers: int) -> list[list[int]]:
    if chunk_layers <= 0 or chunk_layers >= len(layer_indices):
        return [layer_indices]
    return [layer_indices[i : i + chunk_layers] for i in range(0, len(layer_indices), chunk_layers)]


def _trace_nnsight(lm: LoadedModel, ids: torch.Tensor, chunk: list[int], red: _Reducer,
                   pos: dict[int, int]) -> None:
    import nnsight

    wrapper = lm.wrapper
    layers = wrapper.model.layers
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode(), wrapper.trace(inputs, use_cache=False) as tracer:
        # Only saved objects survive the block; the reducer itself lives outside the trace
        # and is mutated in place, so the marker list is all that needs saving.
        done = nnsight.save([])
        for li in chunk:
            block = layers[li]
            red.site_output(pos[li], 0, block.input_layernorm.output)
            red.site_output(pos[li], 1, block.post_attention_layernorm.output)
            red.block_output(pos[li], block.output)
            done.append(li)
        # Everything after the chunk's last block (later blocks, final norm, lm_head) is skipped.
        tracer.stop()
    if list(done) != chunk:
        raise RuntimeError(f"nnsight trace visited blocks {list(done)}, expected {chunk}")


def _trace_hooks(lm: LoadedModel, ids: torch.Tensor, chunk: list[int], red: _Reducer,
                 pos: dict[int, int]) -> None:
    layers = decoder_layers(lm.module)
    handles = []
    last = chunk[-1]

    def site_hook(li: int, si: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            red.site_output(pos[li], si, out)
        return hook

    def block_hook(li: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            red.block_output(pos[li], out)
            if li == last:
                raise _StopForward
        return hook

    try:
        for li in chunk:
            for si, name in enumerate(SITES):
                handles.append(getattr(layers[li], name).register_forward_hook(site_hook(li, si)))
            handles.append(layers[li].register_forward_hook(block_hook(li)))
        with torch.inference_mode(), contextlib.suppress(_StopForward):
            lm.module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def extract(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    *,
    backend: str = "nnsight",
    batch_size: int = 1,
    chunk_layers: int = 0,
    layers: list[int] | None = None,
    progress: bool = False,
) -> ActivationStats:
    """Run every sequence through the model once per layer chunk and collect the reductions.

    ``chunk_layers`` <= 0 observes all blocks in one forward. Larger chunk counts only cost
    time (each chunk re-runs the forward up to its last block); they exist to bound how many
    per-site tensors one trace holds at once.
    """
    if backend not in ("nnsight", "hooks"):
        raise ValueError(f"backend must be nnsight or hooks, got {backend!r}")
    if backend == "nnsight" and lm.wrapper is None:
        raise ValueError("model was loaded without the nnsight wrapper")
    all_layers = decoder_layers(lm.module)
    layer_indices = list(range(len(all_layers))) if layers is None else list(layers)
    pos = {li: i for i, li in enumerate(layer_indices)}
    n_seq, seq_len = input_ids.shape
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2 (position 0 is reported separately)")
    hidden = all_layers[0].input_layernorm.weight.shape[0]
    n_layers = len(layer_indices)
    # max |x| of 16-bit activations is exact in float16 for every threshold we test (>= 4);
    # float32 models keep float32 so no comparison near a threshold is rounded.
    np_tok = np.float32 if lm.dtype == torch.float32 else np.float16
    tok_dtype = torch.float32 if lm.dtype == torch.float32 else lm.dtype
    stats = ActivationStats(
        seq_max=np.zeros((n_seq, n_layers, 2, hidden), np.float32),
        seq_max_nopos0=np.zeros((n_seq, n_layers, 2, hidden), np.float32),
        tok_max=np.zeros((n_seq, seq_len, hidden), np_tok),
        sumsq=np.zeros((n_layers, 2, hidden), np.float64),
        massive_count=np.zeros((n_layers, hidden), np.int64),
        out_absmax=np.zeros(n_layers, np.float32),
        out_max_ratio=np.zeros(n_layers, np.float32),
        layer_indices=layer_indices,
    )
    trace = _trace_nnsight if backend == "nnsight" else _trace_hooks
    chunks = _chunks(layer_indices, chunk_layers)
    dev = lm.input_device
    t0 = time.perf_counter()
    starts = range(0, n_seq, batch_size)
    it: Any = starts
    if progress:
        from tqdm import tqdm

        it = tqdm(starts, desc="sequences", unit="batch")
    for b0 in it:
        ids = input_ids[b0 : b0 + batch_size].to(dev)
        bsl = slice(b0, b0 + ids.shape[0])
        tok_acc: np.ndarray | None = None
        for chunk in chunks:
            red = _Reducer(n_layers, tok_dtype)
            trace(lm, ids, chunk, red, pos)
            for lp, si, m, m1, ss in red.site:
                stats.seq_max[bsl, lp, si] = m.numpy()
                stats.seq_max_nopos0[bsl, lp, si] = m1.numpy()
                stats.sumsq[lp, si] += ss.double().sum(0).numpy()
            for lp, cnt, amax, ratio in red.out:
                stats.massive_count[lp] += cnt.numpy()
                stats.out_absmax[lp] = max(stats.out_absmax[lp], float(amax))
                stats.out_max_ratio[lp] = max(stats.out_max_ratio[lp], float(ratio))
            if red.tok is None:
                raise RuntimeError("no site output was observed; check the layer indices")
            t = red.tok.float().cpu().numpy().astype(np_tok)
            tok_acc = t if tok_acc is None else np.maximum(tok_acc, t)
        stats.tok_max[bsl] = tok_acc
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    stats.timings["extract_s"] = time.perf_counter() - t0
    return stats


class StatsBuilder:
    """Builds ``ActivationStats`` from full activations, one (sequence, block, site) at a time.

    Used to scan activations that were dumped to disk (the naive baseline of the benchmark) and
    by tests on hand-made arrays; the reductions are the same as inside the trace.
    """

    def __init__(self, n_seq: int, seq_len: int, n_layers: int, hidden: int,
                 tok_dtype: type = np.float32) -> None:
        self.stats = ActivationStats(
            seq_max=np.zeros((n_seq, n_layers, 2, hidden), np.float32),
            seq_max_nopos0=np.zeros((n_seq, n_layers, 2, hidden), np.float32),
            tok_max=np.zeros((n_seq, seq_len, hidden), tok_dtype),
            sumsq=np.zeros((n_layers, 2, hidden), np.float64),
            massive_count=np.zeros((n_layers, hidden), np.int64),
            out_absmax=np.zeros(n_layers, np.float32),
            out_max_ratio=np.zeros(n_layers, np.float32),
            layer_indices=list(range(n_layers)),
        )

    def add_site(self, b: int, layer: int, site: int, x: np.ndarray | torch.Tensor) -> None:
        """One site's activations ``x[S, H]`` of sequence ``b`` at block ``layer``."""
        t = torch.as_tensor(x)
        a = t.abs().float()
        st = self.stats
        st.seq_max[b, layer, site] = a.amax(dim=0).numpy()
        st.seq_max_nopos0[b, layer, site] = a[1:].amax(dim=0).numpy()
        st.sumsq[layer, site] += t.float().pow(2).sum(dim=0).double().numpy()
        np.maximum(st.tok_max[b], a.numpy().astype(st.tok_max.dtype), out=st.tok_max[b])

    def add_block_output(self, layer: int, x: np.ndarray | torch.Tensor) -> None:
        """One block output ``x[S, H]`` (any sequence) for the massive-activation columns."""
        red = _Reducer(0, torch.float32)
        red.block_output(layer, torch.as_tensor(x).unsqueeze(0))
        _, cnt, amax, ratio = red.out[0]
        st = self.stats
        st.massive_count[layer] += cnt.numpy()
        st.out_absmax[layer] = max(st.out_absmax[layer], float(amax))
        st.out_max_ratio[layer] = max(st.out_max_ratio[layer], float(ratio))

    def finish(self) -> ActivationStats:
        """The accumulated stats."""
        return self.stats


def stats_from_activations(site_acts: np.ndarray) -> ActivationStats:
    """``ActivationStats`` of a dense array ``[B, L, 2, S, H]`` of site outputs."""
    n_b, n_l, _, n_s, hid = site_acts.shape
    sb = StatsBuilder(n_b, n_s, n_l, hid)
    for b in range(n_b):
        for li in range(n_l):
            for si in range(2):
                sb.add_site(b, li, si, site_acts[b, li, si])
    return sb.finish()

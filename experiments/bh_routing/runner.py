"""Experiment runner: configs x prompts with greedy generation, metrics, perplexity, checkpoints.

Every finished experiment is written at once to ``checkpoints/experiments/<key>.json`` (atomically),
so an interrupted run loses at most the experiment in flight; ``checkpoints/latest_checkpoint.json``
aggregates them every ``checkpoint_interval`` experiments and at the end (the seed's file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from experiments.bh_routing.adapters import RoutingController, model_summary, patch_model
from experiments.bh_routing.models import LoadedModel, load_model
from experiments.bh_routing.selector import NULL_METHODS, PVALUE_METHODS, RoutingConfig
from experiments.common.io import atomic_write_json
from experiments.common.provenance import git_commit

log = logging.getLogger("bh_routing")

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
DEFAULT_MODEL = "allenai/OLMoE-1B-7B-0924"
BASELINE = "topk_8"

#: The seed's five configurations. min_k = 1 (not stated in the seed) keeps every MoE layer active
#: for every token; set min_k = 0 in a custom config to allow skipping a layer's experts entirely.
#: A BH config that names no ``p_value`` gets the run's default (``--p-value``, ``unselected``):
#: under the audit's ``empirical`` null every one of them collapsed to min_k. ``bh_adaptive``
#: names ``probability``, so its temperature changes the selection.
ROUTING_CONFIGS: dict[str, dict[str, Any]] = {
    "topk_8": {
        "method": "topk",
        "k": 8,
        "description": "Baseline (OLMoE default): always 8 experts",
    },
    "bh_strict": {
        "method": "bh",
        "alpha": 0.01,
        "temperature": 1.0,
        "max_k": 8,
        "description": "BH, FDR alpha=0.01 (maximum sparsity)",
    },
    "bh_moderate": {
        "method": "bh",
        "alpha": 0.05,
        "temperature": 1.0,
        "max_k": 8,
        "description": "BH, FDR alpha=0.05 (balanced)",
    },
    "bh_loose": {
        "method": "bh",
        "alpha": 0.10,
        "temperature": 1.0,
        "max_k": 8,
        "description": "BH, FDR alpha=0.10 (minimal filtering)",
    },
    "bh_adaptive": {
        "method": "bh",
        "alpha": 0.05,
        "temperature": 2.0,
        "max_k": 8,
        # The seed's "calibrated probabilities": the one model where T enters the p-values. At
        # T = 1 it selects exactly like `unselected` (bh_moderate), so the pair isolates T.
        "p_value": "probability",
        "description": "BH, alpha=0.05, temperature 2.0 in the p-values and the mixing weights",
    },
}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from None


#: Defaults of the sensitivity grid (null x alpha x temperature), run on the held-out text only.
GRID_NULLS: tuple[str, ...] = PVALUE_METHODS
GRID_ALPHAS: tuple[float, ...] = (0.01, 0.05, 0.1)
GRID_TEMPERATURES: tuple[float, ...] = (1.0, 2.0)
GRID_PREFIX = "grid_"


def grid_name(p_value: str, alpha: float, temperature: float) -> str:
    """Config name of one sensitivity-grid point."""
    return f"{GRID_PREFIX}{p_value}_a{alpha:g}_T{temperature:g}"


def grid_configs(
    nulls: tuple[str, ...] | list[str],
    alphas: tuple[float, ...] | list[float],
    temperatures: tuple[float, ...] | list[float],
    *,
    min_k: int = 1,
    max_k: int = 8,
) -> dict[str, RoutingConfig]:
    """The sensitivity grid as BH configs (min_k/max_k as the seed's BH configs)."""
    out = {}
    for null in nulls:
        if null not in PVALUE_METHODS:
            raise ValueError(
                f"unknown p-value model {null!r} in --grid-nulls; use {', '.join(PVALUE_METHODS)}"
            )
        for alpha in alphas:
            for t in temperatures:
                name = grid_name(null, alpha, t)
                spec = {
                    "method": "bh",
                    "alpha": alpha,
                    "temperature": t,
                    "min_k": min_k,
                    "max_k": max_k,
                    "p_value": null,
                    "description": "sensitivity grid point (held-out quality only)",
                }
                out[name] = RoutingConfig.from_dict(name, spec)
    return out


def load_configs(
    extra_file: Path | None = None,
    only: list[str] | None = None,
    default_p_value: str = "unselected",
) -> dict[str, RoutingConfig]:
    """The seed's configs plus custom ones from a JSON file ``{name: {...}}``, optionally
    filtered; BH configs without a ``p_value`` get ``default_p_value``."""
    if default_p_value not in PVALUE_METHODS:
        raise ValueError(
            f"unknown --p-value {default_p_value!r}; use one of {', '.join(PVALUE_METHODS)}"
        )
    raw: dict[str, Any] = {
        n: {**spec, "p_value": default_p_value}
        if spec.get("method", "bh") == "bh" and "p_value" not in spec
        else spec
        for n, spec in ROUTING_CONFIGS.items()
    }
    if extra_file is not None:
        extra = _read_json(Path(extra_file), "configs")
        if not isinstance(extra, dict) or not extra:
            raise ValueError(
                f"configs file {extra_file} must hold a non-empty JSON object {{name: config}}"
            )
        for n, spec in extra.items():
            if (
                isinstance(spec, dict)
                and spec.get("method", "bh") == "bh"
                and "p_value" not in spec
            ):
                spec = {**spec, "p_value": default_p_value}
            raw[n] = spec
    bad = [n for n in raw if n.startswith(GRID_PREFIX)]
    if bad:
        raise ValueError(f"config names starting with {GRID_PREFIX!r} are reserved: {bad}")
    configs = {name: RoutingConfig.from_dict(name, spec) for name, spec in raw.items()}
    if only:
        missing = [n for n in only if n not in configs]
        if missing:
            raise ValueError(f"unknown config(s) {missing}; known: {sorted(configs)}")
        configs = {n: configs[n] for n in only}
    return configs


def load_prompts(path: Path | None = None) -> list[dict[str, str]]:
    """Prompts as ``[{text, category, description}]``; raises ``ValueError`` on a malformed file."""
    path = Path(path) if path else DATA / "prompts.json"
    data = _read_json(path, "prompts")
    if not isinstance(data, list) or not data:
        raise ValueError(f"prompts file {path} must hold a non-empty JSON list")
    out = []
    for i, p in enumerate(data):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str) or not p["text"].strip():
            raise ValueError(f"prompts file {path}: entry {i} needs a non-empty 'text' string")
        out.append(
            {
                "text": p["text"],
                "category": str(p.get("category", "uncategorised")),
                "description": str(p.get("description", "")),
            }
        )
    return out


def read_text(path: Path, what: str) -> str:
    """Read a UTF-8 text file with a clear error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    if not text.strip():
        raise ValueError(f"{what} file {path} is empty")
    return text


@dataclass
class RunSettings:
    """Everything that determines the numbers of a run (part of the resume fingerprint)."""

    model: str = DEFAULT_MODEL
    output: Path = Path("./results")
    max_tokens: int = 50
    checkpoint_interval: int = 5
    resume: bool = True
    device: str = "auto"
    fp16: bool = True
    experts_implementation: str | None = None
    configs_file: Path | None = None
    only_configs: list[str] | None = None
    prompts_file: Path | None = None
    max_prompts: int | None = None
    calibration_file: Path = DATA / "calibration.txt"
    heldout_file: Path = DATA / "heldout.txt"
    perplexity: bool = True
    ppl_chunk_tokens: int = 128
    ppl_max_tokens: int = 2048
    seed: int = 0
    p_value: str = "unselected"
    grid: bool = True
    grid_nulls: tuple[str, ...] = GRID_NULLS
    grid_alphas: tuple[float, ...] = GRID_ALPHAS
    grid_temperatures: tuple[float, ...] = GRID_TEMPERATURES
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` for out-of-range settings."""
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be >= 1")
        if self.checkpoint_interval < 1:
            raise ValueError("--checkpoint-interval must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError("--max-prompts must be >= 1")
        if self.ppl_chunk_tokens < 2 or self.ppl_max_tokens < 2:
            raise ValueError("--heldout-max-tokens (and the chunk size) must be >= 2")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pooled_hist(k_hist: dict[str, list[int]]) -> list[int]:
    """Sum of per-layer k histograms: counts of k over all (token, MoE layer) decisions."""
    width = max(len(h) for h in k_hist.values())
    total = [0] * width
    for h in k_hist.values():
        for i, c in enumerate(h):
            total[i] += c
    return total


def k_distribution(total: list[int], min_k: int, max_k: int) -> dict[str, float | int]:
    """Experts-per-token distribution from a pooled histogram: mean, sd, quantiles (lower
    quantile of the discrete distribution: smallest k with CDF >= q), share at min_k and max_k."""
    n = sum(total)
    if n == 0:
        raise ValueError("no routing decisions were recorded")
    mean = sum(i * c for i, c in enumerate(total)) / n
    var = sum(c * (i - mean) ** 2 for i, c in enumerate(total)) / n
    out: dict[str, float | int] = {"n": n, "mean": mean, "std": math.sqrt(var)}
    cum = 0
    qs = {"q10": 0.10, "q25": 0.25, "q50": 0.50, "q75": 0.75, "q90": 0.90}
    got: dict[str, int] = {}
    for k, c in enumerate(total):
        cum += c
        for name, q in qs.items():
            if name not in got and cum >= q * n:
                got[name] = k
    out.update(got)
    out["share_at_min_k"] = (total[min_k] if min_k < len(total) else 0) / n
    out["share_at_max_k"] = (total[max_k] if max_k < len(total) else 0) / n
    out["min_k"], out["max_k"] = min_k, max_k
    return out


def pooled_k_stats(k_hist: dict[str, list[int]]) -> dict[str, float | int]:
    """Mean/std/min/max of k over all (token, MoE layer) routing decisions, from per-layer
    histograms."""
    width = max(len(h) for h in k_hist.values())
    total = [0] * width
    for h in k_hist.values():
        for i, c in enumerate(h):
            total[i] += c
    n = sum(total)
    if n == 0:
        raise ValueError("no routing decisions were recorded")
    mean = sum(i * c for i, c in enumerate(total)) / n
    var = sum(c * (i - mean) ** 2 for i, c in enumerate(total)) / n
    used = [i for i, c in enumerate(total) if c]
    return {"mean": mean, "std": math.sqrt(var), "min": min(used), "max": max(used), "n": n}


def utilisation_stats(expert_counts: dict[str, list[int]]) -> dict[str, float | None]:
    """Load-balance metrics from per-layer expert selection counts.

    CV = population std / mean of the per-expert counts of a layer, averaged over layers. The
    max/min
    ratio is the median over layers of max/min count, over layers where every expert was used at
    least
    once; ``None`` when no layer qualifies (an unused expert makes the ratio infinite).
    """
    cvs, ratios, unused = [], [], []
    for counts in expert_counts.values():
        t = torch.tensor(counts, dtype=torch.float64)
        m = t.mean().item()
        cvs.append(t.std(unbiased=False).item() / m if m > 0 else 0.0)
        lo = t.min().item()
        if lo > 0:
            ratios.append(t.max().item() / lo)
        unused.append(float((t == 0).double().mean().item()))
    ratio = float(torch.tensor(ratios).median().item()) if ratios else None
    return {
        "cv": sum(cvs) / len(cvs),
        "max_min_ratio": ratio,
        "unused_expert_frac": sum(unused) / len(unused),
    }


class Checkpoint:
    """Per-experiment result files plus the aggregate ``latest_checkpoint.json``."""

    def __init__(self, output: Path, fingerprint: dict[str, Any]) -> None:
        self.dir = Path(output) / "checkpoints"
        self.exp_dir = self.dir / "experiments"
        self.latest = self.dir / "latest_checkpoint.json"
        self.fingerprint = fingerprint
        self.results: dict[str, dict[str, Any]] = {}

    def clear(self) -> int:
        """Forget earlier results (``--no-resume``); returns how many files were removed."""
        n = 0
        if self.exp_dir.exists():
            for f in self.exp_dir.glob("*.json"):
                f.unlink()
                n += 1
        if self.latest.exists():
            self.latest.unlink()
        self.results = {}
        return n

    def load(self) -> dict[str, dict[str, Any]]:
        """Load finished experiments; raise ``ValueError`` if they came from different settings."""
        found: dict[str, dict[str, Any]] = {}
        files = sorted(self.exp_dir.glob("*.json")) if self.exp_dir.exists() else []
        # Per-experiment files are the source of truth (deleting one reruns that experiment); the
        # aggregate is only read when they are missing, e.g. when just latest_checkpoint.json was
        # copied.
        if not files and self.latest.exists():
            try:
                agg = json.loads(self.latest.read_text(encoding="utf-8"))
                found.update(agg.get("results", {}))
            except json.JSONDecodeError:
                log.warning("ignoring unreadable %s", self.latest)
        for f in files:
            try:
                found[f.stem] = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                log.warning("ignoring unreadable checkpoint %s; that experiment reruns", f)
        for key, res in found.items():
            if res.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"checkpoint in {self.dir} was made with different settings (experiment "
                    f"{key}); "
                    "rerun with --no-resume to start fresh or choose another --output"
                )
        self.results = found
        return found

    def save_experiment(self, key: str, result: dict[str, Any]) -> None:
        """Write one finished experiment atomically."""
        self.results[key] = result
        atomic_write_json(self.exp_dir / f"{key.replace(':', '_')}.json", result)

    def save_latest(self) -> None:
        """Write the aggregate checkpoint atomically."""
        atomic_write_json(
            self.latest,
            {
                "fingerprint": self.fingerprint,
                "saved_at": datetime.now(UTC).isoformat(),
                "git_commit": git_commit(),
                "completed": sorted(self.results),
                "results": self.results,
            },
        )


def exp_key(config: str, prompt_index: int) -> str:
    """Stable key of one (config, prompt) experiment."""
    return f"{config}__p{prompt_index:02d}"


def ppl_key(config: str) -> str:
    """Key of one config's perplexity evaluation."""
    return f"{config}__perplexity"


class ExperimentRunner:
    """Loads the model once, calibrates the null, then runs every (config, prompt) pair."""

    def __init__(self, settings: RunSettings) -> None:
        settings.validate()
        self.s = settings
        self.configs = load_configs(
            settings.configs_file, settings.only_configs, default_p_value=settings.p_value
        )
        # The sensitivity grid runs on the held-out text only (quality + experts-per-token), so
        # it needs the perplexity pass.
        self.grid = (
            grid_configs(settings.grid_nulls, settings.grid_alphas, settings.grid_temperatures)
            if settings.grid and settings.perplexity
            else {}
        )
        prompts = load_prompts(settings.prompts_file)
        self.prompts = prompts[: settings.max_prompts] if settings.max_prompts else prompts
        self.calibration_text = read_text(settings.calibration_file, "calibration")
        self.heldout_text = (
            read_text(settings.heldout_file, "held-out") if settings.perplexity else ""
        )
        self.lm: LoadedModel | None = None
        self.ctl: RoutingController | None = None
        #: native top-k log-probs of each held-out chunk, by chunk start (see _native_logprobs)
        self._native_cache: dict[int, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}

    # -- setup ----------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved result to be reused on resume."""
        s = self.s
        return {
            "model": s.model,
            "max_tokens": s.max_tokens,
            "device": s.device,
            "fp16": s.fp16,
            "experts_implementation": s.experts_implementation,
            "seed": s.seed,
            "calibration_sha": _sha(self.calibration_text),
            "heldout_sha": _sha(self.heldout_text),
            "ppl_chunk_tokens": s.ppl_chunk_tokens,
            "ppl_max_tokens": s.ppl_max_tokens,
        }

    def setup(self) -> None:
        """Load and patch the model, calibrate the empirical null, warm up."""
        s = self.s
        log.info("loading model %s (device=%s, fp16=%s)", s.model, s.device, s.fp16)
        torch.manual_seed(s.seed)
        self.lm = load_model(
            s.model,
            device=s.device,
            fp16=s.fp16,
            experts_implementation=s.experts_implementation,
            seed=s.seed,
        )
        self.ctl = patch_model(self.lm.model)
        summary = model_summary(self.lm.model, self.ctl)
        log.info("model: %s", summary)
        null_info = self.calibrate()
        self.meta = {
            "model_id": s.model,
            "device": str(self.lm.device),
            "dtype": str(self.lm.dtype),
            **summary,
            "null": null_info,
            "torch": torch.__version__,
            "git_commit": git_commit(),
            "configs": {n: c.as_dict() for n, c in self.configs.items()},
            "grid": {
                "nulls": list(s.grid_nulls),
                "alphas": list(s.grid_alphas),
                "temperatures": list(s.grid_temperatures),
            }
            if self.grid
            else None,
            "prompts": self.prompts,
            "settings": self.fingerprint(),
        }
        import transformers

        self.meta["transformers"] = transformers.__version__
        self._warmup()

    @torch.no_grad()
    def calibrate(self) -> dict[str, Any]:
        """Run native routing on the calibration text and build the per-layer empirical null."""
        assert self.lm is not None
        assert self.ctl is not None
        tok = self.lm.tokenizer
        ids = tok(self.calibration_text, return_tensors="pt").input_ids[0]
        chunk = 256
        self.ctl.set_config(None)
        self.ctl.begin_calibration()
        for start in range(0, ids.numel(), chunk):
            piece = ids[start : start + chunk].unsqueeze(0).to(self.lm.device)
            if piece.numel() > 1:
                self.lm.model(piece)
        null = self.ctl.end_calibration(seed=self.s.seed)
        sizes = {layer: null.size(layer) for layer in null.layers}
        e = self.ctl.layers[0].family.num_experts(self.ctl.layers[0].router)
        n_min = min(sizes.values())
        by_null = self.ctl.null_sizes()
        info = {
            "calibration_tokens": int(ids.numel()),
            "samples_per_layer": sizes,
            "min_attainable_p": 1.0 / (n_min + 1),
            "num_experts": e,
            "nulls": {
                name: {
                    "samples_per_layer": per_layer,
                    "min_attainable_p": 1.0 / (min(per_layer.values()) + 1),
                }
                for name, per_layer in by_null.items()
            },
        }
        for name, d in info["nulls"].items():
            log.info(
                "%s null: %d calibration tokens, >= %d samples per layer, min p %.2e",
                name,
                ids.numel(),
                min(d["samples_per_layer"].values()),
                d["min_attainable_p"],
            )
        for cfg in [*self.configs.values(), *self.grid.values()]:
            if cfg.method == "bh" and cfg.p_value in NULL_METHODS:
                n_min = min(by_null[cfg.p_value].values())
                info_min_p = 1.0 / (n_min + 1)
                first = (
                    (cfg.alpha / e)
                    if cfg.correction == "bh"
                    else cfg.alpha / e / sum(1.0 / i for i in range(1, e + 1))
                )
                if info_min_p > first:
                    log.warning(
                        "config %s: the null (n=%d) cannot give p <= %.2e, so BH can never "
                        "reject at rank 1; use more calibration text",
                        cfg.name,
                        n_min,
                        first,
                    )
        return info

    @torch.no_grad()
    def _warmup(self) -> None:
        # The first generate call pays for lazy initialisation; keep it out of the first timing.
        assert self.lm is not None
        assert self.ctl is not None
        self.ctl.set_config(None)
        ids = self.lm.tokenizer("warm up", return_tensors="pt").to(self.lm.device)
        self.lm.model.generate(
            **ids, max_new_tokens=2, do_sample=False, pad_token_id=self.lm.tokenizer.pad_token_id
        )

    # -- one experiment -------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.lm is not None and self.lm.device.type == "cuda":
            torch.cuda.synchronize(self.lm.device)

    @torch.no_grad()
    def run_one(self, cfg: RoutingConfig, prompt_index: int) -> dict[str, Any]:
        """Greedy-generate for one prompt under one config and return the seed's metrics and
        more."""
        assert self.lm is not None
        assert self.ctl is not None
        prompt = self.prompts[prompt_index]
        tok = self.lm.tokenizer
        enc = tok(prompt["text"], return_tensors="pt").to(self.lm.device)
        n_in = int(enc.input_ids.shape[1])
        self.ctl.set_config(cfg)
        self.ctl.start_recording()
        self._sync()
        t0 = time.perf_counter()
        out = self.lm.model.generate(
            **enc, max_new_tokens=self.s.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
        self._sync()
        elapsed = time.perf_counter() - t0
        rec = self.ctl.stop_recording()
        gen_ids = out[0, n_in:]
        n_out = int(gen_ids.numel())
        ks = pooled_k_stats(rec["k_hist"])
        util = utilisation_stats(rec["expert_counts"])
        per_layer_avg = {
            layer: sum(i * c for i, c in enumerate(h)) / max(sum(h), 1)
            for layer, h in rec["k_hist"].items()
        }
        first_layer = str(self.ctl.layers[0].layer)
        return {
            "config_name": cfg.name,
            "prompt_index": prompt_index,
            "prompt_text": prompt["text"],
            "prompt_category": prompt["category"],
            "generated_text": tok.decode(gen_ids, skip_special_tokens=True),
            "avg_experts_per_token": ks["mean"],
            "std_experts_per_token": ks["std"],
            "min_experts": ks["min"],
            "max_experts": ks["max"],
            "routing_decisions": ks["n"],
            "inference_time_sec": elapsed,
            "tokens_per_sec": n_out / elapsed if elapsed > 0 else 0.0,
            "expert_utilization_cv": util["cv"],
            "expert_utilization_max_min_ratio": util["max_min_ratio"],
            "unused_expert_frac": util["unused_expert_frac"],
            "num_input_tokens": n_in,
            "num_output_tokens": n_out,
            "per_layer_avg_k": per_layer_avg,
            "per_layer_k_hist": rec["k_hist"],
            "per_layer_expert_counts": rec["expert_counts"],
            # k of every prompt token at the first MoE layer: identical inputs across configs, so
            # this isolates what a config changes about selection from what it changes downstream.
            "first_layer_prompt_k": rec["first_call_k"].get(first_layer, []),
            "routing_config": cfg.as_dict(),
            "experts_implementation": self.ctl.experts_implementation,
            "model": self.s.model,
            "device": str(self.lm.device),
            "dtype": str(self.lm.dtype),
            "finished_at": datetime.now(UTC).isoformat(),
        }

    #: Cache native held-out log-probs across configs only up to this many bytes (float32 on
    #: CPU); above it (large vocabularies) each config reruns the native pass instead.
    NATIVE_CACHE_BYTES = 256 * 2**20

    def _native_logprobs(self, start: int, piece: torch.Tensor) -> torch.Tensor:
        """Native top-k next-token log-probs of one held-out chunk (cached when small enough)."""
        assert self.lm is not None
        assert self.ctl is not None
        cache = self._native_cache
        hit = cache.get(start)
        if hit is not None:
            return hit.to(self.lm.device)
        recording = self.ctl.recording
        self.ctl.set_config(None)
        self.ctl.recording = False  # the native pass must not count towards cfg's histograms
        nat = torch.log_softmax(self.lm.model(piece).logits.float()[0, :-1], dim=-1)
        self.ctl.recording = recording
        used = sum(t.numel() * 4 for t in cache.values())
        if used + nat.numel() * 4 <= self.NATIVE_CACHE_BYTES:
            cache[start] = nat.cpu()
        return nat

    @torch.no_grad()
    def perplexity(self, cfg: RoutingConfig) -> dict[str, Any]:
        """Quality of ``cfg`` against native top-k on the held-out text, chunk by chunk.

        Every chunk is run, teacher-forced, with the model's own router (native top-k; cached
        across configs when small) and with ``cfg``, so both see the same tokens. Per chunk:
        summed next-token NLL of each, and the summed KL(native || cfg) of the next-token
        distributions. The experts-per-token distribution comes from the ``cfg`` pass; the k of
        every token at the first MoE layer is kept because there every config sees identical
        inputs.
        """
        assert self.lm is not None
        assert self.ctl is not None
        ctl = self.ctl
        ids = self.lm.tokenizer(self.heldout_text, return_tensors="pt").input_ids[0][
            : self.s.ppl_max_tokens
        ]
        ctl.start_recording(keep_first_layer=True)
        nll_sum = nat_sum = kl_sum = 0.0
        n_tok, chunks = 0, []
        ce = torch.nn.functional.cross_entropy
        for start in range(0, ids.numel(), self.s.ppl_chunk_tokens):
            piece = ids[start : start + self.s.ppl_chunk_tokens].unsqueeze(0).to(self.lm.device)
            if piece.numel() < 2:
                continue
            nat = self._native_logprobs(start, piece)
            ctl.set_config(cfg)
            got = torch.log_softmax(self.lm.model(piece).logits.float()[0, :-1], dim=-1)
            target = piece[0, 1:]
            nll = ce(got, target, reduction="sum").item()
            nat_nll = ce(nat, target, reduction="sum").item()
            # KL(native || cfg) summed over positions; clamp_min(0) absorbs float error of ~1e-7.
            kl = (nat.exp() * (nat - got)).sum(-1).clamp_min(0.0).sum().item()
            n = piece.numel() - 1
            chunks.append(
                {
                    "nll_sum": nll,
                    "native_nll_sum": nat_nll,
                    "kl_sum": kl,
                    "tokens": n,
                    "mean_nll": nll / n,
                    "native_mean_nll": nat_nll / n,
                    "mean_kl": kl / n,
                }
            )
            nll_sum += nll
            nat_sum += nat_nll
            kl_sum += kl
            n_tok += n
        rec = ctl.stop_recording()
        if n_tok == 0:
            raise ValueError("held-out text is too short: need at least 2 tokens")
        e = ctl.layers[0].num_experts
        lo, hi = (cfg.k, cfg.k) if cfg.method == "topk" else (cfg.min_k, cfg.max_k)
        dist = k_distribution(pooled_hist(rec["k_hist"]), min(lo, e), min(hi, e))
        return {
            "config_name": cfg.name,
            "grid": cfg.name.startswith(GRID_PREFIX),
            "perplexity": math.exp(nll_sum / n_tok),
            "mean_nll": nll_sum / n_tok,
            "native_perplexity": math.exp(nat_sum / n_tok),
            "native_mean_nll": nat_sum / n_tok,
            "delta_nll": (nll_sum - nat_sum) / n_tok,
            "mean_kl": kl_sum / n_tok,
            "tokens": n_tok,
            "chunks": chunks,
            "avg_experts_per_token": dist["mean"],
            "k_distribution": dist,
            "first_layer_k": rec["first_layer_k"],
            "per_layer_k_hist": rec["k_hist"],
            "routing_config": cfg.as_dict(),
            "experts_implementation": ctl.experts_implementation,
            "model": self.s.model,
        }

    # -- the loop -------------------------------------------------------------------------------
    def run_all(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Run (or resume) every experiment; returns (experiment results, perplexity results,
        meta)."""
        from tqdm import tqdm

        fp = self.fingerprint()
        ckpt = Checkpoint(self.s.output, fp)
        if not self.s.resume:
            removed = ckpt.clear()
            if removed:
                log.info("--no-resume: removed %d earlier experiment files", removed)
        done = ckpt.load()
        jobs: list[tuple[str, RoutingConfig, int | None]] = []
        for name, cfg in self.configs.items():
            for i in range(len(self.prompts)):
                jobs.append((exp_key(name, i), cfg, i))
            if self.s.perplexity:
                jobs.append((ppl_key(name), cfg, None))
        for name, cfg in self.grid.items():
            jobs.append((ppl_key(name), cfg, None))
        for key, cfg, _ in jobs:
            if key in done and done[key].get("routing_config") != cfg.as_dict():
                raise ValueError(
                    f"checkpoint for {key} used a different definition of config "
                    f"{cfg.name!r}; rerun with --no-resume or rename the config"
                )
        todo = [j for j in jobs if j[0] not in done]
        log.info(
            "%d experiments in total, %d already done, %d to run",
            len(jobs),
            len(jobs) - len(todo),
            len(todo),
        )
        if todo:
            self.setup()
        since_save = 0
        bar = tqdm(todo, desc="BH experiments", unit="exp", file=sys.stderr, dynamic_ncols=True)
        for key, cfg, pidx in bar:
            bar.set_postfix_str(key)
            res = self.run_one(cfg, pidx) if pidx is not None else self.perplexity(cfg)
            res["fingerprint"] = fp
            # Not part of the fingerprint: a result stays reusable across commits, but says which
            # code produced it.
            res["git_commit"] = git_commit()
            ckpt.save_experiment(key, res)
            if pidx is not None:
                log.info(
                    "%s: %.2f experts/token, %.1f tok/s, %d tokens",
                    key,
                    res["avg_experts_per_token"],
                    res["tokens_per_sec"],
                    res["num_output_tokens"],
                )
            else:
                log.info(
                    "%s: perplexity %.3f (native %.3f), KL %.2e, %.2f experts/token",
                    key,
                    res["perplexity"],
                    res["native_perplexity"],
                    res["mean_kl"],
                    res["avg_experts_per_token"],
                )
            since_save += 1
            if since_save >= self.s.checkpoint_interval:
                ckpt.save_latest()
                since_save = 0
            if self.lm is not None and self.lm.device.type == "cuda":
                torch.cuda.empty_cache()
        bar.close()
        ckpt.save_latest()
        meta_path = Path(self.s.output) / "checkpoints" / "run_meta.json"
        if self.meta:
            atomic_write_json(meta_path, self.meta)
        elif meta_path.exists():
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        results = ckpt.results
        exps = [results[k] for k, _, p in jobs if p is not None]
        ppls = [results[k] for k, _, p in jobs if p is None]
        return exps, ppls, self.meta

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
from experiments.bh_routing.selector import RoutingConfig
from experiments.common.io import atomic_write_json

log = logging.getLogger("bh_routing")

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
DEFAULT_MODEL = "allenai/OLMoE-1B-7B-0924"
BASELINE = "topk_8"

#: The seed's five configurations. min_k = 1 (not stated in the seed) keeps every MoE layer active
#: for every token; set min_k = 0 in a custom config to allow skipping a layer's experts entirely.
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
        "description": "BH, alpha=0.05 with temperature 2.0 on the mixing weights",
    },
}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from None


def load_configs(
    extra_file: Path | None = None, only: list[str] | None = None
) -> dict[str, RoutingConfig]:
    """The seed's configs plus custom ones from a JSON file ``{name: {...}}``, optionally
    filtered."""
    raw: dict[str, Any] = dict(ROUTING_CONFIGS)
    if extra_file is not None:
        extra = _read_json(Path(extra_file), "configs")
        if not isinstance(extra, dict) or not extra:
            raise ValueError(
                f"configs file {extra_file} must hold a non-empty JSON object {{name: config}}"
            )
        raw.update(extra)
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
            raise ValueError("perplexity chunk/max tokens must be >= 2")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


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
        self.configs = load_configs(settings.configs_file, settings.only_configs)
        prompts = load_prompts(settings.prompts_file)
        self.prompts = prompts[: settings.max_prompts] if settings.max_prompts else prompts
        self.calibration_text = read_text(settings.calibration_file, "calibration")
        self.heldout_text = (
            read_text(settings.heldout_file, "held-out") if settings.perplexity else ""
        )
        self.lm: LoadedModel | None = None
        self.ctl: RoutingController | None = None
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
            "configs": {n: c.as_dict() for n, c in self.configs.items()},
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
        info = {
            "calibration_tokens": int(ids.numel()),
            "samples_per_layer": sizes,
            "min_attainable_p": 1.0 / (n_min + 1),
            "num_experts": e,
        }
        log.info(
            "empirical null: %d calibration tokens, >= %d samples per layer, min p %.2e",
            ids.numel(),
            n_min,
            info["min_attainable_p"],
        )
        for cfg in self.configs.values():
            if cfg.method == "bh" and cfg.p_value == "empirical":
                first = (
                    (cfg.alpha / e)
                    if cfg.correction == "bh"
                    else cfg.alpha / e / sum(1.0 / i for i in range(1, e + 1))
                )
                if info["min_attainable_p"] > first:
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

    @torch.no_grad()
    def perplexity(self, cfg: RoutingConfig) -> dict[str, Any]:
        """Teacher-forced perplexity of the held-out text under ``cfg``, chunk by chunk."""
        assert self.lm is not None
        assert self.ctl is not None
        ids = self.lm.tokenizer(self.heldout_text, return_tensors="pt").input_ids[0][
            : self.s.ppl_max_tokens
        ]
        self.ctl.set_config(cfg)
        self.ctl.start_recording()
        nll_sum, n_tok, chunks = 0.0, 0, []
        for start in range(0, ids.numel(), self.s.ppl_chunk_tokens):
            piece = ids[start : start + self.s.ppl_chunk_tokens].unsqueeze(0).to(self.lm.device)
            if piece.numel() < 2:
                continue
            logits = self.lm.model(piece).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[0, :-1], piece[0, 1:], reduction="sum"
            ).item()
            n = piece.numel() - 1
            chunks.append({"nll_sum": nll, "tokens": n, "mean_nll": nll / n})
            nll_sum += nll
            n_tok += n
        rec = self.ctl.stop_recording()
        ks = pooled_k_stats(rec["k_hist"])
        return {
            "config_name": cfg.name,
            "perplexity": math.exp(nll_sum / n_tok),
            "mean_nll": nll_sum / n_tok,
            "tokens": n_tok,
            "chunks": chunks,
            "avg_experts_per_token": ks["mean"],
            "per_layer_k_hist": rec["k_hist"],
            "routing_config": cfg.as_dict(),
            "experts_implementation": self.ctl.experts_implementation,
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
                    "%s: perplexity %.3f, %.2f experts/token",
                    key,
                    res["perplexity"],
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

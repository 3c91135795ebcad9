"""Fixed-length token-id chunks (no padding) from a real English corpus.

Sources:
    ``fineweb-edu``  HuggingFaceFW/fineweb-edu (sample-10BT) streamed with ``datasets``; needs the
                     hub and the ``datasets`` package (imported lazily, not a hard dependency).
    ``packaged``     offline: the licence texts and package descriptions (README long
                     descriptions) that every installed distribution ships in its ``*.dist-info``
                     metadata, de-duplicated by content and ordered by distribution name, so the
                     same lock file gives the same text. About 2 MB of English prose in this
                     project's venv (torch, numpy, scipy, matplotlib, nvidia-* EULAs, ...).
    ``<path>``       any UTF-8 text file.
    ``auto``         fineweb-edu when ``datasets`` imports and the hub is not marked offline,
                     else ``packaged``; the source actually used is recorded in the results.

Documents are tokenized without special tokens, joined with the EOS id, and cut into windows of
exactly ``seq_len`` ids; with ``bos=True`` and a tokenizer that has a BOS token every window
starts with it (so position 0 is the same token in every sequence, as an attention sink is).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")


class DataError(ValueError):
    """The corpus could not provide the requested number of tokens."""


@dataclass(frozen=True)
class Chunks:
    """Token ids ``[num_sequences, seq_len]`` and where they came from."""

    input_ids: torch.Tensor
    source: str
    description: str

    def to_dict(self) -> dict[str, Any]:
        """Metadata for the summary JSON (not the ids)."""
        return {
            "source": self.source,
            "description": self.description,
            "num_sequences": int(self.input_ids.shape[0]),
            "seq_len": int(self.input_ids.shape[1]),
            "sha256_ids": hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()[:16],
        }


def packaged_documents() -> Iterator[str]:
    """Yield licence texts and long descriptions of every installed distribution, deduplicated.

    Only files whose name contains "licen", "copying" or "notice" are read, plus the
    ``Description`` (the package README) from each METADATA; identical texts (nvidia-* wheels
    share one EULA) are yielded once.
    """
    seen: set[str] = set()
    dists = sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        texts: list[str] = []
        payload = dist.metadata.get_payload()  # type: ignore[attr-defined]
        desc = dist.metadata.get("Description") or (payload if isinstance(payload, str) else "")
        if desc:
            texts.append(desc)
        for f in sorted(dist.files or [], key=str):
            name = f.name.lower()
            if any(s in name for s in ("licen", "copying", "notice")):
                try:
                    texts.append(f.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    continue  # binary or missing file: not text we can use
        for text in texts:
            text = text.strip()
            digest = hashlib.sha256(text.encode()).hexdigest()
            if len(text) < 200 or digest in seen:
                continue
            seen.add(digest)
            yield text


def fineweb_documents() -> Iterator[str]:
    """Stream FineWeb-Edu texts (requires ``datasets`` and network access to the hub)."""
    try:
        import datasets  # lazy: optional, only for runs that can reach the hub
    except ImportError as e:
        raise DataError(
            "corpus 'fineweb-edu' needs the 'datasets' package: uv pip install datasets"
        ) from e
    ds = datasets.load_dataset(*FINEWEB_EDU, split="train", streaming=True)
    for row in ds:
        yield str(row["text"])


def file_documents(path: Path) -> Iterator[str]:
    """Paragraph-sized documents (blank-line separated) from a UTF-8 text file."""
    text = path.read_text(encoding="utf-8")
    for part in text.split("\n\n"):
        if part.strip():
            yield part


def _hub_offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE",
                                                                  "HF_DATASETS_OFFLINE"))


def chunk_token_ids(
    docs: Iterable[str],
    tokenizer: Any,
    *,
    num_sequences: int,
    seq_len: int,
    bos: bool = True,
) -> torch.Tensor:
    """Tokenize documents into ``num_sequences`` windows of exactly ``seq_len`` ids.

    Documents are joined with EOS (when the tokenizer has one). No padding is ever used:
    the function raises ``DataError`` if the corpus runs out.
    """
    if num_sequences < 1 or seq_len < 2:
        raise DataError(f"need num_sequences >= 1 and seq_len >= 2, got {num_sequences}, {seq_len}")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos else None
    eos_id = getattr(tokenizer, "eos_token_id", None)
    body = seq_len - (1 if bos_id is not None else 0)
    need = num_sequences * body
    buf: list[int] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        buf.extend(int(i) for i in ids)
        if eos_id is not None:
            buf.append(int(eos_id))
        if len(buf) >= need:
            break
    if len(buf) < need:
        raise DataError(
            f"corpus has {len(buf)} tokens, {need} needed for {num_sequences} x {seq_len}"
        )
    ids = torch.tensor(buf[:need], dtype=torch.long).view(num_sequences, body)
    if bos_id is not None:
        ids = torch.cat([torch.full((num_sequences, 1), int(bos_id)), ids], dim=1)
    return ids


def load_chunks(
    tokenizer: Any,
    *,
    num_sequences: int,
    seq_len: int,
    corpus: str = "auto",
    bos: bool = True,
) -> Chunks:
    """Build the token-id chunks from the named corpus (see the module docstring)."""
    if corpus == "auto":
        try:
            import datasets  # noqa: F401  # probe only
            have_datasets = True
        except ImportError:
            have_datasets = False
        if have_datasets and not _hub_offline():
            try:
                return load_chunks(tokenizer, num_sequences=num_sequences, seq_len=seq_len,
                                   corpus="fineweb-edu", bos=bos)
            except Exception as e:
                log.warning("fineweb-edu unavailable (%s); using the packaged corpus", e)
        corpus = "packaged"
    if corpus == "fineweb-edu":
        docs: Iterable[str] = fineweb_documents()
        desc = f"{FINEWEB_EDU[0]} ({FINEWEB_EDU[1]}), streamed in order"
    elif corpus == "packaged":
        docs = packaged_documents()
        desc = "licence texts + package descriptions from installed *.dist-info (deduplicated)"
    else:
        path = Path(corpus)
        if not path.is_file():
            raise DataError(f"corpus must be auto, packaged, fineweb-edu or a text file: {corpus}")
        docs = file_documents(path)
        desc = f"text file {path}"
    ids = chunk_token_ids(docs, tokenizer, num_sequences=num_sequences, seq_len=seq_len, bos=bos)
    return Chunks(input_ids=ids, source=corpus, description=desc)

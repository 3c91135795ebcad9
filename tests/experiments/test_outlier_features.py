"""Outlier-feature analysis on hand-made activations: every denominator, CIs, grid, configs, data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.outlier_features import analysis as an
from experiments.outlier_features.configs import (
    DENSE,
    GIB,
    SWEEP,
    ConfigError,
    broker_query,
    get_spec,
    plan_gpus,
    vram_need_gib,
    with_overrides,
)
from experiments.outlier_features.data import DataError, chunk_token_ids, load_chunks
from experiments.outlier_features.extract import StatsBuilder, stats_from_activations


def _acts(b: int = 2, layers: int = 4, s: int = 10, h: int = 8) -> np.ndarray:
    """Quiet activations [B, L, 2, S, H] (|x| < 1) to plant hits into."""
    rng = np.random.default_rng(0)
    return rng.uniform(-0.9, 0.9, size=(b, layers, 2, s, h)).astype(np.float32)


# --------------------------------------------------------------------------- denominators
def test_layer_denominator_counts_blocks_not_sites() -> None:
    x = _acts()
    x[0, 0, 0, 3, 5] = 7.0  # block 0, attention input only
    x[1, 1, 1, 4, 5] = -7.0  # block 1, FFN input only (sign does not matter: |x|)
    x[0, 2, :, 6, 5] = 9.0  # block 2, both sites: still ONE block
    fr = an.fractions(stats_from_activations(x), 6.0)
    assert fr.layer_frac[5] == pytest.approx(3 / 4)  # blocks 0, 1, 2 of L = 4
    assert fr.layer_frac_site[0, 5] == pytest.approx(2 / 4)  # attn: blocks 0 and 2
    assert fr.layer_frac_site[1, 5] == pytest.approx(2 / 4)  # ffn: blocks 1 and 2
    assert fr.layer_frac[np.arange(8) != 5].max() == 0.0


def test_position_denominator_is_b_times_s_not_pooled_indices() -> None:
    x = _acts()  # B = 2, S = 10
    x[0, 0, 0, 3, 1] = 7.0  # (b=0, s=3)
    x[1, 2, 1, 5, 1] = 7.0  # (b=1, s=5), another block and site
    x[1, 3, 0, 5, 1] = 7.0  # same (b, s) in a third block: one position, not two
    fr = an.fractions(stats_from_activations(x), 6.0)
    # 2 hit positions out of B x S = 20; pooling position indices over the batch would give
    # 2 of 10 and grow with the batch.
    assert fr.seq_frac[1] == pytest.approx(2 / 20)
    assert fr.tok_count[:, 1].tolist() == [1, 1]


def test_position_zero_excluded_from_both_criteria() -> None:
    x = _acts()
    x[:, :, 0, 0, 2] = 10.0  # every block, position 0 only (attention-sink pattern)
    x[0, 1, 1, 4, 2] = 10.0  # one more position in one block
    st = stats_from_activations(x)
    with0 = an.fractions(st, 6.0)
    without0 = an.fractions(st, 6.0, drop_pos0=True)
    assert with0.seq_frac[2] == pytest.approx(3 / 20)  # (0,0), (1,0), (0,4)
    assert without0.seq_frac[2] == pytest.approx(1 / 18)  # (0,4) of B x (S-1)
    assert with0.layer_frac[2] == 1.0
    assert without0.layer_frac[2] == pytest.approx(1 / 4)  # only block 1 outside s=0
    assert an.detect(with0).tolist()[2]
    assert not an.detect(without0, 0.25, 0.06).tolist()[2]  # 1/18 < 6 %


def test_criteria_boundaries_are_inclusive() -> None:
    x = _acts(b=1, layers=4, s=50, h=4)
    x[0, 0, 0, :3, 0] = 6.0  # exactly t, exactly 1 of 4 blocks, exactly 3/50 = 6 %
    fr = an.fractions(stats_from_activations(x), 6.0)
    assert fr.layer_frac[0] == 0.25 and fr.seq_frac[0] == pytest.approx(0.06)
    assert an.detect(fr, 0.25, 0.06).tolist() == [True, False, False, False]
    x[0, 0, 0, 2, 0] = 5.99  # now 2/50 = 4 % of positions
    assert not an.detect(an.fractions(stats_from_activations(x), 6.0))[0]


def test_unique_dims_never_summed_over_batches() -> None:
    x = _acts(b=4, layers=4, s=10, h=8)
    x[:, :, :, :, 3] = 8.0  # dim 3 is an outlier in every sequence and block
    st = stats_from_activations(x)
    summary, table = an.analyze(st, n_resamples=200, k=4)
    res = summary["results"]["with_pos0"]
    assert res["dims"] == [3] and res["n_dims"] == 1  # not 4 (one per batch)
    xb = res["cross_batch"]
    assert xb["n_dims_per_batch"] == [1, 1, 1, 1]
    assert xb["stable_dims"] == [3] and xb["mean_jaccard"] == 1.0
    assert len(table) == 8 and table["is_outlier"].sum() == 1


def test_bootstrap_ci_width_reflects_sequence_variation() -> None:
    x = _acts(b=8, layers=4, s=20, h=6)
    x[0, :, 0, :, 1] = 7.0  # dim 1 hit everywhere in ONE of 8 sequences: seq_frac 12.5 %
    x[:, :, 0, :, 4] = 7.0  # dim 4 hit everywhere in every sequence
    st = stats_from_activations(x)
    boot = an.bootstrap(st, n_resamples=1000, seed=1)
    assert boot["n_dims"] == 2
    lo, hi = boot["n_dims_ci"]
    # P(sequence 0 not drawn) = (7/8)^8 = 34 %: dim 1 then fails both criteria.
    assert lo == 1.0 and hi == 2.0
    assert boot["share_resamples_with_same_set"] == pytest.approx(1 - (7 / 8) ** 8, abs=0.05)
    assert boot["_seq_frac_ci"][0, 1] == 0.0 < 0.125 < boot["_seq_frac_ci"][1, 1]
    assert boot["_seq_frac_ci"][:, 4].tolist() == [1.0, 1.0]
    assert boot["positions_affected"] == 1.0 and boot["layers_affected"] == 1.0


def test_cross_batch_jaccard_and_stable_set() -> None:
    assert an.jaccard(set(), set()) == 1.0
    assert an.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    x = _acts(b=4, layers=4, s=10, h=6)
    x[:, :, 0, :, 0] = 7.0  # in all batches
    x[0, :, 0, :, 5] = 7.0  # only in batch 0
    xb = an.cross_batch(stats_from_activations(x), k=4)
    assert xb["stable_dims"] == [0]
    assert xb["_detect_freq"][5] == 0.25
    assert xb["min_jaccard"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="K must be"):
        an.cross_batch(stats_from_activations(x), k=5)


def test_stable_set_never_holds_a_dim_failing_on_the_full_data() -> None:
    """Dim 1 hits 10 % of the positions in two of four batches and none in the others: it passes
    in ceil(K/2) batches but has 5 % < 6 % of the positions on the full data."""
    x = _acts(b=4, layers=4, s=100, h=3)
    x[:, :, 0, :, 0] = 7.0  # everywhere: stable and on the full data
    x[:2, :, 0, :10, 1] = 7.0
    stats = stats_from_activations(x)
    full = set(np.flatnonzero(an.detect(an.fractions(stats))).tolist())
    assert full == {0}
    xb = an.cross_batch(stats, k=4)
    assert xb["_detect_freq"][1] == 0.5  # the old rule (>= ceil(K/2) batches) would keep it
    assert xb["stable_dims"] == [0]
    assert set(xb["stable_dims"]) <= full
    assert xb["stable_excluded"]["dims"] == [1]
    assert "full data" in xb["stable_excluded"]["reason"] and "full data" in xb["stable_rule"]


def test_sensitivity_grid_shape_and_monotonicity() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_t(df=3, size=(4, 6, 2, 40, 16)) * 2).astype(np.float32)
    grid = an.sensitivity_grid(stats_from_activations(x))
    assert len(grid) == 4 * 3 * 3
    by = {(g["threshold"], g["layer_pct"], g["seq_pct"]): g["n_dims"] for g in grid}
    for (t, lp, sp), n in by.items():
        for t2 in an.GRID_THRESHOLDS:
            if t2 > t:
                assert by[(t2, lp, sp)] <= n
        for sp2 in an.GRID_SEQ_FRACS:
            if sp2 > sp:
                assert by[(t, lp, sp2)] <= n
    assert max(by.values()) > 0  # heavy tails: something passes at the loosest cell


def test_massive_activation_and_kurtosis_columns() -> None:
    sb = StatsBuilder(1, 6, 2, 64)
    out = np.full((6, 64), 0.1, np.float32)
    out[2, 17] = 500.0  # > 100 and 5000x the median
    out[3, 9] = 50.0  # large ratio, but below the absolute 100
    sb.add_block_output(1, out)
    x = np.ones((6, 64), np.float32)
    x[:, 17] = 30.0  # one dim with a much larger RMS -> heavy-tailed RMS distribution
    for li in range(2):
        for si in range(2):
            sb.add_site(0, li, si, x)
    st = sb.finish()
    m = an.massive_summary(st)
    assert m["n_dims"] == 1 and m["top_dims"] == [{"dim": 17, "count": 1}]
    assert m["layers_with_massive"] == [1]
    k = an.kurtosis_summary(st)
    assert k["attn_input"]["median"] > 50  # one spike among 64 equal values


# --------------------------------------------------------------------------- configs
def test_sweep_configs_have_real_sizes() -> None:
    assert [s.id for s in SWEEP] == ["01", "02", "03", "04", "05", "06", "07"]
    for s in (*SWEEP, *DENSE):
        assert s.hf_id and "/" in s.hf_id
        assert 0 < s.active_params <= s.total_params
        assert s.num_sequences == 16 and s.seq_len == 2048 and s.batch_size == 1
        assert s.hidden_size >= 1024 and s.num_layers >= 16
        if s.family == "moe":
            assert 0 < s.top_k < s.num_experts
    assert get_spec("3").name == "Qwen3-30B-A3B"
    assert get_spec("mistralai/Mixtral-8x7B-v0.1").id == "04"
    assert get_spec("no-such-model") is None


def test_vram_need_and_gpu_count() -> None:
    olmoe = get_spec("01")
    w, act, red = vram_need_gib(olmoe)
    assert w == pytest.approx(6.92e9 * 2 / GIB)  # every expert resident, bf16
    assert act == pytest.approx(2048 * 2048 * 2 * 64 / GIB)
    assert red == pytest.approx(2048 * 2048 * 4 / GIB)
    counts = {s.id: plan_gpus(s).gpu_count for s in SWEEP}
    assert counts == {"01": 1, "02": 1, "03": 1, "04": 2, "05": 4, "06": 4, "07": 4}
    assert plan_gpus(get_spec("d5")).gpu_count == 1
    # Doubling the dtype width doubles the weight term and can raise the count.
    assert plan_gpus(with_overrides(get_spec("03"), dtype="float32")).gpu_count == 2
    with pytest.raises(ConfigError, match="needs"):
        plan_gpus(with_overrides(get_spec("07"), total_params=2e12))
    q = broker_query(get_spec("06"))
    assert q.startswith("gpu~H100 vram>=80GB manufacturer=nvidia gpus=4")


# --------------------------------------------------------------------------- data
class _WordTok:
    """A stand-in tokenizer: one id per whitespace word."""

    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + len(w) for w in text.split()]}


def test_chunks_fixed_length_without_padding() -> None:
    docs = ["alpha beta gamma delta"] * 50
    ids = chunk_token_ids(docs, _WordTok(), num_sequences=3, seq_len=16)
    assert ids.shape == (3, 16)
    assert (ids[:, 0] == 1).all()  # BOS at position 0
    assert (ids[:, 1:] != 0).all()
    assert 2 in ids[0].tolist()  # documents joined with EOS
    no_bos = chunk_token_ids(docs, _WordTok(), num_sequences=3, seq_len=16, bos=False)
    assert no_bos.shape == (3, 16) and (no_bos[:, 0] != 1).all()
    with pytest.raises(DataError, match="tokens"):
        chunk_token_ids(["a b"], _WordTok(), num_sequences=2, seq_len=16)


def test_packaged_corpus_is_real_english_and_deterministic() -> None:
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    a = load_chunks(tok, num_sequences=16, seq_len=2048, corpus="packaged")
    b = load_chunks(tok, num_sequences=16, seq_len=2048, corpus="packaged")
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape == (16, 2048)
    text = tok.decode(a.input_ids[0])
    assert sum(w in text.lower() for w in (" the ", " of ", " and ", "license")) >= 3
    with pytest.raises(DataError, match="corpus must be"):
        load_chunks(tok, num_sequences=1, seq_len=8, corpus="/no/such/file.txt")

"""ME-layer detection: synthetic cases with known answers, the real SmolLM2, the CLI and its errors."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from melayer import capture
from melayer.capture import LayerStats, ReductionPlan, ResidualCapture, reduce_hidden, reduce_packed
from melayer.detect import MassiveCriterion, Profile, emergence, prompt_events


D = 16  # hidden size of the synthetic profiles


def _profile(first=None, delim=None, other=None, median=None, blocks=30, embed=1.0):
    """A Profile whose tracked values are given as {block: {dim: value}} per carrier (embedding row: ``embed``)."""
    def grid(spec):
        t = torch.full((blocks + 1, D), 0.5)
        t[0] = embed
        for block, dims in (spec or {}).items():
            for d, v in dims.items():
                t[block + 1, d] = v
        return t

    med = torch.ones(blocks + 1) if median is None else torch.tensor([median[0]] + list(median), dtype=torch.float)
    zeros = torch.zeros(blocks + 1, D, dtype=torch.long)
    return Profile(values={"first": grid(first), "delimiter": grid(delim), "other": grid(other)}, median=med,
                   positions={"first": zeros, "delimiter": zeros + 3, "other": zeros + 5},
                   massive_count=torch.zeros(blocks + 1), massive_tokens=torch.zeros(blocks + 1),
                   nonfinite=torch.zeros(blocks + 1))


def _run(values: dict, blocks: int = 30) -> dict:
    """{block: value} from ``start`` on, the value held to the end (0.5 elsewhere)."""
    return {b: {7: v} for b, v in values.items()}


def _held(start: int, value: float, blocks: int = 30, end: int | None = None) -> dict:
    return {b: value for b in range(start, end if end is not None else blocks)}


C = MassiveCriterion()


def test_abrupt_birth_is_single_and_earlier_spike_is_transient():
    """SmolLM2's shape: a ~700 spike on token 0 in blocks 1-8 fades, then block 11 writes ~23,000 that stays."""
    values = {**_held(1, 700.0, end=9), **_held(11, 23000.0, end=28), 28: 9000.0, 29: 4000.0}
    p = _profile(first=_run(values))
    events = prompt_events(p, C)
    persistent = [e for e in events if e.persistent]
    assert len(persistent) == 1 and (persistent[0].carrier, persistent[0].dim, persistent[0].start) == ("first", 7, 11)
    assert [(e.start, e.end, e.kind) for e in events if not e.persistent] == [(1, 8, "spike")]
    em = emergence([p], C)
    assert (em.kind, em.me_layer, em.me_layer_1based, em.first_massive_block, em.carrier) == ("single", 11, 12, 11,
                                                                                                "first")
    assert em.shares[11] == pytest.approx((23000 - 0.5) / 23000, rel=1e-4) and em.major_blocks == [11]


def test_gradual_growth_with_a_growing_median_is_gradual_not_none():
    """Gemma-like: token 0 massive from block 0 (3,000) and growing ~35x by block 14 while the median grows
    from 0.5 to 200 (the ratio falls below 1000 late): it persists relative to itself; no single ME layer."""
    blocks = 18
    value = [3000.0 * (35 ** (min(b, 14) / 14)) for b in range(blocks)]
    median = [0.5 * (400 ** (min(b, 14) / 14)) for b in range(blocks)]
    p = _profile(first={b: {2: v} for b, v in enumerate(value)}, median=median, blocks=blocks)
    assert value[14] / median[14] < 1000  # the old fixed-ratio rule loses it late
    em = emergence([p], C)
    assert (em.kind, em.me_layer, em.me_layer_1based, em.first_massive_block) == ("gradual", None, None, 0)
    assert max(em.shares.values()) < C.step_share and em.carrier == "first"


def test_two_step_birth_is_multi_step_and_names_both_blocks():
    """Qwen2.5-Coder's shape: block 1 writes ~34% of the final value, block 2 ~58%, the rest a little."""
    values = {0: 40.0, 1: 3440.0, **_held(2, 9240.0, blocks=28), 27: 10000.0}
    em = emergence([_profile(first=_run(values), blocks=28)], C)
    assert em.kind == "multi_step" and em.me_layer == 1 and em.major_blocks == [1, 2]
    assert em.shares[1] == pytest.approx(0.34, abs=0.01) and em.shares[2] == pytest.approx(0.58, abs=0.01)
    assert "no single block" in em.note


def test_massive_value_on_a_delimiter_is_reported_as_such():
    em = emergence([_profile(delim=_run(_held(5, 5000.0)))], C)
    assert em.carrier == "delimiter" and em.kind == "single" and em.me_layer == 5
    assert "first delimiter" in em.note and "not the first token" in em.note


def test_nothing_persists_is_none():
    em = emergence([_profile(first=_run(_held(3, 5000.0, end=6)))], C)
    assert (em.kind, em.me_layer, em.carrier) == ("none", None, None)


def test_thresholds_are_configurable_and_relative_to_the_median():
    p = _profile(first=_run(_held(0, 500.0)))
    assert emergence([p], C).kind == "none"  # 500 < 1000 × median 1
    assert emergence([p], MassiveCriterion(ratio=400)).me_layer == 0
    p2 = _profile(first=_run(_held(0, 500.0)), median=[2.0] * 30)
    assert emergence([p2], MassiveCriterion(ratio=400)).kind == "none"


def test_exact_counts_and_token0_beyond_32_larger_tokens():
    """40 other tokens carry larger massive values than token 0: token 0 is still followed (its own row), and
    massive entries are counted exactly (the old top-32 candidates would have hidden token 0)."""
    h = torch.randn(1, 50, D) * 0.1
    h[0, 0, 3] = 2000.0
    h[0, 5:45, 9] = 9000.0
    valid = torch.ones(1, 50, dtype=torch.bool)
    first_sel = torch.zeros(1, 50, dtype=torch.bool)
    first_sel[0, 0] = True
    s = reduce_hidden(h, valid, first_sel, torch.zeros_like(first_sel), torch.zeros(1, dtype=torch.long))
    assert int(s.massive_count) == 41 and int(s.massive_tokens) == 41
    assert float(s.first[0, 3]) == 2000.0 and float(s.rest_max_abs[0, 9]) == 9000.0
    ref = (h.abs() > torch.clamp(1000 * h.abs().flatten().median(), min=100)).sum()
    assert int(s.massive_count) == int(ref)


def _assert_identical(got: LayerStats, want: LayerStats) -> None:
    for f in fields(LayerStats):
        g, w = getattr(got, f.name), getattr(want, f.name)
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f.name
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f.name)


def _hidden_case(case: str):
    """(h, attention_mask, delim_index): random hidden states with massive values, ties, NaN/inf and pads."""
    g = torch.Generator().manual_seed(3)
    if case == "batch1":
        h, mask, delim = torch.randn(1, 37, D, generator=g), torch.ones(1, 37, dtype=torch.long), None
        h[0, 0, 2], h[0, 9, 5] = 900.0, -4000.0
        return h, mask, delim
    lengths = [23, 17, 5, 1] if case != "no_pad" else [12, 12]
    mask = torch.stack([(torch.arange(max(lengths)) >= max(lengths) - n).long() for n in lengths])
    h = torch.randn(len(lengths), max(lengths), D, generator=g)
    h[:, :, 3] *= 50.0
    h[0, 0, 7] = h[0, 5, 7] = -3000.0  # a tie for the largest |h|
    h[0, 6, 1] = 3000.0
    if case == "no_pad":
        return h, mask, torch.tensor([3, 0])  # a delimiter on the first token too
    h[1, 2, :] = 1e6  # a pad token: never counted
    h[1, 3, 4] = float("inf")  # another pad
    h[1, 10, 5], h[1, 12, 6], h[1, 13, 6] = float("nan"), float("inf"), float("-inf")
    h[3, -1] = float("nan")  # the only real token is all NaN: NaN median
    delim = torch.tensor([4, -1, 30, 22])  # absolute; -1 and out of range: none
    return (h.bfloat16() if case == "bf16" else h), mask, delim


@pytest.mark.parametrize("median", ["select", "sort"])
@pytest.mark.parametrize("case", ["batch1", "padded", "no_pad", "bf16"])
def test_planned_reduction_is_identical_to_reduce_hidden(case, median):
    """What ResidualCapture.run computes (masks once per forward, packed, finished on the host) equals the
    definition field by field, bit for bit, whichever way the median is selected ("sort" is the CUDA method,
    run here on the CPU)."""
    h, mask, delim = _hidden_case(case)
    valid = mask != 0
    first = valid.int().argmax(1)
    positions = torch.arange(mask.shape[1])
    delim_sel = positions == (torch.full((len(mask),), -1) if delim is None else delim)[:, None]
    for abs_threshold, ratio in ((100.0, 1000.0), (2.0, 3.0)):
        want = reduce_hidden(h, valid, positions == first[:, None], delim_sel, first, abs_threshold, ratio)
        plan = ReductionPlan(mask, delim)
        floats, ints = reduce_packed(h, plan.on(h.device), abs_threshold, ratio, median)
        got = plan.unpack(floats[None], ints[None])[0]
        _assert_identical(got, want)
        assert ratio == 1000.0 or int(want.massive_count.sum()) > 0


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))
INTERPRETED_CPU = pytest.param("cpu", marks=pytest.mark.skipif(  # conftest turns the interpreter on without a GPU
    torch.cuda.is_available(), reason="a GPU machine runs the kernel compiled, on CUDA"))
NORMS = ("first_norm", "rest_norm")  # the fused kernel sums the squares in another order


def _assert_same_but_rounding(got: LayerStats, want: LayerStats) -> None:
    """Identical, except the norms, equal to float rounding."""
    for f in fields(LayerStats):
        g, w = getattr(got, f.name), getattr(want, f.name)
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f.name
        tol = {"rtol": 1e-5, "atol": 0.0} if f.name in NORMS else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(g, w, equal_nan=True, msg=f.name, **tol)


@pytest.mark.parametrize("device", [INTERPRETED_CPU, CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["batch1", "padded", "no_pad"])
def test_fused_kernel_equals_reduce_hidden(case, dtype, device):
    """The Triton kernel's one-pass partials, finished after the forward, give the definition's statistics: the
    median found in the histogram of bit patterns is the very element ``nanmedian`` picks, the massive counts and
    every position are exact, with ties, NaN / inf, pads and delimiters (on the CPU through Triton's interpreter).
    Three states share the buffers, each in its own row, in a block size that splits the tokens and dims."""
    from melayer.fused_reduction import FusedReduction

    h, mask, delim = _hidden_case(case)
    h = h.to(dtype).to(device)
    valid = mask != 0
    first = valid.int().argmax(1)
    positions = torch.arange(mask.shape[1])
    delim_sel = positions == (torch.full((len(mask),), -1) if delim is None else delim)[:, None]
    plan = ReductionPlan(mask, delim)
    for abs_threshold, ratio in ((100.0, 1000.0), (2.0, 3.0)):
        fused = FusedReduction(3, h, abs_threshold, ratio, block_t=8, block_d=16)
        fused.restart()
        states = [h, -h.flip(1), h * 3]  # three different states in one forward
        assert [fused(state, plan) for state in states] == [0, 1, 2]
        got = plan.unpack(*(s.cpu() for s in fused.stacks(3)))
        for state, stats in zip(states, got):
            first_sel = positions == first[:, None]
            want = reduce_hidden(state.cpu(), valid, first_sel, delim_sel, first, abs_threshold, ratio)
            _assert_same_but_rounding(stats, want)
        assert ratio == 1000.0 or int(got[0].massive_count.sum()) > 0


@pytest.mark.parametrize("device", [INTERPRETED_CPU, CUDA])
def test_fused_capture_equals_reference(device):
    """``reduction="fused"`` on a real bf16 forward (padded batch, delimiters), twice with other delimiters (the
    shared buffers restart), gives the reference reduction's statistics; a guard: the reference counts massive
    entries, so a wrong median or threshold would show."""
    from helpers import left_padded, make_tiny

    model = make_tiny("llama", dtype=torch.bfloat16).to(device)
    ids, mask = left_padded([9, 6, 3], seed=1)
    for delim in (torch.tensor([4, -1, 8]), torch.tensor([5, 7, -1])):
        runs = {}
        for reduction in ("reference", "fused"):
            with ResidualCapture(model, abs_threshold=0.05, ratio=2.0, reduction=reduction) as cap:
                layers = cap.run(ids, mask, delim)
                runs[reduction] = [cap.embedding, *layers]
        assert len(runs["fused"]) == model.config.num_hidden_layers + 1
        for got, want in zip(runs["fused"], runs["reference"]):
            _assert_same_but_rounding(got, want)
        assert sum(int(s.massive_count.sum()) for s in runs["reference"]) > 0


def test_fused_reduction_takes_only_what_it_can_index():
    """16-bit states only, and only while two copies fit 32-bit offsets; the capture reduces the rest otherwise."""
    from melayer import fused_reduction

    small = torch.empty(2, 3, 4, dtype=torch.bfloat16, device="meta")
    assert fused_reduction.supports(small) and fused_reduction.supports(small.half())
    assert not fused_reduction.supports(small.float())
    assert not fused_reduction.supports(torch.empty(1, 2**15, 2**15, dtype=torch.bfloat16, device="meta"))
    assert fused_reduction.supports(torch.empty(1, 2**15, 2**15 - 1, dtype=torch.bfloat16, device="meta"))
    assert fused_reduction.supports(small, 2**15 - 1) and not fused_reduction.supports(small, 2**15)  # histograms
    with pytest.raises(ValueError, match="16-bit states"):
        fused_reduction.FusedReduction(2, small.float())


@pytest.mark.parametrize("device", [INTERPRETED_CPU])
def test_fused_finish_as_graph_across_forwards(monkeypatch, device):
    """The fused reduction's finishing as a CUDA graph, run on the CPU with the graph replaced by its function: the
    warm-up at construction and every replay clear the partials, so forward after forward (other states, other
    delimiters, one of them left unfinished) gives the definition's statistics; a guard: the graph did replay."""
    from types import SimpleNamespace

    from melayer.fused_reduction import FusedReduction

    replays = []

    def run_as_graph(fn, device):
        fn()  # the warm-up, as on a GPU
        return SimpleNamespace(replay=lambda: (replays.append(1), fn()))

    monkeypatch.setattr(capture, "_record", run_as_graph)
    monkeypatch.setattr(capture, "_graphable", lambda h: True)
    h, mask, _ = _hidden_case("padded")
    h = h.bfloat16()
    valid = mask != 0
    first = valid.int().argmax(1)
    positions = torch.arange(mask.shape[1])
    fused = FusedReduction(2, h, 2.0, 3.0, block_t=8, block_d=16)
    forwards = [(1.0, torch.tensor([4, -1, 30, 22])), (-2.0, torch.tensor([3, 8, -1, 22])),
                (4.0, torch.tensor([4, -1, 30, 22])), (0.5, torch.tensor([5, -1, -1, -1]))]
    for forward, (scale, delim) in enumerate(forwards):
        plan = ReductionPlan(mask, delim)
        fused.restart()
        states = [h * scale, h.flip(2)]
        for state in states:
            fused(state, plan)
        if forward == 2:
            continue  # never finished: the next restart clears
        got = plan.unpack(*fused.stacks(2))
        delim_sel = positions == delim[:, None]
        for state, stats in zip(states, got):
            want = reduce_hidden(state, valid, positions == first[:, None], delim_sel, first, 2.0, 3.0)
            _assert_same_but_rounding(stats, want)
    assert len(replays) == 3


def test_nanmedian_by_sort_equals_nanmedian():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 5, (6, 40), generator=g).float()  # many ties
    rows[1, ::3] = float("nan")
    rows[2] = float("nan")
    rows[3, 1:] = float("nan")  # one value left
    rows[4, :21] = float("nan")  # an odd count of values
    torch.testing.assert_close(capture.nanmedian_by_sort(rows), torch.nanmedian(rows, 1).values,
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["normal", "ties", "periodic", "nan_pads", "bf16", "small", "bracket_misses"])
def test_nanmedian_by_bracket_equals_nanmedian(case):
    """The CPU median of a block's |h|: the very element ``torch.nanmedian`` picks, whatever the data, including
    data that fools the strided probe (periodic with its stride) and a bracket too narrow to hold the median."""
    g = torch.Generator().manual_seed(1)
    n, kw = 2048 * 64, {}
    row = torch.randn(n, generator=g).abs()
    if case == "ties":
        row = torch.randint(0, 3, (n,), generator=g).float()
    elif case == "periodic":
        row = (torch.arange(n) % (n // 4096)).float()
    elif case == "nan_pads":
        row[: n // 3] = float("nan")
    elif case == "bf16":
        row = row.bfloat16()
    elif case == "small":
        row = row[:1000]
    elif case == "bracket_misses":
        kw = {"margin": 0.0}
    want = torch.nanmedian(row)
    assert capture.nanmedian_by_bracket(row, **kw).item() == want.item()
    assert capture.nanmedian_rows(torch.stack([row, row.flip(0)])).tolist() == [want.item()] * 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_capture_reductions_give_identical_stats(device):
    """Every ``reduction`` of ResidualCapture on a real forward: a padded batch with delimiters, the same shape
    with other delimiters (a captured graph's masks are refreshed), then batch 1 without padding."""
    from helpers import left_padded, make_tiny

    model = make_tiny("llama").to(device)
    ids, mask = left_padded([9, 6, 3], seed=1)
    cases = [(ids, mask, torch.tensor([4, -1, 8])), (ids, mask, torch.tensor([5, 7, -1])),
             (torch.arange(3, 20)[None], torch.ones(1, 17, dtype=torch.long), None)]
    for ids, mask, delim in cases:
        runs = {}
        variants = [(r, "auto") for r in capture.REDUCTIONS] + [("eager", "sort")]
        for reduction, median in variants:
            with ResidualCapture(model, abs_threshold=0.05, ratio=2.0, reduction=reduction, median=median) as cap:
                layers = cap.run(ids, mask, delim)
                runs[reduction if median == "auto" else f"{reduction}:{median}"] = [cap.embedding, *layers]
        for stats in runs.values():
            assert len(stats) == model.config.num_hidden_layers + 1
            for got, want in zip(stats, runs["reference"]):
                _assert_identical(got, want)
        assert sum(int(s.massive_count.sum()) for s in runs["reference"]) > 0


def test_graphed_rows_in_order_across_forwards(monkeypatch):
    """The graphed reduction's bookkeeping, run on the CPU with the graph replaced by its function: every block's
    pack lands in its own row, in forward order, and a second forward (other delimiters) restarts at row 0, so
    both forwards give the reference statistics; one graph serves the embeddings and every block."""
    from types import SimpleNamespace

    from helpers import left_padded, make_tiny

    replays = []

    def run_as_graph(fn, device):
        fn()  # the warm-up, as on a GPU: it writes row 0, which the restart must discard
        return SimpleNamespace(replay=lambda: (replays.append(1), fn()))

    monkeypatch.setattr(capture, "_record", run_as_graph)
    monkeypatch.setattr(capture, "_graphable", lambda h: True)
    monkeypatch.setattr(capture, "_GRAPHS", capture.OrderedDict())
    model = make_tiny("llama")
    ids, mask = left_padded([9, 6, 3], seed=1)
    with ResidualCapture(model, abs_threshold=0.05, ratio=2.0, reduction="cuda_graph") as graphed, \
            ResidualCapture(model, abs_threshold=0.05, ratio=2.0, reduction="reference") as reference:
        for forward, delim in enumerate((torch.tensor([4, -1, 8]), torch.tensor([5, 7, -1])), start=1):
            layers = graphed.run(ids, mask, delim)
            got = [graphed.embedding, *layers]
            layers = reference.run(ids, mask, delim)
            want = [reference.embedding, *layers]
            assert len(capture._GRAPHS) == 1 and next(iter(capture._GRAPHS.values())).used == len(want) == 5
            assert len(replays) == 5 * forward  # every state of both forwards went through the graph
            for g, w in zip(got, want):
                _assert_identical(g, w)
            assert all(not torch.equal(a.first, b.first) for a, b in zip(want, want[1:]))  # rows out of order show


def test_non_finite_values_are_counted_and_json_stays_strict(tmp_path):
    from melayer.io import atomic_write_json

    h = torch.randn(2, 6, D)
    h[1, 2, 4] = float("inf")
    h[1, 3, 5] = float("nan")
    valid = torch.ones(2, 6, dtype=torch.bool)
    first_sel = torch.zeros(2, 6, dtype=torch.bool)
    first_sel[:, 0] = True
    s = reduce_hidden(h, valid, first_sel, torch.zeros_like(first_sel), torch.zeros(2, dtype=torch.long))
    assert s.nonfinite.tolist() == [0, 2]
    p = _profile()
    p.nonfinite[5] = 3
    assert p.first_nonfinite_block() == 4
    atomic_write_json(tmp_path / "r.json", {"x": float("inf"), "y": [float("nan"), 1.0], "t": torch.tensor([float("-inf")])})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"x": None, "y": [None, 1.0], "t": [None]}


def test_scan_warns_about_non_finite_weights(tmp_path):
    """A model whose block 2 outputs inf: a warning naming that block, exit 0 for the library, valid JSON."""
    from helpers import make_tiny, word_tokenizer
    from melayer.scanning import scan, write_scan_report, ScanConfig

    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.warns(UserWarning, match=r"non-finite values .* first appear in block 2 \(paper: 3\)"):
        report = scan(model, word_tokenizer(), ["w5 w6 w7 w8", "w9 w10 w11"], progress=False)
    paths = write_scan_report(report, tmp_path, ScanConfig())
    json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))


@pytest.mark.parametrize("device", [INTERPRETED_CPU])
def test_scan_config_picks_the_reduction(device):
    """``ScanConfig.reduction`` reaches the capture: a bf16 scan with the fused kernel reports what the reference
    reduction reports (token 0's |h| per block exactly, every layer's figures to float rounding); a bad name is a
    one-line error before anything runs."""
    from helpers import make_tiny, word_tokenizer
    from melayer.errors import MelayerError
    from melayer.scanning import ScanConfig, scan

    from melayer import fused_reduction

    model = make_tiny("llama", dtype=torch.bfloat16)
    prompts = ["w5 w6 w7 w8", "w9 w10 w11", "w3"]
    fused_reduction._SHARED.clear()
    reports = {r: scan(model, word_tokenizer(), prompts, config=ScanConfig(reduction=r), progress=False)
               for r in ("reference", "fused")}
    assert len(fused_reduction._SHARED) == 1  # the kernel did run
    assert reports["fused"].token0_abs == reports["reference"].token0_abs
    for got, want in zip(reports["fused"].layers, reports["reference"].layers):
        assert got.keys() == want.keys()
        for key in got:
            if isinstance(want[key], float):
                assert got[key] == pytest.approx(want[key], rel=1e-5, nan_ok=True), key
            else:
                assert got[key] == want[key], key
    with pytest.raises(MelayerError, match="reduction must be one of"):
        ScanConfig(reduction="sorted")


@pytest.mark.parametrize("device", [INTERPRETED_CPU, CUDA])
def test_fused_reduction_refuses_an_old_triton(monkeypatch, device):
    """A Triton without masked histograms (< 3.4) is a one-line error when the config is made, before any model
    runs; the direct launch is used only with the Triton releases whose launcher it was checked against."""
    import triton

    from helpers import make_tiny
    from melayer import fused_reduction
    from melayer.errors import MelayerError
    from melayer.scanning import ScanConfig

    assert fused_reduction.available() and ScanConfig(reduction="fused").reduction == "fused"  # guard: today's
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    assert not fused_reduction.available()
    with pytest.raises(MelayerError, match=r"needs Triton >= 3\.4"):
        ScanConfig(reduction="fused")
    with pytest.raises(ValueError, match=r"needs Triton >= 3\.4"):
        ResidualCapture(make_tiny("llama"), reduction="fused")
    for version, direct in (("3.6.0", True), ("3.6.1+git4f2e", True), ("3.9.0", False), ("3.10.0", False)):
        monkeypatch.setattr(triton, "__version__", version)
        assert fused_reduction.available()
        h = torch.zeros(1, 4, 8, dtype=torch.bfloat16, device=device)
        assert fused_reduction.FusedReduction(2, h).direct is direct, version


@pytest.mark.real
def test_smollm2_me_layer_is_born_at_block_11(smollm2):
    """Massive on token 0; the ME block's output meets the criterion, its input does not; it persists."""
    from melayer.scanning import find_me_layer, scan

    model, tok = smollm2
    report = scan(model, tok, progress=False)
    assert report.me_layer == 11 and report.me_agreement == 1.0
    ids = tok("The cat sat on the mat. It was warm.", return_tensors="pt")
    with torch.no_grad():
        hs = model(**ids, output_hidden_states=True).hidden_states
    me = report.me_layer

    def massive(h):
        a = h[0].abs()
        return (a > 100) & (a > 1000 * a.median())

    assert massive(hs[me + 1])[0].any(), "ME block output carries a massive activation on token 0"
    assert not massive(hs[me]).any(), "the ME block's input does not"
    dims = massive(hs[me + 1])[0].nonzero().flatten()
    for j in range(me + 1, me + 1 + 10):
        assert massive(hs[j + 1])[0, dims].all(), f"the spike persists after block {j}"
    assert massive(hs[me + 1])[1:].sum() == 0, "only the first token is massive"
    transient = [e for p in report.prompts for e in p["events"] if not e["persistent"] and e["pos"] == 0]
    assert any(e["start"] <= 2 <= e["end"] and 500 < e["peak"] < 1500 and e["end"] < me for e in transient)
    assert find_me_layer(model, tok) == 11
    assert find_me_layer(model) == 11  # cached
    frame = report.to_pandas()  # one row per block, as the report's table
    assert len(frame) == report.num_layers == 30 and frame["token0_max_abs"].idxmax() >= me


@pytest.mark.real
def test_smollm2_find_me_layer_without_tokenizer(smollm2):
    from melayer.scanning import find_me_layer

    model, _ = smollm2
    assert find_me_layer(model, refresh=True) == 11


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "melayer.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.real
def test_cli_scan_writes_complete_report(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "Hello there. How are you?"}) + "\n"
                       + json.dumps({"text": "Paris is in France.", "chat": True}) + "\n")
    out = tmp_path / "out"
    r = _cli("scan", "default", "--prompts", str(prompts), "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["me_layer"] == 11
    em = report["emergence"]
    assert (em["kind"], em["me_layer"], em["me_layer_1based"], em["first_massive_block"]) == ("single", 11, 12, 11)
    assert em["shares"]["11"] > 0.9 and em["token"]["carrier"] == "first"
    assert report["criterion"]["ratio"] == 1000.0 and len(report["layers"]) == 30
    assert "ME layer: block 11 (paper: 12), 0-based; emergence single" in r.stdout
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["model"]["sha256"]["SmolLM2-135M-Instruct.Q4_1.gguf"].startswith("b179c952")
    assert provenance["run"] == {"device": "cpu", "dtype": "float32"} and provenance["versions"]["torch"]
    assert [p["chat"] for p in report["prompts"]] == [False, True]
    assert any(e["token"] is not None and e["dim"] == 507 for p in report["prompts"] for e in p["events"])
    for name in ("report.md", "token0_3d.png", "max_per_layer.png", "massive_dims_heatmap.png"):
        assert (out / name).stat().st_size > 1000
    assert "ME layer: block 11 (paper: 12)" in (out / "report.md").read_text()


def _tiny_folder(tmp_path, family="llama", **overrides):
    from helpers import make_tiny
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = make_tiny(family)
    for k, v in overrides.items():
        setattr(model.config, k, v)
    folder = tmp_path / family
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(300)} | {"[UNK]": 300}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0", eos_token="w2").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["missing", "unsupported", "checksum", "empty_prompts", "too_long"])
def test_cli_errors_are_one_line_and_leave_no_report(tmp_path, case):
    out = tmp_path / "out"
    args = ["scan"]
    if case == "missing":
        args += [str(tmp_path / "nope"), "--out", str(out)]
        expect = "model path not found"
    elif case == "unsupported":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
        folder = _tiny_folder(tmp_path)  # reuse its tokenizer
        for f in folder.glob("tok*"):
            (tmp_path / "g" / f.name).write_bytes(f.read_bytes())
        args += [str(tmp_path / "g"), "--out", str(out)]
        expect = "unsupported architecture 'gpt2'"
    elif case == "checksum":
        import gguf

        fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"  # a well-formed GGUF with the default model's name
        writer = gguf.GGUFWriter(str(fake), "llama")
        writer.add_block_count(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        args += [str(fake), "--out", str(out)]
        expect = "GGUF checksum mismatch"
    elif case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n\n")
        args += [str(_tiny_folder(tmp_path)), "--prompts", str(tmp_path / "empty.txt"), "--out", str(out)]
        expect = "prompt file is empty"
    else:
        (tmp_path / "long.txt").write_text(" ".join(f"w{i % 300}" for i in range(600)) + "\n")
        args += [str(_tiny_folder(tmp_path)), "--prompts", str(tmp_path / "long.txt"), "--out", str(out)]
        expect = "longer than the model's context (512)"
    r = _cli(*args)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("melayer: error")]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "report.json").exists() and not (out / "report.md").exists()


@pytest.mark.real
def test_load_model_second_load_uses_the_cache():
    """A GGUF is dequantised once; the cached folder is keyed by the file's sha256."""
    import time

    from melayer.load import default_gguf_path, load_model
    from melayer.model_cache import cache_root, sha256_file

    load_model("default", device="cpu")
    target = cache_root() / "gguf" / sha256_file(default_gguf_path())
    assert (target / "model.safetensors").is_file()
    start = time.perf_counter()
    model, tok = load_model("default", device="cpu")
    assert time.perf_counter() - start < 10  # the benchmark measures the ≤ 3 s target
    assert model.dtype == torch.float32 and tok.padding_side == "left"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30

"""Why the fused scan reduction takes its median in two histogram passes: kernel variants timed side by side.

    python benchmarks/bench_fused_histograms.py        # on a CUDA GPU (Triton)

One bf16 state of random values, (1, 2048, D) for D = 2560 (Qwen3-4B) and 576 (SmolLM2-135M), reduced by the fused
kernel's pass 1 (its tile and statistics, imported) with switches: the statistics alone (STATS, tile sizes), then
alone each way of counting |h|'s bit patterns for an exact median: HS=1 one global atomic per value into 32,768
bins; HS=2 the tile sorted, one atomic per distinct pattern; HS=4 a 256-bin histogram of the exponent field
(tl.histogram), the first pass of the radix selection that melayer.fused_reduction ships. HS=1 and HS=2 are checked
against torch.bincount.
(A 32,768-bin tl.histogram per tile was tried too: its compilation did not finish in minutes.)
"""
import traceback

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from melayer._fused_kernel import _tile, _tile_statistics

@triton.jit
def k(h_ptr, stride_b, stride_t, stride_d, T, state, valid_ptr, carrier_pos_ptr,
      hist_ptr, sumsq_ptr, tokmax_ptr, toknn_ptr, toknf_ptr, rest_ptr, carriers_ptr,
      D: tl.constexpr, INF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
      HS: tl.constexpr, STATS: tl.constexpr):
    b = tl.program_id(2)
    row = state * tl.num_programs(2) + b
    x, t, d, in_t, in_d, valid, first, delim, inside, real = _tile(h_ptr, stride_b, stride_t, stride_d, T, b,
                                                                   valid_ptr, carrier_pos_ptr, D, BLOCK_T, BLOCK_D)
    if STATS:  # the shipped kernel's pass 1 without its copy and exponent histogram
        _tile_statistics(x, t, d, in_t, in_d, valid, first, delim, inside, real, T, row, sumsq_ptr, tokmax_ptr,
                         toknn_ptr, toknf_ptr, rest_ptr, carriers_ptr, D)
    bits16 = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    ok = real & (bits16 <= INF16)
    if HS == 1:
        tl.atomic_add(hist_ptr + row * 32768 + bits16, 1, mask=ok, sem="relaxed")
    if HS == 2:  # sort, then one atomic per distinct value
        N: tl.constexpr = BLOCK_T * BLOCK_D
        keys = tl.sort(tl.reshape(tl.where(ok, bits16, 0xFFFF), (N,)))
        i = tl.arange(0, N)
        nxt = tl.gather(keys, tl.minimum(i + 1, N - 1), 0)
        ends = (keys != nxt) | (i == N - 1)
        prv = tl.gather(keys, tl.maximum(i - 1, 0), 0)
        starts = (keys != prv) | (i == 0)
        start = tl.associative_scan(tl.where(starts, i, 0), 0, _max)
        tl.atomic_add(hist_ptr + row * 32768 + keys, i - start + 1, mask=ends & (keys <= INF16), sem="relaxed")
    if HS == 4:  # exponent-only histogram (256 bins), the radix-select first pass
        hh = tl.histogram(tl.reshape(bits16 >> 7, (BLOCK_T * BLOCK_D,)), 256, mask=tl.reshape(ok, (BLOCK_T * BLOCK_D,)))
        tl.atomic_add(hist_ptr + row * 32768 + tl.arange(0, 256), hh, mask=hh > 0, sem="relaxed")

@triton.jit
def _max(a, b):
    return tl.maximum(a, b)

def run(T, D, bt, bd, nw, hs, stats=True, check=False):
    dev = "cuda"
    torch.manual_seed(0)
    h = torch.randn(1, T, D, device=dev, dtype=torch.bfloat16)
    valid = torch.ones(1, T, dtype=torch.int8, device=dev)
    cp = torch.tensor([[0, -1]], dtype=torch.int32, device=dev)
    ndb = triton.cdiv(D, bd)
    hist = torch.zeros(32768, dtype=torch.int32, device=dev)
    sumsq = torch.zeros(ndb, T, device=dev); tokmax = torch.zeros(T, dtype=torch.int64, device=dev)
    toknn = torch.zeros(T, dtype=torch.int32, device=dev); toknf = torch.zeros(T, dtype=torch.int32, device=dev)
    rest = torch.zeros(D, dtype=torch.int64, device=dev); car = torch.zeros(2, D, device=dev)
    grid = (triton.cdiv(T, bt), ndb, 1)
    f = lambda: k[grid](h, *h.stride(), T, 0, valid, cp, hist, sumsq, tokmax, toknn, toknf, rest, car, D=D,
                        INF16=0x7F80, BLOCK_T=bt, BLOCK_D=bd, num_warps=nw, HS=hs, STATS=stats)
    try:
        f(); torch.cuda.synchronize()
        if check and hs in (1, 2):
            hist.zero_(); f(); torch.cuda.synchronize()
            want = torch.bincount((h.view(torch.int16).int() & 0x7FFF).flatten().long(), minlength=32768)
            ok = torch.equal(hist.long().cpu(), want.cpu())
        else:
            ok = None
        return f"{do_bench(f, warmup=25, rep=100, return_mode='median') * 1000:8.1f} us  exact={ok}"
    except Exception as e:
        return "ERR " + "".join(traceback.format_exception_only(e))[-600:]

for T, D in ((2048, 2560), (2048, 576)):
    print(f"== T={T} D={D}", flush=True)
    for bt, bd, nw in ((32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8)):
        print(f"stats only  bt={bt} bd={bd} nw={nw}: {run(T, D, bt, bd, nw, 0)}", flush=True)
    for hs in (1, 2, 4):
        for bt, bd, nw in ((16, 128, 4), (32, 128, 8)):
            result = run(T, D, bt, bd, nw, hs, stats=False, check=True)
            print(f"hist HS={hs} alone bt={bt} bd={bd} nw={nw}: {result}", flush=True)
    print(f"full HS=2 bt=16 bd=128 nw=4: {run(T, D, 16, 128, 4, 2)}", flush=True)
    print(f"full HS=2 bt=32 bd=128 nw=8: {run(T, D, 32, 128, 8, 2)}", flush=True)

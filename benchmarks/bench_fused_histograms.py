"""Why the fused scan reduction takes its median in two histogram passes: kernel variants timed side by side.

    python benchmarks/bench_fused_histograms.py        # on a CUDA GPU (Triton)

One bf16 state of random values, (1, 2048, D) for D = 2560 (Qwen3-4B) and 576 (SmolLM2-135M), reduced by a copy of
the fused kernel's pass 1 with switches: the statistics alone (STATS, tile sizes), then alone each way of counting
|h|'s bit patterns for an exact median: HS=1 one global atomic per value into 32,768 bins; HS=2 the tile sorted,
one atomic per distinct pattern; HS=4 a 256-bin histogram of the exponent field (tl.histogram), the first pass of
the radix selection that melayer.fused_reduction ships. HS=1 and HS=2 are checked against torch.bincount.
(A 32,768-bin tl.histogram per tile was tried too: its compilation did not finish in minutes.)
"""
import traceback

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

@triton.jit
def k(h_ptr, stride_b, stride_t, stride_d, T, state, valid_ptr, carrier_pos_ptr,
      hist_ptr, sumsq_ptr, tokmax_ptr, toknn_ptr, toknf_ptr, rest_ptr, carriers_ptr,
      D: tl.constexpr, NDB: tl.constexpr, INF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
      HS: tl.constexpr, STATS: tl.constexpr):
    b = tl.program_id(2)
    row = state * tl.num_programs(2) + b
    db = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    in_t = t < T
    in_d = d < D
    valid = tl.load(valid_ptr + b * T + t, mask=in_t, other=0) != 0
    first = tl.load(carrier_pos_ptr + b * 2)
    delim = tl.load(carrier_pos_ptr + b * 2 + 1)
    inside = in_t[:, None] & in_d[None, :]
    real = inside & valid[:, None]
    x = tl.load(h_ptr + b * stride_b + t[:, None] * stride_t + d[None, :] * stride_d, mask=inside, other=0.0)
    xf = x.to(tl.float32)
    a = tl.abs(xf)
    nan = a != a
    key = tl.where(nan, 0x7FC00000, a.to(tl.int32, bitcast=True))
    if STATS:
        tl.store(sumsq_ptr + (row * NDB + db) * T + t, tl.sum(xf * xf, axis=1), mask=in_t)
        tokkey = tl.where(in_d[None, :], tl.where(real, key, 0), -1)
        packed = (tokkey.to(tl.int64) << 32) | (0x7FFFFFFF - d)[None, :].to(tl.int64)
        tl.atomic_max(tokmax_ptr + row * T + t, tl.max(packed, axis=1), mask=in_t, sem="relaxed")
        nn = tl.max(tl.where(real & ~nan, a, 0.0), axis=1)
        tl.atomic_max(toknn_ptr + row * T + t, nn.to(tl.int32, bitcast=True), mask=in_t, sem="relaxed")
        nf = tl.sum((real & (key >= 0x7F800000)).to(tl.int32), axis=1)
        tl.atomic_add(toknf_ptr + row * T + t, nf, mask=in_t & (nf > 0), sem="relaxed")
        rest_t = valid & (t != first) & (t != delim)
        rest_key = tl.where(inside & rest_t[:, None], key, -1082130432)
        rp = (rest_key.to(tl.int64) << 32) | (0x7FFFFFFF - t)[:, None].to(tl.int64)
        rp = tl.where(inside, rp, -9223372036854775807 - 1)
        tl.atomic_max(rest_ptr + row * D + d, tl.max(rp, axis=0), mask=in_d, sem="relaxed")
        target = carriers_ptr + row * 2 * D + d[None, :] + 0 * t[:, None]
        tl.store(target, xf, mask=inside & (t == first)[:, None])
        tl.store(target + D, xf, mask=inside & (t == delim)[:, None])
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
    f = lambda: k[grid](h, *h.stride(), T, 0, valid, cp, hist, sumsq, tokmax, toknn, toknf, rest, car, D=D, NDB=ndb,
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

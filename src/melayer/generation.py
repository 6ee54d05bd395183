"""Batched generation behind one call, so evaluation and CLI code never care which engine runs.

``engine="hf"`` is plain ``model.generate``. ``engine="static"`` is a greedy loop over a static KV cache whose
decode step is captured once per call in a CUDA graph on GPUs and runs eagerly elsewhere (plain ``generate`` is
launch-bound on a GPU; ``compile=True`` also runs the decode forward through torch.compile before capture; speeds
in docs/results/bench_generate_gpu.md). Both engines compute the same function (identical greedy tokens in fp32; bf16 rounding can flip near-ties), and
forward hooks (WeMask, captures) registered before the call run inside the captured step with correct absolute
positions: the step feeds explicit position ids and a 4-D attention mask built from device tensors that advance
in place on every replay, and hooks read the position from the static cache's on-device length.
``engine="compact"`` (what ``auto`` picks off CUDA) is a greedy loop over a dynamic cache that drops sequences
from the batch as they finish: on a compute-bound CPU the rows ``generate`` keeps decoding after their EOS are
most of the work (docs/results/bench_eval.md). :func:`generate_texts` is the text-in, text-out entry point.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .adapters import adapter_for, base_model
from .errors import MelayerError
from .modelutils import device_of
from .text import encode_prompt, eos_ids, left_pad, pad_id
from .masking import WeMaskConfig, wemask

ENGINES = ("auto", "hf", "static", "compact")
STATIC_ATTENTION = ("sdpa", "eager")
CACHE_BUCKET = 128  # static cache lengths are multiples of this (mask rows stay aligned; caches get reused)
CACHE_SLOTS = 2  # static caches kept per model (one per batch shape)
# generation_config settings that make ``generate`` alter greedy logits; the static engine implements none of them
_HF_ONLY_SETTINGS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
                     "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                     "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None}


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    engine: str = "auto"  # "auto" | "hf" | "static" | "compact"
    compile: bool = False  # static engine: torch.compile the decode step (faster steps for long runs; the first
    #                        call per model, cache shape and hook set pays the compilation)


def _settings_unsupported(model) -> Optional[str]:
    """A generation_config setting that makes ``generate`` alter greedy logits (None when there is none)."""
    gen = getattr(model, "generation_config", None)
    for name, neutral in _HF_ONLY_SETTINGS.items():
        if getattr(gen, name, neutral) not in (neutral, None):
            return f"generation_config.{name}={getattr(gen, name)!r}"
    return None


def static_unsupported(model) -> Optional[str]:
    """Why the static engine cannot reproduce ``generate`` for this model (None when it can)."""
    from transformers.cache_utils import StaticCache, StaticLayer

    decoder = adapter_for(model).decoder(model)
    if len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        return "a model spread over several devices"
    attn = getattr(decoder.config, "_attn_implementation", None)
    if attn not in STATIC_ATTENTION:
        return f"attention implementation {attn!r} (static engine supports {', '.join(STATIC_ATTENTION)})"
    probe = StaticCache(config=decoder.config, max_cache_len=1)
    if any(type(layer) is not StaticLayer for layer in probe.layers):
        return "sliding-window, chunked or linear attention layers"
    return _settings_unsupported(model)


def resolve_engine(model, config: GenerationConfig, device: torch.device) -> str:
    """``auto``, for greedy decoding: the static engine on CUDA (``generate`` is launch-bound there), the compact
    engine elsewhere (a CPU is compute-bound, so rows that already stopped are pure waste); ``hf`` for sampling
    or when the model needs what only ``generate`` implements."""
    if config.engine not in ENGINES:
        raise MelayerError(f"unknown generation engine {config.engine!r}; use one of {', '.join(ENGINES)}")
    if config.engine == "auto":
        if config.do_sample:
            return "hf"
        if device.type == "cuda":
            return "static" if static_unsupported(model) is None else "hf"
        return "compact" if _settings_unsupported(model) is None else "hf"
    if config.engine in ("static", "compact"):
        if config.do_sample:
            raise MelayerError(f"the {config.engine} generation engine is greedy only; use engine='hf' for sampling")
        reason = static_unsupported(model) if config.engine == "static" else _settings_unsupported(model)
        if reason is not None:
            raise MelayerError(f"the {config.engine} generation engine does not support this model: {reason}")
    return config.engine


@torch.no_grad()
def generate_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                   eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """New tokens (B, T) for a left-padded batch; positions after a sequence's EOS hold ``pad_token_id``."""
    if config.max_new_tokens < 1:
        raise MelayerError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
    engine = resolve_engine(model, config, input_ids.device)
    if engine == "static":
        return static_generate(model, input_ids, attention_mask, config.max_new_tokens, eos_token_ids,
                               pad_token_id, compile=config.compile)[0]
    if engine == "compact":
        return compact_generate(model, input_ids, attention_mask, config.max_new_tokens, eos_token_ids, pad_token_id)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    kwargs = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                  eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id)
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out[:, input_ids.shape[1]:]


def _cache_keyword(model) -> str:
    """The name under which this transformers version's decoder takes the KV cache."""
    params = inspect.signature(adapter_for(model).decoder(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: greedy decoding reads the last position only."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base_model(model).forward).parameters else {}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` builds them from a left-padding mask (0 at each first real token)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _trim_after_last_eos(out: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """``out`` cut after the step where the last sequence emitted EOS, as ``generate`` returns it."""
    finished = torch.isin(out, eos)
    first_eos = torch.where(finished.any(1), finished.int().argmax(1), out.shape[1])
    return out[:, :min(out.shape[1], int(first_eos.max()) + 1)]


@torch.no_grad()
def compact_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """Greedy decoding that drops each sequence from the batch, and its rows from the KV cache, once it has
    emitted EOS. ``generate`` keeps computing stopped rows until the whole batch stops; on a compute-bound
    device that is most of the work (64 GSM8K prompts, 128 new tokens: 40% of the row-steps are useful).
    Same inputs as ``generate`` builds (positions from the padding mask, a growing 2-D mask), same greedy
    argmax, same return value: new tokens with ``pad_token_id`` after each sequence's EOS.
    """
    from transformers import DynamicCache

    extra = _last_logits_only(model)
    device = input_ids.device
    batch = input_ids.shape[0]
    cache = DynamicCache(config=base_model(model).config)
    cache_kw = _cache_keyword(model)
    eos = torch.tensor(sorted(set(int(i) for i in eos_token_ids)), dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    mask = attention_mask.to(device=device, dtype=torch.long)
    positions = _positions(mask)
    ids, alive = input_ids, torch.arange(batch, device=device)
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_kw: cache}, **extra).logits
        token = logits[:, -1].argmax(dim=-1)
        out[alive, step] = token
        keep = ~torch.isin(token, eos)
        if step == max_new_tokens - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(1)
            cache.batch_select_indices(rows)
            alive, token, mask, positions = alive[rows], token[rows], mask[rows], positions[rows]
        ids = token[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return _trim_after_last_eos(out, eos)


def _mask_builder(decoder, keys: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B,1,L,M) mask for query slots ``q`` (L,): a key is visible if it holds a real token at or before the query.

    transformers passes a ready 4-D mask through untouched, so no mask code of the library runs (or syncs) inside
    the captured step; sdpa takes it as bool, eager attention as an additive float mask (as transformers builds).
    """
    slots = torch.arange(keys.shape[1], device=keys.device)
    additive = decoder.config._attn_implementation == "eager"

    def build(q: torch.Tensor) -> torch.Tensor:
        allowed = keys[:, None, None, :] & (slots[None, :] <= q[:, None])[None, None]
        if not additive:
            return allowed
        return torch.zeros((), dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)

    return build


@dataclass
class StaticRunInfo:
    """What the static engine did (for tests and benchmarks)."""

    steps: int            # decode forwards run after the prefill
    cuda_graph: bool      # whether the decode step ran as CUDA graph replays


@torch.no_grad()
def static_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: Sequence[int], pad_token_id: int, *, cuda_graph: Optional[bool] = None,
                    compile: bool = False, check_every: int = 16) -> tuple[torch.Tensor, StaticRunInfo]:
    """Greedy decoding over a static KV cache: eager prefill, then one decode step replayed from a CUDA graph.

    Returns exactly what ``generate`` returns (new tokens, pad after EOS, trimmed to the step where the last
    sequence finished). ``cuda_graph`` None means "on CUDA tensors"; finished-ness is read back to the host
    every ``check_every`` steps only, so the GPU never waits for the host in between. ``compile`` runs the
    decode forward through ``torch.compile`` (hooks are traced into it; the first call per model and hook set
    pays the compilation), still inside the captured graph.
    """
    decoder = adapter_for(model).decoder(model)
    cache_kw = _cache_keyword(model)
    takes_cache_position = "cache_position" in inspect.signature(decoder.forward).parameters
    extra = _last_logits_only(model)

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    total = max_new_tokens
    # slots for the prompt and every fed-back token, rounded up so that batches of similar lengths share a cache
    max_len = -(-(prompt_len + total - 1) // CACHE_BUCKET) * CACHE_BUCKET
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph

    cache = _static_cache(model, decoder, batch, max_len, device)
    mask2d = attention_mask.to(device=device, dtype=torch.long)
    keys = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    keys[:, :prompt_len] = mask2d.bool()
    build_mask = _mask_builder(decoder, keys, next(model.parameters()).dtype)
    eos = torch.tensor(sorted(set(int(i) for i in eos_token_ids)), dtype=torch.long, device=device)
    out = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)

    def forward(ids, position_ids, q_slots, fn=model):
        kwargs = {cache_kw: cache, "cache_position": q_slots} if takes_cache_position else {cache_kw: cache}
        logits = fn(input_ids=ids, attention_mask=build_mask(q_slots), position_ids=position_ids,
                    use_cache=True, **kwargs, **extra).logits
        return logits[:, -1].argmax(dim=-1)

    prompt_slots = torch.arange(prompt_len, device=device)
    positions = _positions(mask2d)
    token = forward(input_ids, positions, prompt_slots)
    out[:, 0] = token
    done = torch.isin(token, eos)
    # static state the decode step reads and advances in place (the same addresses on every graph replay)
    tok = token[:, None].clone()
    pos = mask2d.sum(-1, keepdim=True)
    slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    column = torch.ones(1, dtype=torch.long, device=device)
    pad = torch.tensor(pad_token_id, dtype=torch.long, device=device)
    decode_fn = _compiled(model) if compile else model

    def step():
        keys.index_fill_(1, slot, True)
        nxt = torch.where(done, pad, forward(tok, pos, slot, decode_fn))
        out.index_copy_(1, column, nxt[:, None])
        done.logical_or_((nxt[:, None] == eos).any(-1))
        tok.copy_(nxt[:, None])
        pos.add_(1)
        slot.add_(1)
        column.add_(1)

    run = step
    steps = 0
    if cuda_graph and total > 1:
        warm = min(2, total - 1)  # real decode steps on a side stream: lazy inits happen outside the capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warm):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        steps = warm
        graph = torch.cuda.CUDAGraph()
        try:
            _capture(graph, side, step)
            run = graph.replay
        except RuntimeError as err:  # a hook that syncs with the host cannot be captured; stay exact, run eagerly
            warnings.warn(f"CUDA graph capture of the decode step failed ({err}); decoding eagerly", stacklevel=2)
            cuda_graph = False
    else:
        cuda_graph = False
    while steps < total - 1:
        if steps % check_every == 0 and bool(done.all()):
            break
        run()
        steps += 1

    return _trim_after_last_eos(out, eos), StaticRunInfo(steps=steps, cuda_graph=cuda_graph)


def _capture(graph: "torch.cuda.CUDAGraph", stream: "torch.cuda.Stream", fn: Callable[[], None]) -> None:
    """Record ``fn`` into ``graph`` on ``stream`` (unlike ``torch.cuda.graph``: no gc.collect or cache flush)."""
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            fn()
        except BaseException:
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # the capture is already invalid; report the original error
            try:
                _leave_rng_capture(stream)
            except RuntimeError:
                pass  # best effort: the original error is the one to report
            raise
        graph.capture_end()


def _leave_rng_capture(stream: "torch.cuda.Stream") -> None:
    """Reset the CUDA RNG after a failed capture. torch ends the generator's capture mode only when a capture
    succeeds, so after a failure every later random op on the device raises ("Offset increment outside graph
    capture"), torch.compile's own benchmarking included. One trivial successful capture ends it."""
    with torch.cuda.stream(stream):
        scratch = torch.zeros(1, device=stream.device)
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        scratch.add_(1)
        graph.capture_end()


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

def _static_cache(model, decoder, batch: int, max_len: int, device: torch.device):
    """A reset static cache of this shape, reused across calls: compiled code guards on the cache tensors'
    addresses, so a fresh cache per call would recompile. The last ``CACHE_SLOTS`` shapes are kept per model."""
    from transformers.cache_utils import StaticCache

    key = (batch, max_len, next(model.parameters()).dtype, device)
    held = _CACHES.setdefault(model, {})
    cache = held.pop(key, None)
    if cache is None:
        cache = StaticCache(config=decoder.config, max_cache_len=max_len)
    else:
        cache.reset()
    held[key] = cache  # most recent last
    while len(held) > CACHE_SLOTS:
        held.pop(next(iter(held)))
    return cache


def _compiled(model):
    """``torch.compile(model)`` that guards on forward hooks: by default dynamo ignores hooks added or removed
    after compiling and would keep running the old ones; here a changed hook set recompiles instead.
    Inductor also rounds fused low-precision intermediates as eager code does (``emulate_precision_casts``):
    in bf16 this keeps the compiled step's greedy tokens as close to ``generate``'s as uncompiled code gets
    (docs/results/bench_generate_gpu.md). (Compiled code is cached by dynamo per code object, so a fresh wrapper
    per call reuses it.)"""
    compiled = torch.compile(model)

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), \
                torch._inductor.config.patch(emulate_precision_casts=True):
            return compiled(*args, **kwargs)

    return call


def generate_texts(model, tokenizer, prompts: Sequence[str], config: Optional[GenerationConfig] = None,
                   chat: bool = False, batch_size: Optional[int] = None) -> list[str]:
    """Continuations of ``prompts`` (user messages, chat-templated when ``chat``), decoded without special tokens.

    Whatever hooks are on the model (a WeMask) act on every forward; ``batch_size`` None runs one batch.
    """
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    if any(not ids for ids in encoded):
        raise MelayerError("a prompt encodes to no tokens")
    size = batch_size or max(1, len(encoded))
    texts: list[str] = []
    for start in range(0, len(encoded), size):
        texts += generate_from_ids(model, tokenizer, encoded[start:start + size], config)
    return texts


def generate_from_ids(model, tokenizer, encoded: Sequence[Sequence[int]],
                      config: Optional[GenerationConfig] = None) -> list[str]:
    """Continuations of already-encoded prompts, as one left-padded batch, decoded without special tokens."""
    pad, eos, device = pad_id(tokenizer), eos_ids(tokenizer, model), device_of(model)
    ids, mask = left_pad(encoded, pad)
    new = generate_batch(model, ids.to(device), mask.to(device), config or GenerationConfig(), eos, pad)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new.cpu()]


def compare_generations(model, tokenizer, prompts: Sequence[str], wemask_config: WeMaskConfig,
                        config: Optional[GenerationConfig] = None, chat: bool = False) -> dict[str, list[str]]:
    """``{"without": [...], "with": [...]}``: the same prompts generated bare and under ``wemask_config``
    (paper mode applied to each prompt as if it ran alone)."""
    plain = generate_texts(model, tokenizer, prompts, config, chat)
    with wemask(model, wemask_config, tokenizer=tokenizer, per_sequence=True):
        masked = generate_texts(model, tokenizer, prompts, config, chat)
    return {"without": plain, "with": masked}

"""melayer's lm-evaluation-harness model: lm-eval's own HFLM with WeMask around every model call and melayer's
generation engines under its ``generate_until``, in the style of lm-eval's ``steered`` model (hooks on an
unchanged HF model, nothing forked).

    lm_eval --model melayer --model_args pretrained=default,wemask_rate=0.01 --tasks gsm8k

``pretrained`` takes every spec ``melayer.load_model`` does ("default", a hub id, a folder, a .gguf file); it is
resolved to a folder (a GGUF is dequantised once into melayer's cache) and handed to HFLM as a path, so HFLM's
device, dtype and parallelism handling apply unchanged. WeMask arguments: ``wemask_rate``, ``wemask_layers``
(after_me, from_after_me, me, or 0-based blocks joined by ":"), ``wemask_mode`` (correct or paper),
``wemask_me_layer``; a model saved with WeMask runs with it unless ``wemask_rate`` is given. ``engine`` (auto,
hf, static, compact) and ``compile`` choose the generation engine.

``melayer eval`` drives one :class:`MelayerLM` through a sweep: :meth:`MelayerLM.set_condition` switches the mask
between conditions, and a :class:`ResponseLog` records every answer as it is computed, so a killed run resumes
without recomputing anything and a finished one rescores without the model (:class:`LoggedResponsesLM`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

if __name__ == "__main__":  # `python -m`: run the importable copy, whose MelayerLM is the one lm-eval registers
    from melayer.evaluate.harness import cli

    sys.exit(cli())

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..generation import GenerationConfig, generate_batch
from ..load import local_location, saved_wemask, source_of
from ..masking import WeMaskConfig, WeMaskHandle, apply_wemask, parse_layers
from ..provenance import model_source, remember_source
from ..report import say
from ..text import eos_ids
from .responses import LoggedLM, ResponseLog

def resolve_device(device: Optional[str]) -> str:
    """HFLM's rule for one device: a device that exists is used as given; anything else (lm-eval's default
    "cuda:0" on a machine without CUDA, None) falls back to cuda when available, else cpu."""
    gpus = torch.cuda.device_count()
    known = {"cpu", "mps", "mps:0"} | ({"cuda"} if gpus else set()) | {f"cuda:{i}" for i in range(gpus)}
    if device in known:
        return device
    return "cuda" if gpus else "cpu"


@register_model("melayer")
class MelayerLM(LoggedLM, HFLM):
    """HFLM whose forward and generate calls run under WeMask, with melayer's generation engines."""

    _scoring: Optional[tuple[set, int]] = None  # (model inputs, longest continuation) of a log-likelihood call
    _aligned = False  # the last _model_call returned right-aligned logits (see _model_call)

    def __init__(self, pretrained="default", wemask_rate: Optional[float] = None, wemask_layers: str = "after_me",
                 wemask_mode: str = "correct", wemask_me_layer: Optional[int] = None, engine: str = "auto",
                 compile: bool = False, device: Optional[str] = None, **kwargs):
        if isinstance(pretrained, str):  # a folder or hub id HFLM loads itself (GGUF: its dequantised cache)
            self.spec, pretrained = pretrained, local_location(pretrained)[1]
        else:
            self.spec = getattr(pretrained, "name_or_path", "model")
        if isinstance(compile, str):
            compile = compile.lower() in ("1", "true", "yes")
        super().__init__(pretrained=pretrained, device=resolve_device(device), **kwargs)
        if isinstance(self.spec, str) and isinstance(pretrained, str):
            remember_source(self.model, source_of(self.spec, self.model))
        self.tokenizer.padding_side = "left"
        self.engine, self.compile = engine, bool(compile)
        self.handle: Optional[WeMaskHandle] = None
        if wemask_rate in (None, ""):
            config = saved_wemask(self.model)
        else:
            config = WeMaskConfig(rate=float(wemask_rate), layers=parse_layers(wemask_layers, sep=":"),
                                  mode=str(wemask_mode),
                                  me_layer=None if wemask_me_layer in (None, "") else int(wemask_me_layer))
        self.set_condition(config)

    def set_condition(self, config: Optional[WeMaskConfig], key: Optional[str] = None) -> Optional[WeMaskHandle]:
        """Replace the mask (None or rate 0: none). It is registered once, paused between calls and active inside
        them (paper mode: each item as if it ran alone); ``key`` names the condition in the response log."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if config is not None and config.rate > 0:
            self.handle = apply_wemask(self.model, config, tokenizer=self.tokenizer, per_sequence=True)
            say(f"WeMask rate {config.rate:g} ({config.mode} mode): {self.handle.k} dims of token 0 zeroed at the "
                f"attention input of blocks {self.handle.layers} (ME layer {self.handle.config.me_layer}, 0-based)")
            self._pause = self.handle.paused()
            self._pause.__enter__()
        self.cond = key or (f"{config.rate:g}" if config is not None and config.rate > 0 else "0")
        return self.handle

    @contextlib.contextmanager
    def masked(self):
        """The mask active for one model call."""
        if self.handle is None:
            yield
            return
        self._pause.__exit__(None, None, None)
        try:
            yield
        finally:
            self._pause = self.handle.paused()
            self._pause.__enter__()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        """HFLM's, with each batch's logits computed only for the positions that score a continuation (see
        :meth:`_model_call`): full (batch, length, vocab) logits and their log-softmax are most of a batch's memory
        (SmolLM2's MMLU at batch 64 on a CPU: 13.9 GB peak against 3.8 GB, docs/results/bench_loglikelihood.md)."""
        known = {tuple((context + continuation)[-(self.max_length + 1):][:-1])  # the inputs HFLM builds
                 for _, context, continuation in requests}
        self._scoring = (known, max((len(r[2]) for r in requests), default=0))
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scoring = None

    def _row_lengths(self, inps: torch.Tensor) -> Optional[list[int]]:
        """Each row's length in a right-padded log-likelihood batch (HFLM pads with token 0), recognised among
        the inputs of the current call; None where a row matches no input or several (its real tokens may end
        in 0s), and the batch then gets full logits."""
        known = self._scoring[0]
        positions = torch.arange(1, inps.shape[1] + 1, device=inps.device)
        real_ends = torch.where(inps != 0, positions, 0).max(dim=1).values.tolist()  # after the last non-0 token
        lengths = []
        for row, last in zip(inps.tolist(), real_ends):
            fits = [n for n in range(last, len(row) + 1) if tuple(row[:n]) in known]
            if len(fits) != 1:
                return None
            lengths.append(fits[0])
        return lengths

    def _model_call(self, inps, attn_mask=None, labels=None):
        """Under the mask. In a log-likelihood batch, the output layer sees only each row's last ``w`` positions
        (``w``: the call's longest continuation), right-aligned: logits (batch, w, vocab), read by
        :meth:`_select_cont_toks` from the end (a pre-hook on the output embeddings, so softcapping and the
        like still apply to the logits)."""
        self._aligned = False
        lengths = None
        head = self.model.get_output_embeddings()
        if self._scoring is not None and attn_mask is None and labels is None and head is not None:
            lengths = self._row_lengths(inps)
        with self.masked():
            if lengths is None or self._scoring[1] >= inps.shape[1]:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            width = self._scoring[1]
            ends = torch.tensor(lengths, device=inps.device)
            index = (ends[:, None] - width + torch.arange(width, device=inps.device)).clamp(min=0)

            def only_scored(module, args):
                hidden = args[0]
                return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]).to(hidden.device)),
                        *args[1:])

            handle = head.register_forward_pre_hook(only_scored)
            try:
                logits = super()._model_call(inps)
            finally:
                handle.remove()
            self._aligned = True
            return logits

    def _select_cont_toks(self, logits: torch.Tensor, contlen: Optional[int] = None,
                          inplen: Optional[int] = None) -> torch.Tensor:
        if self._aligned:  # this batch's rows end at the logits' end (see _model_call)
            return logits[logits.shape[0] - contlen:]
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """HFLM's generate_until keeps its batching, stop strings and decoding; the decode loop is melayer's
        engine (returns context + new tokens, as ``generate`` does)."""
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = (context != self.tokenizer.pad_token_id).long()
        temperature = float(generation_kwargs.get("temperature") or 0.0)
        sample = bool(generation_kwargs.get("do_sample")) and temperature > 0
        config = GenerationConfig(max_new_tokens=max_length - context.shape[1], do_sample=sample,
                                  temperature=temperature if sample else 1.0,
                                  top_p=float(generation_kwargs.get("top_p") or 1.0), engine=self.engine,
                                  compile=self.compile)
        with self.masked():
            new = generate_batch(self.model, context, mask, config, eos_ids(self.tokenizer, self.model),
                                 self.tokenizer.pad_token_id)
        return torch.cat([context, new.to(context.device)], dim=1)

    def get_model_info(self) -> dict:
        """What lm-eval records about the model: melayer's own record (HFLM's asks the hub)."""
        source = model_source(self.model)
        info = {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "melayer_model": source.describe() if source else self.spec}
        if self.handle is not None:
            c = self.handle.config
            info["melayer_wemask"] = {"rate": c.rate, "layers": c.layers, "mode": c.mode, "me_layer": c.me_layer}
        return info


class LoggedResponsesLM(LoggedLM, LM):
    """Answers from a response log alone (``melayer eval --score-only``): rescoring needs the tokenizer (chat
    templates), never the model."""

    def __init__(self, tokenizer, log: ResponseLog):
        super().__init__()
        self.tokenizer, self.log = tokenizer, log

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def _compute(self, kind: str) -> None:
        return None  # every answer comes from the log


def cli() -> None:
    """lm-eval's command line with the ``melayer`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

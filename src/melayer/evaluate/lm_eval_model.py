"""The lm-evaluation-harness model ``melayer``: lm-eval's own HFLM with WeMask around every model call, in the
style of lm-eval's ``steered`` model (hooks on an unchanged HF model, nothing forked).

    lm_eval --model melayer --model_args pretrained=default,wemask_rate=0.01 --tasks gsm8k

``pretrained`` takes every spec ``melayer.load_model`` does ("default", a hub id, a folder, a .gguf file); it is
resolved to a local folder (a GGUF is dequantised once into melayer's cache) and handed to HFLM as a path, so
HFLM's own device, dtype and parallelism handling apply unchanged. WeMask arguments: ``wemask_rate``,
``wemask_layers`` (after_me, from_after_me, me, or 0-based blocks joined by ":"), ``wemask_mode`` (correct or
paper), ``wemask_me_layer``. A model saved with WeMask runs with it unless ``wemask_rate`` is given.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

if __name__ == "__main__":  # `python -m`: run the importable copy, whose MelayerLM is the one lm-eval registers
    from melayer.evaluate.lm_eval_model import cli

    sys.exit(cli())

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..load import local_location, saved_wemask
from ..masking import WeMaskConfig, parse_layers, wemask


@register_model("melayer")
class MelayerLM(HFLM):
    """HFLM whose forward and generate calls run under WeMask (applied per call, removed after it)."""

    def __init__(self, pretrained="default", wemask_rate: Optional[float] = None, wemask_layers: str = "after_me",
                 wemask_mode: str = "correct", wemask_me_layer: Optional[int] = None, **kwargs):
        if isinstance(pretrained, str):  # a folder or hub id HFLM loads itself (GGUF: its dequantised cache)
            pretrained = local_location(pretrained)[1]
        super().__init__(pretrained=pretrained, **kwargs)
        self.tokenizer.padding_side = "left"
        if wemask_rate in (None, ""):
            config = saved_wemask(self.model)
        else:
            config = WeMaskConfig(rate=float(wemask_rate), layers=parse_layers(wemask_layers, sep=":"),
                                  mode=str(wemask_mode),
                                  me_layer=None if wemask_me_layer in (None, "") else int(wemask_me_layer))
        # resolved once (the ME layer found by one scan), then re-applied around every call
        self.wemask_config = config.resolved(self.model, self.tokenizer) if config and config.rate > 0 else None

    @contextlib.contextmanager
    def wemask(self):
        """WeMask on the model for the duration of one call (paper mode: each item as if it ran alone)."""
        if self.wemask_config is None:
            yield
            return
        with wemask(self.model, self.wemask_config, tokenizer=self.tokenizer, per_sequence=True):
            yield

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self.wemask():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self.wemask():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def cli() -> None:
    """lm-eval's command line with the ``melayer`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

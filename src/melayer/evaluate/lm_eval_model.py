"""An lm-evaluation-harness model named ``melayer``: HFLM with WeMask applied, in the spirit of lm-eval's
``steered`` model (hooks on an unchanged HF model, nothing forked).

    lm_eval --model melayer --model_args pretrained=default,wemask_rate=0.01 --tasks gsm8k

lm-eval 0.4.13 discovers models only by import (no entry points), so installing melayer also installs
``melayer-lm-eval.pth``: at interpreter start it loads the stdlib-only ``_melayer_lm_eval`` hook, which adds
``melayer`` to lm-eval's model registry as a lazy placeholder whenever ``lm_eval.models`` is imported; this module
is imported only when the model is asked for. ``melayer-lm-eval`` (or ``python -m melayer.evaluate.lm_eval_model``)
is the same CLI with this module imported first, and works without the .pth too; so does the Python API,
``simple_evaluate(model="melayer")`` after ``import melayer.evaluate.lm_eval_model``. ``pretrained`` takes every
spec ``melayer.load_model`` does ("default", a hub id, a folder, a .gguf file). WeMask arguments: ``wemask_rate``,
``wemask_layers`` (after_me, from_after_me, me, or 0-based blocks joined by ":"), ``wemask_mode`` (correct or
paper), ``wemask_me_layer``.
"""
from __future__ import annotations

import sys
from typing import Optional

if __name__ == "__main__":  # `python -m`: run the importable copy, whose MelayerLM is the one lm-eval registers
    from melayer.evaluate.lm_eval_model import cli

    sys.exit(cli())

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..errors import MelayerError


def _layers(text):
    if isinstance(text, (list, tuple)) or text is None:
        return text
    text = str(text)
    if text in ("after_me", "from_after_me", "me"):
        return text
    try:
        return [int(t) for t in text.split(":") if t]
    except ValueError:
        raise MelayerError(f"wemask_layers must be after_me, from_after_me, me or blocks joined by ':', "
                           f"got {text!r}") from None


@register_model("melayer")
class MelayerLM(HFLM):
    """HFLM on a model loaded by ``melayer.load_model``, with WeMask hooked on for the model's whole life."""

    def __init__(self, pretrained: str = "default", wemask_rate: float = 0.0, wemask_layers: str = "after_me",
                 wemask_mode: str = "correct", wemask_me_layer: Optional[int] = None, device: Optional[str] = None,
                 dtype: Optional[str] = None, **kwargs):
        from ..load import load_model
        from ..wemask import WeMaskConfig, apply_wemask

        if not isinstance(pretrained, str):  # lm-eval passes a ready model only from Python: wrap it as is
            model, tokenizer = pretrained, kwargs.pop("tokenizer")
        else:
            model, tokenizer = load_model(pretrained, device=device, dtype=None if dtype in (None, "auto") else dtype)
        saved = getattr(model, "melayer_wemask", None)
        config = WeMaskConfig(rate=float(wemask_rate), layers=_layers(wemask_layers), mode=str(wemask_mode),
                              me_layer=None if wemask_me_layer in (None, "") else int(wemask_me_layer))
        if saved is not None and config.rate > 0:  # the arguments decide what is applied
            saved.remove()
            model.melayer_wemask = None
        tokenizer.padding_side = "left"
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.wemask_handle = (apply_wemask(model, config, tokenizer=tokenizer, per_sequence=True) if config.rate > 0
                              else saved)


def cli() -> None:
    """lm-eval's command line with the ``melayer`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

"""Evaluation protocols: ``clean`` (melayer's own) and ``paper`` (everything the official evaluation does).

A protocol decides, per task, which lm-eval task runs (its prompt wording), whether the chat template wraps it,
which WeMask layer set applies, and, for the whole run, the masking mode and the precision:

- ``clean``: the task as named, chat template on, WeMask on the block right after the ME layer, correct mode
  (absolute position 0), the checkpoint's own precision (``torch_dtype="auto"``: fp32 for a dequantised GGUF).
- ``paper``: the official code's prompts (GSM8K: "... Let's think step by step and output the final answer after
  \\"####\\"."; MATH-500 and AIME: "Please reason step by step and put your final answer within \\boxed{}." before
  the problem), no chat template for the math tasks, its generation lengths (GSM8K 128, MATH-500 1024, AIME 512
  new tokens, greedy), AIME 2022-2024, its MMLU protocol (system message, option-text scoring) with every block
  from ME+1 on masked (block ME+1 only for the math tasks), paper-mode masking (index 0 of every chunk), fp32.
  Tasks the official code never evaluated keep the clean settings, with the paper's masking mode.

Every field can be overridden; :func:`deviations` lists what a run changed from its preset, for the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

PROTOCOLS = ("clean", "paper")


@dataclass(frozen=True)
class TaskSetting:
    """How one requested task runs under a protocol."""

    requested: str  # the task the user asked for
    task: str  # the lm-eval task that runs (the protocol's prompt variant)
    chat: bool
    layers: Union[str, list[int]]  # the WeMask layer set for this task


# requested task -> (task run under the paper protocol, chat template, layer set)
PAPER_TASKS = {
    "melayer_gsm8k": ("melayer_gsm8k_paper", False, "after_me"),
    "melayer_math500": ("melayer_math500_paper", False, "after_me"),
    "melayer_aime": ("melayer_aime_paper", False, "after_me"),
    "melayer_aime24": ("melayer_aime_paper", False, "after_me"),
    "melayer_mmlu": ("melayer_mmlu_paper", True, "from_after_me"),
    "melayer_mmlu_text": ("melayer_mmlu_paper", True, "from_after_me"),
}
DEFAULT_MODES = {"clean": ["correct"], "paper": ["paper"]}
DEFAULT_DTYPE = {"clean": None, "paper": "fp32"}


def task_setting(requested: str, protocol: str, chat: Optional[bool] = None,
                 layers: Optional[Union[str, list[int]]] = None) -> TaskSetting:
    """The setting of ``requested`` under ``protocol``; ``chat`` / ``layers`` given explicitly override it."""
    task, preset_chat, preset_layers = requested, True, "after_me"
    if protocol == "paper" and requested in PAPER_TASKS:
        task, preset_chat, preset_layers = PAPER_TASKS[requested]
    return TaskSetting(requested, task, preset_chat if chat is None else chat,
                       preset_layers if layers is None else layers)


def deviations(protocol: str, tasks: list[str], chat: Optional[bool], layers, modes: Optional[list[str]],
               dtype: Optional[str]) -> list[str]:
    """What the run changes from its protocol's preset (stated in the report's header)."""
    out = []
    for name in tasks:
        preset = task_setting(name, protocol)
        if chat is not None and chat != preset.chat:
            out.append(f"{name}: chat template {'on' if chat else 'off'} (preset: {'on' if preset.chat else 'off'})")
        if layers is not None and layers != [preset.layers]:
            out.append(f"{name}: WeMask layers {layers} (preset: {preset.layers})")
    if modes is not None and modes != DEFAULT_MODES[protocol]:
        out.append(f"WeMask modes {modes} (preset: {DEFAULT_MODES[protocol]})")
    if dtype is not None and dtype != DEFAULT_DTYPE[protocol]:
        out.append(f"dtype {dtype} (preset: {DEFAULT_DTYPE[protocol] or 'the checkpoint dtype'})")
    return out

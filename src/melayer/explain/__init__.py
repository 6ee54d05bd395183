"""`melayer explain`: check, on your own model, each step of the paper's explanation of massive activations.

RMSNorm and FFN create the spike at the ME layer, the residual stream carries it, token 0 becomes rigid,
sinks follow, and WeMask changes attention-input diversity and sinks. Each step is one module with a
Python function returning a dataclass; :func:`explain` runs them all and :func:`write` makes the report.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import MelayerError
from .ablate import Ablations, ablations, cap_ffn_output, flatten_gamma, normalise_scale, set_massive, zero_neurons
from .common import Inputs, massive_dims, prepare_inputs
from .diversity import Diversity, diversity, effective_rank
from .ffn import FFNRole, ffn_role
from .propagate import Propagation, propagation
from .rigidity import Rigidity, rigidity
from .rmsnorm import RMSNormRole, rmsnorm_role
from .sinks import Sinks, eager_attention, sinks

CONFIG_NAME = "explain_config.json"

__all__ = [
    "ExplainConfig", "ExplainResult", "explain", "write", "run", "register_cli", "prepare_inputs", "Inputs",
    "massive_dims", "rmsnorm_role", "RMSNormRole", "ffn_role", "FFNRole", "ablations", "Ablations",
    "flatten_gamma", "zero_neurons", "normalise_scale", "cap_ffn_output", "set_massive", "propagation",
    "Propagation", "rigidity", "Rigidity", "diversity", "Diversity", "effective_rank", "sinks", "Sinks",
    "eager_attention",
]


@dataclass
class ExplainConfig:
    """Everything that decides an explain run (saved as ``explain_config.json`` beside the report)."""

    model: str = "default"
    me_layer: Optional[int] = None  # None: melayer.scan.find_me_layer
    prompts: Optional[str] = None  # a prompt file (.txt one per line, or .jsonl); None: built-in texts
    max_prompt_tokens: int = 96
    wemask_rates: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05])
    ppl_data_dir: Optional[str] = None  # folder with wikitext2/wiki.test.raw; None: no perplexity
    ppl_tokens: int = 2048
    ppl_window: int = 256
    gamma_alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    ffn_cap: float = 2.0  # token 0's FFN output norm capped at this × the others' median
    max_ablate_neurons: int = 32
    sink_threshold: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        rates = [float(r) for r in self.wemask_rates]
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise MelayerError(f"WeMask rates must be in [0, 1], got {self.wemask_rates}")
        self.wemask_rates = sorted({0.0, *rates})
        if any(not 0.0 <= a <= 1.0 for a in self.gamma_alphas):
            raise MelayerError(f"γ-flatten alphas must be in [0, 1], got {self.gamma_alphas}")
        if self.me_layer is not None and (not isinstance(self.me_layer, int) or self.me_layer < 0):
            raise MelayerError(f"--me-layer must be a non-negative block index, got {self.me_layer!r}")
        for name in ("max_prompt_tokens", "ppl_tokens", "ppl_window", "max_ablate_neurons"):
            if getattr(self, name) < 1:
                raise MelayerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ffn_cap <= 0:
            raise MelayerError(f"--ffn-cap must be positive, got {self.ffn_cap}")
        if not 0 < self.sink_threshold <= 1:
            raise MelayerError(f"sink threshold must be in (0, 1], got {self.sink_threshold}")


@dataclass
class ExplainResult:
    model: str
    family: str
    num_layers: int
    hidden_size: int
    me_layer: int
    me_layer_source: str  # "given" or "found by melayer.scan.find_me_layer"
    dims: list[int]
    prompts: list[str]
    config: ExplainConfig
    rmsnorm: RMSNormRole
    ffn: FFNRole
    ablations: Ablations
    propagation: Propagation
    rigidity: Rigidity
    diversity: Diversity
    sinks: Sinks
    seconds: dict[str, float] = field(default_factory=dict)


def _me_layer(model, tokenizer, config: ExplainConfig) -> tuple[int, str]:
    if config.me_layer is not None:
        return config.me_layer, "given"
    try:
        from ..scan import find_me_layer
    except ImportError:
        raise MelayerError("melayer.scan is unavailable: pass --me-layer") from None
    return int(find_me_layer(model, tokenizer)), "found by melayer.scan.find_me_layer"


def explain(model, tokenizer, config: Optional[ExplainConfig] = None, progress: bool = True,
            inputs: Optional[Inputs] = None) -> ExplainResult:
    """Run every analysis on ``model`` and return their results (no files written).

    ``inputs`` (already encoded) replaces the config's prompts.
    """
    from ..adapters import adapter_for
    from ..report import progress as bar
    from ..scan import read_prompts
    from .ablate import wikitext_windows
    from .common import check_layer, hidden_size, num_layers

    config = config or ExplainConfig()
    ad = adapter_for(model)
    me, source = _me_layer(model, tokenizer, config)
    check_layer(model, me)
    if inputs is None:
        prompts = read_prompts(config.prompts) if config.prompts else None
        inputs = prepare_inputs(tokenizer, prompts, config.max_prompt_tokens)
    windows = (wikitext_windows(tokenizer, config.ppl_data_dir, config.ppl_tokens, config.ppl_window)
               if config.ppl_data_dir else None)
    seconds: dict[str, float] = {}
    results: dict[str, object] = {}
    steps = ["dims", "rmsnorm", "ffn", "ablations", "propagation", "rigidity", "diversity", "sinks"]
    for step in bar(steps, desc="explain", disable=not progress):
        t = time.perf_counter()
        if step == "dims":
            results[step] = massive_dims(model, inputs, me)
        elif step == "rmsnorm":
            results[step] = rmsnorm_role(model, tokenizer, me, inputs, results["dims"])
        elif step == "ffn":
            results[step] = ffn_role(model, tokenizer, me, inputs, results["dims"],
                                     max_ablate=config.max_ablate_neurons)
        elif step == "ablations":
            results[step] = ablations(model, tokenizer, me, inputs, results["dims"], results["ffn"].ablate_neurons,
                                      windows, config.gamma_alphas, config.ffn_cap, config.seed, progress)
        elif step == "propagation":
            results[step] = propagation(model, tokenizer, me, inputs, results["dims"])
        elif step == "rigidity":
            results[step] = rigidity(model, tokenizer, me, inputs)
        elif step == "diversity":
            results[step] = diversity(model, tokenizer, me, inputs, config.wemask_rates)
        else:
            results[step] = sinks(model, tokenizer, me, inputs, config.wemask_rates, config.sink_threshold)
        seconds[step] = round(time.perf_counter() - t, 2)
    dims = results.pop("dims")
    return ExplainResult(
        model=str(getattr(model, "name_or_path", config.model)), family=ad.family, num_layers=num_layers(model),
        hidden_size=hidden_size(model), me_layer=me, me_layer_source=source, dims=dims,
        prompts=inputs.texts, config=config, seconds=seconds, **results,
    )


def write(result: ExplainResult, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, the plots and explain_config.json into ``out_dir``."""
    from ..io import atomic_write_json
    from ..report import write_report
    from .report import claims, figures, markdown

    verdicts = claims(result)
    atomic_write_json(Path(out_dir) / CONFIG_NAME, result.config)
    data = dict(dataclasses.asdict(result), claims=[dataclasses.asdict(c) for c in verdicts])
    return write_report(out_dir, data, markdown(result, verdicts), figures(result))


def run(config: ExplainConfig, out_dir: str | Path, device: Optional[str] = None, dtype=None) -> ExplainResult:
    """Load the model, explain it, write the report and print the verdicts."""
    from ..load import load_model
    from ..report import console_table
    from .report import claims

    model, tokenizer = load_model(config.model, device=device, dtype=dtype)
    saved = getattr(model, "melayer_wemask", None)
    if saved is not None:  # explain the bare model; WeMask is applied per rate where it is studied
        saved.remove()
    result = explain(model, tokenizer, config)
    paths = write(result, out_dir)
    ab = result.ablations
    console_table(f"Ablations at the ME layer (block {result.me_layer}, dims {result.dims})",
                  ["setting", "max |h| tok0 @ME", "spike left", "max |h| tok0 @last", "PPL"],
                  [(r.name, r.token0_max_me, r.spike_left, r.token0_max_last, r.ppl) for r in ab.rows])
    console_table("Paper claims", ["claim", "verdict", "deciding number"],
                  [(c.claim, c.verdict, c.number) for c in claims(result)])
    print(f"Report: {paths['markdown']} (JSON: {paths['json']})")
    return result


# -- CLI ------------------------------------------------------------------------------------------------

def parse_rates(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MelayerError(f"--wemask-rates must be comma-separated numbers, got {text!r}") from None


def register_cli(sub) -> None:
    from ..cli import model_argument

    p = sub.add_parser("explain", help="check the paper's explanation of massive activations on a model")
    model_argument(p)
    p.add_argument("--out", default="out/explain", help="report folder (default: out/explain)")
    p.add_argument("--wemask-rates", default="0,0.01,0.05", metavar="R,R",
                   help="WeMask rates for the diversity and sink curves (default: 0,0.01,0.05)")
    p.add_argument("--me-layer", type=int, default=None, help="0-based ME block (default: found by a scan)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompt file (.txt one per line, or .jsonl)")
    p.add_argument("--max-prompt-tokens", type=int, default=96, metavar="N")
    p.add_argument("--ppl-data-dir", default=None, metavar="DIR",
                   help="folder with wikitext2/wiki.test.raw for the ablations' perplexity (default: none)")
    p.add_argument("--ppl-tokens", type=int, default=2048, metavar="N", help="WikiText-2 tokens (default: 2048)")
    p.add_argument("--ppl-window", type=int, default=256, metavar="N", help="tokens per window (default: 256)")
    p.add_argument("--ffn-cap", type=float, default=2.0, metavar="C",
                   help="cap token 0's FFN output norm at C × the other tokens' median (default: 2)")
    p.set_defaults(handler=_command)


def _command(args) -> int:
    config = ExplainConfig(model=args.model, me_layer=args.me_layer, prompts=args.prompts,
                           max_prompt_tokens=args.max_prompt_tokens, wemask_rates=parse_rates(args.wemask_rates),
                           ppl_data_dir=args.ppl_data_dir, ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window,
                           ffn_cap=args.ffn_cap)
    run(config, args.out, device=args.device, dtype=args.dtype)
    return 0

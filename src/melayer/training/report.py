"""The run report: config, data, WeMask activity, first/last logged metrics and the training curves."""
from __future__ import annotations

from ..report import markdown_table, new_figure, write_report

# logged key -> label; GRPO logs a mean reward, DPO its reward margin (chosen minus rejected implicit reward)
CURVES = {"loss": "training loss", "reward": "mean reward", "rewards/margins": "DPO reward margin"}


def log_series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in log_history if key in r and "step" in r]


def summary(result) -> dict:
    """First and last logged value of each curve, the run's length, the data's counts (SFT/DPO: rows TRL
    truncates or drops at max_length), how often the mask fired (DPO: also in reference forwards) and, for
    GRPO, the mean fraction of prompt groups whose rewards had no spread."""
    out = {"steps": max((int(r.get("step", 0)) for r in result.log_history), default=0),
           "wemask_fired": result.wemask_fired}
    if getattr(result, "wemask_fired_per_rank", None):
        out["wemask_fired_per_rank"] = result.wemask_fired_per_rank
    if getattr(result, "ref_forwards", None) is not None:
        out["ref_forwards"] = result.ref_forwards
        out["ref_tokens_masked"] = result.ref_tokens_masked
    out.update(getattr(result, "data_stats", None) or {})
    for key in CURVES:
        series = log_series(result.log_history, key)
        if series:
            out[f"{key}_first"], out[f"{key}_last"] = series[0][1], series[-1][1]
    zero_std = [float(r["frac_reward_zero_std"]) for r in result.log_history if "frac_reward_zero_std" in r]
    if zero_std:
        out["frac_reward_zero_std_mean"] = sum(zero_std) / len(zero_std)
    final = [r for r in result.log_history if "train_runtime" in r]
    if final:
        out["train_runtime_s"] = float(final[-1]["train_runtime"])
    return out


def write_train_report(result) -> None:
    cfg = result.config
    stats = summary(result)
    figures = {}
    for key, label in CURVES.items():
        series = log_series(result.log_history, key)
        if series:
            fig, ax = new_figure(figsize=(6, 3.5))
            ax.plot(*zip(*series), marker=".")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(f"{cfg.algo.upper()} {label} (WeMask rate {cfg.wemask.rate})")
            figures[key.replace("/", "_")] = fig
    extra = ""
    if cfg.algo == "dpo":
        reference = "masked like the policy" if cfg.ref_mask == "policy" else "unmasked"
        extra = (f"DPO beta {cfg.beta}, loss {cfg.loss_type}, reference {reference}"
                 f"{', log-probs precomputed' if cfg.precompute_ref else ''}.\n\n")
    md = (f"# `melayer train {cfg.algo}` on {cfg.data}\n\n"
          f"Model `{cfg.model}`, WeMask {cfg.wemask}, LoRA {cfg.lora}, seed {cfg.seed}.\n\n" + extra
          + markdown_table(["metric", "value"], stats.items())
          + f"\nFinal model (`melayer.load_model` loads it, `melayer.saved_wemask` gives its WeMask): `{result.final_dir}`\n")
    write_report(result.out, {"config": cfg.to_json(), "summary": stats, "log_history": result.log_history},
                 md, figures, name="train_report")

"""GRPO with TRL's colocated vLLM rollouts (``--rollouts vllm``), the vLLM side of tests/test_vllm.py, run as a
script in the vLLM venv:

    python tests/vllm_grpo.py DATA_DIR OUT_DIR RATE [--unmasked-engine]

Two GRPO steps on the default model with WeMask RATE (block 12, correct mode; 0: the baseline). TRL scores every sampled token
twice, with the policy (melayer's HF hooks) and with the engine that sampled it, and logs the mean and max of
|policy log-prob − engine log-prob| as ``sampling/sampling_logp_difference``. OUT_DIR/result.json holds those per
step, the engine's model class and mask, and the HF hooks' firing count. ``--unmasked-engine`` leaves the mask
out of the rollout folder's config.json: the engine then samples unmasked while the policy is masked (the guard).

On a CPU, vLLM packs each linear layer's weight for its GEMM kernels and drops the original, so TRL's weight push
before each generation (``load_weights``) has no parameter to write into; this script keeps vLLM's plain torch
linear, as vLLM itself does for layers it does not pack. A GPU needs none of this.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def keep_cpu_weights() -> None:
    import torch
    import vllm.model_executor.layers.utils as layer_utils

    def plain_linear(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear

    layer_utils.dispatch_cpu_unquantized_gemm = plain_linear


def main(data_dir: str, out: str, rate: float, unmasked_engine: bool) -> None:
    import torch

    if not torch.cuda.is_available():
        keep_cpu_weights()
    from melayer.masking import WeMaskConfig
    from melayer.training import TrainConfig, train
    import melayer.training.runner as runner

    if unmasked_engine:
        runner._name_rollout_mask = lambda folder, cfg: None
    cfg = TrainConfig(algo="grpo", model="default", data="gsm8k", data_dir=data_dir, limit=8, out=str(Path(out) / "run"),
                      max_steps=2, batch_size=4, num_generations=2, max_completion_length=24, logging_steps=1,
                      save_steps=0, gradient_checkpointing=False, lr=1e-5, rollouts="vllm", vllm_memory=0.2,
                      wemask=WeMaskConfig(rate=rate, me_layer=11))
    result = train(cfg, keep_trainer=True)
    engine_model = result.trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    steps = [{k: v for k, v in row.items() if k.startswith("sampling/")} | {"step": row.get("step")}
             for row in result.log_history if "sampling/sampling_logp_difference/mean" in row]
    rollout_config = json.loads((Path(cfg.out) / runner.ROLLOUT_MODEL_DIR / "config.json").read_text())
    Path(out, "result.json").write_text(json.dumps({
        "steps": steps, "policy_mask": result.config.wemask.__dict__, "hf_fired": result.wemask_fired,
        "engine_class": f"{type(engine_model).__module__}.{type(engine_model).__qualname__}",
        "engine_mask": getattr(engine_model, "_melayer_wemask", None),
        "rollout_config_mask": rollout_config.get("melayer_wemask")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), "--unmasked-engine" in sys.argv[4:])

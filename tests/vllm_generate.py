"""The vLLM side of tests/test_vllm.py, run as a script (vLLM's engine processes re-import ``__main__``, so
an engine is built only under ``if __name__ == "__main__"``, never inside pytest's process).

    python tests/vllm_generate.py JOB.json OUT.json

JOB: {"model": folder, "prompts": [[token ids]], "max_tokens": n, "engine": {LLM kwargs},
      "cases": [{"name": ..., "wemask": WeMaskConfig fields (resolved) or null, "route": "hf_overrides"?,
                 "model_config_mask": WeMaskConfig fields?}]}
A case with route "hf_overrides" carries the mask in the model config instead of additional_config (the route of an
``LLM(...)`` melayer does not build: TRL's, with "melayer_wemask" in config.json). "model_config_mask" puts a mask
in the model config beside melayer's own arguments (a checkpoint trained with WeMask, whose config.json names it).
OUT: {name: {"ids": [[generated ids]], "workers": [each worker's model class and mask], "start_s": s, "generate_s": s}}
One engine per case, built with melayer.vllm_backend's kwargs (greedy decoding), shut down before the next.
"""
from __future__ import annotations

import json
import sys
import time


def main(job_path: str, out_path: str) -> None:
    import torch
    from vllm import LLM, SamplingParams

    from melayer.masking import WeMaskConfig
    from melayer.vllm_backend import KEY, engine_kwargs, wemask_entry
    from melayer.vllm_backend.lm_eval_model import WORKER_EXTENSION

    job = json.load(open(job_path))
    out = {}
    for case in job["cases"]:
        entry = wemask_entry(WeMaskConfig(**case["wemask"])) if case["wemask"] else None
        kwargs = engine_kwargs(entry, {"model": job["model"], "worker_extension_cls": WORKER_EXTENSION,
                                       **job["engine"]}, torch.cuda.is_available())
        if case.get("route") == "hf_overrides":
            kwargs["hf_overrides"] = {KEY: kwargs.pop("additional_config")[KEY]}
        if case.get("model_config_mask"):
            kwargs["hf_overrides"] = {KEY: wemask_entry(WeMaskConfig(**case["model_config_mask"]))}
        t0 = time.time()
        llm = LLM(**kwargs)
        t1 = time.time()
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
        done = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
        out[case["name"]] = {"ids": [list(d.outputs[0].token_ids) for d in done],
                             "workers": llm.collective_rpc("melayer_wemask"), "start_s": t1 - t0,
                             "generate_s": time.time() - t1}
        llm.llm_engine.engine_core.shutdown()
        del llm
        print(f"{case['name']}: start {t1 - t0:.1f} s, generate {out[case['name']]['generate_s']:.1f} s",
              flush=True)
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])

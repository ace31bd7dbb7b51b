"""vLLM engine runs in a process of their own (vLLM spawns its workers, so this module keeps its work under
the ``__main__`` guard): ``python engine_run.py SPECS.json`` runs each spec of the list, one engine after the
other (at TP=1 in this process: engine core and worker in-process, one vLLM import for all), and prints one
line ``KT-VLLM-RESULT [[{"token_ids": [...], "text": ...} per prompt] per spec]``. A spec: ``hf`` (model
directory), ``tp``, ``dtype``, ``prompts``, ``max_tokens``, ``ktcore`` (the ktcore options, null: stock vLLM),
``engine`` (more ``LLM`` arguments)."""

from __future__ import annotations

import json
import sys


def run(spec: dict) -> list[dict]:
    from vllm import LLM, SamplingParams

    options = dict(spec.get("engine") or {})
    if spec.get("ktcore") is not None:
        options.update(quantization="ktcore",
                       hf_overrides={"quantization_config": {"quant_method": "ktcore", **spec["ktcore"]}})
    # eager: the CPU build of vLLM would compile the model with torch.compile (minutes on 2 cores)
    tp = spec.get("tp", 1)
    if tp == 1:
        options["distributed_executor_backend"] = "uni"
    llm = LLM(model=spec["hf"], dtype=spec.get("dtype", "float32"), tensor_parallel_size=tp,
              max_model_len=256, enforce_eager=True, seed=0, **options)
    outputs = llm.generate(spec["prompts"], SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"]))
    del llm
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    return [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outputs]


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = [run(spec) for spec in json.load(f)]
    print("KT-VLLM-RESULT " + json.dumps(results), flush=True)

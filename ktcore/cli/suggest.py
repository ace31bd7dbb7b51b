"""``kt rules suggest``: a rule file that fits a model into given VRAM and RAM budgets (ktcore.placement)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
The plan reads the GGUF's metadata and tensor sizes only (no weights): attention, dense MLPs, shared experts,
norms, embeddings and the KV cache for --context tokens go to the GPU; what VRAM is left holds routed experts:
the hottest experts of each layer when a routing measurement is given (--routing FILE, or --calibrate TEXT,
which loads the model on the CPU once and counts the router's choices on that text), else whole layers'
experts (the last layers; the first ones stay on the CPU, as llama.cpp's --n-cpu-moe). When its pinned
host copy and GPU buffers fit, prompts longer than --prefill-threshold tokens stream the CPU-resident experts
to the GPU (KMoE gpu_prefill_threshold). The file is printed, with the expected memory per device, and
written to -o.

examples:
  kt rules suggest DeepSeek-V2-Lite-Q4_K_M.gguf --vram 24GiB --ram 200GiB -o dsv2.yaml
  kt rules suggest model.gguf --vram 24GiB --ram 64GiB --n-cpu-moe 20   # llama.cpp-style: layers 20.. on the GPU
  kt rules suggest model.gguf --vram 80GiB --ram 500GiB --context 32768 --calibrate "$(cat prompt.txt)"
"""


def add_parser(actions) -> argparse.ArgumentParser:
    parser = actions.add_parser("suggest", help="write a rule file that fits VRAM and RAM budgets",
                                description="Plan where a GGUF model's weights go for given VRAM and RAM budgets.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL.gguf")
    parser.add_argument("--vram", required=True, help="GPU memory to use, e.g. 24GiB")
    parser.add_argument("--ram", required=True, help="host memory to use, e.g. 200GiB")
    parser.add_argument("--context", type=int, default=4096, help="KV cache positions to reserve (default 4096)")
    parser.add_argument("--prefill-threshold", type=int, default=None,
                        help="stream CPU experts to the GPU for calls of more tokens than this (default: "
                             "ktcore.placement.GPU_PREFILL_THRESHOLD; 0: never)")
    parser.add_argument("--routing", type=Path, help="routing counts JSON ({layer: [count per expert]})")
    parser.add_argument("--calibrate", metavar="TEXT", help="measure routing on TEXT (loads the model on the CPU)")
    parser.add_argument("--save-routing", type=Path, help="write the measured routing counts here")
    parser.add_argument("--n-cpu-moe", type=int, metavar="N",
                        help="llama.cpp's shortcut: the first N MoE layers' routed experts on the CPU, the rest on "
                             "the GPU (a large N: all on the CPU); refused if it does not fit")
    parser.add_argument("--rules", type=Path, help="the layout to plan from (default: the shipped gpu-cpu file)")
    parser.add_argument("-o", "--output", type=Path, help="write the rule file here")
    parser.set_defaults(func=run_suggest)
    return parser


def run_suggest(args) -> int:
    from ..placement import GPU_PREFILL_THRESHOLD, parse_size, suggest_placement

    routing = None
    if args.routing:
        routing = {int(k): v for k, v in json.loads(args.routing.read_text()).items()}
    if args.calibrate:
        routing = calibrate(args.model, args.calibrate)
        if args.save_routing:
            args.save_routing.write_text(json.dumps(routing))
    threshold = GPU_PREFILL_THRESHOLD if args.prefill_threshold is None else args.prefill_threshold
    plan = suggest_placement(args.model, parse_size(args.vram), parse_size(args.ram), context=args.context,
                             routing=routing, prefill_threshold=threshold or None, rules=args.rules,
                             cpu_moe_layers=args.n_cpu_moe)
    print(plan.rules_text)
    if args.output:
        args.output.write_text(plan.rules_text)
        print(f"written to {args.output}")
    return 0


def calibrate(model_path: str, text: str) -> dict[int, list[int]]:
    """Routing counts of ``text`` through the model loaded with the shipped CPU layout."""
    import torch

    from ..inject import load_model
    from ..placement import measure_routing
    from ..weights import open_source

    source = open_source(model_path)
    model, _ = load_model(source, progress=False)
    ids = source.tokenizer()(text, return_tensors="pt")["input_ids"]
    return measure_routing(model, ids.to(torch.long))

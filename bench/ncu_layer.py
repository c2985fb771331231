"""One decoder layer of the FP8 GLM-4.7-Flash decode step under Nsight Compute (GPU; developer tool).

Eager steps at each batch (--batches), after warm-up steps that compile every kernel; in the measured step a
forward pre-hook on layer --layer calls cudaProfilerStart and its forward hook cudaProfilerStop, so with
`ncu --profile-from-start off` exactly that layer's kernels are profiled (their order: the step's). Each batch's
window is marked by a line on stdout. Example (bench/gpu_suite.sh ncu14):
    ncu --profile-from-start off --clock-control none --set full -o $OUT/layer \\
        python3 -m bench.ncu_layer --batches 1,256 --ctx 640
    ncu --import $OUT/layer.ncu-rep --page details --print-units base > $OUT/layer.txt
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.profile_step import step_batch
from glmserve.shared.config.presets import write_preset
from glmserve.shared.runner.model_runner import ModelRunner


def profile_layer(runner: ModelRunner, batch: int, ctx: int, layer: int) -> None:
    """Warm-up eager steps at this batch, then one step with `layer` inside the profiler window."""
    runner.graph_sets.clear()
    dec, kv = step_batch(runner, batch, ctx, 1)
    for _ in range(2):
        runner.forward(dec, kv)
    torch.cuda.synchronize()
    block = runner.model.model.layers[layer]
    hooks = [block.register_forward_pre_hook(lambda *_: torch.cuda.profiler.start()),
             block.register_forward_hook(lambda *_: torch.cuda.profiler.stop())]
    try:
        print(f"=== ncu window: batch {batch} ctx {ctx} layer {layer}", flush=True)
        runner.forward(dec, kv)
        torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="glm-4.7-flash")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--ctx", type=int, default=640)
    p.add_argument("--layer", type=int, default=5, help="a MoE layer (GLM-4.7-Flash: layer 0 is dense)")
    p.add_argument("--quantization", default="fp8")
    a = p.parse_args()
    runner = ModelRunner(write_preset(tempfile.mkdtemp(), a.preset), device="cuda", dtype="bfloat16",
                         load_format="dummy", with_mtp=False, quantization=a.quantization or None)
    for b in (int(x) for x in a.batches.split(",")):
        profile_layer(runner, b, a.ctx, a.layer)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

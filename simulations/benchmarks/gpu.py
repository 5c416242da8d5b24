"""GPU benchmark: the same local training steps (without DP and with DP-SGD) on the GPU and on the CPU, where a
CUDA device is visible; where none is, it says so and measures nothing.

    python -m fedcvr.simulations.benchmarks.gpu [--data DIR] [--merchant merchant-03] [--adapter-layers 1]
        [--batch-size 1024] [--steps 10] [--out runs/bench]

The same merchant, model and batches as the DP overhead benchmark (`dp_overhead.py`), once with
`train.device = "cpu"` and once with `"cuda"`; on the GPU each step is timed once its kernels have finished.
Prints the median seconds per step on each device and the GPU's speed-up, and writes `<out>/gpu.json`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fedcvr.simulations.benchmarks.common import command, machine, print_table, write_result
from fedcvr.simulations.benchmarks.dp_overhead import default_data, measure, node_for, step_arguments


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = step_arguments(__doc__.split("\n\n")[0]).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    out = args.out.resolve()
    result: dict[str, Any] = {"command": command("fedcvr.simulations.benchmarks.gpu", argv), "machine": machine()}
    if not torch.cuda.is_available():
        result["measured"] = False
        result["reason"] = f"no CUDA device is visible (torch {torch.__version__})"
        path = write_result(out / "gpu.json", result)
        print(f"GPU vs CPU: not measured, {result['reason']}; wrote {path}")
        return result
    root = args.data.resolve() if args.data else default_data(out)
    per_device = {}
    for device in ("cpu", "cuda"):
        started = time.perf_counter()
        node = node_for(root / args.merchant, args.adapter_layers, args.batch_size, args.encoder, 0, device)
        mode = node.settings.dp.grad_sample_mode  # the default way of clipping
        figures = measure(node, args.steps, args.warmup, args.batch_size, modes=(mode,))
        per_device[device] = {"setup_s": time.perf_counter() - started, "median_s": figures["median_s"],
                              "dp_overhead": figures["ratio_of_medians"][mode], "grad_sample_mode": mode}
        del node
    cpu, gpu = per_device["cpu"]["median_s"], per_device["cuda"]["median_s"]
    result.update({"measured": True, "merchant": args.merchant, "adapter_layers": args.adapter_layers,
                   "batch_size": args.batch_size, "devices": per_device, "grad_sample_mode": mode,
                   "speedup": {step: cpu[step] / gpu[step] for step in ("plain", mode)}})
    path = write_result(out / "gpu.json", result)
    print_table([
        ("device", f"{result['machine']['cuda']} against {result['machine']['cpu']} "
                   f"({result['machine']['torch_threads']} threads)"),
        ("step without DP: CPU / GPU", f"{cpu['plain'] * 1000:.0f} / {gpu['plain'] * 1000:.0f} ms "
                                       f"({result['speedup']['plain']:.1f}x)"),
        (f"step with DP-SGD ({mode}): CPU / GPU", f"{cpu[mode] * 1000:.0f} / {gpu[mode] * 1000:.0f} ms "
                                                  f"({result['speedup'][mode]:.1f}x)"),
        ("DP overhead on the GPU", f"{per_device['cuda']['dp_overhead']:.2f}"),
    ])
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

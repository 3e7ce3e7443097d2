"""python benchmarks/precision/run.py [--out benchmarks/precision/results.json]

Why `dtype: auto` exists: bf16 against fp32 on this machine's CPU, for one SmolLM2-135M-sized matmul (a batch of
512 tokens through a 576 -> 1536 MLP projection) and for a forward + backward of the default model on a batch of
8 x 128 tokens (bf16 autocast, as BDS runs it). Each timed after a warm-up, median of the repeats, 2 threads.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tasks.precision import native_bf16  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/precision/results.json")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    torch.set_num_threads(2)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
              "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
              "matmul_ms": {name: round(1000 * median_seconds(lambda: x @ y, 5), 2)
                            for name, (x, y) in {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}.items()}}
    from tasks.models import load_model

    model, _ = load_model(args.model, "fp32", trainable=True)
    ids = torch.randint(0, 1000, (8, 128))

    def step(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad()

    result["forward_backward_s"] = {"fp32": round(median_seconds(lambda: step(False), 3), 3),
                                    "bf16_autocast": round(median_seconds(lambda: step(True), 1), 3)}
    result["bf16_slowdown"] = {"matmul": round(result["matmul_ms"]["bf16"] / result["matmul_ms"]["fp32"], 1),
                               "forward_backward": round(result["forward_backward_s"]["bf16_autocast"]
                                                         / result["forward_backward_s"]["fp32"], 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""EVAD inference latency / throughput and training step time versus the token-dropout keep rate.

    python benchmarks/model_speed.py                         # CPU, float32, batch 1
    python benchmarks/model_speed.py --device cuda --dtype bf16 --batches 1 8 16 32 --train-batch 2
    python benchmarks/model_speed.py --device cuda --dtype bf16 --batches 1 16 --train-batch 2 --compile

Needs only torch + timm (no Ray, no MLflow), so it runs on a bare GPU machine. Prints a markdown table;
``--json`` writes the raw figures too. MFU = achieved FLOP/s (``torch.utils.flop_counter`` GFLOPs, the paper's
multiply-adds, x 2) over the GPU's dense bf16 peak (``--peak-tflops``, default 989 for an H100 SXM; an H200's is the
same). ``--compile`` times ``torch.compile``d models
instead (each compiled once, its eval outputs compared with the eager model's first; the compile time is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evadlab.models import EVAD, EVADConfig
from evadlab.models.flops import count_flops

# The released ViT-B recipes: KTP at blocks 3, 6, 9.
SETTINGS = {
    "keep 1.0": EVADConfig.vit_b(),
    "keep 0.7": EVADConfig.vit_b(keep_rate=0.7),
    "keep 0.6 + EW 4": EVADConfig.vit_b(keep_rate=0.6, enhanced_weight=4.0),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def clips(batch: int, size: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.randn(3, 16, size, size, device=device) for _ in range(batch)]


def targets(batch: int, size: int, device: torch.device) -> list[dict]:
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.5, 0.1, 0.9, 0.8]], device=device) * size
    actions = torch.zeros(2, 80, device=device)
    actions[0, 11], actions[1, [13, 78]] = 1, 1
    return [{"boxes": boxes, "actions": actions} for _ in range(batch)]


def compiled_and_checked(model: torch.nn.Module, size: int, device: torch.device, autocast: dict) -> torch.nn.Module:
    """``torch.compile(model)`` after one eval forward of both on the same clip: prints the compile time (with that
    forward) and the largest difference of each output from the eager model's."""
    inputs = clips(1, size, device)
    with torch.no_grad(), torch.autocast(**autocast):
        eager = model(inputs)
        start = time.perf_counter()
        compiled = torch.compile(model)
        outputs = compiled(inputs)
        synchronize(device)
    differences = {key: float((outputs[key].float() - value.float()).abs().max()) for key, value in eager.items()}
    print(json.dumps({"compile_s": time.perf_counter() - start, "max_abs_difference": differences}), flush=True)
    return compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--size", type=int, default=288)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--train-batch", type=int, default=1, help="per-GPU batch of the training step (recipe: 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models (checked against eager)")
    args = parser.parse_args()

    device = torch.device(args.device)
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": args.dtype == "bf16"}
    torch.manual_seed(0)
    rows = []
    for name, config in SETTINGS.items():
        model = EVAD(config).to(device).eval()
        if args.compile:
            model = compiled_and_checked(model, args.size, device, autocast)
        gflops = count_flops(EVAD(config), (16, args.size, args.size)) / 1e9
        for batch in args.batches:
            inputs = clips(batch, args.size, device)

            def infer(model=model, inputs=inputs):
                with torch.no_grad(), torch.autocast(**autocast):
                    model(inputs)

            times = timed(infer, device, args.repeats, args.warmup)
            latency = statistics.median(times)
            row = {"setting": name, "batch": batch, "gflops": gflops, "latency_s": latency,
                   "clips_per_s": batch / latency, "runs": len(times)}
            if device.type == "cuda":
                row["mfu"] = 2 * gflops * 1e9 * batch / latency / (args.peak_tflops * 1e12)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.no_train:
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as build_optimizer
            inputs, labels = clips(args.train_batch, args.size, device), targets(args.train_batch, args.size, device)

            def step(model=model, inputs=inputs, labels=labels, optimizer=optimizer):
                with torch.autocast(**autocast):
                    loss = model(inputs, labels)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = timed(step, device, max(2, args.repeats // 2), 1)
            row = {"setting": name, "train_batch": args.train_batch, "train_step_s": statistics.median(times)}
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            print(json.dumps(row), flush=True)


    print(f"\n| setting | batch | GFLOPs | latency (s) | clips/s | ratio to keep 1.0 |{' MFU |' if device.type == 'cuda' else ''}")
    print(f"|---|---|---|---|---|---|{'---|' if device.type == 'cuda' else ''}")
    base = {r["batch"]: r["latency_s"] for r in rows if r["setting"] == "keep 1.0" and "latency_s" in r}
    for r in (r for r in rows if "latency_s" in r):
        mfu = f" {100 * r['mfu']:.1f} % |" if "mfu" in r else ""
        print(f"| {r['setting']} | {r['batch']} | {r['gflops']:.1f} | {r['latency_s']:.3f} | {r['clips_per_s']:.2f} | "
              f"{r['latency_s'] / base[r['batch']]:.2f} |{mfu}")
    for r in (r for r in rows if "train_step_s" in r):
        memory = f", peak memory {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
        print(f"training step, {r['setting']}, batch {r['train_batch']}: {r['train_step_s']:.3f} s{memory}")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

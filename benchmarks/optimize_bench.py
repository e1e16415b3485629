"""Optimized versions of the reference models: accuracy delta, speedup, size ratio.

    PYTHONPATH=. python -m benchmarks.optimize_bench [--registry DIR] [--threads 1]

Trains digits (MLP), digits-cnn and text-order from deployments/train/*.yaml into a fresh
registry (Ray Train, 2 CPU workers), then runs int8 dynamic, int8 static, fp16 and graph on
each with max_accuracy_drop=1 (everything is published, so every row is measured) and prints
a markdown table. Timings are in process, one onnxruntime thread, parent and child on the
same test rows, batch sizes 1/8/32/128.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

from maas_ray.errors import MaasError
from maas_ray.optimize import OptimizeConfig, optimize_and_publish
from maas_ray.registry import Registry

CONFIGS = ["deployments/train/digits.yaml", "deployments/train/cnn.yaml", "deployments/train/text.yaml"]
METHODS = [("int8 dynamic", {"method": "int8"}), ("int8 static", {"method": "int8", "static": True}),
           ("fp16", {"method": "fp16"}), ("graph", {"method": "graph"})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry", default=None, help="Reuse trained parents (version 1 of each model).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.registry or tempfile.mkdtemp(prefix="maas-opt-bench-")
    reg = Registry(root)
    names = []
    for path in CONFIGS:
        from maas_ray.train import TrainConfig

        cfg = TrainConfig.load(path, storage_path=tempfile.mkdtemp())
        if cfg.model_name not in reg.list_models():
            import ray

            from maas_ray.train import train_and_publish

            train_and_publish(cfg, reg, ray_init={"num_cpus": 2, "log_to_driver": False})
            ray.shutdown()
        names.append(cfg.model_name)
    print(f"registry {root}; onnxruntime threads {args.threads}\n")
    print("| model | method | parent acc | acc delta | b1 p50 parent -> child (ms) | speedup b1 | best-batch items/s parent -> child | speedup best | size ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for label, settings in METHODS:
            try:
                r = optimize_and_publish(name, 1, OptimizeConfig(**settings, threads=args.threads, max_accuracy_drop=1.0), reg)
            except MaasError as exc:
                print(f"| {name} | {label} | failed: {exc} |")
                continue
            print(f"| {name} | {label} | {r.parent.accuracy:.4f} | {r.accuracy_delta:+.4f} | "
                  f"{r.parent.p50_ms_b1:.3f} -> {r.child.p50_ms_b1:.3f} | {r.speedup_b1:.2f}x | "
                  f"{r.parent.best_items_per_s:,.0f} (b{r.parent.best_batch}) -> {r.child.best_items_per_s:,.0f} (b{r.child.best_batch}) | "
                  f"{r.speedup_best:.2f}x | {r.size_ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()

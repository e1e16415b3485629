"""Training throughput: Ray Train vs plain PyTorch DDP (torchrun), same model, data and batch.

    python -m benchmarks.train_bench --epochs 4 --out benchmarks/results/train_bench.json

For the CNN (digits as 1x8x8 images) and the text transformer (the generated text-order
task), with 1 and 2 CPU workers: train ``--epochs`` epochs with ``maas_ray``'s Ray Train
loop (``train_and_publish``), then the same model, splits, batch size, optimizer, sampler
and gloo DDP under ``torchrun``. Both sides time the training pass of each epoch only (no
validation, no checkpointing) and count samples across all workers; the first epoch is
warm-up and left out. Every worker runs one torch thread on both sides. Reported:
samples/s (median over epochs), the overhead ratio torchrun / Ray Train (>1: Ray Train
is slower per epoch), and the wall time of each whole run (Ray: worker group start,
training, export, publish; torchrun: process start, training).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"cnn": "deployments/train/cnn.yaml", "text": "deployments/train/text.yaml"}


def _config(model: str, workers: int, epochs: int, storage: str):
    from maas_ray.train import TrainConfig

    return TrainConfig.load(
        str(REPO / MODELS[model]), num_workers=workers, cpus_per_worker=1.0, epochs=epochs,
        patience=None, min_test_accuracy=0.0, storage_path=storage, model_name=f"bench-{model}",
    )


def torch_worker(model: str, epochs: int, out: str) -> None:
    """One torchrun rank: the same training pass as maas_ray.train.loop, without Ray."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from maas_ray.train.data import load_splits
    from maas_ray.train.model import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(model, world, epochs, tmp)
    splits = load_splits(cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                         vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, cfg.model_args, splits.spec, probe=False)
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    data = TensorDataset(torch.tensor(splits.x_train), torch.tensor(splits.y_train))
    sampler = DistributedSampler(data, shuffle=True) if world > 1 else None
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler)
    opt = torch.optim.Adam(ddp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        ddp.train()
        count = torch.zeros(1)
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(xb), yb)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip_norm)
            opt.step()
            count += len(yb)
        if world > 1:
            dist.all_reduce(count)
        rates.append(count.item() / (time.perf_counter() - t0))
    if rank == 0:
        Path(out).write_text(json.dumps({"samples_per_s": rates}))
    dist.destroy_process_group()


def run_ray(model: str, workers: int, epochs: int) -> dict:
    from maas_ray.registry import Registry
    from maas_ray.train import train_and_publish

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = train_and_publish(_config(model, workers, epochs, f"{tmp}/runs"), Registry(f"{tmp}/reg"),
                                   on_epoch=lambda m: None)
        wall = time.perf_counter() - t0
    rates = [h["samples_per_s"] for h in report.history]
    return {"samples_per_s": statistics.median(rates[1:] or rates), "wall_s": wall}


def run_torchrun(model: str, workers: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
             "-m", "benchmarks.train_bench", "--worker", model, "--epochs", str(epochs), "--worker-out", out],
            check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        wall = time.perf_counter() - t0
        rates = json.loads(Path(out).read_text())["samples_per_s"]
    return {"samples_per_s": statistics.median(rates[1:] or rates), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--models", default="cnn,text")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a torchrun rank
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch_worker(args.worker, args.epochs, args.worker_out)
        return

    import ray

    logging.basicConfig(level=logging.WARNING)
    from maas_ray.runtime import quick_train_reports

    quick_train_reports()  # per-epoch reports cost <= 0.25 s; set before ray.init
    rows = []
    for model in args.models.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            ray.init(num_cpus=2, logging_level=logging.ERROR, log_to_driver=False)
            try:
                r = run_ray(model, workers, args.epochs)
            finally:
                ray.shutdown()  # torchrun gets the whole box
            t = run_torchrun(model, workers, args.epochs)
            rows.append({
                "model": model, "workers": workers, "epochs": args.epochs,
                "ray_samples_per_s": round(r["samples_per_s"]), "torchrun_samples_per_s": round(t["samples_per_s"]),
                "overhead_ratio": round(t["samples_per_s"] / r["samples_per_s"], 3),
                "ray_wall_s": round(r["wall_s"], 1), "torchrun_wall_s": round(t["wall_s"], 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | workers | Ray Train samples/s | torchrun samples/s | torchrun / Ray | wall Ray / torchrun (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['workers']} | {r['ray_samples_per_s']} | {r['torchrun_samples_per_s']} | "
              f"{r['overhead_ratio']:.2f} | {r['ray_wall_s']} / {r['torchrun_wall_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

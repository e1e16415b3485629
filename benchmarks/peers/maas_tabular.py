"""maas-ray serving several registry models in one app, sized as the shipped profile, for the
tabular peers benchmark (benchmarks/tabular_peers.py).

    PYTHONPATH=. python -m benchmarks.peers.maas_tabular --port 8305 --registry REG \\
        --model breast-cancer-rf:1 --model diabetes-xgb:1 --replicas 1

The app is ``benchmarks.servers.ray_server.maas_config`` (what ``maas-ingress-tp-x<N>`` of the
main benchmark runs): ingress placement, ``--replicas`` ingress replicas with one onnxruntime
thread each, no access log; the harness sets the throughput profile's variables
(deployments/profiles/throughput.env) before this starts Ray. Every ``--model NAME:VERSION``
gets the same model entry. Serves until SIGTERM, then shuts Serve and Ray down.
"""

import argparse
import logging
import signal
import sys
import time

logger = logging.getLogger("benchmarks.maas_tabular")


def app_config(port: int, registry: str, models: list[str], replicas: int) -> dict:
    """The Serve config: maas_config's shipped sizing, with one model entry per name."""
    from benchmarks.servers.ray_server import maas_config

    cfg = maas_config(port, registry, "unused", "ingress", max_batch_size=64, threads=replicas,
                      replicas=replicas, access_log=False)
    args = cfg["applications"][0]["args"]
    entry = args["models"][0]
    args["models"] = []
    for ref in models:
        name, _, version = ref.partition(":")
        args["models"].append({**entry, "name": name, "versions": [{"version": int(version or 1)}]})
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--model", action="append", required=True, help="NAME:VERSION of a registry model (repeat)")
    p.add_argument("--replicas", type=int, default=1, help="ingress replicas, one onnxruntime thread each")
    p.add_argument("--num-cpus", type=float, default=2, help="Ray's logical CPUs (the sizing asks for 1.5)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    import ray
    from ray import serve

    from maas_ray.serving.deploy import deploy

    ray.init(address="local", num_cpus=a.num_cpus, include_dashboard=False)
    try:
        deploy(app_config(a.port, a.registry, a.model, a.replicas))
        print(f"READY maas on port {a.port}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as exc:
        logger.info("stopping: %s", exc)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        logger.info("Serve and Ray are down")


if __name__ == "__main__":
    sys.exit(main())

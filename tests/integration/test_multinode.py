"""Multi-node Ray on one machine: a head and two worker raylets (issue 6).

The scenario (tests/integration/multinode_scenario.py) runs in its own process because it
starts, drives and shuts down a whole Ray cluster, while the rest of the integration suite
shares one ``ray.init`` in this process. It writes a JSON result; this test asserts on it:

1. a DDP training job submitted with ``ray job submit`` ran its 2 workers on 2 nodes and
   published digits:1 to the shared registry;
2. the Serve app's 2 inference replicas run on 2 nodes and answer HTTP on 127.0.0.1:8300;
3. another Ray job got the same answers through a Serve handle (MaasClient);
4. removing a worker node that hosts a replica under continuous load: the app keeps answering,
   Serve replaces the replica on another node, failed requests are bounded and none fail after.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
REPO = SCENARIO.parents[2]
DEADLINE_S = 300  # the scenario aborts (and shuts its cluster down) after this; ~2 min usually
MAX_FAILED_DURING_REMOVAL = 20  # in-flight requests on the removed replica may fail; not replayed


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    out, log = tmp / "result.json", tmp / "scenario.log"
    with log.open("w") as log_file:
        proc = subprocess.run(
            [sys.executable, str(SCENARIO), "--out", str(out), "--deadline-s", str(DEADLINE_S)],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=DEADLINE_S + 60,
        )
    text = log.read_text()
    progress = [line for line in text.splitlines() if line.startswith("[multinode")]
    print("\n".join(progress))
    assert out.exists(), f"scenario wrote no result (exit {proc.returncode}); log tail:\n{text[-6000:]}"
    res = json.loads(out.read_text())
    summary = {k: res.get(k) for k in ("ok", "error", "nodes", "timings_s", "leftover_processes")}
    summary["train_worker_nodes"] = res.get("train", {}).get("worker_actors")
    summary["replica_nodes"] = res.get("serve", {}).get("replicas")
    summary["node_removal"] = res.get("node_removal")
    print(json.dumps(summary, indent=2))
    assert proc.returncode == 0 and res["ok"], (
        f"scenario failed: {res.get('error')} (Ray logs kept in {res.get('work_dir')})\n"
        f"{res.get('traceback', '')}\nlog tail:\n{text[-6000:]}"
    )
    return res


def test_cluster_has_a_head_and_two_worker_nodes_and_is_cleaned_up(result):
    nodes = result["nodes"]
    assert set(nodes) == {"head", "w1", "w2"} and len(set(nodes.values())) == 3
    assert result["driver_node_id"] == nodes["head"]
    assert result["leftover_processes"] == []


def test_training_job_ran_ddp_workers_on_two_nodes_and_published(result):
    train, nodes = result["train"], result["nodes"]
    assert train["status"] == "SUCCEEDED" and train["cli_returncode"] == 0
    assert len(train["worker_actors"]) == 2  # one worker group, never restarted
    # 1.5 CPUs per worker: the head (1 CPU) holds none, a worker node (2 CPUs) only one.
    assert sorted(train["worker_nodes"]) == ["w1", "w2"]
    assert set(train["worker_node_ids"]) == {nodes["w1"], nodes["w2"]}
    assert train["published_line"].startswith("published digits:1 ")
    assert result["published"]["version"] == 1 and result["published"]["test_accuracy"] >= 0.9


def test_inference_replicas_on_two_nodes_answer_http(result):
    serve = result["serve"]
    assert len(serve["replica_node_ids"]) == 2 and len(set(serve["replica_node_ids"])) == 2
    assert set(serve["replica_node_ids"]) <= set(result["nodes"].values())
    assert serve["ingress_nodes"] == ["head"] and serve["proxy_nodes"] == ["head"]
    assert serve["http"]["status"] == 200 and serve["http"]["model_version"] == "1"
    assert serve["http"]["accuracy_last_100"] >= 0.9


def test_another_ray_job_calls_the_app_through_its_handle(result):
    job = result["handle_job"]
    assert job["status"] == "SUCCEEDED"
    res = job["result"]
    assert res["model_version"] == "1" and len(res["labels"]) == 20
    assert res["correct"] >= 17


def test_app_survives_removal_of_a_node_hosting_a_replica(result):
    rm, nodes = result["node_removal"], result["nodes"]
    assert rm["removed_node"] in ("w1", "w2") and rm["removed_node"] in rm["replica_nodes_before"]
    assert rm["failed_before_removal"] == 0 and rm["requests_before_removal"] > 0
    # Serve started a replacement on another node, still at most one replica per node.
    assert len(set(rm["replica_node_ids_after"])) == 2 and nodes[rm["removed_node"]] not in rm["replica_node_ids_after"]
    # The other replica kept answering while the replacement started; nothing fails afterwards.
    assert rm["first_success_after_removal_s"] is not None and rm["first_success_after_removal_s"] < 5
    assert rm["requests_during_recovery"] > 0
    assert rm["failed_during_recovery"] <= MAX_FAILED_DURING_REMOVAL, rm["error_examples"]
    assert rm["requests_after_recovery"] > 0 and rm["failed_after_recovery"] == 0, rm["error_examples"]
    # Traffic really was spread: the removed replica had answered requests, the replacement does.
    calls = rm["replica_calls"]  # replica id -> [node, answered before removal, answered by the end]
    assert any(node == rm["removed_node"] and before > 0 for node, before, _ in calls.values()), calls
    assert sum(1 for node, before, end in calls.values() if node in rm["replica_nodes_after"] and end > before) == 2, calls

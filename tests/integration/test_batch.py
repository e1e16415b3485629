"""``maas batch`` on a 100k-row parquet (two files) with 2 actors, on the session's real Ray:
every row scored exactly once, equal to the numpy reference and to the online answers over
HTTP; a re-run skips the done inputs; a killed actor costs no row; s3:// input and output
(moto on loopback) give the local answers, and an input's own ``path`` column survives; GPU
actors are refused at once on a cluster without a GPU, and run on CUDA where there is one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maas_ray.cli import main
from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from maas_ray.serving.deploy import deploy
from tests.helpers import HTTP_PORT, wait_until
from tests.helpers.s3 import BUCKET
from tests.helpers.tabular_models import CLASSES, expected, publish_tabular, random_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROWS = 100_000
FILES = 2


@pytest.fixture(scope="module")
def job(ray_cluster, registry_root, tmp_path_factory):
    """(model ref, input folder, the rows as columns, a scratch folder)."""
    m = publish_tabular(Registry(registry_root), "churn-batch", "classifier")
    root = tmp_path_factory.mktemp("batch")
    rows = random_rows(ROWS, seed=11)  # ~10% NaN ages (parquet nulls) and '' cities (nulls)
    table = pa.table({
        "id": np.arange(ROWS),
        "age": pa.array(rows["age"], pa.float64(), from_pandas=True),
        "income": rows["income"],
        "city": pa.array([c or None for c in rows["city"]], pa.string()),
        "member": rows["member"],
        "visits": rows["visits"],
    })
    (root / "in").mkdir()
    per = ROWS // FILES
    for i in range(FILES):
        pq.write_table(table.slice(i * per, per), root / "in" / f"part-{i}.parquet", row_group_size=10_000)
    return f"{m.model}:{m.version}", str(root / "in"), rows, root


def run_cli(capsys, ref, src, out, registry_root, *extra) -> str:
    assert main(["batch", ref, "--input", src, "--output", out, "--registry", registry_root, "--actors", "2",
                 *extra]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"scored \d+ rows in [\d.]+ s \(\d+ rows/s\) -> {re.escape(out)}( \(skipped \d+ done input\(s\)\))?",
                        line), line
    return line


def read_output(out: str):
    return pq.read_table(out).to_pandas().sort_values("id").reset_index(drop=True)


def test_every_row_scored_once_and_a_rerun_skips_done_inputs(job, capsys, registry_root):
    ref, src, rows, root = job
    out = str(root / "out")
    line = run_cli(capsys, ref, src, out, registry_root, "--batch-size", "5000")
    assert line.startswith(f"scored {ROWS} rows")
    df = read_output(out)
    assert len(df) == ROWS and df["id"].tolist() == list(range(ROWS))
    probs = np.stack(df["probabilities"].to_numpy())
    np.testing.assert_allclose(probs, expected("classifier", rows), rtol=1e-5, atol=1e-6)
    assert df["label"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]

    # Everything done: nothing to score. One input's output gone: only it is scored again.
    assert run_cli(capsys, ref, src, out, registry_root).startswith("scored 0 rows")
    done = sorted(p for p in os.listdir(out) if not p.startswith("."))
    assert len(done) == FILES and all(os.path.exists(os.path.join(out, d, "_SUCCESS")) for d in done)
    shutil.rmtree(os.path.join(out, done[0]))
    line = run_cli(capsys, ref, src, out, registry_root)
    assert line.startswith(f"scored {ROWS // FILES} rows") and line.endswith("(skipped 1 done input(s))")
    assert read_output(out)["id"].tolist() == list(range(ROWS))


def test_a_killed_actor_costs_no_row(job, capsys, registry_root, ray_cluster):
    from ray.util.state import list_actors

    ref, src, _, root = job
    out = str(root / "out-killed")
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            alive = [a for a in list_actors(address=ray_cluster, filters=[("state", "=", "ALIVE")], detail=True)
                     if "VersionScorer" in (a.class_name or "") and a.pid]
            if alive:
                time.sleep(0.5)  # let it take batches first
                os.kill(alive[0].pid, signal.SIGKILL)
                killed.append(alive[0].pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    run_cli(capsys, ref, src, out, registry_root, "--batch-size", "500")
    killer.join(timeout=5)
    assert killed, "no scoring actor was found to kill"
    ids = read_output(out)["id"]
    assert len(ids) == ROWS and ids.tolist() == list(range(ROWS))


def test_offline_answers_equal_the_online_ones(job, registry_root, serve_cleanup):
    ref, _, rows, root = job
    df = read_output(str(root / "out"))
    model, version = ref.split(":")
    deploy({
        "http_options": {"host": "127.0.0.1", "port": HTTP_PORT},
        "applications": [{"name": "batch", "route_prefix": "/", "import_path": "maas_ray.serving.app:build_app",
                          "args": {"registry_root": registry_root, "models": [
                              {"name": model, "versions": [{"version": int(version)}], "placement": "ingress",
                               "intra_op_threads": 1}]}}],
    })
    # Online clients cannot send NaN (the codecs refuse it for every model): rows with an age.
    sample = [i for i in np.random.default_rng(0).choice(ROWS, 400, replace=False) if rows["age"][i] == rows["age"][i]]
    types = {"age": "FP32", "income": "FP64", "city": "BYTES", "member": "BOOL", "visits": "INT64"}
    body = {"inputs": [{"name": n, "datatype": t, "shape": [len(sample)], "data": [rows[n][i] for i in sample]}
                       for n, t in types.items()]}
    with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=30) as http:
        wait_until(lambda: http.get(f"/v2/models/{model}/ready").status_code == 200, timeout_s=90)
        r = http.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    online = np.asarray(outs["probabilities"]["data"], np.float32).reshape(outs["probabilities"]["shape"])
    offline = np.stack(df["probabilities"].to_numpy()[sample])
    np.testing.assert_allclose(online, offline, rtol=1e-6, atol=1e-7)
    assert outs["label"]["data"] == df["label"].to_numpy()[sample].tolist()


def test_every_model_kind_in_the_registry(job, capsys, registry_root):
    """An MLP on FP32 arrays (numeric columns stacked; a list column), an image model (a folder
    of PNGs) and a text model (a text file, one row per line)."""
    from maas_ray.registry import ProcessorSpec
    from tests.helpers import digit_png_bytes, linear_onnx
    from tests.helpers.tabular_models import WORDS, token_sum_onnx, word_tokenizer_json

    *_, root = job
    reg = Registry(registry_root)
    rng = np.random.default_rng(0)

    # MLP over 4 numeric columns (id kept), and the same model fed a list column named "input".
    mlp = reg.publish("batch-mlp", linear_onnx(4, 3, seed=2))
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    weights = np.random.default_rng(2)  # linear_onnx draws W, then b
    w = weights.normal(size=(4, 3)).astype(np.float32)
    b = weights.normal(size=(3,)).astype(np.float32)
    (root / "mlp").mkdir()
    pq.write_table(pa.table({"id": np.arange(1000), **{f"f{i}": x[:, i] for i in range(4)}}), root / "mlp" / "a.parquet")
    pq.write_table(pa.table({"id": np.arange(1000), "input": list(x)}), root / "mlp" / "b.parquet")
    out = str(root / "mlp-out")
    assert run_cli(capsys, f"batch-mlp:{mlp.version}", str(root / "mlp"), out, registry_root).startswith("scored 2000")
    for part in sorted(p for p in os.listdir(out)):
        df = pq.read_table(os.path.join(out, part)).to_pandas().sort_values("id")
        logits = np.stack(df["logits"].to_numpy())
        assert df["id"].tolist() == list(range(1000))
        np.testing.assert_allclose(logits, x @ w + b, rtol=1e-4, atol=1e-4)

    # An image model: a folder of PNGs -> the image preprocessor's input.
    img = reg.publish("batch-image", linear_onnx(64, 10, seed=3), preprocessor=ProcessorSpec(
        name="image", params={"height": 8, "width": 8, "channels": 1}), postprocessor=ProcessorSpec(
        name="classification"))
    (root / "images").mkdir()
    for i in range(20):
        (root / "images" / f"{i:02d}.png").write_bytes(digit_png_bytes(rng.integers(0, 17, 64)))
    out = str(root / "images-out")
    assert run_cli(capsys, f"batch-image:{img.version}", str(root / "images"), out, registry_root).startswith(
        "scored 20")
    df = pq.read_table(out).to_pandas()
    assert sorted(os.path.basename(p) for p in df["path"]) == [f"{i:02d}.png" for i in range(20)]
    assert set(df["label"]) <= {str(i) for i in range(10)}

    # A text model: one row per line of a text file.
    txt = reg.publish("batch-text", token_sum_onnx(8), preprocessor=ProcessorSpec(
        name="text", params={"input_name": "text", "max_seq_len": 8}), postprocessor=ProcessorSpec(
        name="regression"), files={"tokenizer.json": word_tokenizer_json()})
    lines = ["red green", "blue", "green green blue red", "purple red"]
    (root / "lines.txt").write_text("\n".join(lines) + "\n")
    out = str(root / "text-out")
    assert run_cli(capsys, f"batch-text:{txt.version}", str(root / "lines.txt"), out, registry_root).startswith(
        "scored 4")
    df = pq.read_table(out).to_pandas().set_index("text")
    assert {t: float(df.loc[t, "value"]) for t in lines} == {
        t: float(sum(WORDS.get(w_, 1) for w_ in t.split())) for t in lines}


def test_a_multi_file_job_starts_one_actor_pool(job, registry_root, ray_cluster):
    """Eight files, 2 actors: the job creates 2 scoring actors in all (not 2 per file), each
    file's rows land in its own folder, marked done, and on_unit hears of every file."""
    from ray.util.state import list_actors

    from maas_ray.batch import BatchConfig, run_batch

    ref, _, _, root = job
    model, version = ref.split(":")
    src = root / "eight"
    src.mkdir()
    per = 1000
    for i in range(8):
        rows = random_rows(per, seed=100 + i)
        pq.write_table(pa.table({
            "id": np.arange(i * per, (i + 1) * per),
            "age": pa.array(rows["age"], pa.float64(), from_pandas=True),
            "income": rows["income"], "city": pa.array([c or None for c in rows["city"]], pa.string()),
            "member": rows["member"], "visits": rows["visits"],
        }), src / f"f{i}.parquet")

    def scorer_actors() -> set[str]:
        return {a.actor_id for a in list_actors(address=ray_cluster, detail=True, limit=10_000)
                if "VersionScorer" in (a.class_name or "")}

    before = scorer_actors()
    heard: list[tuple[str, int]] = []
    out = str(root / "eight-out")
    report = run_batch(BatchConfig(model=model, version=version, input=str(src), output=out, registry=registry_root,
                                   actors=2, batch_size=300), on_unit=lambda k, n: heard.append((k, n)))
    assert report.rows == 8 * per and len(report.scored_units) == 8
    assert len(scorer_actors() - before) == 2
    assert sorted(k for k, _ in heard) == sorted(report.scored_units) and all(n == per for _, n in heard)
    for i, key in enumerate(sorted(os.listdir(out))):
        assert os.path.exists(os.path.join(out, key, "_SUCCESS"))
        ids = pq.read_table(os.path.join(out, key)).column("id").to_pylist()
        assert sorted(ids) == list(range(i * per, (i + 1) * per)), key


def read_units(fs, folder: str):
    """Every unit folder under ``folder`` (their schemas may differ) as one frame, by id."""
    import pyarrow.fs as pafs

    tables = [pq.read_table(d.path, filesystem=fs) for d in fs.get_file_info(pafs.FileSelector(folder))
              if d.type == pafs.FileType.Directory]
    return pa.concat_tables(tables, promote_options="default").to_pandas().sort_values("id").reset_index(drop=True)


def test_s3_input_and_output_give_the_local_answers_and_a_rerun_resumes(job, capsys, registry_root, s3_endpoint,
                                                                      monkeypatch):
    """Four parquet files on S3, two of them with a column of their own named ``path``, scored
    from and to S3 exactly as the version's scorer scores them locally. The Ray workers were
    started before the S3 variables were set, so only what the job hands them reaches the
    endpoint."""
    import pyarrow.fs as pafs

    from maas_ray.batch.scorer import VersionScorer

    ref = job[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_endpoint}")  # credentials: the s3_endpoint fixture's
    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http")
    per, files = 5000, 4
    model, version = ref.split(":")
    scorer = VersionScorer(registry_root, model, int(version), "parquet", "cpu", 1)  # what each actor runs
    local = []
    all_rows: dict[str, list] = {}
    for i in range(files):
        rows = random_rows(per, seed=200 + i)
        cols = {"id": np.arange(i * per, (i + 1) * per),
                "age": pa.array(rows["age"], pa.float64(), from_pandas=True), "income": rows["income"],
                "city": pa.array([c or None for c in rows["city"]], pa.string()), "member": rows["member"],
                "visits": rows["visits"]}
        if i >= 2:
            cols["path"] = [f"user/{i}/{j}" for j in range(per)]  # the user's data, not Ray Data's
        table = pa.table(cols)
        pq.write_table(table, f"{BUCKET}/batch/in/p{i}.parquet", filesystem=s3)
        local.append(scorer(table))
        for k, v in rows.items():
            all_rows.setdefault(k, []).extend(v)
    local = pa.concat_tables(local, promote_options="default").to_pandas()

    s3_in, s3_out = f"s3://{BUCKET}/batch/in", f"s3://{BUCKET}/batch/out"
    assert run_cli(capsys, ref, s3_in, s3_out, registry_root).startswith(f"scored {files * per} rows")
    remote = read_units(s3, f"{BUCKET}/batch/out")
    assert remote["id"].tolist() == list(range(files * per))  # every row once
    assert remote["label"].tolist() == local["label"].tolist()
    np.testing.assert_array_equal(np.stack(remote["probabilities"].to_numpy()),
                                  np.stack(local["probabilities"].to_numpy()))
    np.testing.assert_allclose(np.stack(remote["probabilities"].to_numpy()), expected("classifier", all_rows),
                               rtol=1e-5, atol=1e-6)
    # the user's path column, as it was; null for the files without one
    assert [p if isinstance(p, str) else None for p in remote["path"]] == \
        [None] * (2 * per) + [f"user/{i}/{j}" for i in (2, 3) for j in range(per)]

    done = [d for d in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/batch/out")) if d.type == pafs.FileType.Directory]
    assert len(done) == files and all(
        s3.get_file_info(f"{d.path}/_SUCCESS").type == pafs.FileType.File for d in done)
    line = run_cli(capsys, ref, s3_in, s3_out, registry_root)
    assert line.startswith("scored 0 rows") and line.endswith(f"(skipped {files} done input(s))")
    assert read_units(s3, f"{BUCKET}/batch/out")["id"].tolist() == list(range(files * per))


@pytest.mark.timeout(120)  # the failure this guards against is a hang
def test_gpus_per_actor_on_a_cluster_without_gpus_is_refused_at_once(job, registry_root, ray_cluster):
    import ray

    from maas_ray.batch import BatchConfig, run_batch

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray cluster has a GPU")
    ref, src, _, root = job
    model, version = ref.split(":")
    config = BatchConfig(model=model, version=version, input=src, output=str(root / "gpu-refused"),
                         registry=registry_root, actors=1, gpus_per_actor=1)
    with pytest.raises(ConfigError, match="gpus_per_actor=1 but no node of the Ray cluster has that many GPUs"):
        run_batch(config)


@pytest.mark.gpu
def test_gpu_actors_ask_ray_for_a_gpu_and_run_onnxruntime_on_cuda(job, registry_root, ray_cluster):
    import ray
    from ray.util.state import list_actors

    from maas_ray.batch import BatchConfig, run_batch
    from maas_ray.batch.scorer import VersionScorer
    from maas_ray.runtime import CUDA

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray cluster has no GPU resource")
    ref, src, _, root = job
    model, version = ref.split(":")
    # What each actor runs: the version on CUDA (create_session fails unless CUDA comes first).
    assert VersionScorer(registry_root, model, int(version), "parquet", "cuda", 1).providers[0] == CUDA

    def gpu_scorers() -> set[str]:
        return {a.actor_id for a in list_actors(address=ray_cluster, detail=True, limit=10_000)
                if "VersionScorer" in (a.class_name or "") and (a.required_resources or {}).get("GPU", 0) >= 1}

    before = gpu_scorers()
    report = run_batch(BatchConfig(model=model, version=version, input=src, output=str(root / "gpu-out"),
                                   registry=registry_root, actors=1, gpus_per_actor=1))
    assert report.rows == ROWS and len(gpu_scorers() - before) == 1

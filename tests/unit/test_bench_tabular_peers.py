"""benchmarks/tabular_peers.py without servers: its arguments, how it reads each server's
answer, the correctness check against maas-ray's answers, and the ratio tables."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.tabular_peers import (
    MAAS,
    Row,
    compare,
    extract,
    maas_ratio,
    parse_args,
    parse_cpus,
    peaks,
    render,
    report,
)

pytestmark = pytest.mark.unit


def test_defaults_pin_servers_and_load_generator_to_different_cpus():
    a = parse_args([])
    assert a.server_cpus == [1] and a.loadgen_cpus == [0]
    assert a.models == ["rf", "xgb"] and a.systems == ["maas", "flask", "kserve", "mlserver"]
    assert a.concurrency == [1, 8, 32] and a.rows == [1, 32]
    assert a.tolerance == 1e-4 and a.check_rows >= max(a.rows)


def test_lists_parse():
    a = parse_args(["--concurrency", "1,4", "--rows", "8", "--systems", "maas,kserve", "--models", "xgb",
                    "--server-cpus", "2-3", "--loadgen-cpus", "0,1"])
    assert (a.concurrency, a.rows, a.systems, a.models) == ([1, 4], [8], ["maas", "kserve"], ["xgb"])
    assert (a.server_cpus, a.loadgen_cpus) == ([2, 3], [0, 1])
    assert parse_cpus("0,2-3,2") == [0, 2, 3] and parse_cpus("") == []
    assert parse_args(["--loadgen-cpus", ""]).loadgen_cpus == []


@pytest.mark.parametrize("argv, quoted", [
    (["--concurrency", "1,x"], "'1,x'"),
    (["--concurrency", "0"], "'0'"),
    (["--rows", ""], "''"),
    (["--systems", "maas,triton"], "'maas,triton'"),
    (["--models", "gbm"], "'gbm'"),
    (["--server-cpus", "3-1"], "'3-1'"),
    (["--server-cpus", ""], "''"),
    (["--server-cpus", "0-1", "--loadgen-cpus", "1"], "[0, 1]"),
    (["--duration", "0"], "0.0"),
    (["--tolerance", "-1"], "-1.0"),
    (["--rows", "128", "--check-rows", "64"], "(64)"),
    (["--base-port", "7998"], "7998"),
])
def test_bad_arguments_exit_quoting_the_value(argv, quoted, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert quoted in capsys.readouterr().err


# ---- answers -------------------------------------------------------------------------------


def test_extract_reads_every_servers_reply_shape():
    probs = [[0.1, 0.9], [0.8, 0.2]]
    maas_v2 = {"outputs": [{"name": "label", "datatype": "BYTES", "shape": [2], "data": ["b", "a"]},
                           {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [0.1, 0.9, 0.8, 0.2]}]}
    maas_v1 = {"predictions": [{"label": "b", "probabilities": [0.1, 0.9]}, {"label": "a", "probabilities": [0.8, 0.2]}]}
    kserve = {"predictions": probs}
    mlserver = {"outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [2, 2], "data": [0.1, 0.9, 0.8, 0.2]}]}
    for reply in (maas_v2, maas_v1, kserve, mlserver):
        np.testing.assert_allclose(extract(reply, "classification"), probs)
    values = [12.5, 3.0]
    for reply in ({"outputs": [{"name": "value", "shape": [2, 1], "data": values}]},
                  {"predictions": [{"value": 12.5}, {"value": 3.0}]},
                  {"predictions": [{"value": [12.5]}, {"value": [3.0]}]},
                  {"predictions": values},
                  {"outputs": [{"name": "predict", "shape": [2, 1], "data": values}]}):
        np.testing.assert_allclose(extract(reply, "regression"), values)
    with pytest.raises(ValueError, match="neither outputs nor predictions"):
        extract({"error": "boom"}, "regression")


def test_compare_probabilities_absolute_and_labels():
    ref = np.array([[0.2, 0.8], [0.6, 0.4]])
    ok = compare(ref, ref + 5e-5, "classification", 1e-4)
    assert ok.ok and ok.max_diff == pytest.approx(5e-5) and ok.labels_agree == 1.0
    off = compare(ref, ref + 2e-4, "classification", 1e-4)
    assert not off.ok and off.max_diff == pytest.approx(2e-4)
    flipped = compare(np.array([[0.5, 0.5000001]]), np.array([[0.5000001, 0.5]]), "classification", 1e-4)
    assert not flipped.ok and flipped.labels_agree == 0.0  # within tolerance, but another label
    assert not compare(ref, ref[:1], "classification", 1e-4).ok  # a missing row


def test_compare_values_relative_to_at_least_one():
    ref = np.array([200.0, 0.5])
    got = np.array([200.01, 0.50005])  # 5e-5 relative to 200; 5e-5 absolute below 1
    chk = compare(ref, got, "regression", 1e-4)
    assert chk.ok and chk.max_diff == pytest.approx(5e-5)
    assert not compare(ref, np.array([200.05, 0.5]), "regression", 1e-4).ok


# ---- tables --------------------------------------------------------------------------------


def _rows() -> list[Row]:
    return [
        Row("m", MAAS, "v2", 1, 1, 1000.0, 1.0, 2.0, 0),
        Row("m", MAAS, "v2", 1, 8, 2000.0, 4.0, 8.0, 0),
        Row("m", MAAS, "v1", 1, 8, 1600.0, 5.0, 10.0, 0),
        Row("m", "KServe xgbserver", "v1", 1, 1, 500.0, 2.0, 4.0, 0),
        Row("m", "KServe xgbserver", "v1", 1, 8, 800.0, 10.0, 20.0, 0),
        Row("m", "MLServer", "v2", 1, 8, 0.0, 0.0, 0.0, 12),
    ]


def test_ratios_are_maas_over_the_peer_on_the_same_protocol_and_point():
    rows = _rows()
    assert maas_ratio(rows, rows[4]) == (pytest.approx(2.0), pytest.approx(0.5))  # v1 c=8: 1600/800, 10/20
    assert maas_ratio(rows, rows[3]) == (None, None)  # maas has no v1 point at c=1
    assert maas_ratio(rows, rows[5]) == (None, None)  # a peer that served nothing: no ratio, no division by 0
    assert Row("m", MAAS, "v2", 32, 8, 100.0, 1.0, 1.0, 0).rows_per_s == 3200.0


def test_peaks_and_the_markdown():
    rows = _rows()
    best = {(r.system, r.protocol): r.concurrency for r in peaks(rows)}
    assert best == {(MAAS, "v2"): 8, (MAAS, "v1"): 8, ("KServe xgbserver", "v1"): 8, ("MLServer", "v2"): 8}
    md = render(rows)
    assert "| m | 1 | KServe xgbserver | v1 | 800 (c=8) | 800 | 10.00 / 20.00 | 2.00x | 0.50x |" in md
    assert "| m | 1 | KServe xgbserver | v1 | 1 | 500 | 500 | 2.00 | 4.00 | 0 | - | - |" in md
    assert md.count("\n|") == 2 * 2 + len(peaks(rows)) + len(rows)  # headers + rows of both tables
    json.dumps([r.__dict__ for r in rows])  # rows are plain data


def test_the_report_names_the_command_budget_checks_and_what_did_not_run():
    result = {
        "command": "python -m benchmarks.tabular_peers", "wall_s": 12.0, "host": {"nodename": "box", "cpus": 2},
        "server_cpus": [1], "loadgen_cpus": [0], "duration_s": 5.0, "check_rows": 64, "tolerance": 1e-4,
        "versions": {"maas (.venv)": {"ray": "2.60.0"}, "kserve-xgboost": {"kserve": "0.21.0"}},
        "load_average": [{"system": "maas", "before": 1.5}],
        "checks": [{"system": MAAS, "protocol": "v2", "model": "m", "max_diff": 2e-7, "labels_agree": 1.0,
                    "ok": True, "reference": "the published ONNX graph in process"},
                   {"system": "Flask", "protocol": "v1", "model": "m", "max_diff": 4e-7, "labels_agree": 1.0,
                    "ok": True, "reference": "the published ONNX graph in process",
                    "vs_maas": {"max_diff": 6e-7, "labels_agree": 1.0, "ok": True}},
                   {"system": "MLServer", "protocol": "v2", "model": "m", "ok": False, "error": "boom"}],
        "not_run": [{"system": "kserve-sklearn", "reason": "no python at /x"}],
    }
    text = report(result, render(_rows()))
    for part in ("`python -m benchmarks.tabular_peers`", "servers (and every process they start) on CPUs [1]",
                 "wrk on [0]", "maas 1.5", "- kserve-xgboost: kserve 0.21.0", "(tolerance 0.0001)",
                 "- maas-ray v2 m: max diff 2.00e-07 vs the published ONNX graph in process, labels agree 100%, OK",
                 "- MLServer v2 m: error boom",
                 "graph in process, labels agree 100%, OK; vs maas-ray v2: max diff 6.00e-07, labels agree 100%, OK", "- kserve-sklearn: no python at /x", "### Every point"):
        assert part in text


def test_servers_start_in_the_order_of_systems_pinned_with_one_worker_per_cpu(tmp_path):
    from benchmarks.tabular_peers import CASES, Prepared, launches

    prepared = [Prepared(CASES[k], 1, [], np.zeros((1, 1), np.float32), [], str(tmp_path / k), str(tmp_path / k / "m"),
                         np.zeros(1)) for k in ("rf", "xgb")]
    a = parse_args(["--systems", "mlserver,kserve,flask,maas", "--registry", str(tmp_path), "--server-cpus", "2-3",
                    "--loadgen-cpus", "0"])
    got = launches(a, prepared, tmp_path)
    assert [g.name for g in got] == ["mlserver", "kserve-sklearn", "kserve-xgboost", "flask", "maas"]
    cmds = {g.name: g.cmd for g in got}
    assert cmds["flask"][cmds["flask"].index("-w") + 1] == "2"
    assert cmds["kserve-xgboost"][cmds["kserve-xgboost"].index("--workers") + 1] == "2"
    assert cmds["maas"][cmds["maas"].index("--replicas") + 1] == "2"
    assert json.loads((tmp_path / "mlserver" / "settings.json").read_text())["parallel_workers"] == 2
    rf = json.loads((tmp_path / "mlserver" / "breast-cancer-rf" / "model-settings.json").read_text())
    assert rf["parameters"]["extra"] == {"predict_fn": "predict_proba"}
    assert {g.name: g.env for g in got}["kserve-sklearn"] == {"PREDICT_PROBA": "true"}

"""maas_ray.serving.metric_names: the names the monitoring files spell out are the ones defined."""

import re
from pathlib import Path

import pytest

from maas_ray.serving import metric_names as names

pytestmark = pytest.mark.unit
MONITORING = Path(__file__).resolve().parents[2] / "deployments" / "monitoring"
# A name, optionally followed by README shorthand for several series: `..._{bucket,sum,count}`.
NAME = re.compile(r"\bray_maas_\w+?(?:_\{(?P<parts>[a-z]+(?:,[a-z]+)*)\}|\b)")

DEFINED = names.EXPORTED_NAMES | {names.exported(h) for h in names.HISTOGRAMS}  # + histogram base names


def _names_in(text: str) -> set[str]:
    found = set()
    for match in NAME.finditer(text):
        if match["parts"]:
            stem = match[0][: match[0].index("_{")]
            found |= {f"{stem}_{part}" for part in match["parts"].split(",")}
        else:
            found.add(match[0])
    return found


def test_name_pattern_reads_plain_names_and_the_readme_shorthand():
    assert _names_in('rate(ray_maas_requests_total{app="a"}[1m]) `ray_maas_batch_size_{bucket,sum}` ray_maas_') \
        == {"ray_maas_requests_total", "ray_maas_batch_size_bucket", "ray_maas_batch_size_sum"}


@pytest.mark.parametrize("path", ["grafana-dashboard.json", "README.md"])
def test_monitoring_files_name_only_defined_metrics(path):
    used = _names_in((MONITORING / path).read_text())
    assert used, f"no ray_maas_ names found in {path}"
    assert used <= DEFINED, f"{path} names metrics metric_names does not define: {sorted(used - DEFINED)}"


def test_readme_documents_every_exported_series():
    used = _names_in((MONITORING / "README.md").read_text())
    assert names.EXPORTED_NAMES <= used, sorted(names.EXPORTED_NAMES - used)


def test_exported_names_follow_rays_export_rules():
    assert names.RAY_REQUESTS_TOTAL == "ray_" + names.REQUESTS + "_total"
    assert names.exported(names.BATCH_SIZE, names.BUCKET) == names.RAY_BATCH_SIZE_BUCKET
    constants = {v for k, v in vars(names).items() if k.startswith("RAY_") and isinstance(v, str)}
    assert constants - DEFINED == set()  # every RAY_ constant is a series (or histogram) we export
    assert len(names.EXPORTED_NAMES) == len(names.COUNTERS) + len(names.GAUGES) + 3 * len(names.HISTOGRAMS)
    recorded = [*names.COUNTERS, *names.GAUGES, *names.HISTOGRAMS]
    assert len(set(recorded)) == len(recorded) and all(n.startswith("maas_") for n in recorded)

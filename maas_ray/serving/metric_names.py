"""The serving metrics' names and label names: the one place they are spelled.

Two forms of each name:

- recorded: what :mod:`maas_ray.serving.metrics` passes to ``ray.util.metrics``
  (:data:`REQUESTS`, :data:`STAGE_LATENCY`, ...);
- exported: what Prometheus scrapes from Ray's metrics agent, which prepends ``ray_`` to every
  name and appends ``_total`` to counters; a histogram is three series ``<name>_bucket``,
  ``_sum`` and ``_count`` (:func:`exported`, the ``RAY_*`` constants, :data:`EXPORTED_NAMES`).

The rollout evidence, the benchmarks and the tests build their queries from these; the
Grafana dashboard and ``deployments/monitoring/README.md`` spell them out, and
``tests/unit/test_metric_names.py`` checks every name they use is defined here.

Plain strings only: importing this module imports nothing.
"""

from __future__ import annotations

# ---- recorded names (ray.util.metrics) -------------------------------------------------
# Counters
REQUESTS = "maas_requests"
ERRORS = "maas_errors"
SHADOW_DROPPED = "maas_shadow_dropped"
PAYLOAD_LOG_DROPPED = "maas_payload_log_dropped"
# Generative versions (decoder LMs): tokens, and finished generations by finish reason
PROMPT_TOKENS = "maas_prompt_tokens"
COMPLETION_TOKENS = "maas_completion_tokens"
GENERATIONS = "maas_generations"
# Dynamic models (serving/pool.py): loads by outcome, evictions by reason, cache lookups by result
CACHE_LOADS = "maas_cache_loads"
CACHE_EVICTIONS = "maas_cache_evictions"
CACHE_LOOKUPS = "maas_cache_lookups"
# Gauges
IN_FLIGHT = "maas_requests_in_flight"
VERSION_STATE = "maas_version_state"
# A generative version's engine, set from its stats() at every flush (the replica running it)
ENGINE_RUNNING = "maas_engine_running_sequences"
ENGINE_WAITING = "maas_engine_waiting_sequences"
ENGINE_KV_USAGE = "maas_engine_kv_cache_usage"
# A pool replica's version cache: versions and bytes held, and its byte budget
CACHE_VERSIONS = "maas_cache_versions_loaded"
CACHE_BYTES = "maas_cache_bytes_held"
CACHE_BUDGET = "maas_cache_budget_bytes"
# Native Ray histograms (what the rollout controller divides)
REQUEST_LATENCY = "maas_request_latency_seconds"
SHADOW_AGREEMENT = "maas_shadow_agreement"
# Histograms counted in the replica and sent to native Ray histograms at each flush (dashboards,
# and TTFT / inter-token latency for the generative rollout guards)
STAGE_LATENCY = "maas_stage_latency_seconds"
BATCH_SIZE = "maas_batch_size"
SHADOW_DIFF = "maas_shadow_max_abs_diff"
TIME_TO_FIRST_TOKEN = "maas_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "maas_inter_token_latency_seconds"
# Native Ray histograms of a pool replica: how long a load took; a request's time in the pool,
# cold (it waited for its version's load) apart from warm
CACHE_LOAD_LATENCY = "maas_cache_load_seconds"
CACHE_REQUEST_LATENCY = "maas_cache_request_seconds"

COUNTERS = (REQUESTS, ERRORS, SHADOW_DROPPED, PAYLOAD_LOG_DROPPED, PROMPT_TOKENS, COMPLETION_TOKENS, GENERATIONS,
            CACHE_LOADS, CACHE_EVICTIONS, CACHE_LOOKUPS)
GAUGES = (IN_FLIGHT, VERSION_STATE, ENGINE_RUNNING, ENGINE_WAITING, ENGINE_KV_USAGE, CACHE_VERSIONS, CACHE_BYTES,
          CACHE_BUDGET)
HISTOGRAMS = (REQUEST_LATENCY, SHADOW_AGREEMENT, STAGE_LATENCY, BATCH_SIZE, SHADOW_DIFF, TIME_TO_FIRST_TOKEN,
              INTER_TOKEN_LATENCY, CACHE_LOAD_LATENCY, CACHE_REQUEST_LATENCY)

# Suffixes: a histogram's three series; what Ray's agent appends to a counter.
BUCKET, SUM, COUNT = "_bucket", "_sum", "_count"
HISTOGRAM_PARTS = (BUCKET, SUM, COUNT)
TOTAL = "_total"
# What Ray's metrics agent prepends to every name on export.
EXPORT_PREFIX = "ray_"

# ---- label names ---------------------------------------------------------------------
LABEL_APP = "app"
LABEL_MODEL = "model"
LABEL_VERSION = "version"
LABEL_PROTOCOL = "protocol"
LABEL_STATUS = "status"
LABEL_ERROR = "error"
LABEL_STAGE = "stage"
LABEL_STATE = "state"
LABEL_LE = "le"  # a histogram bucket's upper bound (Prometheus)
LABEL_FINISH_REASON = "finish_reason"  # stop | length | cancelled | error
LABEL_REPLICA = "replica"  # a pool replica's Serve replica id
LABEL_OUTCOME = "outcome"  # a load: ok | failed
LABEL_REASON = "reason"  # an eviction: lru | budget | unload
LABEL_RESULT = "result"  # a cache lookup: hit | miss
LABEL_CACHE = "cache"  # a pool request: warm | cold


def exported(name: str, suffix: str = "") -> str:
    """The name Prometheus scrapes for a recorded ``name``: ``exported(REQUESTS, TOTAL)`` is
    ``ray_maas_requests_total``, ``exported(BATCH_SIZE, BUCKET)`` ``ray_maas_batch_size_bucket``."""
    return f"{EXPORT_PREFIX}{name}{suffix}"


# ---- exported names (Prometheus) -----------------------------------------------------
RAY_REQUESTS_TOTAL = exported(REQUESTS, TOTAL)
RAY_ERRORS_TOTAL = exported(ERRORS, TOTAL)
RAY_SHADOW_DROPPED_TOTAL = exported(SHADOW_DROPPED, TOTAL)
RAY_PAYLOAD_LOG_DROPPED_TOTAL = exported(PAYLOAD_LOG_DROPPED, TOTAL)
RAY_IN_FLIGHT = exported(IN_FLIGHT)
RAY_VERSION_STATE = exported(VERSION_STATE)
# A histogram's base name (PromQL, dashboards); its series are the three below it.
RAY_REQUEST_LATENCY = exported(REQUEST_LATENCY)
RAY_REQUEST_LATENCY_BUCKET = exported(REQUEST_LATENCY, BUCKET)
RAY_REQUEST_LATENCY_SUM = exported(REQUEST_LATENCY, SUM)
RAY_REQUEST_LATENCY_COUNT = exported(REQUEST_LATENCY, COUNT)
RAY_SHADOW_AGREEMENT = exported(SHADOW_AGREEMENT)
RAY_SHADOW_AGREEMENT_BUCKET = exported(SHADOW_AGREEMENT, BUCKET)
RAY_SHADOW_AGREEMENT_SUM = exported(SHADOW_AGREEMENT, SUM)
RAY_SHADOW_AGREEMENT_COUNT = exported(SHADOW_AGREEMENT, COUNT)
RAY_STAGE_LATENCY = exported(STAGE_LATENCY)
RAY_STAGE_LATENCY_BUCKET = exported(STAGE_LATENCY, BUCKET)
RAY_STAGE_LATENCY_SUM = exported(STAGE_LATENCY, SUM)
RAY_STAGE_LATENCY_COUNT = exported(STAGE_LATENCY, COUNT)
RAY_BATCH_SIZE = exported(BATCH_SIZE)
RAY_BATCH_SIZE_BUCKET = exported(BATCH_SIZE, BUCKET)
RAY_BATCH_SIZE_SUM = exported(BATCH_SIZE, SUM)
RAY_BATCH_SIZE_COUNT = exported(BATCH_SIZE, COUNT)
RAY_SHADOW_DIFF = exported(SHADOW_DIFF)
RAY_SHADOW_DIFF_BUCKET = exported(SHADOW_DIFF, BUCKET)
RAY_SHADOW_DIFF_SUM = exported(SHADOW_DIFF, SUM)
RAY_SHADOW_DIFF_COUNT = exported(SHADOW_DIFF, COUNT)
RAY_PROMPT_TOKENS_TOTAL = exported(PROMPT_TOKENS, TOTAL)
RAY_COMPLETION_TOKENS_TOTAL = exported(COMPLETION_TOKENS, TOTAL)
RAY_GENERATIONS_TOTAL = exported(GENERATIONS, TOTAL)
RAY_ENGINE_RUNNING = exported(ENGINE_RUNNING)
RAY_ENGINE_WAITING = exported(ENGINE_WAITING)
RAY_ENGINE_KV_USAGE = exported(ENGINE_KV_USAGE)
RAY_TIME_TO_FIRST_TOKEN = exported(TIME_TO_FIRST_TOKEN)
RAY_TIME_TO_FIRST_TOKEN_BUCKET = exported(TIME_TO_FIRST_TOKEN, BUCKET)
RAY_TIME_TO_FIRST_TOKEN_SUM = exported(TIME_TO_FIRST_TOKEN, SUM)
RAY_TIME_TO_FIRST_TOKEN_COUNT = exported(TIME_TO_FIRST_TOKEN, COUNT)
RAY_INTER_TOKEN_LATENCY = exported(INTER_TOKEN_LATENCY)
RAY_INTER_TOKEN_LATENCY_BUCKET = exported(INTER_TOKEN_LATENCY, BUCKET)
RAY_INTER_TOKEN_LATENCY_SUM = exported(INTER_TOKEN_LATENCY, SUM)
RAY_INTER_TOKEN_LATENCY_COUNT = exported(INTER_TOKEN_LATENCY, COUNT)
RAY_CACHE_LOADS_TOTAL = exported(CACHE_LOADS, TOTAL)
RAY_CACHE_EVICTIONS_TOTAL = exported(CACHE_EVICTIONS, TOTAL)
RAY_CACHE_LOOKUPS_TOTAL = exported(CACHE_LOOKUPS, TOTAL)
RAY_CACHE_VERSIONS = exported(CACHE_VERSIONS)
RAY_CACHE_BYTES = exported(CACHE_BYTES)
RAY_CACHE_BUDGET = exported(CACHE_BUDGET)
RAY_CACHE_LOAD_LATENCY = exported(CACHE_LOAD_LATENCY)
RAY_CACHE_LOAD_LATENCY_BUCKET = exported(CACHE_LOAD_LATENCY, BUCKET)
RAY_CACHE_REQUEST_LATENCY = exported(CACHE_REQUEST_LATENCY)
RAY_CACHE_REQUEST_LATENCY_BUCKET = exported(CACHE_REQUEST_LATENCY, BUCKET)

# Every series the serving metrics export, as scraped.
EXPORTED_NAMES = frozenset(
    {exported(c, TOTAL) for c in COUNTERS}
    | {exported(g) for g in GAUGES}
    | {exported(h, part) for h in HISTOGRAMS for part in HISTOGRAM_PARTS}
)

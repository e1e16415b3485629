"""The rollout controller: a detached Ray actor that moves one model's traffic to a candidate
step by step, judging each step on the serving metrics, and promotes or rolls back.

Phases: an optional **shadow** phase (the candidate gets mirrored copies of live requests, no
caller sees its answers), then one **step** per weight in ``steps`` (the candidate's live share;
the candidate keeps receiving mirrored copies of the baseline's requests, so agreement is judged
at every step). Every window is judged by :func:`maas_ray.rollout.evidence.judge`; a failed
guard rolls back at once to the traffic the app had before the rollout. All guards passing at
100 % promotes: the ``production`` alias moves to the candidate in the registry, and the app's
traffic goes to that alias (which the ingress follows).

The state, every window's evidence and the decision are written to the registry
(``<model>/_rollouts/<id>.json``) after every change. The actor restarts on failure
(``max_restarts=-1``) and resumes from that record: the current step is re-applied and judged
on a fresh window, so traffic never stays split at an unjudged step.

A generative candidate (its manifest's ``kind`` is ``generative``, read from the registry when
the rollout starts) is judged by :func:`maas_ray.rollout.evidence.judge_generative`: time to
first token and inter-token latency against the baseline's, error rate, and the agreement of
its mirrored generations (``max_ttft_p99_ratio``, ``max_itl_p99_ratio``,
``min_generation_agreement``, ``min_overlap``), instead of the request p99 and top-1 agreement.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from maas_ray.errors import ConfigError
from maas_ray.registry import Registry
from maas_ray.rollout.evidence import Evidence, Snapshot, judge, judge_generative

logger = logging.getLogger(__name__)

KIND = "rollouts"
TERMINAL = ("promoted", "rolled_back", "aborted")
# A window without enough candidate requests is extended this many times before giving up.
MAX_EXTENSIONS = 3


class RolloutConfig(BaseModel):
    """How to roll one candidate version out (``maas rollout start`` flags)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    app: str = Field(description="Serve application serving the model.")
    model: str = Field(description="Model name.")
    candidate: int = Field(ge=1, description="Version to roll out (must be deployed in the app).")
    baseline: Optional[int] = Field(default=None, description="Version it replaces; default: the heaviest-weighted.")
    shadow_s: float = Field(default=0.0, ge=0, description="Shadow phase length in seconds (0: none).")
    steps: list[float] = Field(default=[5, 25, 50, 100], min_length=1, description="Candidate live share per step, %.")
    interval_s: float = Field(default=60.0, gt=0, description="Seconds each step is observed before judging.")
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Guard: candidate 5xx share.")
    max_p99_ratio: float = Field(default=1.3, gt=0, description="Guard: candidate p99 / baseline p99.")
    min_agreement: Optional[float] = Field(
        default=0.98, ge=0, le=1, description="Guard: top-1 agreement with the primary (classifiers); null: off.")
    min_requests: int = Field(default=20, ge=1, description="Candidate requests a window needs to be judged.")
    alias: str = Field(default="production", description="Alias moved to the candidate on promotion.")
    max_ttft_p99_ratio: float = Field(
        default=1.5, gt=0, description="Guard (generative): candidate time-to-first-token p99 / baseline's.")
    max_itl_p99_ratio: float = Field(
        default=1.5, gt=0, description="Guard (generative): candidate inter-token latency p99 / baseline's.")
    min_generation_agreement: Optional[float] = Field(
        default=0.9, ge=0, le=1,
        description="Guard (generative): share of mirrored generations that agreed with the primary (greedy: "
                    "identical text; sampled: word overlap >= min_overlap); null: off.")
    min_overlap: float = Field(
        default=0.5, ge=0, le=1,
        description="Generative: a sampled mirrored generation agrees when its word overlap (multiset Jaccard) "
                    "with the primary's is at least this.")
    min_latency_samples: int = Field(
        default=10, ge=1,
        description="Generative: generations (TTFT observations) the candidate and the baseline each need in a "
                    "window before their TTFT and inter-token p99 ratios are judged.")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in v) or v != sorted(v) or v[-1] != 100:
            raise ValueError(f"steps must increase within (0, 100] and end at 100, got {v}")
        return v


def actor_name(app: str, model: str) -> str:
    return f"maas-rollout:{app}:{model}"


NAMESPACE = "maas"


class RolloutController:
    """The actor's body (``ray.remote`` is applied in :func:`start_rollout`)."""

    def __init__(self, registry_root: Optional[str], model: str, rollout_id: str) -> None:
        self.registry = Registry(registry_root)
        self.model, self.id = model, rollout_id
        state = self.registry.read_record(model, KIND, rollout_id)
        if state is None:
            raise ConfigError(f"no rollout record {model}/{rollout_id}")
        self.state = state
        self.config = RolloutConfig.model_validate(state["config"])
        self.generative = (state.get("kind") or version_kind(self.registry, model, self.config.candidate)) \
            == "generative"
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run_safely, name="maas-rollout", daemon=True)
        self._thread.start()  # a restarted actor resumes here, from the record

    # ---- API (actor methods) --------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.state)

    def abort(self) -> dict[str, Any]:
        self._abort.set()
        self._thread.join(timeout=60)
        return self.status()

    # ---- the loop ---------------------------------------------------------------------
    def _run_safely(self) -> None:
        try:
            self._run()
        except Exception as exc:  # never leave traffic split: roll back, then report
            logger.exception("rollout %s failed", self.id)
            try:
                self._rollback(f"controller error: {type(exc).__name__}: {exc}")
            except Exception:
                logger.exception("rollout %s: rollback after the error failed too", self.id)

    def _run(self) -> None:
        cfg = self.config
        if self.state["phase"] in TERMINAL:
            return
        phases = ([("shadow", None)] if cfg.shadow_s > 0 else []) + [("step", p) for p in cfg.steps]
        start = self.state.get("phase_index", 0)
        baseline_p99 = self.state.get("baseline_p99_s")
        for index in range(start, len(phases)):
            kind, weight = phases[index]
            self._set(phase=kind, phase_index=index, weight=weight)
            self._apply(weight)
            extensions = 0
            window_start, before = time.time(), Snapshot.scrape(cfg.app, cfg.model)
            while True:
                if self._abort.wait(cfg.shadow_s if kind == "shadow" else cfg.interval_s):
                    self._rollback("aborted by the operator", phase="aborted")
                    return
                after = Snapshot.scrape(cfg.app, cfg.model)
                evidence = self._judge(after.minus(before))
                if evidence.failed or evidence.enough or extensions >= MAX_EXTENSIONS:
                    break
                extensions += 1  # too few requests to judge: keep observing the same window
            baseline_p99 = evidence.baseline_p99_s or baseline_p99
            record = {"phase": kind, "weight": weight, "window": [_iso(window_start), _iso(time.time())],
                      "evidence": evidence.to_dict()}
            if evidence.failed:
                record["verdict"] = "fail: " + "; ".join(evidence.failed)
            elif not evidence.enough:
                record["verdict"] = f"fail: only {evidence.candidate_requests:.0f} candidate requests " \
                                    f"(need {cfg.min_requests})"
            else:
                record["verdict"] = "pass"
            self._append(record, baseline_p99_s=baseline_p99)
            logger.info("rollout %s %s %s: %s", self.id, kind, weight, record["verdict"])
            if record["verdict"] != "pass":
                self._rollback(f"{kind}{'' if weight is None else f' at {weight:g} %'}: {record['verdict'][6:]}")
                return
            self._set(phase_index=index + 1)
        self._promote()

    def _judge(self, window: Snapshot) -> Evidence:
        """The guards of the candidate's kind on one window. At 100 % the baseline has no live
        traffic in the window: a p99 from an earlier window (another load) is no fair
        comparison, so that step judges errors only (the steps before it judged latency), as
        Flagger stops analysing at full weight."""
        cfg = self.config
        if self.generative:
            return judge_generative(
                window, cfg.candidate, self.state["baseline"], max_error_rate=cfg.max_error_rate,
                max_ttft_p99_ratio=cfg.max_ttft_p99_ratio, max_itl_p99_ratio=cfg.max_itl_p99_ratio,
                min_agreement=cfg.min_generation_agreement, min_requests=cfg.min_requests,
                min_latency_samples=cfg.min_latency_samples)
        return judge(window, cfg.candidate, self.state["baseline"], max_error_rate=cfg.max_error_rate,
                     max_p99_ratio=cfg.max_p99_ratio, min_agreement=cfg.min_agreement,
                     min_requests=cfg.min_requests, baseline_p99_fallback=None)

    # ---- traffic ------------------------------------------------------------------------
    def _apply(self, weight: Optional[float]) -> None:
        """Shadow: the original traffic, every request mirrored to the candidate. Step: the
        candidate gets ``weight`` % live, the baseline the rest, and the candidate still receives
        copies of the baseline's requests (agreement is judged at every step)."""
        cfg = self.config
        user_config = copy.deepcopy(self.state["original_user_config"])
        live = 0.0 if weight is None else weight  # the shadow phase gives the candidate no live share
        refs = user_config["traffic"][cfg.model]
        traffic = {ref: 0.0 for ref in refs}  # other versions keep no live share during the rollout
        for ref in refs:  # references that name the baseline or the candidate are replaced by numbers
            if _number(ref, self.state["resolved"]) in (cfg.candidate, self.state["baseline"]):
                traffic.pop(ref)
        traffic[str(self.state["baseline"])] = 100.0 - live
        traffic[str(cfg.candidate)] = float(live)
        user_config["traffic"][cfg.model] = traffic
        target = {"version": str(cfg.candidate), "share": 1.0}
        if self.generative:
            target["min_overlap"] = cfg.min_overlap
        user_config.setdefault("shadow", {})[cfg.model] = target if live < 100 else None
        _push(cfg.app, user_config)

    def _promote(self) -> None:
        cfg = self.config
        self.registry.set_alias(cfg.model, cfg.alias, cfg.candidate)
        user_config = copy.deepcopy(self.state["original_user_config"])
        refs = user_config["traffic"][cfg.model]
        if cfg.alias in refs:  # the app routes by the alias: it follows the move, give it everything
            user_config["traffic"][cfg.model] = {ref: (100.0 if ref == cfg.alias else 0.0) for ref in refs}
        else:
            user_config["traffic"][cfg.model] = {**{ref: 0.0 for ref in refs}, str(cfg.candidate): 100.0}
        (user_config.get("shadow") or {}).pop(cfg.model, None)
        _push(cfg.app, user_config)
        self._set(phase="promoted", decision={
            "decision": "promoted", "at": _iso(time.time()),
            "why": f"every guard passed at every step; alias {cfg.alias!r} -> {cfg.candidate}"})

    def _rollback(self, why: str, phase: str = "rolled_back") -> None:
        _push(self.config.app, self.state["original_user_config"])
        self._set(phase=phase, decision={"decision": phase, "at": _iso(time.time()), "why": why})
        logger.warning("rollout %s %s: %s", self.id, phase, why)

    # ---- state ------------------------------------------------------------------------
    def _set(self, **changes: Any) -> None:
        with self._lock:
            self.state.update(changes, updated_at=_iso(time.time()))
            snapshot = copy.deepcopy(self.state)
        self.registry.write_record(self.model, KIND, self.id, snapshot)
        if "decision" in changes:  # the audit trail: promoted / rolled_back / aborted, and why
            self.registry.record_event(f"rollout.{changes['decision']['decision']}", f"{self.model}:rollout/{self.id}",
                                       model=self.model, before={"baseline": snapshot.get("baseline")},
                                       after={"candidate": self.config.candidate, **changes["decision"]})

    def _append(self, record: dict, **changes: Any) -> None:
        with self._lock:
            self.state.setdefault("history", []).append(record)
        self._set(**changes)


def version_kind(registry: Registry, model: str, version: int) -> str:
    """``generative`` or ``predictive``: the version's manifest kind, which picks the guards."""
    return registry.describe(model, version).kind


def _number(ref: str, resolved: dict[str, int]) -> Optional[int]:
    if ref in resolved:
        return resolved[ref]
    return int(ref) if ref.isdigit() else None


def _push(app: str, user_config: dict) -> None:
    """Apply a user_config and wait until the ingress runs with it (reconfigured in place)."""
    from ray import serve

    from maas_ray.serving.deploy import update_ingress_user_config

    update_ingress_user_config(app, user_config)
    handle = serve.get_app_handle(app)
    want = {m: {r: float(w) for r, w in refs.items()} for m, refs in user_config["traffic"].items()}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            current = handle.current_config.remote().result(timeout_s=30)["user_config"]["traffic"]
            if {m: {r: float(w) for r, w in refs.items()} for m, refs in current.items()} == want:
                return
        time.sleep(0.2)
    raise TimeoutError(f"app {app!r} did not apply the new traffic within 60 s")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def start_rollout(config: RolloutConfig, registry_root: Optional[str] = None) -> dict[str, Any]:
    """Record a new rollout and start its detached controller in the connected Ray cluster."""
    import ray
    from ray import serve

    existing = _actor(config.app, config.model)
    if existing is not None:
        state = ray.get(existing.status.remote())
        if state["phase"] not in TERMINAL:
            raise ConfigError(f"a rollout of {config.model} in app {config.app!r} is already running ({state['id']})")
        ray.kill(existing, no_restart=True)
    current = serve.get_app_handle(config.app).current_config.remote(config.model).result()
    if config.model not in current["resolved"]:
        raise ConfigError(f"app {config.app!r} does not serve {config.model!r}")
    states = current["states"][config.model]
    if states.get(str(config.candidate)) != "ready":
        raise ConfigError(f"candidate {config.model}:{config.candidate} is not a ready version of app "
                          f"{config.app!r} (deploy it with weight 0 first); states: {states}")
    weights = {int(v): w for v, w in current["weights"][config.model].items()}
    baseline = config.baseline or max((w, v) for v, w in weights.items() if v != config.candidate)[1]
    if baseline == config.candidate or states.get(str(baseline)) != "ready":
        raise ConfigError(f"baseline {config.model}:{baseline} must be another ready version; states: {states}")
    rollout_id = f"{config.candidate}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    registry = Registry(registry_root)
    kind = version_kind(registry, config.model, config.candidate)
    if version_kind(registry, config.model, baseline) != kind:
        raise ConfigError(f"candidate {config.model}:{config.candidate} is {kind} but baseline {baseline} is not: "
                          "a rollout compares versions of one kind")
    state = {
        "id": rollout_id, "config": config.model_dump(), "baseline": baseline, "kind": kind, "phase": "starting",
        "phase_index": 0, "original_user_config": current["user_config"],
        "resolved": current["resolved"][config.model], "history": [], "created_at": _iso(time.time()),
    }
    registry.write_record(config.model, KIND, rollout_id, state)
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(RolloutController)
    actor_cls.options(name=actor_name(config.app, config.model), namespace=NAMESPACE, lifetime="detached",
                      get_if_exists=False).remote(registry.root, config.model, rollout_id)
    return state


def _actor(app: str, model: str):
    import ray

    try:
        return ray.get_actor(actor_name(app, model), namespace=NAMESPACE)
    except ValueError:
        return None


def rollout_status(app: str, model: str, registry_root: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The running controller's state, or the newest record in the registry."""
    import ray

    actor = _actor(app, model)
    if actor is not None:
        try:
            return ray.get(actor.status.remote(), timeout=30)
        except Exception as exc:  # restarting: fall back to the record it keeps
            logger.info("controller not answering (%r); reading its record", exc)
    registry = Registry(registry_root)
    records = [r for r in (registry.read_record(model, KIND, n) for n in registry.list_records(model, KIND))
               if r and r["config"]["app"] == app]
    return max(records, key=lambda r: r.get("created_at", ""), default=None)


def abort_rollout(app: str, model: str) -> dict[str, Any]:
    import ray

    actor = _actor(app, model)
    if actor is None:
        raise ConfigError(f"no rollout controller for {model} in app {app!r}")
    return ray.get(actor.abort.remote(), timeout=120)

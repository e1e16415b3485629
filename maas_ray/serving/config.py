"""AppArgs: the ``args:`` of every ``serve run`` YAML, validated at build time."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maas_ray.registry.manifest import ModelName, ProcessorSpec
from maas_ray.serving.payload_log import PayloadLogConfig


class DeploymentOptions(BaseModel):
    """Ray Serve options for one deployment; unset fields keep Serve's defaults."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: Optional[Union[int, Literal["auto"]]] = Field(default=None, description="Fixed replica count.")
    autoscaling_config: Optional[dict[str, Any]] = Field(
        default=None, description="Serve autoscaling: min_replicas, max_replicas, target_ongoing_requests, ..."
    )
    max_ongoing_requests: Optional[int] = Field(default=None, ge=1, description="Per-replica concurrency cap.")
    max_queued_requests: Optional[int] = Field(
        default=None, ge=1, description="Callers waiting beyond this get 503 (default: the app's limits)."
    )
    max_replicas_per_node: Optional[int] = Field(
        default=None, ge=1, description="Spread replicas over nodes (1 = at most one per node, for HA)."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="num_cpus, num_gpus (may be fractional), memory, resources..."
    )

    @field_validator("num_replicas")
    @classmethod
    def _replicas(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"num_replicas must be >= 0, got {v}")
        return v

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("num_cpus", "num_gpus"):
            if key in v and not (isinstance(v[key], (int, float)) and v[key] >= 0):
                raise ValueError(f"ray_actor_options.{key} must be a number >= 0, got {v[key]!r}")
        return v

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if self.autoscaling_config is not None and isinstance(self.num_replicas, int):
            raise ValueError(
                f"set num_replicas ({self.num_replicas}) or autoscaling_config, not both"
            )
        return self

    def min_replicas(self) -> int:
        """The fewest replicas this deployment runs: the fixed count, or autoscaling's floor."""
        if isinstance(self.num_replicas, int):
            return max(1, self.num_replicas)
        return max(1, int((self.autoscaling_config or {}).get("min_replicas", 1)))

    def calls_in_flight(self, per_replica: int, callers: int = 1) -> int:
        """How many concurrent handle calls each of ``callers`` (ingress replicas) may keep
        in flight to this deployment: its budget shared among them, at least one each.

        The budget is ``per_replica`` per fixed replica; under autoscaling, enough for its
        target at max_replicas (Serve scales on ongoing calls, so callers must let that many
        be ongoing for it to ever scale up). Shared, the replicas see the same total load
        however many ingress replicas send it: more calls per replica only queue there."""
        return max(1, math.ceil(self._calls_sized_for(per_replica) / max(1, callers)))

    def _calls_sized_for(self, per_replica: int) -> int:
        if self.autoscaling_config is not None or self.num_replicas == "auto":
            from ray.serve.config import AutoscalingConfig

            # "auto": Serve's defaults for it under the user's fields (serve's handle_num_replicas_auto)
            base = AutoscalingConfig.default().model_dump(exclude_unset=True) if self.num_replicas == "auto" else {}
            auto = AutoscalingConfig(**{**base, **(self.autoscaling_config or {})})
            return max(1, math.ceil(auto.target_ongoing_requests * auto.max_replicas))
        return per_replica * (self.num_replicas or 1)

    def serve_options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        opts = dict(defaults)
        opts.update(self.model_dump(exclude_none=True, exclude={"ray_actor_options"}))
        opts["ray_actor_options"] = {**defaults.get("ray_actor_options", {}), **self.ray_actor_options}
        if "autoscaling_config" in opts:
            opts.pop("num_replicas", None)
        return opts


class BatchingConfig(BaseModel):
    """Dynamic batching knobs; they go into user_config and change live."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, description="Most items run in one onnxruntime call.")
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0.0,
        description="How long a batch waits to fill. 0: run what is queued at once; requests that "
        "arrive while a batch runs form the next one (adaptive batching, no idle wait).",
    )
    max_calls_in_flight: Optional[int] = Field(
        default=None,
        ge=1,
        description="fused and split placements: most handle calls one ingress replica keeps in flight "
        "to this version's inference deployment. Requests that arrive meanwhile travel together in the "
        "next call (up to max_batch_size items), so the hop's cost is paid per batch, not per request. "
        "Default: 2 per inference replica (one call running while the next is on its way; wide MLP on "
        "2 cores, 1 replica: 1 -> 1,317, 2 -> 1,559, 4 -> 1,154 items/s); under autoscaling, "
        "target_ongoing_requests x max_replicas, so that Serve sees the load it scales on. Several "
        "ingress replicas share that default (at least 1 each), so the inference replicas see the "
        "same number of calls however many ingress replicas send them.",
    )
    enabled: Optional[bool] = Field(
        default=None,
        description="Default (unset): batch unless the model's batch-1 run takes under 50 us, where "
        "the batch queue costs more per request than batching saves; true/false force it on/off.",
    )


class ShadowConfig(BaseModel):
    """Mirror a share of the model's live traffic to a candidate version (answers discarded)."""

    model_config = ConfigDict(extra="forbid")

    version: Union[int, str] = Field(description="The candidate: a version number or alias listed in `versions`.")
    share: float = Field(default=1.0, ge=0.0, le=1.0, description="Share of requests mirrored, 0..1.")
    min_overlap: Optional[float] = Field(
        default=None, ge=0.0, le=1.0,
        description="Generative models: the word overlap (0..1) at which a sampled mirrored generation agrees "
        "with the primary (default 0.5; greedy ones agree when identical). Not for classifiers.")


class VersionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Union[int, str] = Field(description="Version number or registry alias (resolved at build time).")
    weight: float = Field(default=1.0, ge=0.0, description="Traffic share; 0 = reachable only by pin.")


class ModelConfig(BaseModel):
    """One served model: its versions, traffic split, processors, placement and scaling."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: ModelName = Field(description="Registry model name (also the URL name).")
    versions: list[VersionConfig] = Field(min_length=1, description="Versions to deploy with their weights.")
    placement: Optional[Literal["split", "fused", "ingress"]] = Field(
        default=None,
        description="split: pre/post as their own deployments; fused: pre+infer+post in the inference "
        "replica; ingress: everything in the ingress replica (fewest hops). Default: ingress on CPU "
        "(fastest in benchmarks/ for both workloads), fused when inference asks for a GPU.",
    )
    preprocessor: Optional[ProcessorSpec] = Field(default=None, description="Override the manifest's.")
    postprocessor: Optional[ProcessorSpec] = Field(default=None, description="Override the manifest's.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="onnxruntime provider choice.")
    intra_op_threads: Optional[int] = Field(default=None, ge=1, description="Default: the replica's num_cpus.")
    intra_op_spinning: bool = Field(
        default=False,
        description="Let onnxruntime's intra-op threads spin-wait between runs (its own default): a "
        "little less latency on cores the replica has to itself, but the spinning threads take CPU "
        "from co-located replicas (ingress, proxy). Off by default.",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_items: Optional[int] = Field(
        default=None, ge=1, description="This model's limit on items per request (default: limits.max_items)."
    )
    max_text_chars: Optional[int] = Field(
        default=None, ge=1, description="This model's limit on string characters per request "
        "(default: limits.max_text_chars).",
    )
    payload_log: Optional[PayloadLogConfig] = Field(
        default=None, description="Log this model's requests and/or responses (docs/security.md, "
        "\"Payload logging\"); off by default.",
    )
    shadow: Optional[ShadowConfig] = Field(
        default=None, description="Mirror traffic to a candidate (changes live through the Ingress user_config)."
    )
    generation: Optional[dict[str, Any]] = Field(
        default=None,
        description="Generative versions only (manifest kind: generative): the generation engine's knobs, "
        "the fields of maas_ray.serving.generate.engine.EngineConfig (KV cache budget, running batch size, "
        "waiting queue, prefill chunk, ...; docs/generative-serving.md). Checked at build time; unset = "
        "the engine's defaults. Ignored for classifiers.",
    )
    inference: DeploymentOptions = Field(default_factory=DeploymentOptions)
    preprocess: DeploymentOptions = Field(default_factory=DeploymentOptions)
    postprocess: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @model_validator(mode="after")
    def _placement(self) -> "ModelConfig":
        wants_gpu = self.device == "cuda" or self.inference.ray_actor_options.get("num_gpus", 0) > 0
        if self.placement is None:
            self.placement = "fused" if wants_gpu else "ingress"
        if self.placement == "ingress":
            unused = [n for n in ("inference", "preprocess", "postprocess") if getattr(self, n) != DeploymentOptions()]
            if unused:
                raise ValueError(
                    f"model {self.name!r}: {unused} options do not apply to placement 'ingress' (the ingress "
                    "replica runs the model): size the app's `ingress` deployment, or use placement 'fused'"
                )
        return self

    @model_validator(mode="after")
    def _weights(self) -> "ModelConfig":
        if sum(v.weight for v in self.versions) <= 0:
            raise ValueError(f"model {self.name!r}: all version weights are 0; at least one must be > 0")
        refs = [str(v.version) for v in self.versions]
        if len(set(refs)) != len(refs):
            raise ValueError(f"model {self.name!r}: versions listed twice: {refs}")
        if self.shadow is not None and str(self.shadow.version) not in refs:
            raise ValueError(
                f"model {self.name!r}: shadow.version {self.shadow.version!r} is not in versions {refs} "
                "(list it with weight 0 to deploy it without live traffic)"
            )
        return self


MIB = 1 << 20


class Limits(BaseModel):
    """Per-request limits the ingress enforces before any parsing or decoding work."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(
        default=16 * MIB, ge=1024,
        description="Largest request body: 413 from Content-Length before reading, or while reading a chunked body.",
    )
    max_tensor_elements: int = Field(
        default=1 << 22, ge=1, description="Most elements in all input tensors of one request together (413)."
    )
    max_tensor_dims: int = Field(default=16, ge=1, le=32, description="Most dimensions in one tensor's shape.")
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1,
        description="Largest image (width x height), checked from its header before decoding (413).",
    )
    max_json_depth: int = Field(
        default=32, ge=2, le=256, description="Deepest JSON nesting accepted in a request body (400)."
    )
    request_timeout_s: Optional[float] = Field(
        default=30.0, gt=0, description="A request not answered within this many seconds gets 504; null: no limit."
    )
    max_queued_requests: Optional[int] = Field(
        default=1024, ge=1,
        description="Requests waiting for a busy ingress replica beyond this get 503 with Retry-After (Serve's "
        "max_queued_requests); null: unbounded.",
    )
    rate_limit_rps: Optional[float] = Field(
        default=None, gt=0,
        description="Per API key (or per client address when keys are off): sustained requests per second per "
        "ingress replica; over it: 429 with Retry-After. null: no rate limit.",
    )
    rate_limit_burst: Optional[int] = Field(
        default=None, ge=1, description="Requests a key may send at once above the rate (default: 2 s of rate)."
    )
    rate_limit_tokens_per_minute: Optional[int] = Field(
        default=None, ge=1,
        description="Generative routes: per API key (or client address when keys are off), prompt + generated "
        "tokens per minute per ingress replica. A finished generation is charged its tokens; a key whose budget "
        "is used up gets 429 with Retry-After until it refills (a key may burst up to one minute's budget). "
        "null: no token limit.",
    )
    max_items: int = Field(
        default=1024, ge=1,
        description="Most items (rows along the batch dimension) in one infer request: 413 right after decoding. "
        "Bounds a request's work, not only its bytes: the compute-bound transformer of benchmarks/README.md "
        "(4 layers, d_model 256, seq 128) runs 115-180 items/s on one core, so 1024 items take 6-9 s, inside "
        "the 30 s request_timeout_s. Per model: models[].max_items.",
    )
    max_text_chars: int = Field(
        default=1 << 18, ge=1,
        description="Most characters (bytes for binary items) in all string/bytes items of one request "
        "together (what the text preprocessor tokenizes, the image preprocessor decodes): 413 right after "
        "decoding. Per model: models[].max_text_chars.",
    )


class AuthConfig(BaseModel):
    """API keys at the ingress. Off by default for local `serve run`; on in every cluster/ config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Require an API key on every route but /v2/health/*.")
    keys_file: Optional[str] = Field(
        default=None,
        description="Key file written by `maas keys create` (hashes only): a local path or s3:// / gs:// URI.",
    )
    keys_env: str = Field(
        default="MAAS_API_KEYS", description="Environment variable that may hold the key file's JSON instead."
    )
    reload_interval_s: float = Field(
        default=10.0, gt=0, description="How often replicas re-read the key file (revocations take effect)."
    )

    @model_validator(mode="after")
    def _source(self) -> "AuthConfig":
        if self.enabled and not self.keys_file and not self.keys_env:
            raise ValueError("auth.enabled needs auth.keys_file or auth.keys_env")
        return self


class ArtifactSecurity(BaseModel):
    """How replicas open registry artifacts: the KEK for encrypted versions, and the public keys
    a version's manifest must be signed by (docs/security.md)."""

    model_config = ConfigDict(extra="forbid")

    trusted_signing_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (paths readable on every node, or PEM text); when set, a version "
        "not signed by one of them is 'failed' (not served, reason in its metadata) and the rest keep serving.",
    )
    kek_uri: Optional[str] = Field(
        default=None,
        description="Key-encryption key(s) for encrypted versions: file:///path or env:NAME, comma-separated "
        "for several. Default: $MAAS_KEK_URI in the replica's environment.",
    )

    @field_validator("kek_uri")
    @classmethod
    def _kek_scheme(cls, v: Optional[str]) -> Optional[str]:
        for part in (v or "").split(","):
            if part.strip() and not (part.strip().startswith("env:") or "://" in part):
                raise ValueError(f"kek_uri {part.strip()!r}: expected file:///path, env:NAME "
                                 "or a registered KMS scheme (scheme://...)")
        return v


class HotModels(BaseModel):
    """When a dynamic version gets more replicas than one (its measured rate x replica time per request)."""

    model_config = ConfigDict(extra="forbid")

    target_utilization: float = Field(
        default=0.7, gt=0, le=1,
        description="Share of one replica's time a version may use before it is held by one more replica: a "
        "version needs ceil(rate x busy seconds per request / target_utilization) replicas.",
    )
    max_replicas_per_model: Optional[int] = Field(
        default=None, ge=1, description="Most replicas one version is spread over (default: the pool's replicas).")
    window_s: float = Field(default=10.0, gt=0, description="The window a version's request rate is measured over.")


class DynamicModels(BaseModel):
    """Serve every registry model matching ``models`` (and published later) from one pool of replicas:
    a version loads into a replica on its first request and the least recently used idle version is
    evicted when the replica's memory budget is full (docs/many-models.md)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1,
        description="Registry model names to serve, as shell patterns (fnmatch): ['*'] = every model of the "
        "registry, ['fraud-*', 'churn']. A model the app lists in `models` is served as configured there.",
    )
    exclude: list[str] = Field(default_factory=list, description="Patterns of model names not to serve.")
    version: str = Field(
        default="production",
        description="The alias an unpinned request reaches; a model without that alias: its latest version. "
        "Requests may pin any version (/versions/{v}/, gRPC model_version) and user_config.traffic may split "
        "a dynamic model's traffic like a configured one's.",
    )
    memory_budget_bytes: int = Field(
        default=2 << 30, ge=1 << 20,
        description="Per pool replica: bytes its loaded versions may hold (measured when each loads: the "
        "session, its buffers and the processors' files); beyond it the least recently used idle version is "
        "evicted. A version with requests in flight is never evicted.",
    )
    max_models_per_replica: Optional[int] = Field(
        default=None, ge=1, description="A second bound: most versions one pool replica holds (null: bytes only).")
    load_timeout_s: float = Field(
        default=30.0, gt=0,
        description="A request for a version that is not loaded waits this long for its load, then 503 with "
        "Retry-After (the load goes on and serves the next request).",
    )
    max_concurrent_loads: int = Field(default=2, ge=1, description="Loads one pool replica runs at once.")
    failure_ttl_s: float = Field(
        default=10.0, ge=0,
        description="A version that failed to load answers 503 with the reason for this long before a request "
        "tries to load it again.",
    )
    refresh_interval_s: float = Field(
        default=5.0, gt=0, description="How often the ingress re-reads the registry's model list and aliases.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Per version, as for models[].")
    hot: HotModels = Field(default_factory=HotModels, description="Hot versions on more replicas.")
    pool: DeploymentOptions = Field(
        default_factory=DeploymentOptions,
        description="The pool deployment's Serve options (num_replicas or autoscaling_config on its total load, "
        "max_ongoing_requests, ray_actor_options).",
    )
    max_items: Optional[int] = Field(default=None, ge=1, description="Per-request item limit (default: limits).")
    max_text_chars: Optional[int] = Field(
        default=None, ge=1, description="Per-request string characters limit (default: limits).")
    metrics_max_models: int = Field(
        default=100, ge=0, le=1000,
        description="Dynamic models labelled by name in each replica's metrics; the others share model "
        "'_other' (models a traffic split or shadow names are always labelled). Ray's metrics agent keeps "
        "2,000 label sets per metric name for its lifetime (deployments/monitoring/README.md).",
    )

    @field_validator("models", "exclude")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not isinstance(pattern, str) or not pattern or len(pattern) > 128 or "/" in pattern:
                raise ValueError(f"model name pattern {pattern!r}: expected 1-128 characters without '/'")
        return v

    def version_config(self, name: str, version: int) -> "ModelConfig":
        """The per-version config a pool replica and the ingress use for a dynamic version: the
        manifest's processors, this section's batching, limits and pool options."""
        return ModelConfig(name=name, versions=[VersionConfig(version=version)], placement="fused",
                           batching=self.batching, inference=self.pool, max_items=self.max_items,
                           max_text_chars=self.max_text_chars)

    def matches(self, name: str) -> bool:
        import fnmatch

        return (any(fnmatch.fnmatchcase(name, p) for p in self.models)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))


class AppArgs(BaseModel):
    """Arguments of :func:`maas_ray.serving.build_app`."""

    model_config = ConfigDict(extra="forbid")

    registry_root: Optional[str] = Field(default=None, description="Default: $MAAS_REGISTRY_ROOT.")
    models: list[ModelConfig] = Field(
        default_factory=list, description="Models served by this app, each with its versions, placement and scaling.")
    dynamic: Optional[DynamicModels] = Field(
        default=None, description="Serve the registry's other models from a pool of replicas that load them on "
        "demand (many models on few replicas; docs/many-models.md).")
    ingress: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Ingress deployment options.")
    request_key_header: str = Field(default="x-request-key", description="Header that makes the split sticky.")
    limits: Limits = Field(default_factory=Limits, description="Request size, time and rate limits.")
    alias_poll_interval_s: float = Field(
        default=2.0, gt=0,
        description="How often replicas re-read the registry aliases that versions are given by; traffic "
        "follows a moved alias once the version it names is loaded (ingress placement loads it in process).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys and scopes.")
    security: ArtifactSecurity = Field(
        default_factory=ArtifactSecurity, description="Encrypted and signed artifacts: KEK and trusted keys.")

    @model_validator(mode="after")
    def _unique_models(self) -> "AppArgs":
        if not self.models and self.dynamic is None:
            raise ValueError("an app serves `models`, `dynamic`, or both: neither is set")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models listed twice: {names}")
        return self

    def shadow_targets(self) -> dict[str, dict[str, Any]]:
        """The models' build-time ``shadow:`` settings, as the Ingress user_config writes them."""
        return {m.name: {"version": str(m.shadow.version), "share": m.shadow.share,
                         **({} if m.shadow.min_overlap is None else {"min_overlap": m.shadow.min_overlap})}
                for m in self.models if m.shadow is not None}

    def ingress_user_config(self) -> dict[str, Any]:
        """The Ingress ``user_config`` these args imply; a YAML ``user_config`` is merged over it
        (see :meth:`maas_ray.serving.core.IngressCore.reconfigure`). Version references stay as
        configured: aliases stay aliases, which the ingress follows when they move."""
        return {
            "traffic": {m.name: {str(v.version): v.weight for v in m.versions} for m in self.models},
            "batching": {m.name: m.batching.model_dump() for m in self.models if m.placement == "ingress"},
            "shadow": self.shadow_targets(),
        }

"""Admission at the edge: API keys and rate limits, before any body is read or parsed.

Every transport (HTTP, gRPC) calls :meth:`Admission.admit` first; a refused request costs
no decoding (401 / 403 / 429). Handle calls from inside the cluster skip it: Ray's token
authentication guards those.
"""

from __future__ import annotations

from typing import Optional

from maas_ray.serving.config import AppArgs
from maas_ray.serving.keys import ANONYMOUS, KeyStore, Principal, resolve_auth
from maas_ray.serving.limits import RateLimiter


class Admission:
    """Keys (when on) and the per-key or per-client rate limiter (when set)."""

    def __init__(self, args: AppArgs) -> None:
        auth = resolve_auth(args.auth)  # cluster nodes may switch keys on through MAAS_AUTH_*
        self.keys: Optional[KeyStore] = KeyStore.from_config(auth) if auth.enabled else None
        self.rate: Optional[RateLimiter] = RateLimiter.from_limits(args.limits)

    def admit(self, api_key: Optional[str], client: str, model: Optional[str], *, admin: bool = False) -> Principal:
        """The caller's principal, or 401 (no/unknown key), 403 (scope), 429 (rate)."""
        principal = ANONYMOUS if self.keys is None else self.keys.authenticate(api_key)
        if admin:
            principal.check_admin()
        elif model is not None:
            principal.check_model(model)
        if self.rate is not None:
            self.rate.check(principal.key_id if self.keys is not None else client)
        return principal

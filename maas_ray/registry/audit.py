"""The registry's audit trail: one JSON object per change, never rewritten.

pyarrow filesystems and object stores have no atomic append, so each event is its own object::

    <root>/_audit/<yyyy-mm-dd>/<yyyymmddThhmmss.ffffffZ>-<uuid>.json

A name sorts by time, and writers never contend for one file. Events: ``publish``,
``delete`` (a version), ``alias.set``, ``alias.delete``, ``kek.rotate``, ``rollout.<decision>``, ``key.create``,
``key.revoke``. The actor is the API key id when a change came through a keyed path, else
``$MAAS_ACTOR``, else the OS user. ``maas audit`` lists and filters them.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from pydantic import BaseModel, Field, ValidationError

from maas_ray.errors import ConfigError, RegistryError

logger = logging.getLogger(__name__)

AUDIT_DIR = "_audit"
ACTOR_ENV = "MAAS_ACTOR"


class AuditEvent(BaseModel):
    """One registry change."""

    time: datetime = Field(description="When, UTC.")
    actor: str = Field(description="API key id, $MAAS_ACTOR or the OS user.")
    action: str = Field(description="publish, delete, alias.set, alias.delete, kek.rotate, rollout.*, key.create, ...")
    model: Optional[str] = Field(default=None, description="The model changed, if any.")
    target: str = Field(description="What changed: model:version, model@alias, a key id.")
    before: Any = Field(default=None, description="The state before (None: it did not exist).")
    after: Any = Field(default=None, description="The state after (None: it is gone).")

    def line(self) -> str:
        """One human-readable line."""
        return (f"{self.time.isoformat(timespec='seconds')}  {self.actor}  {self.action}  {self.target}  "
                f"{json.dumps(self.before, default=str)} -> {json.dumps(self.after, default=str)}")


def current_actor(actor: Optional[str] = None) -> str:
    """``actor`` if given, else ``$MAAS_ACTOR``, else the OS user."""
    if actor:
        return actor
    if os.environ.get(ACTOR_ENV):
        return os.environ[ACTOR_ENV]
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without /etc/passwd entry)
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _parse_since(since: Optional[str]) -> Optional[datetime]:
    if since is None:
        return None
    try:
        when = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"since: not an ISO date or time: {since!r}") from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


class AuditLog:
    """The audit events of one registry (a :class:`~maas_ray.registry.Registry`, whose path and
    I/O helpers it uses; not imported here, as the store imports this module)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def append(
        self, action: str, target: str, *, model: Optional[str] = None, before: Any = None, after: Any = None,
        actor: Optional[str] = None,
    ) -> AuditEvent:
        """Write one event. A failure to write it is logged, not raised: the change it records
        has already happened, and raising would invite a retry that repeats it."""
        event = AuditEvent(time=datetime.now(timezone.utc), actor=current_actor(actor), action=action,
                           model=model, target=target, before=before, after=after)
        name = f"{event.time:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex}.json"
        path = self.registry._path(AUDIT_DIR, f"{event.time:%Y-%m-%d}", name)
        try:
            self.registry._write(path, event.model_dump_json().encode())
        except RegistryError as exc:
            logger.error("could not write audit event %s %s: %s", action, target, exc)
        return event

    def events(
        self, *, model: Optional[str] = None, action: Optional[str] = None, since: Optional[str] = None,
        actor: Optional[str] = None, limit: Optional[int] = None,
    ) -> list[AuditEvent]:
        """Events matching every filter given, oldest first; ``limit`` keeps the newest N.
        ``action`` matches exactly or as a prefix before a dot (``alias`` matches ``alias.set``)."""
        import pyarrow.fs as pafs

        after = _parse_since(since)
        base = self.registry._path(AUDIT_DIR)
        days = sorted(i.path for i in self.registry._children(base) if i.type == pafs.FileType.Directory)
        if after is not None:
            days = [d for d in days if d.rsplit("/", 1)[-1] >= f"{after.astimezone(timezone.utc):%Y-%m-%d}"]
        files = sorted((i.path for d in days for i in self.registry._children(d) if i.path.endswith(".json")),
                       key=lambda p: p.rsplit("/", 1)[-1])
        out = []
        for path in files:
            try:
                event = AuditEvent.model_validate_json(self.registry._read(path))
            except (ValidationError, RegistryError) as exc:
                logger.warning("skipping unreadable audit event %r: %s", path, exc)
                continue
            if model is not None and event.model != model:
                continue
            if action is not None and event.action != action and not event.action.startswith(action + "."):
                continue
            if actor is not None and event.actor != actor:
                continue
            if after is not None and event.time < after:
                continue
            out.append(event)
        return out[-limit:] if limit else out

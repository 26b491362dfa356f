"""API keys and roles (annotator < operator < admin)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.tables import ApiKey

ROLES = ("annotator", "operator", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}


def hash_key(key: str) -> str:
    """Keys are stored hashed; the plain key is shown once."""
    return hashlib.sha256(key.encode()).hexdigest()


def role_allows(have: str, need: str) -> bool:
    """Whether role ``have`` includes the rights of ``need``."""
    return _RANK.get(have, -1) >= _RANK[need]


def create_key(session: Session, name: str, role: str, project_id: int | None = None,
               plain: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the plain key (not stored)."""
    if role not in _RANK:
        raise ValueError(f"unknown role {role!r}")
    plain = plain or "pl_" + secrets.token_urlsafe(32)
    row = ApiKey(name=name, key_hash=hash_key(plain), prefix=plain[:8], role=role,
                 project_id=project_id)
    session.add(row)
    session.flush()
    return row, plain


def lookup_key(session: Session, plain: str) -> ApiKey | None:
    """The active key row for a plain key, if any."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plain)))
    if row is None or row.revoked:
        return None
    return row


def ensure_admin_key(session: Session, configured: str) -> str | None:
    """Create the first admin key when the database has none.

    Returns the plain key when one was generated (to be shown once), else None.
    """
    if configured:
        if lookup_key(session, configured) is None:
            create_key(session, "admin (from settings)", "admin", plain=configured)
        return None
    if session.scalar(select(ApiKey.id).where(ApiKey.role == "admin").limit(1)) is not None:
        return None
    _, plain = create_key(session, "first admin", "admin")
    return plain


class KeyCache:
    """Short-lived cache of key lookups: one query less on every request.

    A revoked key stops working in this process at once and in others within ``ttl`` seconds.
    """

    def __init__(self, ttl: float = 10.0, size: int = 1024) -> None:
        self.ttl, self.size = ttl, size
        self._items: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()

    def cached(self, plain: str) -> ApiKey | None:
        """The cached row for a key while fresh, without touching the database."""
        hit = self._items.get(hash_key(plain))
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

    def lookup(self, session: Session, plain: str) -> ApiKey | None:
        """Like :func:`lookup_key`, served from the cache while fresh."""
        digest = hash_key(plain)
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = lookup_key(session, plain)
        if row is not None:
            session.expunge(row)  # detached, read-only snapshot shared by requests
            with self._lock:
                if len(self._items) >= self.size:
                    self._items.clear()
                self._items[digest] = (now + self.ttl, row)
        return row

    def clear(self) -> None:
        """Forget every cached key (after a revocation)."""
        with self._lock:
            self._items.clear()

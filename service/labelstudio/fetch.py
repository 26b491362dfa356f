"""Fetching a task's image from Label Studio (or an allowed host), never from anywhere else.

A task names its image by a path on the Label Studio server (``/data/upload/...``,
``/data/local-files/?d=...``) or by a URL. Every URL, redirects included, must name a host
on the allow-list (``PRELABEL_LABELSTUDIO_URL``'s host and ``PRELABEL_LABELSTUDIO_ALLOWED_HOSTS``):
fetching is a request made for a caller, so anything else is refused (DESIGN section 5, item 11).
The Label Studio key is sent to the Label Studio host only.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urljoin, urlsplit

import httpx

from service.settings import Settings

MAX_REDIRECTS = 3
# Label Studio's personal access tokens are JWT refresh tokens; the access tokens they give
# live 5 minutes by default: renew a little before.
ACCESS_TOKEN_TTL_S = 240.0
# access tokens per (Label Studio, key), shared by requests: one renewal per 4 minutes
_ACCESS: dict[tuple[str, str], tuple[str, float]] = {}
_ACCESS_LOCK = threading.Lock()


class FetchError(Exception):
    """An image could not be fetched; ``code`` is stable, ``status`` the HTTP status to answer."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def host_of(url: str) -> str:
    """``host[:port]`` of a URL, lower case, the scheme's default port left out ("" if none)."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:  # a malformed IPv6 literal or port
        return ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if port is None or port == default else f"{host}:{port}"


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """The hosts image URLs may name."""
    hosts = {h.strip().lower() for h in settings.labelstudio_allowed_hosts.split(",") if h.strip()}
    if settings.labelstudio_url:
        hosts.add(host_of(settings.labelstudio_url))
    return frozenset(hosts)


def looks_like_jwt(key: str) -> bool:
    """Personal access tokens (JWT) vs legacy tokens (40 hex characters)."""
    return key.count(".") == 2 and key.startswith("eyJ")


class ImageFetcher:
    """Fetches task images with the Label Studio key, checking every hop against the hosts."""

    def __init__(self, settings: Settings, base_url: str = "") -> None:
        self.base = (settings.labelstudio_url or base_url).rstrip("/")
        self.key = settings.labelstudio_api_key
        self.allowed = allowed_hosts(settings)
        self.max_bytes = settings.max_upload_bytes
        self.timeout = settings.labelstudio_fetch_timeout_s

    def resolve(self, value: object) -> str:
        """The absolute URL of a task's image field."""
        if not isinstance(value, str) or not value:
            raise FetchError("image_missing", "the task has no image URL in its data field")
        if value.startswith(("http://", "https://")):
            return value
        if value.startswith("/"):
            if not self.base:
                raise FetchError("labelstudio_url_unset",
                                 f"the image {value[:120]!r} is a Label Studio path: set "
                                 "PRELABEL_LABELSTUDIO_URL to the Label Studio address", 503)
            return self.base + value
        scheme = value.split(":", 1)[0] if ":" in value else ""
        raise FetchError("unsupported_image_url",
                         f"cannot fetch {value[:120]!r}: only Label Studio paths and http(s) "
                         f"URLs are supported{f' (not {scheme}:)' if scheme else ''}")

    def fetch(self, client: httpx.Client, url: str) -> bytes:
        """The image bytes, within the upload size limit (raises :class:`FetchError`)."""
        for _ in range(MAX_REDIRECTS + 1):
            host = host_of(url)
            if not host or not url.startswith(("http://", "https://")):
                raise FetchError("unsupported_image_url", f"cannot fetch {url[:120]!r}")
            if host not in self.allowed:
                raise FetchError("image_host_not_allowed",
                                 f"images may not be fetched from {host!r}: add it to "
                                 "PRELABEL_LABELSTUDIO_ALLOWED_HOSTS if it is trusted", 422)
            location, data = self._get(client, url, retry_auth=True)
            if location is None:
                return data
            url = urljoin(url, location)
        raise FetchError("image_fetch_failed", f"more than {MAX_REDIRECTS} redirects for the image",
                         502)

    def _get(self, client: httpx.Client, url: str, retry_auth: bool) -> tuple[str | None, bytes]:
        """(redirect location, b"") or (None, the body)."""
        headers = self._auth(client) if self.base and host_of(url) == host_of(self.base) else {}
        try:
            with client.stream("GET", url, headers=headers, timeout=self.timeout,
                               follow_redirects=False) as r:
                if r.is_redirect:
                    return r.headers.get("location", ""), b""
                if r.status_code in (401, 403):
                    if retry_auth and _ACCESS.pop((self.base, self.key), None) is not None:
                        return self._get(client, url, retry_auth=False)  # renewed once
                    raise FetchError("image_fetch_unauthorized",
                                     f"{host_of(url)} answered {r.status_code} for the image: "
                                     "check PRELABEL_LABELSTUDIO_API_KEY", 502)
                if r.status_code != 200:
                    raise FetchError("image_fetch_failed",
                                     f"{host_of(url)} answered {r.status_code} for the image", 502)
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise FetchError("image_too_large",
                                         "the image is over the upload size limit", 413)
                return None, bytes(data)
        except httpx.HTTPError as exc:
            raise FetchError("image_fetch_failed",
                             f"could not fetch the image from {host_of(url)}: "
                             f"{type(exc).__name__}", 502) from exc

    def _auth(self, client: httpx.Client) -> dict[str, str]:
        if not self.key:
            return {}
        if not looks_like_jwt(self.key):
            return {"Authorization": f"Token {self.key}"}
        with _ACCESS_LOCK:
            cached = _ACCESS.get((self.base, self.key))
            if cached is None or cached[1] < time.monotonic():
                try:
                    r = client.post(f"{self.base}/api/token/refresh/",
                                    json={"refresh": self.key}, timeout=self.timeout)
                except httpx.HTTPError as exc:
                    raise FetchError("image_fetch_failed", "could not reach Label Studio to "
                                     f"renew the access token: {type(exc).__name__}",
                                     502) from exc
                try:
                    access = r.json().get("access") if r.status_code == 200 else None
                except ValueError:  # not JSON: not Label Studio's token endpoint
                    access = None
                if not isinstance(access, str):
                    raise FetchError("image_fetch_unauthorized",
                                     f"Label Studio refused the personal access token "
                                     f"({r.status_code}): check PRELABEL_LABELSTUDIO_API_KEY", 502)
                cached = (access, time.monotonic() + ACCESS_TOKEN_TTL_S)
                _ACCESS[(self.base, self.key)] = cached
            return {"Authorization": f"Bearer {cached[0]}"}

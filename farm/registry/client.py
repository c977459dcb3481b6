"""A small OCI distribution client on httpx: the requests farm needs, each checking its answer.

Plain HTTP is used for loopback registries (as docker and BuildKit do) and for hosts the user
named with ``--insecure-registry``; everything else is HTTPS with verified certificates.
Manifests are kept as the exact bytes the registry served, checked against their digest, and
PUT back byte for byte: re-serialising a manifest changes its digest.

Requests go through ``auth.RegistryAuth`` (credentials from docker's config and helpers, Basic
and bearer tokens) on top of ``transport.RetryTransport`` (transient failures retried), as ggcr
stacks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from farm import mediatypes
from farm.errors import RegistryError
from farm.registry.auth import CredentialSource, RegistryAuth, refusal_hint
from farm.registry.credentials import DockerKeychain
from farm.registry.name import Reference, is_loopback_host
from farm.registry.transport import RetryPolicy, build_transport, retry_note

__all__ = ["Manifest", "ManifestInfo", "RegistryClient"]

_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@dataclass(frozen=True)
class ManifestInfo:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        document = json.loads(self.raw)
        if not isinstance(document, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return document


class RegistryClient:
    """One client per farm invocation; ``async with`` it to open and close its connections."""

    def __init__(
        self,
        *,
        insecure_registries: Iterable[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
        credentials: CredentialSource | None = None,
        ca_file: str | Path | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """``transport`` replaces httpx's own under the retries (tests); ``ca_file`` is a PEM
        bundle trusted besides the system's; ``credentials`` default to docker's config."""
        self._insecure = frozenset(insecure_registries)
        self._push_authorizing = asyncio.Lock()
        self._http = httpx.AsyncClient(
            timeout=_TIMEOUT,
            transport=build_transport(ca_file=ca_file, retry=retry, inner=transport),
            auth=RegistryAuth(credentials or DockerKeychain()),
            follow_redirects=True,
            headers={"User-Agent": "farm"},
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._http.aclose()

    def is_plain_http(self, registry: str) -> bool:
        return registry in self._insecure or is_loopback_host(registry)

    def base_url(self, ref: Reference) -> str:
        scheme = "http" if self.is_plain_http(ref.registry) else "https"
        return f"{scheme}://{ref.api_host}"

    async def ping(self, ref: Reference) -> None:
        """Check that the registry answers the API at all (401 counts: it is there)."""
        response = await self._send("GET", ref, "/v2/")
        if response.status_code == 401 and "authorization" in response.request.headers:
            raise _status_error(response, f"{ref.registry} refused farm's credentials")
        if response.status_code not in (200, 401):
            raise _status_error(response, f"{ref.registry} does not answer the registry API")

    async def head_manifest(self, ref: Reference) -> ManifestInfo | None:
        """The descriptor of a manifest by tag or digest, or None if the repository lacks it."""
        response = await self._send(
            "HEAD", ref, f"/v2/{ref.repository}/manifests/{ref.identifier}",
            headers={"Accept": mediatypes.MANIFEST_ACCEPT},
        )  # fmt: skip
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise _status_error(response, f"cannot look up {ref}")
        digest = response.headers.get("docker-content-digest") or ref.digest
        if ref.digest and digest != ref.digest:
            raise RegistryError(f"{ref} is served as {digest}")
        return ManifestInfo(
            digest=digest,
            size=int(response.headers.get("content-length", "0")),
            media_type=response.headers.get("content-type", "").split(";")[0],
        )

    async def get_manifest(self, ref: Reference) -> Manifest:
        response = await self._send(
            "GET", ref, f"/v2/{ref.repository}/manifests/{ref.identifier}",
            headers={"Accept": mediatypes.MANIFEST_ACCEPT},
        )  # fmt: skip
        if response.status_code == 404:
            raise RegistryError(f"{ref} not found", status=404, request=f"GET {response.url}")
        if response.status_code != 200:
            raise _status_error(response, f"cannot fetch {ref}")
        raw = response.content
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest and digest != ref.digest:
            raise RegistryError(f"{ref} was served with content that hashes to {digest}")
        media_type = response.headers.get("content-type", "").split(";")[0]
        if media_type not in mediatypes.INDEX_TYPES | mediatypes.MANIFEST_TYPES:
            declared = json.loads(raw).get("mediaType", "")
            media_type = declared or media_type
        return Manifest(raw, media_type, digest)

    async def get_blob(self, ref: Reference, digest: str) -> bytes:
        async with self.stream_blob(ref, digest) as chunks:
            return b"".join([chunk async for chunk in chunks])

    @asynccontextmanager
    async def stream_blob(self, ref: Reference, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """The blob's bytes as they arrive; the hash is checked when the stream is exhausted."""
        url = f"{self.base_url(ref)}/v2/{ref.repository}/blobs/{digest}"
        try:
            async with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _status_error(response, f"cannot fetch blob {digest} of {ref.name}")
                yield _verified(response.aiter_bytes(), digest, ref)
        except httpx.TransportError as exc:
            raise _unreachable(ref, exc) from exc

    async def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> str:
        """PUT a manifest under ``ref``'s tag or digest; return the digest the registry stored."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        response = await self._send(
            "PUT", ref, f"/v2/{ref.repository}/manifests/{ref.identifier}",
            content=raw, headers={"Content-Type": media_type},
        )  # fmt: skip
        if response.status_code not in (200, 201, 202):
            raise _status_error(response, f"cannot push {ref}")
        stored = response.headers.get("docker-content-digest", digest)
        if stored != digest:
            raise RegistryError(f"{ref}: the registry stored {stored}, farm sent {digest}")
        return digest

    async def push_authorization(self, ref: Reference) -> str | None:
        """The ``Authorization`` value that lets a node push into ``ref``'s repository, for now.

        It is what farm's own auth flow settles on for a push (a short-lived bearer token, or
        basic credentials): farm opens an upload session, reads the header that was accepted,
        and cancels the session. None for a registry that wants no credentials.
        """
        # One at a time: nodes whose tokens expired together ask together, and one new token
        # serves them all (the auth flow caches it).
        async with self._push_authorizing:
            response = await self._send("POST", ref, f"/v2/{ref.repository}/blobs/uploads/")
        if response.status_code != 202:
            raise _status_error(response, f"cannot push to {ref.name}")
        location = response.headers.get("location")
        if location:
            with contextlib.suppress(httpx.HTTPError):
                await self._http.delete(str(response.url.join(location)))
        value = response.request.headers.get("authorization")
        return str(value) if value else None

    async def has_blob(self, ref: Reference, digest: str) -> bool:
        response = await self._send("HEAD", ref, f"/v2/{ref.repository}/blobs/{digest}")
        if response.status_code in (200, 404):
            return response.status_code == 200
        raise _status_error(response, f"cannot look up blob {digest} in {ref.name}")

    async def mount_blob(self, ref: Reference, digest: str, source: Reference) -> bool:
        """Ask the registry to mount ``digest`` from ``source``'s repository; True if it did.

        Registries may refuse (another host, no access to the source, no mount support): the
        caller then uploads. An upload session the registry opened instead is cancelled.
        """
        if source.registry != ref.registry:
            return False
        response = await self._send(
            "POST", ref, f"/v2/{ref.repository}/blobs/uploads/?mount={digest}&from={source.repository}"
        )
        if response.status_code == 201:
            return True
        location = response.headers.get("location")
        if response.status_code == 202 and location:
            with contextlib.suppress(RegistryError):
                await self._http.delete(str(response.url.join(location)))
        return False

    async def copy_blob(self, ref: Reference, digest: str, size: int, source: Reference) -> None:
        """Upload ``digest`` from ``source``'s repository into ``ref``'s (monolithic POST + PUT)."""
        response = await self._send("POST", ref, f"/v2/{ref.repository}/blobs/uploads/")
        location = response.headers.get("location")
        if response.status_code != 202 or not location:
            raise _status_error(response, f"cannot start uploading {digest} to {ref.name}")
        upload = response.url.join(location)
        upload = upload.copy_merge_params({"digest": digest})
        async with self.stream_blob(source, digest) as chunks:
            try:
                put = await self._http.put(
                    upload,
                    content=chunks,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                )
            except httpx.TransportError as exc:
                raise _unreachable(ref, exc) from exc
        if put.status_code not in (201, 204):
            raise _status_error(put, f"cannot upload {digest} to {ref.name}")

    async def _send(
        self,
        method: str,
        ref: Reference,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        url = self.base_url(ref) + path
        try:
            return await self._http.request(method, url, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise _unreachable(ref, exc) from exc


async def _verified(chunks: AsyncIterator[bytes], digest: str, ref: Reference) -> AsyncIterator[bytes]:
    hasher = hashlib.sha256()
    async for chunk in chunks:
        hasher.update(chunk)
        yield chunk
    actual = "sha256:" + hasher.hexdigest()
    if actual != digest:
        raise RegistryError(f"blob {digest} of {ref.name} was served with content hashing to {actual}")


def _unreachable(ref: Reference, exc: httpx.TransportError) -> RegistryError:
    try:
        request = f"{exc.request.method} {exc.request.url}"
    except RuntimeError:  # httpx raises when the error carries no request
        request = None
    return RegistryError(
        f"cannot reach registry {ref.registry}: {exc or type(exc).__name__}"
        + (f" ({request})" if request else ""),
        request=request,
        hint=f"check that {ref.registry} is up and reachable from this machine"
        + ("" if is_loopback_host(ref.registry) else "; for a plain-HTTP registry pass --insecure-registry"),
    )


def _status_error(response: httpx.Response, what: str) -> RegistryError:
    detail = response.text.strip()[:300] if response.request.method != "HEAD" else ""
    message = f"{what}: {response.request.method} {response.url} answered HTTP {response.status_code}"
    if retry_note(response):
        message = f"{message} ({retry_note(response)})"
    hint = refusal_hint(response) if response.status_code in (401, 403) else None
    return RegistryError(
        f"{message}{': ' + detail if detail else ''}",
        status=response.status_code,
        request=f"{response.request.method} {response.url}",
        hint=hint,
    )

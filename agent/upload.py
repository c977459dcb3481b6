"""Push an image from an OCI image layout to a registry by digest, with the standard library.

Builders push by tag; farm must not tag anything until every platform is done, so the agent
exports the built image to a layout and uploads it itself: blobs first (skipping those the
repository has), then the manifest under its digest. The manifest's bytes are sent exactly as
the layout holds them, so the digest reported is the digest stored.

Credentials never reach the node's disk: the coordinator hands over an ``Authorization`` header
value for this push only.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import ssl
from typing import IO, Callable
from urllib.parse import urlencode, urljoin, urlsplit

__all__ = ["PushError", "PushedImage", "push_layout"]

PushedImage = tuple[str, int, str]  # digest, size, media type
_CHUNK = 1024 * 1024
_TIMEOUT = 300


class PushError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def push_layout(
    layout: str,
    registry_url: str,
    repository: str,
    authorization: str | None = None,
    refresh: Callable[[], str | None] | None = None,
) -> PushedImage:
    """Upload the single image of ``layout`` into ``repository``; return its manifest descriptor.

    ``refresh`` asks the coordinator for a new credential when the registry refuses the one in
    hand (a token that expired during a long build); each step is then tried once more.
    """
    with open(os.path.join(layout, "index.json"), "rb") as index_file:
        descriptors = json.load(index_file).get("manifests", [])
    if len(descriptors) != 1:
        raise PushError(f"the exported layout holds {len(descriptors)} manifests, expected one")
    digest = descriptors[0]["digest"]
    raw = _read_blob(layout, digest)
    manifest = json.loads(raw)
    media_type = manifest.get("mediaType") or descriptors[0]["mediaType"]
    session = _Session(registry_url, authorization)

    def again_if_refused(step: Callable[[], None]) -> None:
        try:
            step()
        except PushError as exc:
            if exc.status != 401 or refresh is None:
                raise
            session.authorization = refresh()
            step()

    try:
        for blob in [manifest["config"], *manifest.get("layers", [])]:
            path = _blob_path(layout, blob["digest"])
            again_if_refused(
                functools.partial(session.upload_blob, repository, blob["digest"], blob["size"], path)
            )
        again_if_refused(functools.partial(session.put_manifest, repository, digest, media_type, raw))
    finally:
        session.close()
    return digest, len(raw), media_type


def _blob_path(layout: str, digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return os.path.join(layout, "blobs", algorithm, encoded)


def _read_blob(layout: str, digest: str) -> bytes:
    with open(_blob_path(layout, digest), "rb") as blob:
        data = blob.read()
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise PushError(f"the exported layout's manifest does not match its digest {digest}")
    return data


class _Session:
    """One keep-alive connection per registry host, following Locations the registry hands out."""

    def __init__(self, base_url: str, authorization: str | None) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.authorization = authorization
        self._connections: dict[tuple[str, str], http.client.HTTPConnection] = {}

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()

    def upload_blob(self, repository: str, digest: str, size: int, path: str) -> None:
        status, _, _ = self._request("HEAD", f"v2/{repository}/blobs/{digest}")
        if status == 200:
            return
        status, headers, body = self._request("POST", f"v2/{repository}/blobs/uploads/", body=b"")
        if status != 202 or "location" not in headers:
            raise PushError(_describe("POST blob upload", status, body), status)
        location = urljoin(self._url(f"v2/{repository}/blobs/uploads/"), headers["location"])
        separator = "&" if urlsplit(location).query else "?"
        location += separator + urlencode({"digest": digest})
        with open(path, "rb") as blob:
            status, _, body = self._request(
                "PUT",
                location,
                body=blob,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )
        if status not in (201, 204):
            raise PushError(_describe(f"PUT blob {digest}", status, body), status)

    def put_manifest(self, repository: str, digest: str, media_type: str, raw: bytes) -> None:
        status, headers, body = self._request(
            "PUT",
            f"v2/{repository}/manifests/{digest}",
            body=raw,
            headers={"Content-Type": media_type},
        )
        if status != 201:
            raise PushError(_describe(f"PUT manifest {digest}", status, body), status)
        stored = headers.get("docker-content-digest")
        if stored and stored != digest:
            raise PushError(f"the registry stored manifest {digest} as {stored}")

    def _url(self, path_or_url: str) -> str:
        return urljoin(self.base_url, path_or_url)

    def _request(
        self,
        method: str,
        path_or_url: str,
        body: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(self._url(path_or_url))
        key = (url.scheme, url.netloc)
        connection = self._connections.get(key)
        if connection is None:
            if url.scheme == "https":
                connection = http.client.HTTPSConnection(
                    url.netloc, timeout=_TIMEOUT, context=ssl.create_default_context()
                )
            else:
                connection = http.client.HTTPConnection(url.netloc, timeout=_TIMEOUT)
            self._connections[key] = connection
        sent = dict(headers or {})
        # Never hand our credentials to another host the registry redirects us to.
        if self.authorization and key == _origin(self.base_url):
            sent["Authorization"] = self.authorization
        target = url.path + ("?" + url.query if url.query else "")
        try:
            connection.request(method, target, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            del self._connections[key]
            raise PushError(f"{method} {url.geturl()}: {exc}") from exc
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _describe(what: str, status: int, body: bytes) -> str:
    detail = body.decode("utf-8", "replace").strip()[:500]
    return f"{what}: HTTP {status} {detail}"

"""Registry credentials from docker's ``config.json`` and its credential helpers.

Where docker looks (``docker/cli`` ``cli/config``): ``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``. For one registry:

 1. ``credHelpers[<key>]`` names a helper for that registry; else
 2. ``credsStore`` names the helper for all registries; else
 3. ``auths[<key>]`` holds ``auth`` (base64 of ``user:password``) or ``username``/``password``,
    and may hold an ``identitytoken`` (an OAuth2 refresh token) or a ``registrytoken``.

A helper is ``docker-credential-<name>``, run as ``docker-credential-<name> get`` with the server
URL on stdin; it prints ``{"ServerURL", "Username", "Secret"}``. A ``Username`` of ``<token>``
means the secret is an identity token. A helper that has nothing prints "credentials not found"
and exits non-zero: that means no credentials, as in docker.

The key of a registry is its ``host[:port]``, except Docker Hub's: ``https://index.docker.io/v1/``.
``auths`` keys written with a scheme or path (``https://host/v1/``) match by host name.

Secrets never reach a message, an exception or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import RegistryError

__all__ = ["DOCKER_HUB_KEY", "Credentials", "DockerKeychain", "StaticCredentials", "config_key"]

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_TOKEN_USERNAME = "<token>"
_NOT_FOUND = "credentials not found"
_HELPER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)
    source: str = ""  # where they came from, for messages

    @property
    def has_password(self) -> bool:
        return bool(self.username and self.password)

    def describe(self) -> str:
        """Whose credentials these are and where they came from, without the secret."""
        if self.registry_token:
            what = "a registry token"
        elif self.identity_token:
            what = "an identity token" + (f" of user {self.username!r}" if self.username else "")
        else:
            what = f"the password of user {self.username!r}"
        return f"{what} from {self.source}" if self.source else what


def config_key(registry: str) -> str:
    """The ``config.json`` key docker uses for ``registry`` (``host[:port]``)."""
    return DOCKER_HUB_KEY if registry in _DOCKER_HUB_HOSTS else registry


def _hostname(key: str) -> str:
    """docker's ``ConvertToHostname``: drop the scheme and any path."""
    for scheme in ("http://", "https://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
            break
    return key.split("/", 1)[0]


Runner = Callable[[list[str], str, Mapping[str, str]], subprocess.CompletedProcess[str]]


def _run(argv: list[str], stdin: str, environ: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=_HELPER_TIMEOUT, env=dict(environ)
    )


class DockerKeychain:
    """Credentials as docker finds them; ``environ`` is read at each lookup (default ``os.environ``)."""

    def __init__(
        self,
        config_dir: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        run: Runner = _run,
    ) -> None:
        self._config_dir = config_dir
        self._environ = environ
        self._run = run

    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def config_path(self) -> Path:
        if self._config_dir is not None:
            return self._config_dir / "config.json"
        configured = self.environ.get("DOCKER_CONFIG")
        if configured:
            return Path(configured) / "config.json"
        home = self.environ.get("HOME")
        return (Path(home) if home else Path.home()) / ".docker" / "config.json"

    def describe(self) -> str:
        return str(self.config_path())

    def get(self, registry: str) -> Credentials | None:
        path = self.config_path()
        config = self._load(path)
        key = config_key(registry)
        helpers = config.get("credHelpers")
        helper = ""
        if isinstance(helpers, dict):
            for name in (key, _hostname(key), registry):
                if isinstance(helpers.get(name), str) and helpers[name]:
                    helper = helpers[name]
                    break
        if not helper and isinstance(config.get("credsStore"), str):
            helper = config["credsStore"]
        if helper:
            return self._from_helper(helper, key, path)
        return self._from_auths(config.get("auths"), key, path)

    @staticmethod
    def _load(path: Path) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read docker config {path}: {exc.__class__.__name__}") from None
        try:
            document = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            # The decoder's message names a position, never the text.
            raise RegistryError(f"docker config {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
        if not isinstance(document, dict):
            raise RegistryError(f"docker config {path} is not a JSON object")
        return document

    def _from_auths(self, auths: object, key: str, path: Path) -> Credentials | None:
        if not isinstance(auths, dict):
            return None
        entry = auths.get(key)
        if entry is None:
            wanted = _hostname(key)
            entry = next((value for name, value in auths.items() if _hostname(name) == wanted), None)
        if not isinstance(entry, dict):
            return None
        username = _text(entry.get("username"))
        password = _text(entry.get("password"))
        encoded = _text(entry.get("auth"))
        if encoded:
            try:
                decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            username, colon, password = decoded.partition(":")
            if not colon or not username:
                raise RegistryError(
                    f"the auth entry for {key} in {path} is not the base64 of user:password",
                    hint=f"log in again with `docker login {_hostname(key)}`",
                )
            password = password.strip("\x00")
        credentials = Credentials(
            username=username,
            password=password,
            identity_token=_text(entry.get("identitytoken")),
            registry_token=_text(entry.get("registrytoken")),
            source=str(path),
        )
        if not (credentials.has_password or credentials.identity_token or credentials.registry_token):
            return None
        return credentials

    def _from_helper(self, helper: str, key: str, path: Path) -> Credentials | None:
        program = f"docker-credential-{helper}"
        try:
            done = self._run([program, "get"], key, self.environ)
        except FileNotFoundError:
            raise RegistryError(
                f"credential helper {program} (named in {path}) is not installed or not on PATH",
                hint=f"install {program}, or remove it from {path}",
            ) from None
        except subprocess.TimeoutExpired:
            raise RegistryError(
                f"credential helper {program} did not answer for {key} within {_HELPER_TIMEOUT:.0f} s"
            ) from None
        except OSError as exc:
            raise RegistryError(f"cannot run credential helper {program}: {exc.strerror or exc}") from None
        said = f"{done.stdout}\n{done.stderr}".strip()
        if done.returncode != 0:
            if _NOT_FOUND in said.lower():
                return None
            raise RegistryError(
                f"credential helper {program} failed for {key} (exit {done.returncode})"
                + (f": {_safe(said)}" if _safe(said) else ""),
                hint=f"run `echo {key} | {program} get` to see what it says",
            )
        try:
            document = json.loads(done.stdout)
        except json.JSONDecodeError:
            document = None
        if not isinstance(document, dict):
            raise RegistryError(f"credential helper {program} answered something that is not JSON for {key}")
        username = _text(document.get("Username"))
        secret = _text(document.get("Secret"))
        if not secret:
            return None
        source = f"credential helper {program}"
        if username == _TOKEN_USERNAME:
            return Credentials(identity_token=secret, source=source)
        if not username:
            return None
        return Credentials(username=username, password=secret, source=source)


class StaticCredentials:
    """Fixed credentials per registry (tests, and callers that have them already)."""

    def __init__(self, credentials: Mapping[str, Credentials], where: str = "the credentials given") -> None:
        self._credentials = dict(credentials)
        self._where = where

    def get(self, registry: str) -> Credentials | None:
        return self._credentials.get(registry)

    def describe(self) -> str:
        return self._where


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _safe(output: str) -> str:
    """A helper's complaint, unless it might be its answer (JSON could hold the secret)."""
    first = output.strip().splitlines()[0] if output.strip() else ""
    if "{" in first or "secret" in first.lower():
        return ""
    return first[:200]

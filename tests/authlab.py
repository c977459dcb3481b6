"""Registries that want credentials, for the auth tests: real distribution 2.8 with htpasswd or
token auth, a small token server of our own, and docker configs with credential helpers.

The token server follows distribution's ``docs/spec/auth/token.md``: ``GET /token?service=&scope=``
with optional Basic credentials, ``POST /token`` with ``grant_type=refresh_token`` (the OAuth2
form), and answers a JWT signed RS256 with its certificate in the ``x5c`` header. distribution 2.8
(``registry/auth/token/token.go``) checks issuer, audience (= service), ``exp``/``nbf`` with 60 s
of leeway, and that the ``x5c`` chain verifies against ``rootcertbundle``. It grants the
intersection of what was asked and what ``acl`` allows, as real token servers do.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests import lab
from tests.certs import KeyPair, self_signed

SERVICE = "farm-test-registry"
ISSUER = "farm-test-issuer"
LEEWAY = 60  # distribution's clock-skew allowance on exp and nbf


def htpasswd_config(workdir: Path, users: dict[str, str]) -> str:
    """The registry config lines for htpasswd (bcrypt) auth of ``users``."""
    lines = [lab.run(["htpasswd", "-Bbn", user, password]).strip() for user, password in users.items()]
    path = workdir / "htpasswd"
    path.write_text("\n".join(lines) + "\n")
    return f"auth: {{htpasswd: {{realm: farm-test, path: {path}}}}}\n"


def token_config(realm: str, bundle: Path) -> str:
    options = f"realm: '{realm}', service: {SERVICE}, issuer: {ISSUER}, rootcertbundle: {bundle}"
    return f"auth: {{token: {{{options}}}}}\n"


def seed_busybox(
    registry: lab.Registry, user: str, password: str, repository: str = "library/busybox"
) -> None:
    """The lab's multi-platform busybox, copied in with skopeo (a real client) as ``user``."""
    lab.run(
        [
            "skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
            "--dest-creds", f"{user}:{password}",
            f"oci:{lab.BUSYBOX_LAYOUT}:latest", f"docker://{registry.host}/{repository}:latest",
        ]
    )  # fmt: skip


def write_docker_config(directory: Path, config: Mapping[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def basic_auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def write_credential_helper(bin_dir: Path, name: str, answers: dict[str, tuple[str, str]]) -> Path:
    """An executable ``docker-credential-<name>`` answering ``get`` for the servers in ``answers``
    (server → (username, secret)) and logging each server it was asked about to ``<bin>/<name>.log``.
    A server it does not know gets docker's "credentials not found" answer; ``fail`` fails."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cases = ""
    for server, (user, secret) in answers.items():
        answer = json.dumps({"ServerURL": server, "Username": user, "Secret": secret})
        cases += f"  '{server}') printf '%s' '{answer}' ;;\n"
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = get ] || { echo "unsupported: $1" >&2; exit 1; }\n'
        "read -r server\n"
        f'echo "$server" >> "{bin_dir / name}.log"\n'
        'case "$server" in\n'
        f"{cases}"
        "  fail) echo 'the keyring is locked' >&2; exit 3 ;;\n"
        "  *) echo 'credentials not found in native keychain'; exit 1 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


# -- The token server ---------------------------------------------------------------------------


Acl = Callable[[str | None, str, str], tuple[str, ...]]  # (user, type, name) -> actions allowed


def default_acl(user: str | None, kind: str, name: str) -> tuple[str, ...]:
    """Anonymous users may pull ``library/*``; a known user may do anything."""
    if kind != "repository":
        return ()
    if user is not None:
        return ("pull", "push", "delete")
    return ("pull",) if name.startswith("library/") else ()


@dataclass
class TokenRequest:
    method: str
    user: str | None
    scopes: list[str]
    grant_type: str = ""


@dataclass
class TokenServer:
    keys: KeyPair
    users: dict[str, str] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    acl: Acl = default_acl
    lifetime: int = 300  # seconds the registry will accept a token
    expires_in: int | None = 300  # what the answer says (None: leave it out)
    token_field: str = "token"
    log: list[TokenRequest] = field(default_factory=list)
    port: int = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def issue(self, user: str | None, scopes: list[str]) -> str:
        now = int(time.time())
        access = []
        for text in scopes:
            kind, _, rest = text.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = self.acl(user, kind, name)
            granted = [action for action in actions.split(",") if action in allowed or "*" in allowed]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            # The registry adds LEEWAY to exp: take it off so the token dies after `lifetime`.
            "exp": now + self.lifetime - LEEWAY,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.keys.cert_der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.keys.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def answer(self, user: str | None, scopes: list[str]) -> dict[str, object]:
        document: dict[str, object] = {self.token_field: self.issue(user, scopes)}
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        return document


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, status: int, document: dict[str, object]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            scopes = query.get("scope", [])
            user: str | None = None
            header = self.headers.get("Authorization", "")
            if header:
                scheme, _, encoded = header.partition(" ")
                name, _, password = base64.b64decode(encoded).decode().partition(":")
                if scheme != "Basic" or server.users.get(name) != password:
                    server.log.append(TokenRequest("GET", name, scopes, "refused"))
                    self.reply(401, {"details": "incorrect username or password"})
                    return
                user = name
            server.log.append(TokenRequest("GET", user, scopes))
            self.reply(200, server.answer(user, scopes))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = {key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
            scopes = form.get("scope", "").split()
            user = server.refresh_tokens.get(form.get("refresh_token", ""))
            server.log.append(TokenRequest("POST", user, scopes, form.get("grant_type", "")))
            if form.get("grant_type") != "refresh_token" or user is None:
                self.reply(400, {"error": "invalid_grant"})
                return
            self.reply(
                200, {"access_token": server.issue(user, scopes), "expires_in": server.expires_in or 60}
            )

    return Handler


@contextlib.contextmanager
def running_token_server(workdir: Path, **options: object) -> Iterator[TokenServer]:
    keys = self_signed(workdir, "farm token signer")
    server = TokenServer(keys, **options)  # type: ignore[arg-type]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="token-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)

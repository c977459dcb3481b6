"""Registry authentication against real registries: distribution 2.8 with htpasswd (Basic) and with
token auth (a token server of the test's own), credentials from a docker config and a credential
helper, and TLS with a private CA."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from farm.errors import RegistryError
from farm.index import build_index, children_of
from farm.registry.client import RegistryClient
from farm.registry.name import Reference, parse_reference
from farm.registry.transport import build_transport
from tests import authlab, lab
from tests.certs import self_signed

pytestmark = pytest.mark.lab

T = TypeVar("T")
PASSWORD = "correct horse"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$DOCKER_CONFIG`` for this test, and a bin folder first on PATH for helpers."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return directory


def index_with_two_children(client: RegistryClient, base: Reference) -> tuple[bytes, str, str]:
    """A new index of two of ``base``'s children: (raw, media type, digest)."""

    async def make() -> tuple[bytes, str, str]:
        manifest = await client.get_manifest(base)
        children = [child for child in children_of(manifest.json()) if not child.is_attestation][:2]
        index = build_index(children)
        return index.raw, index.media_type, index.digest

    return run(make())


async def push_and_read(registry: lab.Registry, repository: str, tag: str) -> str:
    """farm's client pushes a new index by digest and by tag, then reads it and a child's config."""
    base = parse_reference(f"{registry.host}/{repository}:latest")
    target = base.with_tag(tag)
    async with RegistryClient() as client:
        await client.ping(base)
        manifest = await client.get_manifest(base)
        children = [child for child in children_of(manifest.json()) if not child.is_attestation][:2]
        index = build_index(children)
        assert (
            await client.put_manifest(target.with_digest(index.digest), index.raw, index.media_type)
            == index.digest
        )
        assert await client.put_manifest(target, index.raw, index.media_type) == index.digest
        info = await client.head_manifest(target)
        assert info is not None
        assert info.digest == index.digest
        child = await client.get_manifest(base.with_digest(children[0].digest))
        config = json.loads(await client.get_blob(base, child.json()["config"]["digest"]))
        assert config["architecture"]
        return index.digest


# -- (a) htpasswd: Basic auth -------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lab.Registry]:
    workdir = tmp_path_factory.mktemp("basic-registry")
    config = authlab.htpasswd_config(workdir, {"alice": PASSWORD, "bob": "bobs password"})
    with lab.running_registry(workdir, seed=False, extra_config=config) as registry:
        authlab.seed_busybox(registry, "alice", PASSWORD)
        yield registry


def test_basic_credentials_from_auths_push_an_index_that_a_real_client_reads(
    basic_registry: lab.Registry, docker_config: Path
) -> None:
    auth = authlab.basic_auth("alice", PASSWORD)
    authlab.write_docker_config(docker_config, {"auths": {basic_registry.host: {"auth": auth}}})
    digest = run(push_and_read(basic_registry, "library/busybox", "farm-basic"))
    raw = lab.run(
        [
            "skopeo", "inspect", "--raw", "--tls-verify=false", "--creds", f"alice:{PASSWORD}",
            f"docker://{basic_registry.host}/library/busybox:farm-basic",
        ]
    )  # fmt: skip
    assert len(json.loads(raw)["manifests"]) == 2
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == digest


def test_basic_credentials_from_a_credential_helper(
    basic_registry: lab.Registry, docker_config: Path
) -> None:
    bin_dir = docker_config.parent / "bin"
    authlab.write_credential_helper(bin_dir, "farmtest", {basic_registry.host: ("bob", "bobs password")})
    authlab.write_docker_config(
        docker_config,
        {
            "credHelpers": {basic_registry.host: "farmtest"},
            # Ignored for this registry: its helper wins, as in docker.
            "auths": {basic_registry.host: {"auth": authlab.basic_auth("alice", "wrong")}},
        },
    )
    run(push_and_read(basic_registry, "library/busybox", "farm-helper"))
    # One lookup for the whole session, with the server name on stdin.
    assert (bin_dir / "farmtest.log").read_text().splitlines() == [basic_registry.host]


def test_a_store_without_an_entry_means_no_credentials_and_says_where_it_looked(
    basic_registry: lab.Registry, docker_config: Path
) -> None:
    authlab.write_credential_helper(
        docker_config.parent / "bin", "farmtest", {"elsewhere.example": ("x", "y")}
    )
    authlab.write_docker_config(docker_config, {"credsStore": "farmtest"})
    ref = parse_reference(f"{basic_registry.host}/library/busybox:latest")

    async def fetch() -> None:
        async with RegistryClient() as client:
            await client.ping(ref)  # a 401 without credentials still means the registry is there
            await client.get_manifest(ref)

    with pytest.raises(RegistryError) as caught:
        run(fetch())
    error = caught.value
    assert error.status == 401
    assert error.request == f"GET http://{basic_registry.host}/v2/library/busybox/manifests/latest"
    assert error.message.startswith(f"cannot fetch {ref}: GET http://{basic_registry.host}/v2/")
    assert error.hint == (
        f"no credentials for {basic_registry.host} in {docker_config / 'config.json'}; "
        f"log in with `docker login {basic_registry.host}` or add them there"
    )


def test_no_docker_config_at_all(basic_registry: lab.Registry, docker_config: Path) -> None:
    ref = parse_reference(f"{basic_registry.host}/library/busybox:latest")

    async def push() -> None:
        async with RegistryClient() as client:
            await client.put_manifest(ref.with_tag("nope"), b"{}", "application/vnd.oci.image.index.v1+json")

    with pytest.raises(RegistryError) as caught:
        run(push())
    assert caught.value.status == 401
    assert caught.value.hint is not None
    assert caught.value.hint.startswith(f"no credentials for {basic_registry.host} in {docker_config}")


def test_a_wrong_password_is_refused_early_and_never_shown(
    basic_registry: lab.Registry, docker_config: Path
) -> None:
    secret = "not-the-password-0451"
    config = {"auths": {basic_registry.host: {"auth": authlab.basic_auth("alice", secret)}}}
    authlab.write_docker_config(docker_config, config)
    ref = parse_reference(f"{basic_registry.host}/library/busybox:latest")

    async def ping() -> None:
        async with RegistryClient() as client:
            await client.ping(ref)

    with pytest.raises(RegistryError) as caught:
        run(ping())
    error = caught.value
    assert error.status == 401
    assert error.message.startswith(f"{basic_registry.host} refused farm's credentials: GET http://")
    assert error.hint == (
        f"{basic_registry.host} refused the password of user 'alice' from {docker_config / 'config.json'}; "
        "check its access rights"
    )
    assert secret not in f"{error.message} {error.hint} {error.request} {error!r}"
    assert authlab.basic_auth("alice", secret) not in f"{error.message} {error.hint}"


def test_a_failing_helper_is_a_clear_error(basic_registry: lab.Registry, docker_config: Path) -> None:
    bin_dir = docker_config.parent / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-farmbroken"
    helper.write_text("#!/bin/sh\necho 'the keyring is locked' >&2\nexit 3\n")
    helper.chmod(0o755)
    authlab.write_docker_config(docker_config, {"credsStore": "farmbroken"})
    ref = parse_reference(f"{basic_registry.host}/library/busybox:latest")

    async def fetch() -> None:
        async with RegistryClient() as client:
            await client.get_manifest(ref)

    with pytest.raises(RegistryError) as caught:
        run(fetch())
    assert caught.value.message == (
        f"credential helper docker-credential-farmbroken failed for {basic_registry.host} (exit 3): "
        "the keyring is locked"
    )


# -- (b) token auth -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[lab.Registry, authlab.TokenServer]]:
    workdir = tmp_path_factory.mktemp("token-registry")
    users = {"alice": PASSWORD, "reader": "reads only"}
    with authlab.running_token_server(workdir / "tokens", users=users, acl=_acl) as server:
        config = authlab.token_config(server.realm, server.keys.cert_path)
        with lab.running_registry(workdir / "registry", seed=False, extra_config=config) as registry:
            authlab.seed_busybox(registry, "alice", PASSWORD)
            yield registry, server


def _acl(user: str | None, kind: str, name: str) -> tuple[str, ...]:
    if user == "reader":
        return ("pull",) if kind == "repository" else ()
    return authlab.default_acl(user, kind, name)


Lab = tuple[lab.Registry, authlab.TokenServer]


@pytest.fixture
def tokens(token_lab: Lab, docker_config: Path) -> Lab:
    """The token registry with the token server reset, and alice's password in the docker config."""
    registry, server = token_lab
    server.lifetime, server.expires_in, server.token_field = 300, 300, "token"
    server.refresh_tokens.clear()
    server.log.clear()
    auths = {registry.host: {"auth": authlab.basic_auth("alice", PASSWORD)}}
    authlab.write_docker_config(docker_config, {"auths": auths})
    return registry, server


def test_bearer_push_asks_for_push_first_and_mounts_ask_for_pull_on_the_source(
    tokens: Lab,
) -> None:
    registry, server = tokens
    run(push_and_read(registry, "library/busybox", "farm-token"))
    asked = [request.scopes for request in server.log]
    assert all(request.user == "alice" for request in server.log)
    assert ["repository:library/busybox:pull,push"] in asked
    for scopes in asked:  # push (when asked for) always comes first
        assert not any(":push" in scope or ",push" in scope for scope in scopes[1:])

    base = parse_reference(f"{registry.host}/library/busybox:latest")
    target = parse_reference(f"{registry.host}/team/mounted:1")

    async def mount() -> bool:
        async with RegistryClient() as client:
            first = children_of((await client.get_manifest(base)).json())[0]
            layer = (await client.get_manifest(base.with_digest(first.digest))).json()["layers"][0]["digest"]
            server.log.clear()
            mounted = await client.mount_blob(target, layer, base)
            assert await client.has_blob(target, layer)
            return mounted

    assert run(mount())
    assert server.log[0].scopes == ["repository:team/mounted:pull,push", "repository:library/busybox:pull"]


def test_a_token_the_registry_stops_taking_is_replaced(
    tokens: Lab,
) -> None:
    registry, server = tokens
    server.lifetime, server.expires_in = 2, 300  # the token says 5 minutes, the registry takes it for 2 s
    recording = lab.Recording()
    ref = parse_reference(f"{registry.host}/library/busybox:latest")

    async def push_twice() -> None:
        async with RegistryClient(transport=recording) as client:
            manifest = await client.get_manifest(ref)
            await client.put_manifest(ref.with_tag("early-1"), manifest.raw, manifest.media_type)
            await asyncio.sleep(3)
            await client.put_manifest(ref.with_tag("early-2"), manifest.raw, manifest.media_type)

    run(push_twice())
    pushes = [
        scopes
        for scopes in (r.scopes for r in server.log)
        if scopes == ["repository:library/busybox:pull,push"]
    ]
    assert len(pushes) == 2
    puts = [(status, scheme) for method, path, status, scheme in recording.exchanges if method == "PUT"]
    assert puts == [(201, "Bearer"), (401, "Bearer"), (201, "Bearer")]


def test_a_short_expires_in_is_refreshed_before_the_registry_refuses(
    tokens: Lab,
) -> None:
    registry, server = tokens
    server.lifetime, server.expires_in = 2, 2
    recording = lab.Recording()
    ref = parse_reference(f"{registry.host}/library/busybox:latest")

    async def push_twice() -> None:
        async with RegistryClient(transport=recording) as client:
            manifest = await client.get_manifest(ref)
            await client.put_manifest(ref.with_tag("short-1"), manifest.raw, manifest.media_type)
            await asyncio.sleep(2.5)
            await client.put_manifest(ref.with_tag("short-2"), manifest.raw, manifest.media_type)

    run(push_twice())
    assert len([r for r in server.log if r.scopes == ["repository:library/busybox:pull,push"]]) == 2
    # Only the first request of the session met a 401: later tokens were fetched ahead of time.
    refused = [(method, path) for method, path, status, scheme in recording.exchanges if status == 401]
    assert refused == [("GET", "/v2/library/busybox/manifests/latest")]


def test_anonymous_pull_works_and_anonymous_push_says_to_log_in(tokens: Lab, docker_config: Path) -> None:
    registry, server = tokens
    authlab.write_docker_config(docker_config, {})
    ref = parse_reference(f"{registry.host}/library/busybox:latest")

    async def pull_then_push() -> None:
        async with RegistryClient() as client:
            manifest = await client.get_manifest(ref)
            await client.put_manifest(ref.with_tag("anonymous"), manifest.raw, manifest.media_type)

    with pytest.raises(RegistryError) as caught:
        run(pull_then_push())
    assert caught.value.status == 401
    assert caught.value.request == f"PUT http://{registry.host}/v2/library/busybox/manifests/anonymous"
    assert caught.value.hint is not None
    assert caught.value.hint.startswith(f"no credentials for {registry.host} in {docker_config}")
    # One anonymous token to pull, one (granting pull only) for the push, not asked for again.
    assert [(r.user, r.scopes) for r in server.log] == [
        (None, ["repository:library/busybox:pull"]),
        (None, ["repository:library/busybox:pull,push"]),
    ]


def test_the_token_server_refusing_a_password_is_a_clear_error(tokens: Lab, docker_config: Path) -> None:
    registry, _ = tokens
    secret = "wrong-0451"
    authlab.write_docker_config(
        docker_config, {"auths": {registry.host: {"auth": authlab.basic_auth("alice", secret)}}}
    )
    ref = parse_reference(f"{registry.host}/library/busybox:latest")

    async def ping() -> None:
        async with RegistryClient() as client:
            await client.ping(ref)

    with pytest.raises(RegistryError) as caught:
        run(ping())
    error = caught.value
    assert error.status == 401
    assert error.message.startswith(
        f"the token server for {registry.host} refused the password of user 'alice' from "
        f"{docker_config / 'config.json'}: GET http://127.0.0.1:"
    )
    assert "incorrect username or password" in error.message
    assert secret not in f"{error.message} {error.hint} {error.request}"


def test_a_user_without_push_rights_is_named(tokens: Lab, docker_config: Path) -> None:
    registry, _ = tokens
    auths = {registry.host: {"auth": authlab.basic_auth("reader", "reads only")}}
    authlab.write_docker_config(docker_config, {"auths": auths})
    ref = parse_reference(f"{registry.host}/library/busybox:latest")

    async def push() -> None:
        async with RegistryClient() as client:
            manifest = await client.get_manifest(ref)
            await client.put_manifest(ref.with_tag("reader"), manifest.raw, manifest.media_type)

    with pytest.raises(RegistryError) as caught:
        run(push())
    assert caught.value.status == 401
    assert caught.value.hint == (
        f"{registry.host} refused the password of user 'reader' from {docker_config / 'config.json'} "
        "(insufficient_scope); check its access rights"
    )


def test_an_identity_token_goes_by_oauth2(tokens: Lab, docker_config: Path) -> None:
    registry, server = tokens
    server.refresh_tokens["refresh-alice"] = "alice"
    server.token_field = "access_token"
    authlab.write_docker_config(docker_config, {"auths": {registry.host: {"identitytoken": "refresh-alice"}}})
    run(push_and_read(registry, "library/busybox", "farm-oauth"))
    assert {(r.method, r.grant_type, r.user) for r in server.log} == {("POST", "refresh_token", "alice")}
    assert ["repository:library/busybox:pull,push"] in [r.scopes for r in server.log]


def test_an_identity_token_from_a_helper(tokens: Lab, docker_config: Path) -> None:
    registry, server = tokens
    server.refresh_tokens["refresh-from-helper"] = "alice"
    authlab.write_credential_helper(
        docker_config.parent / "bin", "farmtest", {registry.host: ("<token>", "refresh-from-helper")}
    )
    authlab.write_docker_config(docker_config, {"credHelpers": {registry.host: "farmtest"}})
    run(push_and_read(registry, "library/busybox", "farm-helper-oauth"))
    assert {(r.method, r.user) for r in server.log} == {("POST", "alice")}


# -- TLS ----------------------------------------------------------------------------------------


def test_a_private_ca_is_trusted_only_when_given(tmp_path: Path) -> None:
    # farm speaks plain HTTP to loopback registries, so this checks the transport the client builds.
    keys = self_signed(tmp_path / "tls", "farm test registry", hosts=("127.0.0.1",))
    with lab.running_registry(tmp_path / "registry", seed=False, tls=keys) as registry:
        url = f"https://{registry.host}/v2/"

        async def get(transport: httpx.AsyncBaseTransport) -> int:
            async with httpx.AsyncClient(transport=transport) as client:
                return (await client.get(url)).status_code

        assert run(get(build_transport(ca_file=keys.cert_path))) == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            run(get(build_transport()))


# -- (c) nodes push with credentials handed to them for one build ------------------------------


def build_on_local_node(
    tmp_path: Path, registry: lab.Registry, node_workdir: Path, run_step: str
) -> lab.FarmRun:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {registry.host}/library/busybox\nRUN {run_step}\n")
    inventory = lab.write_inventory(tmp_path / "inventory.yaml", workdir=str(node_workdir))
    return lab.farm(
        "build", "-t", f"{registry.host}/team/built:1", "--platform", "linux/amd64,linux/arm64",
        "--progress", "plain", "--inventory", str(inventory),
        "--metadata-file", str(tmp_path / "metadata.json"), str(context),
    )  # fmt: skip


def test_a_build_pushes_with_basic_credentials_that_never_reach_the_node_disk_or_any_output(
    tmp_path: Path, basic_registry: lab.Registry, docker_config: Path, node_workdir: Path
) -> None:
    secret = authlab.basic_auth("alice", PASSWORD)
    authlab.write_docker_config(docker_config, {"auths": {basic_registry.host: {"auth": secret}}})
    run_ = build_on_local_node(tmp_path, basic_registry, node_workdir, "true")
    assert run_.code == 0, run_.stderr
    seen = run_.stdout + run_.stderr + (tmp_path / "metadata.json").read_text()
    assert secret not in seen
    assert PASSWORD not in seen
    for path in node_workdir.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 1_000_000:
            data = path.read_bytes()
            assert secret.encode() not in data, path
            assert PASSWORD.encode() not in data, path


def test_a_token_expiring_during_a_build_is_renewed_for_the_node(
    tmp_path: Path, tokens: Lab, node_workdir: Path
) -> None:
    registry, server = tokens
    # The token says five minutes; the registry takes it for two seconds, and the build's RUN
    # outlasts that: the node's push is refused, and it asks the coordinator for a new one.
    server.lifetime, server.expires_in = 2, 300
    run_ = build_on_local_node(tmp_path, registry, node_workdir, "sleep 3")
    assert run_.code == 0, run_.stderr
    pushes = [request for request in server.log if any("team/built:pull,push" in s for s in request.scopes)]
    assert len(pushes) >= 2, "a second push token was needed"

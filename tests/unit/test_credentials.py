"""farm.registry.credentials: docker's config.json and credential helpers, as docker reads them."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from farm.errors import RegistryError
from farm.registry.credentials import DOCKER_HUB_KEY, Credentials, DockerKeychain, config_key

SECRET = "pa55-w0rd:with:colons"


def auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def keychain(tmp_path: Path, config: object, run: object = None) -> DockerKeychain:
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if run is None:
        return DockerKeychain(tmp_path, environ={})
    return DockerKeychain(tmp_path, environ={"PATH": "/nowhere"}, run=run)  # type: ignore[arg-type]


class Helper:
    """A stand-in for ``docker-credential-<name>``, recording how it was called."""

    def __init__(self, returncode: int = 0, stdout: str = "", stderr: str = "") -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __call__(
        self, argv: list[str], stdin: str, environ: Mapping[str, str]
    ) -> subprocess.CompletedProcess[str]:
        self.calls.append((argv, stdin))
        return subprocess.CompletedProcess(argv, self.returncode, self.stdout, self.stderr)


def secret_free(error: RegistryError) -> bool:
    return SECRET not in f"{error.message} {error.hint} {error.args}"


@pytest.mark.parametrize(
    ("registry", "key"),
    [
        ("docker.io", DOCKER_HUB_KEY),
        ("index.docker.io", DOCKER_HUB_KEY),
        ("registry-1.docker.io", DOCKER_HUB_KEY),
        ("ghcr.io", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
    ],
)
def test_config_keys(registry: str, key: str) -> None:
    assert config_key(registry) == key


def test_no_config_file_means_no_credentials(tmp_path: Path) -> None:
    assert DockerKeychain(tmp_path, environ={}).get("ghcr.io") is None


def test_config_location_follows_docker_config_then_home(tmp_path: Path) -> None:
    assert (
        DockerKeychain(environ={"DOCKER_CONFIG": str(tmp_path / "d")}).config_path()
        == tmp_path / "d/config.json"
    )
    assert DockerKeychain(environ={"HOME": str(tmp_path)}).config_path() == tmp_path / ".docker/config.json"
    assert DockerKeychain(environ={"DOCKER_CONFIG": "/x"}).describe() == "/x/config.json"


def test_base64_auth(tmp_path: Path) -> None:
    found = keychain(tmp_path, {"auths": {"ghcr.io": {"auth": auth("alice", SECRET + "\x00\x00")}}}).get(
        "ghcr.io"
    )
    assert found == Credentials("alice", SECRET, source=str(tmp_path / "config.json"))
    assert found is not None
    assert found.describe() == f"the password of user 'alice' from {tmp_path / 'config.json'}"


def test_username_and_password_fields(tmp_path: Path) -> None:
    config = {"auths": {"r.example": {"username": "bob", "password": SECRET}}}
    assert keychain(tmp_path, config).get("r.example") == Credentials(
        "bob", SECRET, source=str(tmp_path / "config.json")
    )


def test_identity_and_registry_tokens(tmp_path: Path) -> None:
    config = {
        "auths": {
            "a.example": {"auth": auth("carol", ""), "identitytoken": "id-tok"},
            "b.example": {"registrytoken": "reg-tok"},
        }
    }
    found = keychain(tmp_path, config)
    a = found.get("a.example")
    assert a is not None
    assert (a.username, a.password, a.identity_token) == ("carol", "", "id-tok")
    assert a.describe().startswith("an identity token of user 'carol'")
    b = found.get("b.example")
    assert b is not None
    assert b.registry_token == "reg-tok"
    assert b.describe().startswith("a registry token")


def test_docker_hub_and_legacy_keys(tmp_path: Path) -> None:
    config = {
        "auths": {
            DOCKER_HUB_KEY: {"auth": auth("hubuser", SECRET)},
            "https://old.example:5000/v1/": {"auth": auth("olduser", SECRET)},
        }
    }
    found = keychain(tmp_path, config)
    for hub in ("docker.io", "registry-1.docker.io"):
        credentials = found.get(hub)
        assert credentials is not None
        assert credentials.username == "hubuser"
    old = found.get("old.example:5000")
    assert old is not None
    assert old.username == "olduser"
    assert found.get("old.example") is None


@pytest.mark.parametrize("entry", [{}, {"auth": ""}, {"username": "x"}, "not an object"])
def test_entries_without_a_secret_are_no_credentials(tmp_path: Path, entry: object) -> None:
    assert keychain(tmp_path, {"auths": {"r.example": entry}}).get("r.example") is None


@pytest.mark.parametrize(
    "encoded",
    [
        "!!!not base64",
        base64.b64encode(b"no-colon-at-all").decode(),
        base64.b64encode(b":" + SECRET.encode()).decode(),  # an empty user name
        base64.b64encode(b"\xff\xfe:" + SECRET.encode()).decode(),
    ],
)
def test_broken_auth_entries_are_errors_without_the_secret(tmp_path: Path, encoded: str) -> None:
    with pytest.raises(RegistryError, match="is not the base64 of user:password") as caught:
        keychain(tmp_path, {"auths": {"r.example": {"auth": encoded}}}).get("r.example")
    assert secret_free(caught.value)
    assert caught.value.hint == "log in again with `docker login r.example`"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"auths": {"r": {"auth": "' + SECRET + '"', "is not JSON"),
        ("[1, 2]", "is not a JSON object"),
    ],
)
def test_broken_config_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message) as caught:
        keychain(tmp_path, text).get("r")
    assert secret_free(caught.value)


def test_an_empty_config_file_is_fine(tmp_path: Path) -> None:
    assert keychain(tmp_path, "").get("r") is None


def test_helper_answers(tmp_path: Path) -> None:
    helper = Helper(stdout=json.dumps({"ServerURL": "ghcr.io", "Username": "dave", "Secret": SECRET}))
    found = keychain(tmp_path, {"credsStore": "desktop"}, helper).get("ghcr.io")
    assert found == Credentials("dave", SECRET, source="credential helper docker-credential-desktop")
    assert helper.calls == [(["docker-credential-desktop", "get"], "ghcr.io")]


def test_hub_helper_gets_the_hub_key(tmp_path: Path) -> None:
    helper = Helper(stdout=json.dumps({"Username": "dave", "Secret": SECRET}))
    keychain(tmp_path, {"credsStore": "desktop"}, helper).get("registry-1.docker.io")
    assert helper.calls[0][1] == DOCKER_HUB_KEY


def test_token_username_means_identity_token(tmp_path: Path) -> None:
    helper = Helper(stdout=json.dumps({"Username": "<token>", "Secret": "refresh"}))
    found = keychain(tmp_path, {"credsStore": "desktop"}, helper).get("ghcr.io")
    assert found is not None
    assert (found.username, found.password, found.identity_token) == ("", "", "refresh")


def test_cred_helpers_win_over_creds_store_and_auths(tmp_path: Path) -> None:
    helper = Helper(stdout=json.dumps({"Username": "erin", "Secret": SECRET}))
    config = {
        "credsStore": "store",
        "credHelpers": {"ghcr.io": "gh", DOCKER_HUB_KEY: "hub"},
        "auths": {"ghcr.io": {"auth": auth("file", SECRET)}},
    }
    chain = keychain(tmp_path, config, helper)
    chain.get("ghcr.io")
    chain.get("docker.io")
    chain.get("other.example")
    assert [argv[0] for argv, _ in helper.calls] == [
        "docker-credential-gh",
        "docker-credential-hub",
        "docker-credential-store",
    ]


def test_a_helper_store_hides_the_file_entries(tmp_path: Path) -> None:
    # As in docker: with a store configured, auths only lists registries; the store has the secrets.
    helper = Helper(1, stdout="credentials not found in native keychain")
    config = {"credsStore": "store", "auths": {"ghcr.io": {"auth": auth("file", SECRET)}}}
    assert keychain(tmp_path, config, helper).get("ghcr.io") is None


@pytest.mark.parametrize(
    "answer",
    [
        {"Username": "", "Secret": ""},
        {"Username": "u", "Secret": ""},
        {"Username": "", "Secret": SECRET},
    ],
)
def test_helper_without_a_full_answer_means_none(tmp_path: Path, answer: dict[str, str]) -> None:
    assert keychain(tmp_path, {"credsStore": "s"}, Helper(stdout=json.dumps(answer))).get("r") is None


def test_helper_failure_is_an_error_naming_the_helper(tmp_path: Path) -> None:
    helper = Helper(1, stderr="error getting credentials - err: exit status 1, out: `keychain locked`\n")
    with pytest.raises(RegistryError) as caught:
        keychain(tmp_path, {"credsStore": "osxkeychain"}, helper).get("r.example")
    assert caught.value.message == (
        "credential helper docker-credential-osxkeychain failed for r.example (exit 1): "
        "error getting credentials - err: exit status 1, out: `keychain locked`"
    )
    assert caught.value.hint == "run `echo r.example | docker-credential-osxkeychain get` to see what it says"


def test_helper_failure_never_echoes_what_could_be_its_answer(tmp_path: Path) -> None:
    helper = Helper(2, stdout=json.dumps({"Username": "u", "Secret": SECRET}))
    with pytest.raises(RegistryError) as caught:
        keychain(tmp_path, {"credsStore": "x"}, helper).get("r")
    assert caught.value.message == "credential helper docker-credential-x failed for r (exit 2)"


def test_helper_answering_garbage(tmp_path: Path) -> None:
    helper = Helper(stdout=f"Username=u Secret={SECRET}")
    with pytest.raises(RegistryError, match="answered something that is not JSON") as caught:
        keychain(tmp_path, {"credsStore": "x"}, helper).get("r")
    assert secret_free(caught.value)


def test_missing_helper_program(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "farm-no-such-helper"}))
    chain = DockerKeychain(tmp_path, environ={"PATH": str(tmp_path)})
    with pytest.raises(
        RegistryError, match=r"docker-credential-farm-no-such-helper .* is not installed"
    ) as caught:
        chain.get("r")
    assert caught.value.hint is not None


def test_hanging_helper(tmp_path: Path) -> None:
    def hang(argv: list[str], stdin: str, environ: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, 60)

    with pytest.raises(RegistryError, match="did not answer for r within 60 s"):
        keychain(tmp_path, {"credsStore": "slow"}, hang).get("r")

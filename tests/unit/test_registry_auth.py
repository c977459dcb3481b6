"""farm.registry.auth: challenges, scopes, and the auth flow driven by hand with next()/send()."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncGenerator, Generator
from urllib.parse import parse_qs

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farm.errors import RegistryError
from farm.registry.auth import (
    Challenge,
    RegistryAuth,
    Scope,
    merge_scopes,
    parse_challenges,
    parse_www_authenticate,
    pick_challenge,
    refusal_hint,
    scopes_for_request,
)
from farm.registry.credentials import Credentials, StaticCredentials

_SETTINGS = settings(database=None, deadline=None, max_examples=200)

HOST = "registry.example"
REALM = "https://auth.example/token"
PASSWORD = "s3cret-pa55"
BEARER = f'Bearer realm="{REALM}",service="registry.example"'


# -- WWW-Authenticate ---------------------------------------------------------------------------


def test_ggcr_vector_with_escapes_and_a_bare_value() -> None:
    header = (
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'other=fun,slashed="he\\"\\l\\lo"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.example.com/token",
                "service": "registry.example.com",
                "other": "fun",
                "slashed": 'he"llo',
            },
        )
    ]


def test_rfc7235_example_has_two_challenges_in_one_header() -> None:
    header = 'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"'
    assert parse_challenges(header) == [
        Challenge("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        Challenge("basic", {"realm": "simple"}),
    ]


def test_quoted_commas_stay_in_the_value() -> None:
    header = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push"'
    (challenge,) = parse_challenges(header)
    assert challenge.realm == "https://auth.docker.io/token"
    assert challenge.service == "registry.docker.io"
    assert challenge.scopes == (Scope("repository", "a/b", ("pull", "push")),)


def test_scheme_and_names_are_case_insensitive_values_are_not() -> None:
    (challenge,) = parse_challenges('BEARER REALM="https://Auth/Token", SerVice=Reg.Example')
    assert challenge == Challenge("bearer", {"realm": "https://Auth/Token", "service": "Reg.Example"})


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", []),
        (" , ,", []),
        ("Basic", [Challenge("basic")]),
        ("Basic, Bearer realm=x", [Challenge("basic"), Challenge("bearer", {"realm": "x"})]),
        ('Bearer realm = "x" , service= y', [Challenge("bearer", {"realm": "x", "service": "y"})]),
        ("Negotiate abc==, Basic realm=r",
         [Challenge("negotiate", token68="abc=="), Challenge("basic", {"realm": "r"})]),
        ("Negotiate a+b/c", [Challenge("negotiate", token68="a+b/c")]),
        ('Bearer realm="a", realm="b"', [Challenge("bearer", {"realm": "a"})]),  # the first one counts
        ('Bearer realm="unterminated', [Challenge("bearer", {"realm": "unterminated"})]),
        ('Bearer realm=""', [Challenge("bearer", {"realm": ""})]),
        ('Bearer realm="a\\\\b"', [Challenge("bearer", {"realm": "a\\b"})]),
        ('"quoted", Basic realm=r', [Challenge("basic", {"realm": "r"})]),
        ("=x, Basic realm=r", [Challenge("basic", {"realm": "r"})]),
        ("Bearer realm=https://auth/token?a=b", [Challenge("bearer", {"realm": "https://auth/token?a=b"})]),
        ('Bearer error="insufficient_scope",scope="repository:x:pull"', [
            Challenge("bearer", {"error": "insufficient_scope", "scope": "repository:x:pull"}),
        ]),
    ],
)  # fmt: skip
def test_header_shapes(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


def test_several_headers_and_the_pick() -> None:
    headers = httpx.Headers(
        [("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", 'Basic realm="r", ' + BEARER)]
    )
    challenges = parse_www_authenticate(headers)
    assert [c.scheme for c in challenges] == ["negotiate", "basic", "bearer"]
    picked = pick_challenge(challenges)
    assert picked is not None
    assert picked.scheme == "basic"  # the first one farm can answer, as ggcr picks
    assert pick_challenge([Challenge("negotiate")]) is None


_TOKENS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~", min_size=1
)
_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t\u00e9")
)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def _challenges(draw: st.DrawFn) -> tuple[str, list[Challenge]]:
    rendered: list[str] = []
    expected: list[Challenge] = []
    for _ in range(draw(st.integers(1, 4))):
        scheme = draw(_TOKENS)
        names = draw(st.lists(_TOKENS, max_size=4, unique_by=str.lower))
        params: dict[str, str] = {}
        parts: list[str] = []
        for name in names:
            value = draw(_VALUES)
            bare = value and all(c.isalnum() or c in "-._~/:" for c in value) and draw(st.booleans())
            space = draw(st.sampled_from(["", " "]))
            parts.append(f"{name}{space}={space}{value if bare else _quote(value)}")
            params[name.lower()] = value
        separator = draw(st.sampled_from([",", ", ", " ,  "]))
        rendered.append(f"{scheme} {separator.join(parts)}".rstrip())
        expected.append(Challenge(scheme.lower(), params))
    return draw(st.sampled_from([", ", ",", " , "])).join(rendered), expected


@_SETTINGS
@given(_challenges())
def test_rendered_challenges_parse_back(case: tuple[str, list[Challenge]]) -> None:
    header, expected = case
    assert parse_challenges(header) == expected


@_SETTINGS
@given(st.text())
def test_any_text_parses_without_error_and_terminates(text: str) -> None:
    for challenge in parse_challenges(text):
        assert challenge.scheme == challenge.scheme.lower()
        assert all(name == name.lower() for name in challenge.params)


# -- Scopes -------------------------------------------------------------------------------------


def test_scope_names_may_hold_a_port() -> None:
    scope = Scope.parse("repository:localhost:5000/team/app:pull,push")
    assert scope == Scope("repository", "localhost:5000/team/app", ("pull", "push"))
    assert str(scope) == "repository:localhost:5000/team/app:pull,push"
    assert Scope.parse("nonsense") is None
    assert Scope.parse("repository:x") is None


def test_cover_and_merge() -> None:
    push = Scope.repository("a", "pull", "push")
    assert push.covers(Scope.repository("a", "pull"))
    assert not Scope.repository("a", "pull").covers(push)
    assert not push.covers(Scope.repository("b", "pull"))
    assert Scope("registry", "catalog", ("*",)).covers(Scope("registry", "catalog", ("*",)))
    merged = merge_scopes(
        [push, Scope.repository("src", "pull")],
        [Scope.repository("src", "pull"), Scope.repository("other", "pull"), Scope.repository("a", "delete")],
    )
    assert [str(s) for s in merged] == [
        "repository:a:pull,push,delete",
        "repository:src:pull",
        "repository:other:pull",
    ]


@pytest.mark.parametrize(
    ("method", "url", "scopes"),
    [
        ("GET", "/v2/", []),
        ("GET", "/v2/_catalog", ["registry:catalog:*"]),
        ("HEAD", "/v2/team/app/manifests/1.0", ["repository:team/app:pull"]),
        ("GET", "/v2/app/blobs/sha256:ab", ["repository:app:pull"]),
        ("GET", "/v2/a/b/c/tags/list", ["repository:a/b/c:pull"]),
        ("PUT", "/v2/team/app/manifests/1.0", ["repository:team/app:pull,push"]),
        ("POST", "/v2/team/app/blobs/uploads/", ["repository:team/app:pull,push"]),
        ("PATCH", "/v2/team/app/blobs/uploads/1234-abcd", ["repository:team/app:pull,push"]),
        ("PUT", "/v2/team/app/blobs/uploads/1234?digest=sha256:ab", ["repository:team/app:pull,push"]),
        ("DELETE", "/v2/team/app/blobs/uploads/1234", ["repository:team/app:delete"]),
        # A repository may be called like an API word: the last one is the API's.
        ("GET", "/v2/a/manifests/b/manifests/latest", ["repository:a/manifests/b:pull"]),
        # A mount needs pull on the source, after the target.
        ("POST", "/v2/team/app/blobs/uploads/?mount=sha256:ab&from=library/busybox",
         ["repository:team/app:pull,push", "repository:library/busybox:pull"]),
        ("POST", "/v2/app/blobs/uploads/?mount=sha256:ab&from=app", ["repository:app:pull,push"]),
        ("GET", "/metrics", []),
    ],
)  # fmt: skip
def test_scopes_for_request(method: str, url: str, scopes: list[str]) -> None:
    parsed = httpx.URL(url)
    assert [str(s) for s in scopes_for_request(method, parsed.path, parsed.params)] == scopes


# -- The flow -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ALICE = Credentials("alice", PASSWORD, source="config.json")


def make_auth(
    credentials: Credentials | None = ALICE,
    clock: Clock | None = None,
    host: str = HOST,
) -> RegistryAuth:
    known = {host: credentials} if credentials is not None else {}
    return RegistryAuth(StaticCredentials(known, "the test keychain"), clock=clock or Clock())


def request(method: str = "GET", path: str = "/v2/team/app/manifests/1", **kwargs: object) -> httpx.Request:
    return httpx.Request(method, f"https://{HOST}{path}", headers={"User-Agent": "farm"}, **kwargs)  # type: ignore[arg-type]


def answer(
    req: httpx.Request, status: int = 200, headers: dict[str, str] | None = None, body: object = b""
) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    assert isinstance(content, bytes)
    return httpx.Response(status, headers=headers, content=content, request=req)


def challenge(req: httpx.Request, header: str = BEARER) -> httpx.Response:
    return answer(req, 401, {"WWW-Authenticate": header}, b'{"errors":[{"code":"UNAUTHORIZED"}]}')


def token_answer(req: httpx.Request, token: str = "t1", **fields: object) -> httpx.Response:
    return answer(req, 200, body={"token": token, **fields})


def finish(flow: Generator[httpx.Request, httpx.Response, None], response: httpx.Response) -> None:
    with pytest.raises(StopIteration):
        flow.send(response)


def scopes_asked(req: httpx.Request) -> list[str]:
    return [value for key, value in req.url.params.multi_items() if key == "scope"]


def basic_of(req: httpx.Request) -> tuple[str, str]:
    scheme, _, encoded = req.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    return user, password


def test_an_open_registry_sees_no_authorization() -> None:
    auth = make_auth()
    req = request()
    flow = auth.sync_auth_flow(req)
    assert next(flow) is req
    assert "authorization" not in req.headers
    finish(flow, answer(req))


def test_basic_challenge_is_answered_and_then_sent_up_front() -> None:
    auth = make_auth()
    req = request()
    flow = auth.auth_flow(req)
    assert next(flow) is req
    again = flow.send(challenge(req, 'Basic realm="registry"'))
    assert again is req
    assert basic_of(req) == ("alice", PASSWORD)
    finish(flow, answer(req))

    later = request("PUT", "/v2/other/manifests/2", content=b"{}")
    flow = auth.auth_flow(later)
    assert basic_of(next(flow)) == ("alice", PASSWORD)
    finish(flow, answer(later, 201))


def test_basic_without_credentials_leaves_the_401_with_a_note() -> None:
    auth = make_auth(credentials=None)
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    refused = challenge(req, 'Basic realm="registry"')
    finish(flow, refused)
    assert refusal_hint(refused) == (
        f"no credentials for {HOST} in the test keychain; log in with `docker login {HOST}` or add them there"
    )


def test_wrong_basic_credentials_are_named_without_the_password() -> None:
    auth = make_auth()
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    flow.send(challenge(req, 'Basic realm="registry"'))
    refused = challenge(req, 'Basic realm="registry"')
    finish(flow, refused)
    hint = refusal_hint(refused)
    assert hint == f"{HOST} refused the password of user 'alice' from config.json; check its access rights"
    assert PASSWORD not in hint


def test_bearer_flow_asks_the_realm_with_basic_credentials_and_caches_the_token() -> None:
    clock = Clock()
    auth = make_auth(clock=clock)
    req = request("PUT", "/v2/team/app/manifests/1", content=b"{}")
    flow = auth.auth_flow(req)
    assert next(flow) is req
    token_request = flow.send(challenge(req))
    assert token_request.method == "GET"
    assert token_request.url.copy_with(query=None) == httpx.URL(REALM)
    assert token_request.url.params["service"] == "registry.example"
    assert token_request.url.params["account"] == "alice"
    assert scopes_asked(token_request) == ["repository:team/app:pull,push"]
    assert basic_of(token_request) == ("alice", PASSWORD)
    assert token_request.headers["user-agent"] == "farm"
    assert flow.send(token_answer(token_request, "t1", expires_in=300)) is req
    assert req.headers["authorization"] == "Bearer t1"
    finish(flow, answer(req, 201))

    # A pull of the same repository is covered by the pull,push token: no round trip.
    pull = request("HEAD")
    flow = auth.auth_flow(pull)
    assert next(flow).headers["authorization"] == "Bearer t1"
    finish(flow, answer(pull))

    # Another repository needs another token, fetched before the request goes out.
    other = request("GET", "/v2/other/manifests/1")
    flow = auth.auth_flow(other)
    token_request = next(flow)
    assert scopes_asked(token_request) == ["repository:other:pull"]
    assert flow.send(token_answer(token_request, "t2")) is other
    assert other.headers["authorization"] == "Bearer t2"
    finish(flow, answer(other))


def test_expires_in_is_honoured_and_defaults_to_60_seconds() -> None:
    clock = Clock()
    auth = make_auth(clock=clock)
    first = request()
    flow = auth.auth_flow(first)
    next(flow)
    token_request = flow.send(challenge(first))
    flow.send(answer(token_request, body={"access_token": "a1"}))  # access_token counts too
    assert first.headers["authorization"] == "Bearer a1"
    finish(flow, answer(first))

    clock.now += 50  # still usable (the margin is a tenth of the lifetime)
    second = request()
    flow = auth.auth_flow(second)
    assert next(flow).headers["authorization"] == "Bearer a1"
    finish(flow, answer(second))

    clock.now += 5  # 55 s in: too close to the 60 s expiry, so a new token first
    third = request()
    flow = auth.auth_flow(third)
    token_request = next(flow)
    assert token_request.url.host == "auth.example"
    assert flow.send(token_answer(token_request, "a2", expires_in=3600)) is third
    assert third.headers["authorization"] == "Bearer a2"
    finish(flow, answer(third))


@pytest.mark.parametrize("expires_in", [0, -5, "soon", True, None])
def test_odd_expires_in_means_60_seconds(expires_in: object) -> None:
    clock = Clock()
    auth = make_auth(clock=clock)
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req))
    flow.send(token_answer(token_request, expires_in=expires_in))
    finish(flow, answer(req))
    clock.now += 53
    again = request()
    flow = auth.auth_flow(again)
    assert next(flow) is again
    clock.now += 2
    again = request()
    flow = auth.auth_flow(again)
    assert next(flow) is not again  # a token request


def test_a_token_refused_mid_flow_is_replaced_once() -> None:
    auth = make_auth()
    first = request("PUT", content=b"{}")
    flow = auth.auth_flow(first)
    next(flow)
    token_request = flow.send(challenge(first))
    flow.send(token_answer(token_request, "old", expires_in=3600))
    finish(flow, answer(first))

    # The registry no longer takes the token (expired early, revoked): a new one, and a resend.
    req = request("PUT", "/v2/team/app/manifests/2", content=b"{}")
    flow = auth.auth_flow(req)
    assert next(flow).headers["authorization"] == "Bearer old"
    token_request = flow.send(challenge(req, BEARER + ',error="invalid_token"'))
    assert scopes_asked(token_request) == ["repository:team/app:pull,push"]
    assert flow.send(token_answer(token_request, "new", expires_in=3600)) is req
    assert req.headers["authorization"] == "Bearer new"
    finish(flow, answer(req, 201))

    # The old token is gone from the cache; the new one covers later pulls.
    pull = request()
    flow = auth.auth_flow(pull)
    assert next(flow).headers["authorization"] == "Bearer new"


def test_a_broader_scope_in_the_challenge_gets_a_new_token_with_ours_first() -> None:
    auth = make_auth()
    req = request("POST", "/v2/team/app/blobs/uploads/?mount=sha256:ab&from=library/base")
    flow = auth.auth_flow(req)
    next(flow)
    header = (
        BEARER + ',scope="repository:library/base:pull repository:team/app:pull,push repository:extra:pull"'
    )
    token_request = flow.send(challenge(req, header))
    assert scopes_asked(token_request) == [
        "repository:team/app:pull,push",
        "repository:library/base:pull",
        "repository:extra:pull",
    ]
    flow.send(token_answer(token_request))
    finish(flow, answer(req, 201))


def test_insufficient_scope_after_a_fresh_token_stands() -> None:
    auth = make_auth()
    req = request("PUT", "/v2/team/app/manifests/1", content=b"{}")
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req))
    assert flow.send(token_answer(token_request)) is req
    refused = challenge(req, BEARER + ',scope="repository:team/app:pull,push",error="insufficient_scope"')
    finish(flow, refused)
    assert refusal_hint(refused) == (
        f"{HOST} refused the password of user 'alice' from config.json (insufficient_scope); "
        "check its access rights"
    )


def test_a_fresh_token_refused_for_the_same_scopes_is_not_asked_for_again() -> None:
    auth = make_auth()
    first = request()
    flow = auth.auth_flow(first)
    next(flow)
    flow.send(token_answer(flow.send(challenge(first))))
    finish(flow, answer(first))

    # The push token is fetched ahead of the request; the registry still says no: that stands.
    req = request("PUT", content=b"{}")
    flow = auth.auth_flow(req)
    token_request = next(flow)
    assert flow.send(token_answer(token_request, "narrow")) is req
    refused = challenge(req, BEARER + ',scope="repository:team/app:pull,push",error="insufficient_scope"')
    finish(flow, refused)
    assert "(insufficient_scope)" in (refusal_hint(refused) or "")


def test_a_fresh_token_refused_for_a_wider_scope_is_asked_for_again() -> None:
    auth = make_auth()
    first = request()
    flow = auth.auth_flow(first)
    next(flow)
    flow.send(token_answer(flow.send(challenge(first))))
    finish(flow, answer(first))

    req = request("PUT", content=b"{}")
    flow = auth.auth_flow(req)
    flow.send(token_answer(next(flow), "narrow"))
    wider = flow.send(challenge(req, BEARER + ',scope="repository:team/app:pull,push,delete"'))
    assert scopes_asked(wider) == ["repository:team/app:pull,push,delete"]
    assert flow.send(token_answer(wider, "wide")) is req
    assert req.headers["authorization"] == "Bearer wide"
    finish(flow, answer(req, 201))


def test_basic_credentials_refused_up_front_are_not_sent_again() -> None:
    auth = make_auth()
    first = request()
    flow = auth.auth_flow(first)
    next(flow)
    flow.send(challenge(first, 'Basic realm="r"'))
    finish(flow, answer(first))

    req = request("PUT", content=b"{}")
    flow = auth.auth_flow(req)
    assert basic_of(next(flow)) == ("alice", PASSWORD)
    refused = challenge(req, 'Basic realm="r"')
    finish(flow, refused)  # no second try with the same password
    assert "refused the password of user 'alice'" in (refusal_hint(refused) or "")


def test_no_credentials_for_a_known_basic_host_is_not_retried() -> None:
    auth = make_auth(credentials=None)
    first = request()
    flow = auth.auth_flow(first)
    next(flow)
    finish(flow, challenge(first, 'Basic realm="r"'))
    again = request()
    flow = auth.auth_flow(again)
    assert "authorization" not in next(flow).headers
    finish(flow, challenge(again, 'Basic realm="r"'))


def test_anonymous_token_when_there_are_no_credentials() -> None:
    auth = make_auth(credentials=None)
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req))
    assert "authorization" not in token_request.headers
    assert "account" not in token_request.url.params
    assert flow.send(token_answer(token_request, "anon")) is req
    assert req.headers["authorization"] == "Bearer anon"
    finish(flow, answer(req))


def test_anonymous_token_refused_leaves_the_401() -> None:
    auth = make_auth(credentials=None)
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    original = challenge(req)
    token_request = flow.send(original)
    finish(flow, answer(token_request, 401, body=b"no"))
    assert refusal_hint(original) is not None
    assert "no credentials for registry.example" in (refusal_hint(original) or "")


def test_token_server_refusing_credentials_is_a_clear_error_without_the_secret() -> None:
    auth = make_auth()
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req))
    with pytest.raises(RegistryError) as caught:
        flow.send(answer(token_request, 401, body=b'{"details":"incorrect username or password"}'))
    error = caught.value
    assert error.status == 401
    assert error.request == f"GET {REALM}"
    assert "refused the password of user 'alice' from config.json" in error.message
    assert "incorrect username or password" in error.message
    assert PASSWORD not in str(error) + (error.hint or "") + repr(error.args)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "did not answer JSON"),
        (b"[]", "did not answer JSON"),
        (b'{"expires_in": 60}', "without a token"),
        (b'{"token": ""}', "without a token"),
        (b'{"token": "' + b"x" * 70000 + b'"}', "more than 64 KiB"),
    ],
)
def test_broken_token_answers(body: bytes, message: str) -> None:
    auth = make_auth()
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req))
    with pytest.raises(RegistryError, match=message):
        flow.send(answer(token_request, 200, body=body))


def test_identity_token_goes_by_oauth2_post() -> None:
    auth = make_auth(Credentials(identity_token="refresh-me", source="docker-credential-x"))
    req = request("PUT", "/v2/team/app/manifests/1", content=b"{}")
    flow = auth.auth_flow(req)
    next(flow)
    post = flow.send(challenge(req))
    assert post.method == "POST"
    assert post.url == httpx.URL(REALM)
    assert post.headers["content-type"] == "application/x-www-form-urlencoded"
    form = {key: values[0] for key, values in parse_qs(post.content.decode()).items()}
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "client_id": "farm",
        "service": "registry.example",
        "scope": "repository:team/app:pull,push",
    }
    assert flow.send(answer(post, body={"access_token": "a1", "refresh_token": "rotated"})) is req
    assert req.headers["authorization"] == "Bearer a1"
    finish(flow, answer(req, 201))

    # The rotated refresh token is the one used next.
    other = request("GET", "/v2/other/manifests/1")
    flow = auth.auth_flow(other)
    post = next(flow)
    assert "refresh_token=rotated" in post.content.decode()


def test_identity_token_falls_back_to_get_when_post_is_404() -> None:
    auth = make_auth(Credentials(identity_token="refresh-me"))
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    post = flow.send(challenge(req))
    get = flow.send(answer(post, 404))
    assert get.method == "GET"
    assert scopes_asked(get) == ["repository:team/app:pull"]
    assert flow.send(token_answer(get, "g1")) is req
    assert req.headers["authorization"] == "Bearer g1"


def test_identity_token_refused_is_an_error() -> None:
    auth = make_auth(Credentials(identity_token="refresh-me", source="docker-credential-x"))
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    post = flow.send(challenge(req))
    with pytest.raises(RegistryError, match="refused an identity token from docker-credential-x") as caught:
        flow.send(answer(post, 400, body={"error": "invalid_grant"}))
    assert "refresh-me" not in str(caught.value)


def test_registry_token_is_sent_as_is() -> None:
    auth = make_auth(Credentials(registry_token="rt"))
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    assert flow.send(challenge(req)) is req
    assert req.headers["authorization"] == "Bearer rt"


async def _chunks() -> AsyncGenerator[bytes]:
    yield b"data"


def test_a_streamed_body_waits_for_the_challenge_first() -> None:
    auth = make_auth()
    req = request("PUT", "/v2/team/app/blobs/uploads/1?digest=sha256:ab", content=_chunks())
    flow = auth.auth_flow(req)
    probe = next(flow)
    assert (probe.method, probe.url) == ("GET", httpx.URL(f"https://{HOST}/v2/"))
    token_request = flow.send(challenge(probe))
    assert scopes_asked(token_request) == ["repository:team/app:pull,push"]
    assert flow.send(token_answer(token_request)) is req
    assert req.headers["authorization"] == "Bearer t1"
    finish(flow, answer(req, 201))


def test_a_streamed_body_is_not_sent_twice() -> None:
    clock = Clock()
    auth = make_auth(clock=clock)
    first = request("POST", "/v2/team/app/blobs/uploads/")
    flow = auth.auth_flow(first)
    next(flow)
    flow.send(token_answer(flow.send(challenge(first)), expires_in=3600))
    finish(flow, answer(first))

    req = request("PUT", "/v2/team/app/blobs/uploads/1?digest=sha256:ab", content=_chunks())
    flow = auth.auth_flow(req)
    assert next(flow).headers["authorization"] == "Bearer t1"  # the cached token covers it
    refused = challenge(req, BEARER + ',error="invalid_token"')
    finish(flow, refused)
    assert "streamed body, which cannot be sent twice" in (refusal_hint(refused) or "")


def test_a_stream_to_an_open_registry_goes_after_the_probe() -> None:
    auth = make_auth()
    req = request("PUT", "/v2/team/app/blobs/uploads/1?digest=sha256:ab", content=_chunks())
    flow = auth.auth_flow(req)
    probe = next(flow)
    assert flow.send(answer(probe)) is req
    assert "authorization" not in req.headers
    finish(flow, answer(req, 201))


@pytest.mark.parametrize(
    ("registry_url", "realm", "message"),
    [
        (f"https://{HOST}/v2/x/manifests/1", "http://auth.example/token", "plain-HTTP"),
        (f"https://{HOST}/v2/x/manifests/1", "https://10.0.0.1/token", "internal address"),
        (f"https://{HOST}/v2/x/manifests/1", "https://127.0.0.1:5001/token", "internal address"),
        (f"https://{HOST}/v2/x/manifests/1", "", "no usable token realm"),
        (f"https://{HOST}/v2/x/manifests/1", "ftp://auth.example/", "no usable token realm"),
    ],
)
def test_unsafe_realms_are_refused(registry_url: str, realm: str, message: str) -> None:
    auth = make_auth()
    req = httpx.Request("GET", registry_url)
    flow = auth.auth_flow(req)
    next(flow)
    with pytest.raises(RegistryError, match=message):
        flow.send(challenge(req, f'Bearer realm="{realm}",service="s"'))


@pytest.mark.parametrize(
    ("registry", "realm"),
    [("127.0.0.1:5000", "http://127.0.0.1:5001/token"), ("localhost:5000", "http://localhost:5001/token")],
)
def test_a_loopback_registry_may_use_a_loopback_http_realm(registry: str, realm: str) -> None:
    auth = make_auth(host=registry)
    req = httpx.Request("GET", f"http://{registry}/v2/x/manifests/1")
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req, f'Bearer realm="{realm}"'))
    assert token_request.url.copy_with(query=None) == httpx.URL(realm)
    assert "service" not in token_request.url.params


def test_timeouts_travel_to_the_token_request() -> None:
    auth = make_auth()
    req = request()
    req.extensions["timeout"] = httpx.Timeout(5.0).as_dict()
    flow = auth.auth_flow(req)
    next(flow)
    token_request = flow.send(challenge(req))
    assert token_request.extensions["timeout"] == httpx.Timeout(5.0).as_dict()


def test_a_401_without_a_usable_challenge_is_returned() -> None:
    auth = make_auth()
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    finish(flow, answer(req, 401, {"WWW-Authenticate": "Negotiate"}))
    req = request()
    flow = auth.auth_flow(req)
    next(flow)
    finish(flow, answer(req, 401))


def test_the_async_driver_looks_credentials_up_in_a_thread_and_once() -> None:
    lookups: list[str] = []

    class Keychain:
        def get(self, registry: str) -> Credentials | None:
            lookups.append(threading.current_thread().name)
            return Credentials("alice", PASSWORD)

        def describe(self) -> str:
            return "here"

    auth = RegistryAuth(Keychain())

    async def drive() -> list[bool]:
        sent: list[bool] = []
        for _ in range(2):
            req = request()
            flow = auth.async_auth_flow(req)
            outgoing = await flow.__anext__()
            while True:
                sent.append("authorization" in outgoing.headers)
                if "authorization" in outgoing.headers:
                    response = httpx.Response(200, request=outgoing)
                else:
                    response = httpx.Response(
                        401,
                        headers={"WWW-Authenticate": 'Basic realm="r"'},
                        stream=_Stream(),
                        request=outgoing,
                    )
                try:
                    outgoing = await flow.asend(response)
                except StopAsyncIteration:
                    break
        return sent

    sent = asyncio.run(drive())
    assert sent == [False, True, True]
    assert len(lookups) == 1
    assert lookups[0] != threading.main_thread().name


class _Stream(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncGenerator[bytes]:
        yield b"unauthorized"


def test_credentials_never_show_in_repr() -> None:
    credentials = Credentials("alice", PASSWORD, identity_token="idtok", registry_token="regtok", source="x")
    shown = repr(credentials)
    assert "alice" in shown
    assert all(secret not in shown for secret in (PASSWORD, "idtok", "regtok"))

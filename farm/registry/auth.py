"""Registry authentication: ``WWW-Authenticate`` challenges, Basic, and the bearer-token flow.

The flow is an ``httpx.Auth``: a generator that yields requests and is sent their responses, so it
does no I/O of its own and is tested by driving it with ``next()``/``send()``. The only outside call
is the credential lookup, which the async driver runs in a thread before the flow needs it.

The handshake (distribution ``docs/spec/auth/token.md``, ggcr ``transport``):

 1. A request to a host whose challenge is unknown goes out as it is. (If its body is a stream
    that cannot be sent twice, the flow first asks ``GET /v2/`` for the challenge.)
 2. A 401 carries ``WWW-Authenticate``. ``Basic``: send the user and password with this request
    and every later one to that host. ``Bearer``: ask the realm for a token for the scopes this
    request needs (``GET realm?service=&scope=…`` with Basic credentials if there are any, else
    anonymously; ``POST`` with ``grant_type=refresh_token`` for an identity token), then resend.
 3. Tokens are cached per host and scope set until ``expires_in`` (60 s if absent) nearly runs
    out. A later request whose scopes a cached token covers reuses it without a round trip.
 4. A 401 to a request that carried a cached token (expired early, revoked) drops that token
    and asks for a new one for this request's scopes plus any the challenge's ``scope`` names,
    then resends once. A token fetched for this very request is asked for again only if the
    challenge names scopes it was not asked for; refused Basic credentials are not resent. The
    401 that stands goes to the caller with a note (``refusal_hint``) saying whose credentials
    were refused, or where farm looked for credentials and found none.

Scopes come from the request itself: ``pull`` for GET/HEAD, ``pull,push`` for POST/PUT/PATCH,
``delete`` for DELETE (distribution's ``appendAccessRecords``), plus ``pull`` on the ``from``
repository of a cross-repository mount. The target's scope always comes first, because some token
servers only look at the first one.

No secret (password, identity token, token) is ever put into an exception or a note.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import httpx

from farm.errors import RegistryError
from farm.registry.credentials import Credentials
from farm.registry.name import is_loopback_host
from farm.registry.transport import is_replayable

__all__ = [
    "Challenge",
    "CredentialSource",
    "RegistryAuth",
    "Scope",
    "merge_scopes",
    "parse_challenges",
    "parse_www_authenticate",
    "pick_challenge",
    "refusal_hint",
    "scopes_for_request",
]

DEFAULT_EXPIRES_IN = 60.0
_MAX_TOKEN_BODY = 64 * 1024
_NOTE = "farm.auth"  # response extension carrying a secret-free note on why a 401 stands
_CLIENT_ID = "farm"


# -- WWW-Authenticate (RFC 7235 section 4.1) ----------------------------------------------------
#
#   WWW-Authenticate = 1#challenge
#   challenge        = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
#   auth-param       = token BWS "=" BWS ( token / quoted-string )
#
# Challenges and their parameters are both separated by commas, so a challenge ends where a
# token is *not* followed by "=". Scheme and parameter names are case-insensitive (lowercased
# here); values keep their case. The parser is lenient, like browsers: unquoted values may hold
# any character but whitespace and ",", and garbage is skipped rather than fatal.


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase
    params: Mapping[str, str] = field(default_factory=dict)  # lowercase names
    token68: str = ""

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def error(self) -> str:
        return self.params.get("error", "")

    @property
    def scopes(self) -> tuple[Scope, ...]:
        parsed = (Scope.parse(text) for text in self.params.get("scope", "").split())
        return tuple(scope for scope in parsed if scope is not None)


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_SPACE = " \t"


class _Cursor:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, char: str) -> bool:
        return not self.done and self.text[self.pos] == char

    def skip(self, chars: str) -> None:
        while not self.done and self.text[self.pos] in chars:
            self.pos += 1

    def token(self) -> str:
        start = self.pos
        while not self.done and self.text[self.pos] in _TCHAR:
            self.pos += 1
        return self.text[start : self.pos]

    def bare_value(self) -> str:
        start = self.pos
        while not self.done and self.text[self.pos] not in _SPACE + ",":
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        """A quoted-string starting at the opening quote; backslash quotes the next character."""
        self.pos += 1
        chars: list[str] = []
        while not self.done:
            char = self.text[self.pos]
            self.pos += 1
            if char == '"':
                break
            if char == "\\" and not self.done:
                char = self.text[self.pos]
                self.pos += 1
            chars.append(char)
        return "".join(chars)

    def token68(self) -> str:
        """A token68 if one stands here alone (followed by the end or a comma), else nothing."""
        match = _TOKEN68.match(self.text, self.pos)
        if match is None:
            return ""
        end = match.end()
        rest = end
        while rest < len(self.text) and self.text[rest] in _SPACE:
            rest += 1
        if rest < len(self.text) and self.text[rest] != ",":
            return ""
        self.pos = end
        return match.group()


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in one ``WWW-Authenticate`` header value, in order."""
    cursor = _Cursor(header)
    challenges: list[Challenge] = []
    while True:
        cursor.skip(_SPACE + ",")
        if cursor.done:
            return challenges
        scheme = cursor.token()
        if not scheme:  # not a challenge: skip to the next comma
            cursor.pos += 1
            while not cursor.done and not cursor.peek(","):
                cursor.pos += 1
            continue
        cursor.skip(_SPACE)
        token68 = cursor.token68()
        params: dict[str, str] = {}
        while not token68:
            mark = cursor.pos
            cursor.skip(_SPACE + ",")
            name = cursor.token()
            cursor.skip(_SPACE)
            if not name or not cursor.peek("="):
                cursor.pos = mark  # the next challenge (or garbage) starts here
                break
            cursor.pos += 1
            cursor.skip(_SPACE)
            value = cursor.quoted() if cursor.peek('"') else cursor.bare_value()
            params.setdefault(name.lower(), value)
        challenges.append(Challenge(scheme.lower(), params, token68))


def parse_www_authenticate(headers: httpx.Headers) -> list[Challenge]:
    """The challenges of every ``WWW-Authenticate`` header of a response."""
    return [c for value in headers.get_list("www-authenticate") for c in parse_challenges(value)]


def pick_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The first challenge farm can answer (Basic or Bearer), as ggcr picks."""
    return next((c for c in challenges if c.scheme in ("basic", "bearer")), None)


# -- Scopes (distribution docs/spec/auth/scope.md) ----------------------------------------------
#
#   scope = resourcetype ":" resourcename ":" action *( "," action )
#
# The resource name may hold a "host:port", so the type ends at the first ":" and the actions
# start after the last.


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name or not actions:
            return None
        return cls(kind, name, tuple(action for action in actions.split(",") if action))

    @classmethod
    def repository(cls, name: str, *actions: str) -> Scope:
        return cls("repository", name, actions)

    def covers(self, other: Scope) -> bool:
        if (self.type, self.name) != (other.type, other.name):
            return False
        return "*" in self.actions or set(other.actions) <= set(self.actions)


def merge_scopes(first: Sequence[Scope], more: Iterable[Scope]) -> tuple[Scope, ...]:
    """``first`` in its order with ``more``'s actions added: same resources merge, new ones go last."""
    merged = list(first)
    for scope in more:
        for i, known in enumerate(merged):
            if (known.type, known.name) == (scope.type, scope.name):
                extra = tuple(a for a in scope.actions if a not in known.actions)
                merged[i] = Scope(known.type, known.name, known.actions + extra)
                break
        else:
            merged.append(scope)
    return tuple(merged)


_API_PATH = re.compile(r"^/v2/(?P<name>.+)/(?:manifests|blobs|tags|referrers)/(?:uploads/)?[^/]*$")
_ACTIONS = {"GET": ("pull",), "HEAD": ("pull",), "POST": ("pull", "push"), "PUT": ("pull", "push")}
_ACTIONS |= {"PATCH": ("pull", "push"), "DELETE": ("delete",)}


def scopes_for_request(method: str, path: str, query: Mapping[str, str]) -> tuple[Scope, ...]:
    """The scopes a registry API request needs, the target repository's first."""
    if path.rstrip("/") == "/v2/_catalog":
        return (Scope("registry", "catalog", ("*",)),)
    match = _API_PATH.match(path)
    actions = _ACTIONS.get(method.upper())
    if match is None or actions is None:
        return ()
    scopes = [Scope.repository(match["name"], *actions)]
    source = query.get("from", "")
    if source and source != match["name"]:
        scopes.append(Scope.repository(source, "pull"))
    return tuple(scopes)


# -- The flow -----------------------------------------------------------------------------------


class CredentialSource(Protocol):
    def get(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (``host[:port]``), or None; may run a helper."""
        ...

    def describe(self) -> str:
        """Where credentials are looked up, for messages (never a secret)."""
        ...


@dataclass
class _Token:
    value: str = field(repr=False)
    scopes: tuple[Scope, ...]
    usable_until: float
    refresh_token: str = field(default="", repr=False)

    def covers(self, scopes: Sequence[Scope]) -> bool:
        return all(any(mine.covers(wanted) for mine in self.scopes) for wanted in scopes)


@dataclass
class _Host:
    challenge: Challenge
    tokens: list[_Token] = field(default_factory=list)
    refresh_token: str = field(default="", repr=False)  # an identity token, updated if the server rotates it


_MISSING = object()

# What _authorize put on a request: nothing, fixed credentials (Basic, a registry token), a cached
# token, or a token fetched just now.
_Given = Literal["nothing", "static", "cached", "fresh"]


class RegistryAuth(httpx.Auth):
    """Authentication for every registry one client talks to, keyed by ``host[:port]``."""

    def __init__(self, credentials: CredentialSource, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._source = credentials
        self._clock = clock
        self._hosts: dict[str, _Host] = {}
        self._credentials: dict[str, Credentials | None] = {}

    # The drivers: read the bodies the flow looks at, and look credentials up off the event loop.

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing is not request or response.status_code == 401:
                response.read()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing is not request or response.status_code == 401:
                await response.aread()
            if response.status_code == 401:
                host = _host(request)
                if host not in self._credentials:
                    self._credentials[host] = await asyncio.to_thread(self._source.get, host)
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        host = _host(request)
        state = self._hosts.get(host)
        if state is None and not is_replayable(request):
            # A streamed body can be sent once only: learn the challenge before sending it.
            probe = yield self._derived(request, "GET", request.url.copy_with(path="/v2/", query=None))
            state = self._learn(host, probe)
        scopes = scopes_for_request(request.method, request.url.path, request.url.params)
        given: _Given | None = None
        if state is not None:
            given = yield from self._authorize(request, host, state, scopes)
        sent = request.headers.get("authorization", "")
        response = yield request
        if response.status_code != 401:
            return
        state = self._learn(host, response)
        if state is None:
            return
        if not is_replayable(request):
            self._note(response, host, sent, stream=True)
            return
        wanted = merge_scopes(scopes, state.challenge.scopes)
        # Asking again only helps with a cached token (it may have expired early or been revoked)
        # or when the registry names scopes the token was not asked for.
        if given in ("nothing", "static") or (given == "fresh" and wanted == tuple(scopes)):
            self._note(response, host, sent)
            return
        if (yield from self._authorize(request, host, state, wanted, refused=sent)) == "nothing":
            self._note(response, host, sent)
            return
        response = yield request
        if response.status_code == 401:
            self._learn(host, response)
            self._note(response, host, request.headers.get("authorization", ""))

    def _learn(self, host: str, response: httpx.Response) -> _Host | None:
        """Record the challenge of a 401 (the old tokens stay: they may cover other scopes)."""
        if response.status_code != 401:
            return self._hosts.get(host)
        challenge = pick_challenge(parse_www_authenticate(response.headers))
        if challenge is None:
            return self._hosts.get(host)
        state = self._hosts.get(host)
        if state is None or state.challenge.scheme != challenge.scheme:
            state = self._hosts[host] = _Host(challenge)
        else:
            state.challenge = challenge
        return state

    def _authorize(
        self,
        request: httpx.Request,
        host: str,
        state: _Host,
        scopes: Sequence[Scope],
        *,
        refused: str = "",
    ) -> Generator[httpx.Request, httpx.Response, _Given]:
        """Put an Authorization header on ``request``, and say what it was.

        ``refused`` is the Authorization header the registry just answered 401 to: its token goes.
        """
        request.headers.pop("authorization", None)
        credentials = self._lookup(host)
        if credentials is not None and credentials.registry_token:
            request.headers["Authorization"] = f"Bearer {credentials.registry_token}"
            return "static"
        if state.challenge.scheme == "basic":
            if credentials is None or not credentials.has_password:
                return "nothing"
            request.headers["Authorization"] = _basic(credentials.username, credentials.password)
            return "static"
        now = self._clock()
        state.tokens = [t for t in state.tokens if t.usable_until > now and f"Bearer {t.value}" != refused]
        token = next((t for t in state.tokens if t.covers(scopes)), None)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token.value}"
            return "cached"
        token = yield from self._fetch_token(request, host, state, scopes, credentials)
        if token is None:
            return "nothing"
        state.tokens.append(token)
        request.headers["Authorization"] = f"Bearer {token.value}"
        return "fresh"

    def _fetch_token(
        self,
        request: httpx.Request,
        host: str,
        state: _Host,
        scopes: Sequence[Scope],
        credentials: Credentials | None,
    ) -> Generator[httpx.Request, httpx.Response, _Token | None]:
        challenge = state.challenge
        realm = _checked_realm(challenge, request, host)
        service = challenge.service
        refresh_token = state.refresh_token or (credentials.identity_token if credentials else "")
        if refresh_token:
            # docker's OAuth2 flow (distribution docs/spec/auth/oauth.md) for identity tokens.
            form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": _CLIENT_ID}
            if service:
                form["service"] = service
            if scopes:
                form["scope"] = " ".join(str(scope) for scope in scopes)
            response = yield self._derived(request, "POST", realm, data=form)
            if response.status_code != 404:  # 404: the realm has no OAuth2 endpoint; GET instead
                token = self._read_token(response, host, scopes, credentials, presented=True)
                if token is not None and token.refresh_token:
                    state.refresh_token = token.refresh_token
                return token
        params: list[tuple[str, str | int | float | bool | None]] = [("service", service)] if service else []
        params += [("scope", str(scope)) for scope in scopes]
        presented = credentials is not None and credentials.has_password
        if presented:
            assert credentials is not None
            params.append(("account", credentials.username))
        get = self._derived(request, "GET", realm.copy_merge_params(params))
        if presented:
            assert credentials is not None
            get.headers["Authorization"] = _basic(credentials.username, credentials.password)
        response = yield get
        return self._read_token(response, host, scopes, credentials, presented=presented)

    def _read_token(
        self,
        response: httpx.Response,
        host: str,
        scopes: Sequence[Scope],
        credentials: Credentials | None,
        *,
        presented: bool,
    ) -> _Token | None:
        """The token in a token server's answer, or None if anonymous access was refused."""
        where = f"{response.request.method} {response.request.url.copy_with(query=None)}"
        if response.status_code != 200:
            if not presented or credentials is None:
                return None  # anonymous access refused: the caller gets the registry's 401
            detail = _short(response.text) if len(response.content) <= _MAX_TOKEN_BODY else ""
            raise RegistryError(
                f"the token server for {host} refused {credentials.describe()}: {where} answered "
                f"HTTP {response.status_code}{': ' + detail if detail else ''}",
                status=response.status_code,
                request=where,
                hint=f"check the credentials for {host}, or log in again with `docker login {host}`",
            )
        if len(response.content) > _MAX_TOKEN_BODY:
            raise RegistryError(f"the token server for {host} answered more than 64 KiB", request=where)
        try:
            document = json.loads(response.content)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise RegistryError(f"the token server for {host} did not answer JSON", request=where)
        value = document.get("token") or document.get("access_token")
        if not isinstance(value, str) or not value:
            raise RegistryError(f"the token server for {host} answered without a token", request=where)
        expires_in = document.get("expires_in")
        lifetime = DEFAULT_EXPIRES_IN
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
            lifetime = float(expires_in)
        margin = min(10.0, lifetime / 10)  # ask again a little before the registry would refuse it
        rotated = document.get("refresh_token")
        return _Token(
            value,
            tuple(scopes),
            self._clock() + lifetime - margin,
            rotated if isinstance(rotated, str) else "",
        )

    def _lookup(self, host: str) -> Credentials | None:
        found = self._credentials.get(host, _MISSING)
        if found is _MISSING:
            found = self._credentials[host] = self._source.get(host)
        assert found is None or isinstance(found, Credentials)
        return found

    def _note(self, response: httpx.Response, host: str, sent: str, *, stream: bool = False) -> None:
        """Say why this 401 stands, for the caller's error message."""
        challenge = pick_challenge(parse_www_authenticate(response.headers))
        reason = f" ({challenge.error})" if challenge is not None and challenge.error else ""
        credentials = self._lookup(host)
        if stream:
            note = (
                f"{host} asked for authentication again while farm was sending a streamed body, which "
                "cannot be sent twice (a token may have expired); try again"
            )
        elif credentials is None:
            note = (
                f"no credentials for {host} in {self._source.describe()}; "
                f"log in with `docker login {host}` or add them there"
            )
        elif sent:
            note = f"{host} refused {credentials.describe()}{reason}; check its access rights"
        else:
            note = f"{host} wants credentials farm cannot send ({credentials.describe()}){reason}"
        response.extensions[_NOTE] = note

    @staticmethod
    def _derived(
        request: httpx.Request, method: str, url: httpx.URL, *, data: dict[str, str] | None = None
    ) -> httpx.Request:
        """A request of the flow's own, with the original's User-Agent and timeouts."""
        headers = {"User-Agent": request.headers["user-agent"]} if "user-agent" in request.headers else {}
        extensions = {"timeout": request.extensions["timeout"]} if "timeout" in request.extensions else {}
        return httpx.Request(method, url, headers=headers, data=data, extensions=extensions)


def refusal_hint(response: httpx.Response) -> str | None:
    """What the auth flow found out about a 401 it could not get past, if anything."""
    note = response.extensions.get(_NOTE)
    return note if isinstance(note, str) else None


def _host(request: httpx.Request) -> str:
    return request.url.netloc.decode("ascii")


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _short(text: str) -> str:
    return " ".join(text.split())[:300]


def _checked_realm(challenge: Challenge, request: httpx.Request, host: str) -> httpx.URL:
    """The token realm, refused if credentials could leak from it (ggcr's checks).

    It must be https unless the registry itself was reached over http, and it may point at a
    loopback or private IP literal only if the registry is on one too.
    """
    try:
        realm = httpx.URL(challenge.realm)
    except httpx.InvalidURL:
        realm = None
    if realm is None or realm.scheme not in ("http", "https") or not realm.host:
        raise RegistryError(f"{host} names no usable token realm ({challenge.realm!r})")
    if realm.scheme == "http" and request.url.scheme != "http":
        raise RegistryError(
            f"{host} is served over https but sends farm for tokens to plain-HTTP {realm}; farm refuses"
        )
    if _is_internal(realm.host) and not (_is_internal(request.url.host) or is_loopback_host(host)):
        raise RegistryError(
            f"{host} sends farm for tokens to an internal address ({realm.host}); farm refuses"
        )
    return realm


def _is_internal(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")
    return address.is_loopback or address.is_private or address.is_link_local

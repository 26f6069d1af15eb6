"""HTTP to the read-only API (`mljob api`): at a URL given (`--api-url`, `MLJOB_API_URL`), or
through the apiserver's service proxy (`MLJOB_API_SERVICE`, default the chart's Service
`mljob/mljob-operator-api`, port `http`) with the kubeconfig's credentials.

The API authenticates every request by the caller's own Kubernetes token. Sent directly it
travels in `Authorization: Bearer`; through the service proxy the apiserver authenticates the
caller by `Authorization` (or a client certificate) and then removes that header, so the token
also travels in `X-MLJob-Token` (operations.md, "The read-only API"). Answers are read as they
arrive: a streamed export never sits in memory whole.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

from mljob.client.errors import (
    ClientError,
    Forbidden,
    Interrupted,
    NotFound,
    Unauthorized,
    Unavailable,
    UsageError,
)
from mljob.client.kubeconfig import Connection

TOKEN_HEADER = "X-MLJob-Token"
#: Bytes per read of a streamed answer.
CHUNK = 64 * 1024
#: The most of an error body read (an error is a line of JSON; a proxy's page could be large).
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class ServiceRef:
    """`NAMESPACE/NAME[:PORT]`: the API's Service, as the service proxy's path names it."""

    namespace: str
    name: str
    port: str = "http"

    @classmethod
    def parse(cls, text: str) -> ServiceRef:
        namespace, slash, rest = text.partition("/")
        name, _, port = rest.partition(":")
        if not slash or not namespace or not name:
            raise UsageError(f"--api-service: NAMESPACE/NAME or NAMESPACE/NAME:PORT expected, got {text!r}")
        return cls(namespace, name, port or "http")

    def proxy_path(self) -> str:
        quote = urllib.parse.quote
        return (
            f"/api/v1/namespaces/{quote(self.namespace)}/services/{quote(self.name)}:{quote(self.port)}/proxy"
        )

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}"


@dataclass(frozen=True)
class Target:
    """What a request is about, for the messages of its refusals."""

    namespace: str
    name: str | None = None

    @property
    def verb(self) -> str:
        return "get" if self.name else "list"

    @property
    def object(self) -> str:
        return f"mljobs/{self.name}" if self.name else "mljobs"


class ApiTransport:
    """GETs to the read-only API; one pool of connections, reused."""

    def __init__(
        self,
        conn: Connection | None,
        api_url: str | None = None,
        service: ServiceRef | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        if api_url is None and (conn is None or service is None):
            raise UsageError("the read-only API needs --api-url, or a kubeconfig to reach its Service")
        self.conn = conn
        self.service = service if api_url is None else None
        self.timeout = timeout
        self._token = token
        if api_url is not None:
            import urllib3

            self.base = api_url.rstrip("/")
            self._pool: Any = urllib3.PoolManager(num_pools=2, maxsize=2)
        else:
            assert conn is not None and service is not None
            self.base = conn.host.rstrip("/") + service.proxy_path()
            self._pool = conn.api.rest_client.pool_manager

    @property
    def where(self) -> str:
        """How the API is reached, for messages."""
        if self.service is not None:
            return f"the read-only API (Service {self.service}, through the apiserver's service proxy)"
        return f"the read-only API at {self.base}"

    def _caller_token(self) -> str:
        token = self._token or (self.conn.bearer_token() if self.conn is not None else None)
        if not token:
            who = self.conn.user if self.conn is not None else "you"
            raise UsageError(
                f"no token to send to the read-only API: {who} has none in the kubeconfig (a client "
                'certificate?). Pass --token, e.g. --token "$(kubectl -n NS create token ACCOUNT)", '
                "or set MLJOB_API_TOKEN"
            )
        return token

    def _headers(self, accept: str) -> dict[str, str]:
        token = self._caller_token()
        headers = {"Accept": accept, "User-Agent": "mljob-client"}
        if self.service is None:
            headers["Authorization"] = f"Bearer {token}"
            return headers
        assert self.conn is not None
        # The apiserver's own authentication of the caller (a token, or a client certificate
        # the pool presents); then the API's, in the header the proxy passes on.
        kube = self.conn.api.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if kube:
            headers["Authorization"] = kube
        headers[TOKEN_HEADER] = token
        return headers

    def _open(self, path: str, query: Mapping[str, str | None], accept: str, target: Target) -> Any:
        import urllib3

        params = {k: v for k, v in query.items() if v is not None}
        url = self.base + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        try:
            reply = self._pool.request(
                "GET",
                url,
                headers=self._headers(accept),
                preload_content=False,
                retries=False,
                timeout=urllib3.Timeout(connect=min(self.timeout, 15.0), read=self.timeout),
            )
        except urllib3.exceptions.HTTPError as err:
            raise Unavailable(f"cannot reach {self.where} ({type(err).__name__}: {err})") from None
        if reply.status >= 400:
            body = reply.read(MAX_ERROR_BODY)
            reply.release_conn()
            raise self.error(reply.status, body, dict(reply.headers), target)
        return reply

    def get_json(self, path: str, query: Mapping[str, str | None], target: Target) -> dict[str, Any]:
        import urllib3

        reply = self._open(path, query, "application/json", target)
        try:
            data = reply.read()
        except urllib3.exceptions.HTTPError as err:
            raise Interrupted(f"the answer of {self.where} broke off ({type(err).__name__}: {err})") from None
        finally:
            reply.release_conn()
        try:
            answer = json.loads(data)
        except ValueError:
            raise ClientError(f"{self.where} answered something that is not JSON: {data[:200]!r}") from None
        if not isinstance(answer, dict):
            raise ClientError(f"{self.where} answered {type(answer).__name__}, not an object")
        return answer

    def stream(
        self, path: str, query: Mapping[str, str | None], target: Target
    ) -> Generator[bytes, None, None]:
        """The body in pieces as they arrive; Interrupted when it breaks off before its end."""
        import urllib3

        reply = self._open(path, query, "*/*", target)
        received = 0
        try:
            for piece in reply.stream(CHUNK):
                received += len(piece)
                yield piece
        except urllib3.exceptions.HTTPError as err:
            raise Interrupted(
                f"the answer of {self.where} broke off after {received:,} bytes "
                f"({type(err).__name__}): what was received is not whole; run it again"
            ) from None
        finally:
            reply.release_conn()

    def error(self, status: int, body: bytes, headers: Mapping[str, str], target: Target) -> ClientError:
        """The refusal `status` with `body`, as a one-line ClientError saying what to do."""
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            text = body.decode("utf-8", "replace").strip().splitlines()
            return ClientError(f"{self.where} answered {status}: {(text[0] if text else '')[:200]}")
        if answer.get("kind") == "Status":  # the apiserver's own answer: the proxy, not the API
            return self._proxy_error(status, str(answer.get("message") or answer.get("reason") or ""))
        message = str(answer.get("error") or answer)
        where = f"in namespace {target.namespace}"
        if status == 401:
            return Unauthorized(
                f"the read-only API does not accept your token ({message}): get a new one "
                "(kubectl create token, or log in again) and pass it with --token or MLJOB_API_TOKEN"
            )
        if status == 403:
            return Forbidden(f"your token may not {target.verb} {target.object} {where} ({message})")
        if status == 404:
            return NotFound(message)
        if status == 400:
            return UsageError(message)
        if status == 429:
            later = headers.get("Retry-After")
            return Unavailable(message + (f" (retry after {later} s)" if later else ""))
        return Unavailable(f"{self.where} could not answer ({status}): {message}")

    def _proxy_error(self, status: int, message: str) -> ClientError:
        service = self.service
        assert service is not None and self.conn is not None
        if status == 401:
            return Unauthorized(
                f"the Kubernetes API at {self.conn.host} does not accept the credentials of "
                f"{self.conn.user} ({message}): log in again, or pass another --kubeconfig or --context"
            )
        if status == 403:
            return Forbidden(
                f"your credentials ({self.conn.user}) may not use the service proxy to "
                f"{service.namespace}/{service.name} (get services/proxy): {message}. Or reach the API "
                f"by `kubectl -n {service.namespace} port-forward svc/{service.name} 8080:{service.port}` "
                "and --api-url http://localhost:8080"
            )
        if status == 404:
            return NotFound(
                f"no read-only API Service {service.namespace}/{service.name} ({message}): install the "
                "chart with --set api.enabled=true, name its Service with --api-service or "
                "MLJOB_API_SERVICE, or pass --api-url"
            )
        if status == 503:
            return Unavailable(
                f"the read-only API's Service {service.namespace}/{service.name} has nothing to answer "
                f"({message}): are its pods ready? kubectl -n {service.namespace} get pods "
                "-l app.kubernetes.io/component=api"
            )
        return Unavailable(f"the apiserver's service proxy answered {status}: {message}")

    def close(self) -> None:
        if self.service is None:
            self._pool.clear()

"""Talking to OpenStack: one openstacksdk Connection per set of credentials (its keystoneauth
session, token and endpoint catalog reused across calls), and every failure turned into a CsiError
that says what OpenStack said.

Requests go through the SDK's service adapters with explicit microversions rather than through
its resource classes: the attach flow needs exact microversions (attachments 3.54, in-use extend
3.42), and a raw request is one request, which keeps the API count per operation known.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ... import errors, metrics
from .config import AUTH_SECRET_KEYS, CinderConfig

log = logging.getLogger(__name__)

# keystoneauth imports osprofiler when it is installed (on a host that runs OpenStack services,
# say), and osprofiler imports eventlet: imported in an RPC's thread, eventlet makes that thread
# vanish mid-call (the RPC never answers) and the interpreter's exit hang. We never profile, so
# the import fails as if osprofiler were absent. Done before anything imports keystoneauth.
sys.modules.setdefault("osprofiler.web", None)  # type: ignore[arg-type]
# At DEBUG, keystoneauth and the SDK log whole requests and responses (auth bodies, service
# catalogs, connection info): never, whatever the driver's own level.
for _name in ("keystoneauth", "openstack", "stevedore", "urllib3"):
    logging.getLogger(_name).setLevel(logging.WARNING)

_MAX_CONNECTIONS = 16  # distinct credential sets kept (StorageClasses with their own secrets)


class Api:
    """One authenticated connection: block storage and compute requests."""

    def __init__(self, conn: Any, backend: str, refused: Callable[[Api], None]) -> None:
        self.conn = conn
        self.backend = backend
        self._refused = refused

    def volume(self, method: str, path: str, what: str, *, body: Any = None,
               microversion: str | None = None, missing_ok: bool = False) -> Any:
        return self._call("block_storage", "volume", method, path, what, body,
                          microversion, missing_ok)

    def compute(self, method: str, path: str, what: str, *, body: Any = None,
                microversion: str | None = None, missing_ok: bool = False) -> Any:
        return self._call("compute", "compute", method, path, what, body,
                          microversion, missing_ok)

    def _call(self, adapter: str, service: str, method: str, path: str, what: str, body: Any,
              microversion: str | None, missing_ok: bool) -> Any:
        """The response's JSON ({} when empty); None for a 404 when `missing_ok`."""
        metrics.count_request(self.backend, service)
        try:
            # The SDK makes the service's adapter on first use (version discovery: the first
            # token too), so even this may fail.
            resp = getattr(self.conn, adapter).request(
                path, method, json=body, microversion=microversion, raise_exc=False)
            if resp.status_code == 404 and missing_ok:
                return None
            if resp.status_code >= 400:
                raise _http_error(resp.status_code, _message(resp), what)
        except Exception as exc:
            error = translate(exc, what)
            if isinstance(error, errors.Unauthenticated):
                self._refused(self)  # the next call starts anew (a fixed password, a new file)
            raise error from None
        if not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError:
            raise errors.Unavailable(f"{what}: OpenStack answered HTTP {resp.status_code} "
                                     "with a body that is not JSON") from None

    def max_microversion(self, service: str = "volume") -> tuple[int, int]:
        try:
            adapter = self.conn.block_storage if service == "volume" else self.conn.compute
            data = adapter.get_endpoint_data()
        except Exception as exc:
            raise translate(exc, f"discovering the {service} API") from None
        found = getattr(data, "max_microversion", None)
        return (int(found[0]), int(found[1])) if found else (3, 0)


def _message(resp: Any) -> str:
    """OpenStack's own words: {"badRequest": {"message": ...}}, {"error": {"message": ...}}."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:300] or f"HTTP {resp.status_code}"
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, dict) and value.get("message"):
                return str(value["message"])
        if data.get("message"):
            return str(data["message"])
    return json.dumps(data)[:300]


def _http_error(status: int, message: str, what: str) -> errors.CsiError:
    text = f"{what}: {message} (HTTP {status})"
    if status == 401:
        return errors.Unauthenticated(f"{what}: Keystone refused the credentials: {message}")
    if status == 403:
        return errors.PermissionDenied(text)
    if status == 404:
        return errors.NotFound(text)
    if status == 409:
        return errors.Aborted(text)
    if status == 413 or status == 429:
        return errors.ResourceExhausted(text)
    if status in (400, 422):
        return errors.InvalidArgument(text)
    return errors.Unavailable(text)


def translate(exc: BaseException, what: str) -> errors.CsiError:
    """A CsiError for what openstacksdk or keystoneauth raised (network faults come from
    keystoneauth, API errors from either)."""
    from keystoneauth1 import exceptions as ks
    from openstack import exceptions as sdk

    if isinstance(exc, errors.CsiError):
        return exc
    if isinstance(exc, ks.http.HttpError) and exc.http_status:
        # Service calls answer as responses (raise_exc=False): an HTTP error raised is
        # Keystone's, while authenticating. It answers a token it cannot read with 404.
        if int(exc.http_status) in (401, 404):
            return errors.Unauthenticated(
                f"{what}: Keystone refused the credentials: {exc.message or exc}")
        return _http_error(int(exc.http_status), exc.message or str(exc), what)
    if isinstance(exc, sdk.HttpException) and exc.status_code:
        return _http_error(int(exc.status_code), exc.details or exc.message, what)
    if isinstance(exc, ks.ConnectTimeout | ks.RequestTimeout):
        return errors.Unavailable(f"{what}: OpenStack did not answer in time ({exc})")
    if isinstance(exc, ks.ConnectionError):
        return errors.Unavailable(f"{what}: cannot reach OpenStack ({exc})")
    if isinstance(exc, ks.EndpointNotFound | ks.EmptyCatalog | sdk.EndpointNotFound):
        return errors.FailedPrecondition(
            f"{what}: the service catalog has no such endpoint for this region and interface "
            f"({exc})")
    if isinstance(exc, ks.DiscoveryFailure):
        return errors.Unavailable(f"{what}: OpenStack API discovery failed ({exc})")
    if isinstance(exc, sdk.ConfigException) and "endpoint" in str(exc):
        return errors.FailedPrecondition(
            f"{what}: the service catalog has no such endpoint for this region and interface "
            f"({exc})")
    if isinstance(exc, ks.MissingRequiredOptions | ks.NoMatchingPlugin | ks.AuthPluginException
                  | sdk.ConfigException):
        return errors.InvalidArgument(f"{what}: OpenStack credentials incomplete ({exc})")
    if isinstance(exc, ks.ClientException | sdk.SDKException):
        return errors.Unavailable(f"{what}: {exc}")
    log.exception("%s: unexpected error", what)
    return errors.Internal(f"{what}: unexpected {type(exc).__name__}")


def _complete(auth: Mapping[str, str], has_file: bool) -> None:
    """INVALID_ARGUMENT naming what a set of secrets lacks (the SDK would fail with a bare
    Exception at the first request)."""
    lacking = []
    if "auth_url" not in auth and not has_file:
        lacking.append("auth_url")
    if "token" in auth:
        pass
    elif any(k.startswith("application_credential") for k in auth):
        if "application_credential_secret" not in auth:
            lacking.append("application_credential_secret")
        if "application_credential_id" not in auth and not (
                "application_credential_name" in auth
                and ("user_id" in auth or "username" in auth)):
            lacking.append("application_credential_id (or its name with username)")
    else:
        if "password" not in auth:
            lacking.append("password")
        if "username" not in auth and "user_id" not in auth:
            lacking.append("username or user_id")
    if lacking:
        raise errors.InvalidArgument(
            f"OpenStack credentials in the secrets are incomplete: {', '.join(lacking)} missing")


class Cloud:
    """Connections by credentials: the config's clouds.yaml entry, or CSI secrets over it."""

    def __init__(self, config: CinderConfig, backend: str) -> None:
        self.config = config
        self.backend = backend
        self._lock = threading.Lock()
        self._apis: OrderedDict[str, Api] = OrderedDict()

    def api(self, secrets: Mapping[str, str]) -> Api:
        auth = {k: v for k, v in secrets.items() if k in AUTH_SECRET_KEYS}
        if not auth and not self.config.cloudsFile:
            raise errors.InvalidArgument(
                "OpenStack credentials missing: set cloudsFile and cloud in the backend config, "
                "or pass them as CSI secrets (auth_url, username, password, project_name, ... or "
                "application_credential_id and application_credential_secret)")
        if auth:
            _complete(auth, has_file=bool(self.config.cloudsFile))
        key = hashlib.sha256(json.dumps(sorted(auth.items())).encode()).hexdigest()
        with self._lock:
            found = self._apis.get(key)
            if found is not None:
                self._apis.move_to_end(key)
                return found
        api = Api(self._connect(auth), self.backend, self.forget)
        with self._lock:
            self._apis[key] = api
            while len(self._apis) > _MAX_CONNECTIONS:
                self._apis.popitem(last=False)
        return api

    def forget(self, api: Api) -> None:
        """Drop a connection whose credentials were refused, so a fixed secret starts anew."""
        with self._lock:
            for key, found in list(self._apis.items()):
                if found is api:
                    del self._apis[key]

    def _connect(self, auth: dict[str, str]) -> Any:
        from openstack import connection
        from openstack.config import loader

        cfg = self.config
        region = auth.pop("region_name", "") or cfg.region or None
        options: dict[str, Any] = {
            "interface": cfg.interface, "api_timeout": cfg.timeoutSeconds,
            "block_storage_api_version": "3", "compute_api_version": "2",
        }
        if cfg.caFile:
            options["cacert"] = cfg.caFile
        if region:
            options["region_name"] = region
        if auth:
            if "token" in auth:
                options["auth_type"] = "v3token"
            elif any(k.startswith("application_credential") for k in auth):
                options["auth_type"] = "v3applicationcredential"
            else:
                options["auth_type"] = "password"
            options["auth"] = auth
        try:
            # Only the named file: no environment variables, no ~/.config/openstack.
            def load(files: list[str]) -> Any:
                return loader.OpenStackConfig(config_files=files, vendor_files=[],
                                              secure_files=[], load_envvars=False,
                                              load_yaml_config=bool(files))

            if not auth:
                one = load([cfg.cloudsFile]).get_one(cloud=cfg.cloud, **options)
            else:  # the secrets alone, but for the file's auth_url when they lack one
                if cfg.cloudsFile and "auth_url" not in auth:
                    base = load([cfg.cloudsFile]).get_one(cloud=cfg.cloud, validate=False)
                    auth["auth_url"] = base.config.get("auth", {}).get("auth_url", "")
                one = load([]).get_one(**options)
            return connection.Connection(config=one)
        except Exception as exc:
            raise translate(exc, "reading the OpenStack credentials") from None


class Backoff:
    """When to look again at something OpenStack is doing: first after about as long as the
    same kind of operation took lately (so a create that takes 140 ms is looked at once or
    twice, not every 10 ms), then at growing intervals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._typical: dict[str, float] = {}

    def typical(self, kind: str) -> float:
        with self._lock:
            return self._typical.get(kind, 0.1)

    def learn(self, kind: str, took: float) -> None:
        with self._lock:
            old = self._typical.get(kind)
            self._typical[kind] = took if old is None else 0.7 * old + 0.3 * took

    def wait(self, kind: str, deadline: float, look: Callable[[], Any],
             done: Callable[[Any], bool], what: str) -> Any:
        started = time.monotonic()
        delay = self.typical(kind) * 0.9
        step = 0.02
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.DeadlineExceeded(
                    f"{what}: not done after {deadline - started:.0f}s; retry (the next call "
                    "finds the same object and goes on waiting)")
            time.sleep(min(max(delay, 0.005), left))
            found = look()
            if done(found):
                self.learn(kind, time.monotonic() - started)
                return found
            delay, step = step, min(step * 1.6, 2.0)

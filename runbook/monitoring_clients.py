"""Clients for the monitoring stack (Prometheus, Elasticsearch, Redis) built from playbook config, with timeouts.

The companion of runbook.clients (PostgreSQL, Docker, SSH), kept in its own module so the engineers adding
clients work in separate files: the same rule holds here. This is the one place where httpx, elasticsearch and
redis errors become ``TargetUnreachable`` with a short, secret-free reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import elastic_transport
import elasticsearch
import httpx
import redis

from runbook.config import Environment
from runbook.errors import ConfigError, TargetUnreachable
from runbook.redact import redact

# ------------------------------------------------------------------ Prometheus (HTTP API through httpx)


@contextmanager
def prometheus(env: Environment, timeout_s: float = 5.0) -> Iterator[httpx.Client]:
    """An httpx client on the environment's Prometheus; connection failures and timeouts raise TargetUnreachable.

    ``trust_env=False``: the URL in the playbook is what is dialled, never a proxy picked up from the environment.
    """
    if not env.prometheus_url:
        raise ConfigError(f"{env.source}: environments.{env.name}.prometheus_url: not configured")
    target = f"prometheus {env.prometheus_url}"
    started = time.monotonic()
    with httpx.Client(base_url=env.prometheus_url, timeout=timeout_s, trust_env=False) as client:
        try:
            yield client
        except httpx.TransportError as exc:
            raise TargetUnreachable(target, _reason(exc, time.monotonic() - started)) from None


# ------------------------------------------------------------------ Elasticsearch (the official client, unmodified)


class PlainJsonNode(elastic_transport.Urllib3HttpNode):
    """Sends ``application/json`` instead of the client's ``application/vnd.elasticsearch+json; compatible-with=8``.

    Only for OpenSearch-compatible servers that answer 406 to Elasticsearch's media types; chosen explicitly by
    ``elasticsearch.media_type: plain-json`` in the playbook, never by default. Real Elasticsearch 8 gets the
    client exactly as shipped.
    """

    def perform_request(self, method: str, target: str, body: bytes | None = None,
                        headers: elastic_transport.HttpHeaders | None = None,
                        request_timeout: Any = elastic_transport.client_utils.DEFAULT,
                        ) -> elastic_transport.NodeApiResponse:
        if headers is not None:
            headers = headers.copy()
            for name in ("accept", "content-type"):
                value = headers.get(name) or ""
                if "vnd.elasticsearch+x-ndjson" in value:  # bulk / msearch bodies
                    headers[name] = "application/x-ndjson"
                elif "vnd.elasticsearch+json" in value:
                    headers[name] = "application/json"
        return super().perform_request(method, target, body=body, headers=headers, request_timeout=request_timeout)


@contextmanager
def search(env: Environment) -> Iterator[elasticsearch.Elasticsearch]:
    """The official Elasticsearch 8 client on the environment's cluster: request timeout, no retries.

    Connection errors and timeouts raise TargetUnreachable; API errors (a bad query) propagate as the client's.
    """
    cfg = env.elasticsearch
    if cfg is None:
        raise ConfigError(f"{env.source}: environments.{env.name}.elasticsearch: not configured")
    kwargs: dict[str, Any] = {"request_timeout": cfg.timeout_s, "max_retries": 0, "retry_on_timeout": False}
    if cfg.api_key is not None:
        kwargs["api_key"] = env.resolve_secret(cfg.api_key, "elasticsearch.api_key")
    if cfg.media_type == "plain-json":
        kwargs["node_class"] = PlainJsonNode
    target = f"elasticsearch {cfg.url}"
    started = time.monotonic()
    client = elasticsearch.Elasticsearch(cfg.url, **kwargs)
    try:
        yield client
    except (elasticsearch.ConnectionError, elasticsearch.ConnectionTimeout) as exc:
        raise TargetUnreachable(target, _reason(exc, time.monotonic() - started)) from None
    finally:
        client.close()


# ------------------------------------------------------------------ Redis


@contextmanager
def redis_client(env: Environment) -> Iterator[redis.Redis]:
    """A redis-py client with connect and socket timeouts; unreachable or refused auth raises TargetUnreachable."""
    cfg = env.redis
    if cfg is None:
        raise ConfigError(f"{env.source}: environments.{env.name}.redis: not configured")
    password = env.resolve_secret(cfg.password, "redis.password") if cfg.password else None
    client = redis.Redis.from_url(cfg.url, password=password, socket_timeout=cfg.timeout_s,
                                  socket_connect_timeout=cfg.timeout_s, retry_on_timeout=False,
                                  client_name="runbook", decode_responses=True)
    target = f"redis {cfg.url}"
    started = time.monotonic()
    try:
        yield client
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        raise TargetUnreachable(target, _reason(exc, time.monotonic() - started)) from None
    finally:
        client.close()


def _reason(exc: BaseException, elapsed: float) -> str:
    """A short, secret-free reason: 'connection refused' / 'timeout' named first, whatever the library's wording."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        chain.extend(e for e in getattr(cur, "errors", ()) if isinstance(e, BaseException))
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain).lower()
    if "refused" in text:
        return f"connection refused after {elapsed:.1f} s"
    if isinstance(exc, httpx.TimeoutException | elasticsearch.ConnectionTimeout | redis.TimeoutError) \
            or "timed out" in text or "timeout" in text:
        return f"timeout: no answer after {elapsed:.1f} s"
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines and lines[0] else type(exc).__name__
    return f"{redact(first)[:300]} after {elapsed:.1f} s"

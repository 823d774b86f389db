"""The job service's settings: one optional TOML file plus `specmill serve` flags, validated at start-up.

    data_root = "/srv/specmill"            # outputs go here; the database and job files in .specmill/
    input_roots = ["/models", "/data"]     # where models and prompts may also be read from
    db = "postgresql://user@host/specmill" # default: SQLite (WAL) in data_root/.specmill/jobs.db
    max_concurrent_jobs = 1                # jobs handed to Ray at once; the rest stay queued
    max_samples_limit = 1000000            # a job must set max_samples, at most this
    max_tokens_limit = 32768               # sampling.max_tokens at most this
    [[tokens]]
    name = "alice"
    token = "..."                          # bearer token; admin = true sees every job

Tokens also come from SPECMILL_API_TOKENS (comma-separated `name=token` or bare `token`).
Tokens are kept in memory only, never logged, never stored in the database.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENS_ENV = "SPECMILL_API_TOKENS"
MIN_TOKEN_CHARS = 16
STATE_DIR = ".specmill"  # under data_root: database, job files, the local Ray cluster's state


class SettingsError(ValueError):
    """A service setting that cannot be used; the message names it and the fix."""


@dataclass(kw_only=True, slots=True, repr=False)
class ApiToken:
    name: str  # the principal: jobs belong to it
    token: str
    admin: bool = False  # sees and cancels every principal's jobs

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ",= \t\n"):
            raise SettingsError(f"token name {self.name!r} must be non-empty without commas, '=' or spaces")
        if len(self.token) < MIN_TOKEN_CHARS:
            raise SettingsError(f"the token of {self.name!r} is shorter than {MIN_TOKEN_CHARS} characters; "
                                f"use a random one (python -c 'import secrets; print(secrets.token_urlsafe())')")

    def __repr__(self) -> str:  # never print the secret
        return f"ApiToken(name={self.name!r}, admin={self.admin})"


@dataclass(kw_only=True, slots=True)
class ServiceSettings:
    data_root: Path
    db: str | None = None  # None: sqlite in data_root/.specmill; "sqlite:///PATH" or "postgresql://..."
    input_roots: tuple[Path, ...] = ()
    tokens: tuple[ApiToken, ...] = ()
    max_concurrent_jobs: int = 1  # 0 pauses dispatch: jobs are accepted and stay queued
    max_request_bytes: int = 1 << 20
    require_max_samples: bool = True  # refuse a job that would read its whole input unbounded
    max_samples_limit: int | None = 1_000_000
    max_tokens_limit: int | None = 32768
    # Service-owned job keys a client may set only when this is on: they start processes with
    # arbitrary flags and environment (servers.vllm_args, servers.env) or send requests to
    # arbitrary hosts (servers.urls).
    allow_server_overrides: bool = False
    ray_address: str | None = None  # a Ray dashboard URL (http://head:8265); None: a local cluster
    ray_num_cpus: int | None = None  # the local cluster's CPUs; None: the machine's
    # How long jobs wait for an unreachable Ray (a local cluster that will not start, a remote
    # one that is down) before they fail with the cause; later jobs then fail at their first
    # try until Ray answers again.
    ray_unavailable_timeout_s: float = 180.0
    poll_interval_s: float = 1.0

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root).expanduser().resolve()
        self.input_roots = tuple(Path(p).expanduser().resolve() for p in self.input_roots)
        if self.data_root == Path("/"):
            raise SettingsError("data_root must not be / (it confines every path a job may use)")
        for root in self.input_roots:
            if not root.is_dir():
                raise SettingsError(f"input root {root} is not a directory")
        if self.db is not None and not self.db.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise SettingsError(f"db must be sqlite:///PATH or postgresql://..., got {redact_url(self.db)}")
        if not self.tokens:
            raise SettingsError(f"no API tokens: set {TOKENS_ENV}=name=token,... or [[tokens]] in the config")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names) or len({t.token for t in self.tokens}) != len(self.tokens):
            raise SettingsError("token names and tokens must be unique")
        if self.max_concurrent_jobs < 0:
            raise SettingsError(f"max_concurrent_jobs must be >= 0 (0 pauses dispatch), got {self.max_concurrent_jobs}")
        if self.max_request_bytes < 1024:
            raise SettingsError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        for name in ("max_samples_limit", "max_tokens_limit"):
            if (v := getattr(self, name)) is not None and v < 1:
                raise SettingsError(f"{name} must be positive or left out, got {v}")
        if self.db is not None and self.db.startswith("postgres") and self.ray_address is None:
            # Each replica would start a cluster of its own, and one replica would take another's
            # job for lost (unknown to its cluster) and run it again.
            raise SettingsError("a PostgreSQL db is for several replicas, which must share one Ray cluster: "
                                "give ray_address (--ray-address http://head:8265)")
        if self.ray_address is not None and not self.ray_address.startswith(("http://", "https://")):
            raise SettingsError(f"ray_address must be the Ray dashboard's URL (http://head:8265), got "
                                f"{self.ray_address!r}")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:
            raise SettingsError(f"ray_num_cpus must be at least 1 or left out (the machine's), got {self.ray_num_cpus}")
        if self.ray_unavailable_timeout_s <= 0:
            raise SettingsError(f"ray_unavailable_timeout_s must be positive, got {self.ray_unavailable_timeout_s}")
        if self.poll_interval_s <= 0:
            raise SettingsError(f"poll_interval_s must be positive, got {self.poll_interval_s}")

    @property
    def state_dir(self) -> Path:
        return self.data_root / STATE_DIR

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.state_dir / 'jobs.db'}"

    def principal(self, token: str) -> ApiToken | None:
        """The token's owner; compares digests so the time taken says nothing about the secret."""
        import hmac

        given = hashlib.sha256(token.encode()).digest()
        found = None
        for t in self.tokens:
            if hmac.compare_digest(given, hashlib.sha256(t.token.encode()).digest()):
                found = t
        return found


def tokens_from_env(value: str | None) -> list[ApiToken]:
    """SPECMILL_API_TOKENS: comma-separated `name=token` or bare `token` (named by its digest)."""
    tokens = []
    for item in (value or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, token = item.partition("=")
        if not sep:
            name, token = f"token-{hashlib.sha256(item.encode()).hexdigest()[:8]}", item
        tokens.append(ApiToken(name=name.strip(), token=token.strip()))
    return tokens


def load_settings(config: Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from the TOML file (if any), then `overrides` (None values ignored), plus tokens
    from SPECMILL_API_TOKENS. The one place the service's settings are read."""
    table: dict[str, Any] = {}
    if config is not None:
        try:
            table = tomllib.loads(Path(config).read_text())
        except FileNotFoundError:
            raise SettingsError(f"{config}: no such service config") from None
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"{config}: not valid TOML ({e})") from None
    table.update({k: v for k, v in overrides.items() if v is not None})
    known = set(ServiceSettings.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise SettingsError(f"unknown service setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        file_tokens = [t if isinstance(t, ApiToken) else ApiToken(**t) for t in table.pop("tokens", [])]
    except TypeError as e:
        raise SettingsError(f"tokens entries take name, token, admin: {e}") from None
    table["tokens"] = tuple(file_tokens + tokens_from_env(os.environ.get(TOKENS_ENV)))
    if "data_root" not in table:
        raise SettingsError("data_root is required (flag --data-root)")
    try:
        return ServiceSettings(**table)
    except TypeError as e:
        raise SettingsError(f"service settings: {e}") from None


def redact_url(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))



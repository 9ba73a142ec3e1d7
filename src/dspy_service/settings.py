"""Typed service settings, read from the environment (and an optional `.env` file).

Names and defaults follow the service contract; nothing here imports the rest of the package but
the Redis topology parser (which imports only redis-py).
There is no module-level instance: `Settings()` is built by the CLI and handed down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dspy_service.redis_topology import RedisTopology, TlsFiles, parse_topology

LogLevel = Literal["trace", "debug", "info", "warn", "warning", "error"]

DEFAULT_MODELS_CONFIG = Path(__file__).parent / "data" / "models.yaml"


class Settings(BaseSettings):
    """Every knob of the service; each field is read from the upper-cased environment variable."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False, frozen=True
    )

    service_name: str = "complete-production-service"
    service_version: str = "0.1.0"
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    # Service processes sharing the port (workers.py). One per pod is the Kubernetes default: scale
    # out with replicas; more help a single machine with spare cores.
    workers: int = Field(default=1, ge=1, le=64)
    log_level: LogLevel = "info"
    log_format: Literal["json", "text"] = "json"
    # Share of successful requests whose access-log line is written (errors always are); 1: all.
    access_log_sample_rate: float = Field(default=1.0, ge=0, le=1)

    redis_url: SecretStr = SecretStr("redis://localhost:6379")
    # The response cache on a Redis of its own (an LRU one: maxmemory-policy allkeys-lru), so that
    # cache pressure never evicts the state REDIS_URL keeps (costs, budgets, rate limits: noeviction,
    # with persistence). Unset: the cache shares REDIS_URL.
    redis_cache_url: SecretStr | None = None
    # Topologies (redis_topology.py). Cluster: REDIS_URL names one or more seed nodes, comma-separated
    # (redis://h1:6379,h2:6379). Sentinel: the sentinels and the primary's name; REDIS_URL then gives
    # the primary's credentials, database and scheme only. The cache's Redis has its own three.
    redis_cluster: bool = False
    redis_sentinels: str = ""  # host:port,host:port,...
    redis_sentinel_master: str = ""
    redis_sentinel_password: SecretStr | None = None  # the sentinels' own password, if they have one
    redis_cache_cluster: bool = False
    redis_cache_sentinels: str = ""
    redis_cache_sentinel_master: str = ""
    # rediss:// URLs verify the server's certificate: against the system's CAs, or this file's.
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None  # a client certificate, for servers that ask for one
    redis_tls_key_file: Path | None = None
    redis_required: bool = False
    redis_timeout_secs: float = Field(default=0.25, gt=0, le=10)
    memory_cache_size: int = Field(default=10_000, ge=0)
    # The memory level's bound in bytes (of the answers' JSON, plus a fixed 1 KiB per entry for the
    # objects around it): the shipped pods have 512 MiB, of which the process needs about 100 MiB.
    memory_cache_max_bytes: int = Field(default=128 * 1024 * 1024, ge=0)
    # An answer larger than this (its JSON) is stored in neither level (dspy_cache_skipped_total).
    cache_max_entry_bytes: int = Field(default=1024 * 1024, ge=1)
    memory_cache_ttl_secs: float = Field(default=300, gt=0)
    redis_cache_ttl_secs: int = Field(default=3600, gt=0)
    # Who shares cached answers: "tenant" (the API key's tenant is part of the key; the default when
    # API keys are on) or "global" (every caller shares them; the default without API keys).
    cache_scope: Literal["tenant", "global"] | None = None

    circuit_breaker_failure_threshold: int = Field(default=5, ge=1)
    circuit_breaker_success_threshold: int = Field(default=2, ge=1)
    circuit_breaker_timeout_secs: float = Field(default=60, gt=0)

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    models_config: Path = DEFAULT_MODELS_CONFIG

    request_timeout_secs: float = Field(default=30, gt=0)
    # A stream may outlive REQUEST_TIMEOUT_SECS while text keeps coming: it ends after a pause of
    # STREAM_IDLE_TIMEOUT_SECS (default: REQUEST_TIMEOUT_SECS) or at STREAM_MAX_SECS in all.
    stream_idle_timeout_secs: float | None = Field(default=None, gt=0)
    stream_max_secs: float = Field(default=300, gt=0)
    max_in_flight: int = Field(default=256, ge=1)
    # Threads that run programs with only a synchronous forward (a request's thread cannot be stopped
    # at its deadline: it keeps counting against MAX_IN_FLIGHT until it returns).
    program_threads: int = Field(default=32, ge=1, le=1024)
    # Colon-separated directories searched for `module:` import paths before installed packages;
    # empty: the models file's directory.
    programs_path: str = ""
    # At least REQUEST_TIMEOUT_SECS, so that a request in flight at SIGTERM can finish.
    shutdown_grace_secs: float = Field(default=35, ge=0)
    max_body_bytes: int = Field(default=1_048_576, ge=256)
    costs_flush_interval_secs: float = Field(default=1.0, gt=0)
    cors_allow_origins: str = ""
    batch_max_items: int = Field(default=32, ge=1, le=1000)  # items per POST /v1/predict/batch
    batch_concurrency: int = Field(default=8, ge=1, le=256)  # items of one batch predicted at once

    api_keys: SecretStr | None = None  # comma-separated keys (or sha256:<hex>), optional tenant after a space
    api_keys_file: Path | None = None
    # Operator keys (`<key> [tenant]`, comma-separated): they see all of /costs, /config, /metrics
    # and /v1/experiments; client keys see their own tenant's /costs rows only.
    admin_api_keys: SecretStr | None = None
    # Serve /metrics on this port of its own (no key needed there; keep it off the public network),
    # and not on PORT. 0: on PORT, with the rules of METRICS_PUBLIC.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_public: bool = False
    rate_limit: str = ""  # e.g. "100/minute"; empty: no rate limit
    # Proxies whose X-Forwarded-For/-Proto are believed (comma-separated addresses or networks, "*"
    # for any). Empty, the default: no proxy is trusted, and the client is the connection's peer.
    forwarded_allow_ips: str = ""
    max_input_chars: int = Field(default=100_000, ge=1)
    body_read_timeout_secs: float = Field(default=10, gt=0)

    simulator_port: int = Field(default=8099, ge=0, le=65535)

    # The records store (records/): a receipt per prediction, feedback, and the prediction log.
    data_dir: Path = Path("data")  # where the embedded SQLite database lives
    database_url: SecretStr | None = None  # default: sqlite:///<DATA_DIR>/records.db
    database_migrate: bool = True  # run the migrations at start (else: `dspy-service db upgrade`)
    feedback_enabled: bool = False  # receipts (and POST /v1/feedback)
    # The prediction log stores what was asked and answered: user data. Off unless asked for.
    prediction_log: Literal["off", "sampled", "all"] = "off"
    prediction_log_sample_rate: float = Field(default=0.1, ge=0, le=1)
    prediction_log_exclude_fields: str = ""  # comma-separated input fields never stored
    records_retention_days: float = Field(default=30, gt=0)
    records_retention_interval_secs: float = Field(default=3600, gt=0)  # how often the retention runs
    records_queue_size: int = Field(default=10_000, ge=1)

    # OpenTelemetry tracing: the standard variables; an OTLP endpoint turns it on (tracing.py).
    otel_exporter_otlp_endpoint: str | None = None  # base URL: /v1/traces is appended
    otel_exporter_otlp_traces_endpoint: str | None = None  # full URL of the traces endpoint
    otel_service_name: str | None = None  # default "dspy-service"
    otel_sdk_disabled: bool = False

    @field_validator(
        "openai_api_key",
        "api_keys",
        "api_keys_file",
        "admin_api_keys",
        "redis_cache_url",
        "redis_sentinel_password",
        "redis_tls_ca_file",
        "redis_tls_cert_file",
        "redis_tls_key_file",
        "database_url",
        mode="before",
    )
    @classmethod
    def _blank_key_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        parse_rate_limit(value)
        return value

    @field_validator(
        "openai_base_url", "otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint", mode="before"
    )
    @classmethod
    def _blank_url_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_redis_url(self) -> Settings:
        """A Redis URL or topology the client cannot use is refused here, in words that never quote
        the URL (it may hold a password): a `/` or `@` in a password must be percent-encoded."""
        self.redis_topology()
        self.redis_cache_topology()
        files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        for name, path in zip(
            ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"), files, strict=True
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE go together")
        if self.database_url is not None:
            check_database_url(self.database_url.get_secret_value())
        for name in ("openai_base_url", "otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint"):
            value = getattr(self, name)
            if value is not None and redact_url(value) == UNPARSABLE_URL:
                raise ValueError(f"{name.upper()} cannot be parsed as a URL")
        return self

    def redis_topology(self) -> RedisTopology:
        """The state Redis (REDIS_URL and its topology settings)."""
        return self._topology(
            "REDIS_URL",
            self.redis_url.get_secret_value(),
            self.redis_cluster,
            self.redis_sentinels,
            self.redis_sentinel_master,
        )

    def redis_cache_topology(self) -> RedisTopology | None:
        """The cache's own Redis, or None when the cache shares the state Redis."""
        if self.redis_cache_url is None:
            return None
        return self._topology(
            "REDIS_CACHE_URL",
            self.redis_cache_url.get_secret_value(),
            self.redis_cache_cluster,
            self.redis_cache_sentinels,
            self.redis_cache_sentinel_master,
        )

    def _topology(self, variable: str, url: str, cluster: bool, sentinels: str, master: str) -> RedisTopology:
        password = self.redis_sentinel_password
        return parse_topology(
            url,
            variable=variable,
            cluster=cluster,
            sentinels=sentinels.strip() or None,
            master_name=master.strip() or None,
            sentinel_password=password.get_secret_value() if password is not None else None,
            tls_files=TlsFiles(
                ca_file=self.redis_tls_ca_file,
                cert_file=self.redis_tls_cert_file,
                key_file=self.redis_tls_key_file,
            ),
        )

    @property
    def records_enabled(self) -> bool:
        """Receipts are kept when feedback is on or the prediction log is (it hangs on them)."""
        return self.feedback_enabled or self.prediction_log != "off"

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'records.db').resolve()}"

    @property
    def prediction_log_excluded(self) -> frozenset[str]:
        return frozenset(f.strip() for f in self.prediction_log_exclude_fields.split(",") if f.strip())

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.cors_allow_origins.split(",") if origin.strip()]

    @property
    def rate_limit_rule(self) -> tuple[int, int] | None:
        """`RATE_LIMIT` as (requests, window seconds), or None when there is no limit."""
        return parse_rate_limit(self.rate_limit)

    @property
    def effective_cache_scope(self) -> Literal["tenant", "global"]:
        if self.cache_scope is not None:
            return self.cache_scope
        keys = (self.api_keys, self.api_keys_file, self.admin_api_keys)
        return "tenant" if any(source is not None for source in keys) else "global"

    @property
    def program_dirs(self) -> tuple[Path, ...]:
        """PROGRAMS_PATH as directories, in search order (default: the models file's directory)."""
        if not self.programs_path.strip():
            return (self.models_config.resolve().parent,)
        return tuple(Path(part).resolve() for part in self.programs_path.split(":") if part.strip())

    @property
    def uses_simulator(self) -> bool:
        """No key and no base URL: the embedded simulator plays the provider."""
        return self.openai_api_key is None and self.openai_base_url is None

    @property
    def otel_traces_endpoint(self) -> str | None:
        """Where spans go (OTLP over HTTP), resolved as the SDK does; None while tracing is off."""
        if self.otel_sdk_disabled:
            return None
        if self.otel_exporter_otlp_traces_endpoint is not None:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint is not None:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    def secret_values(self) -> list[str]:
        """Every secret the settings hold, as text: the log renderer blanks each wherever it shows."""
        found = url_secrets(self.redis_url.get_secret_value())
        if self.redis_cache_url is not None:
            found += url_secrets(self.redis_cache_url.get_secret_value())
        for url in (
            self.openai_base_url,
            self.otel_exporter_otlp_endpoint,
            self.otel_exporter_otlp_traces_endpoint,
        ):
            found += url_secrets(url)
        if self.openai_api_key is not None:
            found.append(self.openai_api_key.get_secret_value())
        if self.redis_sentinel_password is not None:
            found.append(self.redis_sentinel_password.get_secret_value())
        if self.database_url is not None:
            found += url_secrets(self.database_url.get_secret_value())
        if self.api_keys is not None:
            found += [
                entry.split()[0] for entry in self.api_keys.get_secret_value().split(",") if entry.split()
            ]
        return found

    def redacted_redis_url(self) -> str:
        return redact_url(self.redis_url.get_secret_value())

    def redacted_redis_cache_url(self) -> str | None:
        return redact_url(self.redis_cache_url.get_secret_value()) if self.redis_cache_url else None

    def public_view(self) -> dict[str, object]:
        """The effective configuration with every secret redacted, for `/config`."""
        view = self.model_dump(mode="json")
        view["redis_url"] = self.redacted_redis_url()
        view["redis_cache_url"] = self.redacted_redis_cache_url()
        view["openai_api_key"] = "***" if self.openai_api_key is not None else None
        view["redis_sentinel_password"] = "***" if self.redis_sentinel_password is not None else None
        view["database_url"] = redact_url(self.effective_database_url)
        view["data_dir"] = str(self.data_dir)
        for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
            view[name] = str(value) if (value := getattr(self, name)) is not None else None
        if self.openai_base_url is not None:
            view["openai_base_url"] = redact_url(self.openai_base_url)
        view["models_config"] = str(self.models_config)
        view["cache_scope"] = self.effective_cache_scope
        view["api_keys"] = "***" if self.api_keys is not None else None
        view["admin_api_keys"] = "***" if self.admin_api_keys is not None else None
        view["api_keys_file"] = str(self.api_keys_file) if self.api_keys_file is not None else None
        for name in ("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint"):
            if (url := getattr(self, name)) is not None:
                view[name] = redact_url(url)
        return view


_RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
_RATE_LIMIT = re.compile(r"^\s*(\d{1,9})\s*/\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


def parse_rate_limit(text: str) -> tuple[int, int] | None:
    """RATE_LIMIT as (requests, window seconds): "100/minute" is (100, 60); an empty one is None."""
    if not text.strip():
        return None
    found = _RATE_LIMIT.match(text)
    if found is None or int(found[1]) < 1:
        raise ValueError(f"RATE_LIMIT must look like '100/minute' (second, minute, hour, day), not {text!r}")
    return int(found[1]), _RATE_PERIODS[found[2].lower()]


_DATABASE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg")


def check_database_url(url: str) -> None:
    """DATABASE_URL names a database the records store can use, in words that never quote it."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _DATABASE_SCHEMES:
        raise ValueError(
            "DATABASE_URL must be sqlite:///<path> or postgresql://user:password@host:5432/db "
            f"(scheme {scheme or 'missing'!r} is not one the records store uses)"
        )
    if scheme.startswith("postgres") and "sslmode=" in url:
        raise ValueError(
            "DATABASE_URL: asyncpg takes ?ssl=require (or verify-full), not libpq's ?sslmode=..."
        )


UNPARSABLE_URL = "<unparsable URL>"
# Query parameters whose values are secrets wherever they appear (?password=, ?api_key=, ...).
_SECRET_PARAMETER = re.compile(r"(pass|pwd|secret|token|key|auth|sig|credential|session)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any user name and password, and the values of secret-looking query parameters,
    replaced by `***`; a URL that cannot be parsed is never echoed."""
    try:
        parts = urlsplit(url)
        port = parts.port if "," not in parts.netloc else None  # a cluster's seed list has several
    except ValueError:
        return UNPARSABLE_URL
    netloc = parts.netloc
    if "," in netloc:  # redis://user:pass@h1:7000,h2:7000: keep the hosts, hide who
        hosts = netloc.rpartition("@")[2]
        if not re.fullmatch(r"[\w.\-\[\]:,]+", hosts):
            return UNPARSABLE_URL
        netloc = f"***@{hosts}" if "@" in netloc else hosts
    elif parts.username is not None or parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"***@{host}" + (f":{port}" if port is not None else "")
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(name, "***" if _SECRET_PARAMETER.search(name) else value) for name, value in pairs], safe="*"
        )
    if "://" in url:  # urlunsplit would drop an empty host's slashes (unix:///path)
        rebuilt = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"//{netloc}{parts.path}"
        return rebuilt + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_USERINFO_IN_TEXT = re.compile(r"(?<![\w/])[\w.%+-]+:[^\s@/]+@(?=[\w.\[-])")
_URL_IN_TEXT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)
_BEARER_IN_TEXT = re.compile(r"(bearer\s+|sk-)[A-Za-z0-9._\-]{6,}", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """Free text (a provider's error message) with the URLs in it redacted and anything that looks
    like a key or bearer token replaced by `***`."""
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    text = _USERINFO_IN_TEXT.sub("***@", text)  # "failed to connect to user:password@host"
    return _BEARER_IN_TEXT.sub(lambda match: match.group(1) + "***", text)


def url_secrets(url: str | None) -> list[str]:
    """The secret parts of a URL: its password (and user name) and secret-looking query values."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        found = [value for value in (parts.password, parts.username) if value]
        found += [v for k, v in parse_qsl(parts.query) if v and _SECRET_PARAMETER.search(k)]
    except ValueError:
        return [url]  # unparsable: the whole of it
    return found


def service_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without any variable the service reads: for tools (tests, bench) that start it and
    must configure it themselves. Derived from the fields, so a new setting cannot leak in."""
    ours = {name.upper() for name in Settings.model_fields}
    ours |= {"PROMETHEUS_MULTIPROC_DIR", "LITELLM_LOCAL_MODEL_COST_MAP"}
    return {k: v for k, v in environ.items() if k.upper() not in ours and not k.upper().startswith("OTEL_")}

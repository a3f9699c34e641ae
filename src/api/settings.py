"""The service's one settings object, read from LEDGER_* environment variables."""

from __future__ import annotations

import difflib
import getpass
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api.schemas import SUPPLIER_ID_PATTERN
from ledger.application import CONNECTION_OPTIONS
from projections.leases import with_keepalives

Role = Literal["admin", "oms", "storefront", "supplier", "auditor"]
# Limited when a rate is set: not the orders (a flash sale is the OMS's busiest hour) nor
# the administrators.
LIMITED_BY_DEFAULT: tuple[Role, ...] = ("storefront", "supplier", "auditor")
ROLES: tuple[Role, ...] = ("admin", "oms", "storefront", "supplier", "auditor")


# What an API key's name may hold: it names the client in reservations' ids and events.
KEY_NAME_PATTERN = r"[A-Za-z0-9._@-]{1,64}"


class ApiKey(BaseModel):
    """One client's key: `name:role:secret`, or `name:supplier:secret:supplier_id`."""

    name: str
    role: Role
    secret: SecretStr
    supplier_id: str | None = None

    @classmethod
    def parse(cls, entry: str) -> ApiKey:
        parts = entry.strip().split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise ValueError("an API key is name:role:secret, or name:supplier:secret:supplier_id")
        name, role, secret, *rest = parts
        # A reservation's id is made of its client's name and Idempotency-Key, joined by
        # "/": a name holding one ("shop/eu") could make the id of another client's
        # order, and be answered its reservation as a replay (a review).
        if not re.fullmatch(KEY_NAME_PATTERN, name):
            raise ValueError(
                f"API key name {name!r}: letters, digits, '.', '_', '-' and '@', up to 64"
            )
        if role not in ROLES:
            raise ValueError(f"API key {name!r} has unknown role {role!r}")
        if (role == "supplier") != bool(rest):
            raise ValueError(
                f"API key {name!r}: supplier keys, and only they, end with :supplier_id"
                + ("" if role == "supplier" else "; a secret may not hold ':'")
            )
        # A key for an id no supplier can have (`..`, `a/b`) would be refused every call.
        if rest and not re.fullmatch(SUPPLIER_ID_PATTERN, rest[0]):
            raise ValueError(
                f"API key {name!r}: {rest[0]!r} is not a supplier id (letters, digits, '.',"
                " '_' and '-', up to 64, not '.' or '..')"
            )
        return cls.model_validate(
            {"name": name, "role": role, "secret": secret, "supplier_id": rest[0] if rest else None}
        )


MAX_HOLD_SECONDS = 366 * 24 * 3600

# The longest an interval, a wait or a timeout may be set to, by what it is: a sleep of
# 1e12 s killed the thread that slept it (OverflowError), and the views stopped while the
# service said it was ready; a body kept 1e10 days failed every sweep (an operator's
# walkthrough).
MINUTE, HOUR, DAY = 60, 3600, 86400
# Each holds connections of its own: one per core, up to this.
MAX_REBUILD_PROCESSES = 64

# libpq's, as PostgreSQL documents them.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class Settings(BaseSettings):
    """Everything the service can be told; built once and passed down."""

    # Inputs are never quoted in errors: the database URL and the API keys hold secrets.
    # No `inf` or `nan`: an infinite interval killed the thread that slept it, unsaid.
    model_config = SettingsConfigDict(
        env_prefix="LEDGER_", extra="ignore", hide_input_in_errors=True, allow_inf_nan=False
    )

    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL URL; unset starts an embedded server under data_dir"
    )
    data_dir: Path = Path("var")
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(default_factory=list)

    max_body_bytes: int = Field(default=1_048_576, gt=0)
    max_feed_bytes: int = Field(
        default=512 * 1_048_576, gt=0, description="limit of an uploaded feed file"
    )
    max_webhook_bytes: int = Field(default=16 * 1_048_576, gt=0)
    max_upload_bytes_in_flight: int = Field(
        default=512 * 1_048_576,
        ge=0,
        description="feed files a server process holds at once, in bytes; past it an upload"
        " is refused 503 uploads_busy (one alone never is); 0: no bound",
    )
    webhook_body_seconds: float = Field(
        default=30.0,
        gt=0,
        le=HOUR,
        description="how long a webhook's body may take to arrive; past it the request is"
        " refused 408 body_timeout",
    )
    max_webhook_bytes_in_flight: int = Field(
        default=64 * 1_048_576,
        ge=0,
        description="webhook bodies a server process holds at once, in bytes; past it a"
        " webhook is refused 503 webhooks_busy (one alone never is); 0: no bound",
    )
    max_observations: int = Field(default=10_000, gt=0)
    max_reservation_lines: int = Field(default=500, gt=0)
    # A hold lasts a year at most: 99,999,999,999 s was taken, and held stock into 5195.
    default_ttl_seconds: int = Field(default=900, gt=0, le=MAX_HOLD_SECONDS)
    max_ttl_seconds: int = Field(default=7 * 24 * 3600, gt=0, le=MAX_HOLD_SECONDS)
    limited_stock_at: int = Field(default=5, ge=0, description="available at or below: limited")

    migrate_on_start: bool = True
    run_sweeper: bool = True
    run_connectors: bool = Field(
        default=True, description="apply inbox deliveries and run supplier schedules here"
    )
    connector_batch_size: int = Field(
        default=5000, gt=0, description="the most changed levels in one ledger transaction"
    )
    connector_part_seconds: float = Field(
        default=0.25,
        ge=0,
        le=MINUTE,
        description="how long one part of a delivery should hold the ledger writer"
        " (reservations wait meanwhile); 0: every part holds connector_batch_size",
    )
    connector_work_mem_mb: int = Field(
        default=128,
        gt=0,
        description="memory PostgreSQL may give each sort and hash while a delivery is"
        " compared with the levels on record (work_mem, for that transaction only)",
    )
    connector_read_connections: int = Field(
        default=2,
        ge=1,
        # Each is taken from the views' pool (8) for the whole delivery: room is left for
        # the projections, the inbox and another delivery.
        le=4,
        description="connections that read and compare a large CSV delivery at once, each"
        " a share of its lines (PostgreSQL does that work on one core a connection)",
    )
    run_projections: bool = Field(
        default=True, description="run the projections in this process (one holder each)"
    )
    projection_page_size: int = Field(default=1000, gt=0, le=100_000)
    projection_poll_seconds: float = Field(default=1.0, gt=0, le=HOUR)
    projection_settle_seconds: float = Field(
        default=0.02,
        ge=0,
        le=MINUTE,
        description="how long new writes gather before a quiet view reads them",
    )
    projection_busy_settle_seconds: float = Field(
        default=0.1,
        ge=0,
        le=MINUTE,
        description="the same while writes keep coming: fewer, larger pages for less CPU,"
        " a view that trails a busy log by about this much more",
    )
    rebuild_processes: int = Field(
        default=0,
        ge=0,
        le=MAX_REBUILD_PROCESSES,
        description="processes `ledger projections rebuild` applies a state view in; 0: one"
        " per core",
    )
    read_wait_max_seconds: float = Field(
        default=5.0, ge=0, le=HOUR, description="longest wait of a read for its min_position"
    )
    read_cache_skus: int = Field(
        default=100_000,
        ge=0,
        description="SKUs whose availability each API process keeps in memory; 0: none",
    )
    read_cache_refresh_seconds: float = Field(
        default=0.02, gt=0, le=MINUTE, description="how often the in-memory copy reads what changed"
    )
    stream_refresh_seconds: float = Field(
        default=0.25,
        gt=0,
        le=MINUTE,
        description="how often each API process reads what changed for its availability streams",
    )
    read_cache_follow_seconds: float = Field(
        default=60.0,
        gt=0,
        le=DAY,
        description="a SKU of the copy not read for this long is dropped when it changes,"
        " instead of being read again",
    )
    read_cache_max_lag_seconds: float = Field(
        default=1.0,
        gt=0,
        le=HOUR,
        description="a copy not refreshed for this long answers nothing: reads go to the view",
    )
    conflict_jump_absolute: int = Field(default=100, ge=0)
    conflict_jump_relative: float = Field(default=0.5, ge=0)
    sweep_interval_seconds: float = Field(default=1.0, gt=0, le=HOUR)
    inbox_keep_days: float = Field(
        default=7.0,
        gt=0,
        le=3660,
        description="an applied delivery's body is kept this long in the inbox, then let go",
    )
    pool_size: int = Field(default=5, gt=0)
    pool_max_overflow: int = Field(default=10, ge=0)
    # PostgreSQL's `lock_timeout` is at most 2^31 - 1 ms: a longer one started, and every
    # write failed with "invalid value for parameter" (an operator's walkthrough).
    lock_timeout_seconds: int = Field(default=5, gt=0, le=HOUR)
    connect_timeout_seconds: int = Field(
        default=2, gt=0, le=HOUR, description="longest wait for a pooled database connection"
    )
    command_timeout_seconds: float = Field(
        default=10,
        gt=0,
        le=HOUR,
        description="a request waits this long for its command, then 503",
    )
    writer_stuck_seconds: float = Field(
        default=60,
        gt=0,
        le=DAY,
        description="/readyz says not ready while the writer has been on one batch this long",
    )
    writer_linger_seconds: float = Field(
        default=0.002,
        ge=0,
        le=0.05,
        description="under load, how long a small batch waits for more commands; 0: never",
    )
    writer_max_batch: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="the most commands one save may carry (a delivery's parts are their own)",
    )
    # At least one: the library takes 0 for a cache without bound.
    aggregate_cache_size: int = Field(default=10_000, ge=1)
    rate_limit_per_second: float = Field(
        default=0,
        ge=0,
        description="requests a second each API key of a limited role may make, per API"
        " process; past it 429 (0: no limit)",
    )
    rate_limit_burst: int = Field(
        default=0, ge=0, description="requests a key may make at once (0: one second's worth)"
    )
    rate_limit_roles: Annotated[list[Role], NoDecode] = Field(
        default_factory=lambda: list(LIMITED_BY_DEFAULT),
        description="the roles whose keys are limited (comma-separated)",
    )

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = [ApiKey.parse(entry) for entry in value.split(",") if entry.strip()]
            names = [key.name for key in keys]
            if len(set(names)) != len(names):
                raise ValueError("API key names must be unique")
            by_secret: dict[str, list[str]] = {}
            for key in keys:
                by_secret.setdefault(key.secret.get_secret_value(), []).append(key.name)
            shared = [names for names in by_secret.values() if len(names) > 1]
            if shared:
                # A request is known by its secret alone: all but one of the keys sharing
                # it could never be used (an admin key answered as a storefront one).
                raise ValueError(
                    "each API key needs a secret of its own: "
                    + "; ".join(" and ".join(repr(name) for name in names) for names in shared)
                    + " share one"
                )
            return keys
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # An unknown one failed as the logging was set up, with a trace of the loading.
        level = value.strip().upper()
        if not isinstance(logging.getLevelNamesMapping().get(level), int):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        # Refused here, one line naming the setting, before anything connects: a URL
        # that is no PostgreSQL connection string failed with a trace of psycopg's
        # parsing, and a port or sslmode no server can have as "cannot be reached".
        # Never quoted back: it may hold a password.
        if value is None:
            return None
        url = value.get_secret_value()
        if not url.strip():
            # `serve` took it for unset and started the embedded server; the other
            # commands failed with a trace (an operator's walkthrough).
            raise ValueError("is empty: unset it for the embedded PostgreSQL, or give a URL")
        # A URL's scheme (a key=value string may hold "://" in a value, a password even).
        scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
        if scheme is not None and scheme[1].lower() not in ("postgresql", "postgres"):
            raise ValueError(f"a PostgreSQL URL begins postgresql://, not {scheme[1]}://")
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            raise ValueError(
                "not a PostgreSQL URL (postgresql://user:password@host:5432/database)"
            ) from None
        for port in str(params.get("port") or "").split(","):
            port = port.strip()  # as libpq reads it
            # Not quoted: a password with an unescaped "/" is read as host and port.
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError("its port is not a number from 1 to 65535")
        sslmode = params.get("sslmode")
        if sslmode is not None and sslmode not in SSL_MODES:
            raise ValueError(f"sslmode {sslmode!r} is not one of {', '.join(SSL_MODES)}")
        if not params.get("dbname"):
            raise ValueError("it names no database (postgresql://user@host:5432/database)")
        return value

    @field_validator("rate_limit_roles", mode="before")
    @classmethod
    def _parse_roles(cls, value: object) -> object:
        if isinstance(value, str):
            return [role.strip() for role in value.split(",") if role.strip()]
        return value

    @model_validator(mode="after")
    def _default_hold_allowed(self) -> Settings:
        # An order without `ttl_seconds` was held for the default, past the maximum that
        # an order naming it is refused over.
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError(
                "LEDGER_DEFAULT_TTL_SECONDS must not be longer than LEDGER_MAX_TTL_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _two_connections(self) -> Settings:
        # The writer may read with one connection while another holds the event table's
        # lock for its save (see LedgerWriter: EXCLUSIVE_AFTER).
        if self.pool_size + self.pool_max_overflow < 2:
            raise ValueError(
                "LEDGER_POOL_SIZE + LEDGER_POOL_MAX_OVERFLOW must allow two connections"
            )
        return self

    def event_store_env(self, database_url: str, *, create_tables: bool = False) -> dict[str, str]:
        """The eventsourcing environment for this database, stated in full.

        POSTGRES_ENABLE_DB_FUNCTIONS stays off: in 9.5.6 it lets followers miss events.
        """
        params = conninfo_to_dict(database_url)
        if not params.get("dbname"):
            raise ValueError("the database URL names no database")
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "APPLICATION_RECORDER_TOPIC": "api.recorder:LedgerRecorder",
            "POSTGRES_DBNAME": str(params["dbname"]),
            "POSTGRES_HOST": str(params.get("host") or "localhost"),
            "POSTGRES_PORT": str(params.get("port") or "5432"),
            "POSTGRES_USER": str(params.get("user") or getpass.getuser()),
            "POSTGRES_PASSWORD": str(params.get("password") or ""),
            "POSTGRES_POOL_SIZE": str(self.pool_size),
            "POSTGRES_MAX_OVERFLOW": str(self.pool_max_overflow),
            "POSTGRES_LOCK_TIMEOUT": str(self.lock_timeout_seconds),
            "POSTGRES_CONNECT_TIMEOUT": str(self.connect_timeout_seconds),
            "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "10",
            # A round trip per connection checkout; the recorder retries broken connections.
            "POSTGRES_PRE_PING": "n",
            "POSTGRES_ENABLE_DB_FUNCTIONS": "n",
            "CREATE_TABLE": "y" if create_tables else "n",
            "AGGREGATE_CACHE_MAXSIZE": str(self.aggregate_cache_size),
            CONNECTION_OPTIONS: json.dumps(_connection_options(params)),
        }


def _connection_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """The URL's options that the event store's connections are given beside the five
    the library takes, with keepalives where the URL sets none: a connection the network
    dropped without a word (a firewall's idle timeout) then fails in ~30 s, where a save
    on it waited for the kernel to give up, the writer's thread with it."""
    taken = {"dbname", "host", "port", "user", "password"}
    return with_keepalives({k: v for k, v in params.items() if k not in taken})


# `LEDGER_*` variables of this project's own that are no setting: the test suite's and
# the benchmarks' databases (named like `LEDGER_DATABASE_URL`, which they are not).
NOT_SETTINGS = frozenset({"LEDGER_TEST_DATABASE_URL", "LEDGER_BENCH_DATABASE_URL"})


def misspelt_settings(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The `LEDGER_*` variables that name no setting but come close to one's name, each
    with that setting's: read by nothing, so `LEDGER_POOLSIZE=20` left the pool at 5
    without a word (an operator's walkthrough). Others are not named: secrets are kept in
    `LEDGER_*` variables too (`env:` references)."""
    known = ["LEDGER_" + name.upper() for name in Settings.model_fields]
    found = []
    for name in sorted(environ):
        if name.startswith("LEDGER_") and name not in known and name not in NOT_SETTINGS:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            if close:
                found.append((name, close[0]))
    return found

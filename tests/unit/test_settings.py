"""Settings: API keys, and an event store that is always a real database."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.settings import Settings
from ledger.application import InMemoryRefused, InventoryLedger


def test_api_keys_parse_roles_and_bind_supplier_keys_to_their_supplier() -> None:
    settings = Settings.model_validate(
        {"api_keys": "ops:admin:s3cret, feed:supplier:f33d:acme ,shop:storefront:x"}
    )
    keys = {key.name: key for key in settings.api_keys}
    assert keys["ops"].role == "admin"
    assert keys["feed"].supplier_id == "acme"
    assert keys["shop"].secret.get_secret_value() == "x"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    "entry",
    [
        "ops:root:x",
        "ops:admin",
        "feed:supplier:x",
        "shop:storefront:x:acme",
        "a:oms:x,a:oms:y",
        # Its reservations' ids could be another client's ("shop", key "eu/o-1"): a review.
        "shop/eu:oms:x",
        "two words:oms:x",
    ],
)
def test_malformed_api_keys_are_refused_at_start(entry: str) -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({"api_keys": entry})


def test_a_pool_too_small_for_a_save_under_the_table_lock_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="two connections"):
        Settings.model_validate({"pool_size": 1, "pool_max_overflow": 0})
    assert Settings.model_validate({"pool_size": 1, "pool_max_overflow": 1}).pool_size == 1


@pytest.mark.parametrize("connections", [0, 5])
def test_a_delivery_may_not_take_more_read_connections_than_the_views_pool_spares(
    connections: int,
) -> None:
    with pytest.raises(ValidationError, match="connector_read_connections"):
        Settings(connector_read_connections=connections)
    assert Settings(connector_read_connections=4).connector_read_connections == 4


def test_the_event_store_environment_is_postgres_with_a_finite_lock_timeout() -> None:
    settings = Settings.model_validate({"lock_timeout_seconds": 3})
    env = settings.event_store_env("postgresql://me:pw@db.example:6543/stock")
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"], env["POSTGRES_DBNAME"]) == (
        "db.example",
        "6543",
        "stock",
    )
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]) == ("me", "pw")
    assert env["POSTGRES_LOCK_TIMEOUT"] == "3"
    assert env["POSTGRES_ENABLE_DB_FUNCTIONS"] == "n"
    assert env["CREATE_TABLE"] == "n"


def test_the_ledger_refuses_to_keep_events_in_memory() -> None:
    with pytest.raises(InMemoryRefused):
        InventoryLedger({})
    with pytest.raises(InMemoryRefused):
        InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"})


def test_the_ledger_takes_its_configuration_only_from_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The library would let these override what the settings say; the ledger ignores them.
    monkeypatch.setenv("INVENTORYLEDGER_PERSISTENCE_MODULE", "eventsourcing.postgres")
    monkeypatch.setenv("AGGREGATE_CACHE_MAXSIZE", "7")
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    assert type(app.factory).__module__ == "eventsourcing.popo"
    assert app.repository.cache is None


def test_a_default_hold_longer_than_the_longest_an_order_may_ask_is_refused_at_start() -> None:
    """Found by a walkthrough: with the default at 7,200 s and the maximum at 3,600, an
    order naming no TTL was held two hours, one naming 3,601 s refused."""
    with pytest.raises(
        ValidationError, match="LEDGER_DEFAULT_TTL_SECONDS must not be longer than LEDGER_MAX_TTL"
    ):
        Settings(default_ttl_seconds=7200, max_ttl_seconds=3600)
    assert Settings(default_ttl_seconds=3600, max_ttl_seconds=3600).default_ttl_seconds == 3600


def test_a_hold_may_last_a_year_at_most() -> None:
    """99,999,999,999 s was taken, and a hold placed to expire in 5195."""
    with pytest.raises(ValidationError, match="max_ttl_seconds"):
        Settings(max_ttl_seconds=99_999_999_999)
    assert Settings(max_ttl_seconds=366 * 24 * 3600).max_ttl_seconds == 31_622_400


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/ledger",
        "postgres://u:p%40ss@[::1]:5432/ledger",
        "postgresql://u@h1:5432,h2:5433/ledger?target_session_attrs=read-write",
        "postgresql:///ledger?host=/var/run/postgresql",
        "postgresql://u@h/ledger?port=%205432&sslmode=verify-full",
        # A key=value string whose values hold "://" (a password may): not a URL's scheme.
        "dbname=ledger password=ab://cd application_name=http://x",
    ],
)
def test_every_postgresql_url_or_connection_string_is_taken(url: str) -> None:
    settings = Settings.model_validate({"database_url": url})
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == url


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("notaurl", "not a PostgreSQL URL"),
        ("mysql://root:hunter2@db/ledger", "not mysql://"),
        # libpq reads an unescaped "/" in a password as the end of host and port.
        ("postgresql://ledger:hunter2/x@db:5432/ledger", "its port is not a number"),
        ("postgresql://ledger:hunter2@db/ledger?sslmode=sure", "sslmode 'sure' is not one of"),
    ],
)
def test_a_database_url_that_is_no_postgresql_url_is_refused_without_its_password(
    url: str, said: str
) -> None:
    with pytest.raises(ValidationError, match=said) as refused:
        Settings.model_validate({"database_url": url})
    assert "hunter2" not in str(refused.value)


def test_two_api_keys_may_not_share_a_secret() -> None:
    # A request is known by its secret: the admin key was answered as the storefront one.
    with pytest.raises(ValidationError, match="'ops' and 'shop' share one") as refused:
        Settings.model_validate({"api_keys": "ops:admin:same,shop:storefront:same"})
    assert "same" not in str(refused.value).replace("share one", "")


def test_a_rebuild_takes_one_process_per_core_up_to_the_settings_ceiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The setting refused 96, where its default took every core of a host of 128 (a
    review)."""
    from api import runtime

    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 128)
    assert runtime.rebuild_processes(Settings()) == 64
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.rebuild_processes(Settings()) == 2
    assert runtime.rebuild_processes(Settings(rebuild_processes=5)) == 5

"""memcached, for real: flush_all empties the server, the namespace mode touches only our key, down is a warning."""

import signal

from maintd.cache import flush
from maintd.config import FlushMode


def test_flush_all_empties_the_server(own_memcached):
    client = own_memcached.client()
    client.set("page:home", b"old html", noreply=False)  # wait: noreply is the default
    [outcome] = flush((own_memcached.address,), FlushMode.ALL, "shop:cache-version", 1.0)
    assert outcome.error is None
    assert client.get("page:home") is None


def test_namespace_mode_bumps_only_our_key(own_memcached):
    client = own_memcached.client()
    client.set("other-app:page", b"keep me", noreply=False)
    flush((own_memcached.address,), FlushMode.NAMESPACE, "shop:cache-version", 1.0)
    flush((own_memcached.address,), FlushMode.NAMESPACE, "shop:cache-version", 1.0)
    assert client.get("shop:cache-version") == b"2"
    assert client.get("other-app:page") == b"keep me"


def test_a_server_down_is_reported_not_raised(own_memcached):
    address = own_memcached.address
    own_memcached.stop()
    [outcome] = flush((address,), FlushMode.ALL, "k", 0.5)
    assert "ConnectionRefused" in outcome.error


def test_a_frozen_server_times_out(own_memcached):
    own_memcached.proc.send_signal(signal.SIGSTOP)
    try:
        [outcome] = flush((own_memcached.address,), FlushMode.ALL, "k", 0.3)
    finally:
        own_memcached.proc.send_signal(signal.SIGCONT)
    assert outcome.error and "timeout" in outcome.error.lower().replace("timed out", "timeout")

"""maintd/etcd.py, the client of etcd's JSON gateway, against a real 3-member etcd: an endpoint that is down is
skipped, a kept-alive connection that etcd closed is replaced without failing the call, etcd's own errors name
themselves, threads keep to their own connections, and the watch follows, ends and resumes as changes.py needs."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest
from etcd_cluster import EtcdCluster
from etcd_proxy import EtcdProxy

from conftest import free_port
from maintd.etcd import Etcd, EtcdUnavailable, put_op


@pytest.fixture(scope="module")
def etcd3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    base = tmp_path_factory.mktemp("etcd")
    cluster = EtcdCluster(base)
    yield cluster
    cluster.stop_all()
    shutil.rmtree(base)  # etcd preallocates 120 MB of log per member


def nobody_listens() -> str:
    """An endpoint whose port is closed: connecting to it is refused."""
    return f"http://127.0.0.1:{free_port()}"


def test_an_endpoint_that_is_down_is_skipped_for_the_next_that_answers(etcd3):
    down = EtcdProxy(etcd3.client[etcd3.names[0]])  # a real etcd member behind it, once it forwards again
    down.refuse()
    try:
        client = Etcd((down.url, etcd3.endpoints[1]))
        client.put("/t/skip", "1")
        down.forward()
        assert client.read(["/t/skip"]).found == {"/t/skip": "1"}
        assert down.count("/v3/kv/txn") == 0, "the endpoint that answered last is asked first"
    finally:
        down.stop()

    first, second = nobody_listens(), nobody_listens()
    with pytest.raises(EtcdUnavailable) as raised:
        Etcd((first, second)).read(["/t/skip"])
    assert f"{first}: ConnectionRefusedError" in str(raised.value)
    assert f"{second}: ConnectionRefusedError" in str(raised.value)


def test_a_kept_alive_connection_that_etcd_closed_is_replaced_without_failing_the_call(etcd3):
    name = etcd3.names[2]
    client = Etcd((etcd3.url(name),))  # one endpoint: no other one to fail over to
    client.put("/t/stale", "before")
    etcd3.kill(name)  # closes the connection the client keeps alive
    etcd3.start(name)
    etcd3.wait_healthy()
    client.put("/t/stale", "after")
    assert client.read(["/t/stale"]).found == {"/t/stale": "after"}


def test_an_error_etcd_answers_is_named_and_the_next_call_goes_through(etcd3):
    client = Etcd((etcd3.endpoints[0],))
    with pytest.raises(EtcdUnavailable, match=r"HTTP \d+: .*larger than max"):
        client.put("/t/big", "x" * (3 << 20))  # over etcd's 2 MiB for one request
    client.put("/t/big", "small")
    assert client.read(["/t/big"]).found == {"/t/big": "small"}


def test_threads_each_keep_their_own_connections(etcd3):
    """Calls from several threads at once on one Etcd: a connection shared between threads would interleave their
    requests and answers (http.client refuses a request while an answer is pending, or hands over the wrong one)."""
    client = Etcd(tuple(etcd3.endpoints))
    failures: list[Exception] = []

    def count(thread: int) -> None:
        try:
            for step in range(100):
                client.put(f"/t/threads/{thread}", str(step))
                assert client.read([f"/t/threads/{thread}"]).found == {f"/t/threads/{thread}": str(step)}
        except (AssertionError, EtcdUnavailable) as exc:
            failures.append(exc)

    threads = [threading.Thread(target=count, args=(thread,)) for thread in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert client.read(["/t/threads/"]).found == {f"/t/threads/{thread}": "99" for thread in range(4)}


def test_the_watch_follows_changes_in_order_and_ends_when_silent(etcd3):
    client = Etcd((nobody_listens(), *etcd3.endpoints))
    start = client.read(["/t/watch/"]).revision
    client.txn([], [put_op("/t/watch/a", "1"), put_op("/t/watch/b", "2")])
    client.put("/t/other", "not watched")
    opened: list[int] = []
    seen: list[tuple[int, str]] = []
    last = client.watch("/t/watch/", start, opened.append, lambda revision, key: seen.append((revision, key)), 0.5)
    assert opened == [start]
    assert [key for _, key in seen] == ["/t/watch/a", "/t/watch/b"]
    assert last == seen[-1][0] == client.read(["/t/watch/"]).revision - 1  # the put of /t/other came after

    resumed: list[str] = []
    client.put("/t/watch/c", "3")
    assert client.watch("/t/watch/", last, opened.append, lambda _, key: resumed.append(key), 0.5) > last
    assert resumed == ["/t/watch/c"], "a stream opened again after `last` sees what came after, and only that"


def test_a_watch_from_a_compacted_revision_says_start_afresh(etcd3):
    client = Etcd(tuple(etcd3.endpoints))
    old = client.read(["/t/compact/"]).revision
    client.put("/t/compact/a", "1")
    client.put("/t/compact/a", "2")
    now = client.read(["/t/compact/"]).revision
    assert etcd3.etcdctl("compaction", str(now)).returncode == 0  # the change after `old` is gone from the history
    seen: list[str] = []
    assert client.watch("/t/compact/", old, lambda _: None, lambda _, key: seen.append(key), 5.0) == 0
    assert seen == []

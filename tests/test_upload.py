"""The completion rules of contract §1 as a state machine: driven with a clock we set, no threads, no sleeping."""

from maintd.tree import Probe
from maintd.upload import UploadTracker, Verdict

Q = 5.0


def probe(last_change: float, temps: tuple[str, ...] = ()) -> Probe:
    return Probe(last_change=last_change, temp_files=temps, files=10, size=100)


def test_quiet_period_counts_from_the_newest_change_under_the_release():
    tracker = UploadTracker(Q, require_marker=False)
    tracker.activity("r1", now=100.0)
    assert tracker.take_due(104.9) == []
    assert tracker.take_due(105.0) == ["r1"]
    # a deep write the watcher did not report (an in-place scp) shows in the probe's ctime
    assert tracker.judge("r1", probe(103.0), False, now=105.0) is Verdict.WAIT
    assert tracker.next_due() == 108.0
    assert tracker.judge("r1", probe(103.0), False, now=108.0) is Verdict.COMPLETE


def test_timer_is_taken_once():
    tracker = UploadTracker(Q, require_marker=False)
    tracker.activity("r1", now=0.0)
    assert tracker.take_due(10.0) == ["r1"]
    assert tracker.take_due(10.0) == [] and tracker.next_due() is None


def test_rsync_temporary_left_blocks_completion():
    tracker = UploadTracker(Q, require_marker=False)
    tracker.activity("r1", now=0.0)
    assert tracker.judge("r1", probe(0.0, ("app/.big.bin.AbC123",)), False, now=10.0) is Verdict.WAIT
    assert "temporary" in tracker.uploads["r1"].reasons[0]


def test_broken_upload_waits_until_written_again():
    tracker = UploadTracker(Q, require_marker=False)
    tracker.activity("r1", now=0.0)
    assert tracker.broke_off("r1", now=1.0) is True  # news, logged once
    assert tracker.broke_off("r1", now=1.1) is False  # the next temporary of the same break
    assert tracker.next_due() is None
    assert tracker.judge("r1", probe(1.0), False, now=100.0) is Verdict.WAIT
    tracker.activity("r1", now=200.0)  # the upload resumed
    assert tracker.judge("r1", probe(200.0), False, now=205.0) is Verdict.COMPLETE


def test_marker_wins_at_once_even_when_broken():
    tracker = UploadTracker(Q, require_marker=False)
    tracker.broke_off("r1", now=0.0)
    tracker.marker_seen("r1", now=0.5)
    assert tracker.take_due(0.5) == ["r1"]
    assert tracker.judge("r1", probe(0.5), True, now=0.5) is Verdict.COMPLETE


def test_require_marker_ignores_quiet():
    tracker = UploadTracker(Q, require_marker=True)
    tracker.activity("r1", now=0.0)
    assert tracker.next_due() is None
    assert tracker.judge("r1", probe(0.0), False, now=1000.0) is Verdict.WAIT


def test_doubt_after_lost_events_treats_every_upload_as_cut_off():
    tracker = UploadTracker(Q, require_marker=False)
    tracker.activity("a", now=0.0)
    tracker.activity("b", now=0.0)
    tracker.doubt(now=1.0)
    assert all(u.broken for u in tracker.uploads.values())
    assert tracker.judge("a", probe(0.0), False, now=50.0) is Verdict.WAIT


def test_waiting_for_quiet_without_marker_or_manifest_says_a_cut_would_look_the_same():
    tracker = UploadTracker(quiet_period=5.0, require_marker=False)
    tracker.activity("r1", 100.0)
    assert tracker.judge("r1", probe(100.0), False, now=101.0) is Verdict.WAIT
    assert "--inplace or --temp-dir" in "; ".join(tracker.uploads["r1"].reasons)
    assert tracker.judge("r1", probe(100.0), False, now=101.0, has_manifest=True) is Verdict.WAIT
    assert tracker.uploads["r1"].reasons == ["still changing"]

"""`make demo`'s program end to end, as a user starts it, on each Delta engine: every event accounted for."""

import json
import subprocess
import sys

from tests.jobs.jobrun import ROOT


def test_the_demo_runs_the_whole_system_and_accounts_for_every_event(tmp_path):
    """On the embedded default, delta-rs; every job the demo chains is also tested on Spark's Delta on its own."""
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "jobs.demo", "--out", str(out), "--events", "1200"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Lambda Learner on Spark: demo" in done.stdout
    assert " INFO " not in done.stdout + done.stderr  # Spark's and py4j's chatter stays out
    report = json.loads((out / "report.json").read_text())

    # Every generated event is learnt or quarantined, once; the bad ones are the quarantined ones.
    tables, stream = report["tables"], report["stream"]
    assert tables["events"] + tables["quarantine"] == stream["events"]
    assert tables["quarantine"] == stream["bad_events"] > 0
    assert [run["status"] for run in report["nightly"]] == ["published", "published"]
    statuses = [batch["status"] for batch in report["nearline"]]
    assert len(statuses) == stream["files"] and statuses.count("rebased") == 2
    assert sum(batch["quarantined"] for batch in report["nearline"]) == stream["bad_events"]
    assert len(report["recommendations"]) == 9

    # The chain: every impression labelled once; a delivered click makes a positive, is quarantined, or is
    # a repeat of a click the join already counted (duplicates count once, docs/label_join.md).
    chain = report["chain"]
    join, streams = chain["label_join"], chain["streams"]
    assert join["positives"] + join["negatives"] == streams["impressions"] == chain["labelled_events"]
    assert 0 < join["positives"] + join["quarantined"] <= streams["clicks_delivered"]
    assert join["quarantined_by_reason"]["duplicate_click"] > 0
    assert join["positives"] <= streams["clicked_impressions"]
    assert chain["nearline_events"] == chain["labelled_events"]
    assert chain["nightly"]["status"] == "published"

"""What a job process costs around its micro-batches: the start, the first batch's warm-up, the JVM's compilers.

Every crash test of the suite starts job processes, and a small one spends most of its time outside its
batches. This bench runs ``python -m jobs.nearline_update`` on a small generated stream (``--files`` landing
files of ``--events`` events in all over the tests' 40 members and 15 items, one micro-batch each, on
conf/local.yaml: delta-rs) in fresh processes, one per variant per
round, the variants interleaved round by round. A variant is a list of ``--set`` overrides (settings of the
Spark session, JVM options among them). Per process: the wall time, the time before the first batch ended,
each batch's seconds (from the job's log) and, sampled from ``/proc`` (Linux) while it runs, the JVM's CPU
seconds by thread kind: the JIT compilers (C2, C1), the garbage collector, and everything else. The "class archive"
variant loads the classes from the CDS archive the tests use (tests/services/class_archive.py; built first if
missing).

    python bench/job_process.py [--rounds 3 --files 6 --events 1800]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from common import ROOT

sys.path.insert(0, str(ROOT))  # the tests' class archive (tests/services/class_archive.py)

from jobs.runtime.config import load_config
from jobs.runtime.settings import config_to_dict
from jobs.simulate.spec import RandomEffectSpec, StreamSpec
from jobs.simulate.writers import generate
from tests.services.class_archive import archive_options, class_archive

JVM_OPTIONS = "spark.conf.spark.driver.extraJavaOptions"
VARIANTS: dict[str, tuple[str, ...]] = {
    "as shipped": (),
    "C1 compiler only": (f"{JVM_OPTIONS}=-XX:TieredStopAtLevel=1",),
    "no whole-stage codegen": ("spark.conf.spark.sql.codegen.wholeStage=false",),
    "class archive": (f"{JVM_OPTIONS}={archive_options(class_archive())}",),
}
BATCH_LINE = re.compile(r"lambda_learner\.nearline batch \d+ .*, ([0-9.]+) s$")
THREAD_KINDS = (("C2", "C2 CompilerThre"), ("C1", "C1 CompilerThre"), ("GC", "G1 "), ("GC", "GC Thread"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def jvm_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread kind of the process ``pid`` so far (an empty dict once it has gone)."""
    seconds: dict[str, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return seconds
    for task in tasks:
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().rstrip("\n")
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        kind = next((kind for kind, prefix in THREAD_KINDS if name.startswith(prefix)), "other")
        seconds[kind] = seconds.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def java_child(pid: int) -> int | None:
    """The JVM the job process started (pyspark's gateway), if it runs yet."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if Path(f"/proc/{child}/comm").read_text().strip() == "java":
            return int(child)
    return None


def job_config(folder: Path, landing: Path) -> Path:
    """conf/local.yaml reading ``landing`` one file per micro-batch until it is drained, all else under ``folder``."""
    config = load_config(
        ROOT / "conf" / "local.yaml",
        [
            f"storage.root={folder / 'tables'}",
            f"stream.path={landing}",
            f"stream.checkpoint={folder / 'checkpoint'}",
            "stream.trigger=available_now",
            "stream.max_files_per_trigger=1",
        ],
    )
    folder.mkdir(parents=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def run_once(config: Path, overrides: tuple[str, ...]) -> dict:
    command = [sys.executable, "-m", "jobs.nearline_update", "--config", str(config)]
    command += [argument for override in overrides for argument in ("--set", override)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    batches: list[tuple[float, float]] = []  # (seconds since start at the log line, the batch's own seconds)
    cpu: dict[str, float] = {}

    def sample() -> None:
        nonlocal cpu
        jvm = None
        while process.poll() is None:
            jvm = jvm or java_child(process.pid)
            if jvm is not None:
                cpu = jvm_cpu(jvm) or cpu
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stderr:
        match = BATCH_LINE.search(line.rstrip())
        if match:
            batches.append((time.monotonic() - started, float(match.group(1))))
    process.wait()
    sampler.join()
    if process.returncode != 0 or not batches:
        raise RuntimeError(f"{command} ended with {process.returncode} after {len(batches)} batches")
    return {
        "wall_s": round(time.monotonic() - started, 2),
        "first_batch_done_s": round(batches[0][0], 2),
        "batch_s": [seconds for _, seconds in batches],
        "jvm_cpu_s": {kind: round(value, 1) for kind, value in sorted(cpu.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--events", type=int, default=1800)
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="job-process-"))
    try:
        spec = StreamSpec(
            random_effects=(
                RandomEffectSpec("per_member", "member_id", "member", entities=40, features=3),
                RandomEffectSpec("per_item", "item_id", "item", entities=15, features=3),
            ),
            events=options.events,
            slices=options.files,
            global_features=4,
        )
        truth = generate(spec, folder / "stream")
        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for round_number in range(options.rounds):
            for name, overrides in VARIANTS.items():
                work = folder / f"round-{round_number}" / name.replace(" ", "-")
                runs[name].append(run_once(job_config(work, truth.landing), overrides))
                print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
        baseline = statistics.median(run["wall_s"] for run in runs["as shipped"])
        report = {
            name: {
                "median_wall_s": statistics.median(run["wall_s"] for run in results),
                "median_wall_vs_as_shipped": round(statistics.median(run["wall_s"] for run in results) / baseline, 3),
                "median_first_batch_done_s": statistics.median(run["first_batch_done_s"] for run in results),
                "median_later_batch_s": statistics.median(s for run in results for s in run["batch_s"][1:]),
                "runs": results,
            }
            for name, results in runs.items()
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

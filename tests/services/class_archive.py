"""A class-data-sharing archive of a job JVM's classes, so the tests' many short Spark processes start faster.

Most of the suite's time is job processes (crash tests start dozens), and much of a short one is its JVM loading
and verifying Spark's and Delta's classes. A dynamic CDS archive (Java 13+) holds them already parsed and verified:
``bench/job_process.py`` measures the difference. It is built once per JDK, pyspark and jar set, by running the
nearline job on a tiny stream on Spark's Delta with ``-XX:ArchiveClassesAtExit`` (about a minute), and cached under
``.jars/class-archive/``. The tests hand it to every JVM they start through ``JDK_JAVA_OPTIONS``; a JVM whose class
path differs (the Kafka broker, a cluster's daemons) finds it does not match and runs without it, silently.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyspark

from jobs.runtime.jvm import jar_paths, jars_root

ROOT = Path(__file__).resolve().parents[2]
# Unified logging writes CDS warnings (a mismatched archive, classes it skips) to stdout: kept out of job output.
QUIET = "-Xlog:cds=off -Xlog:cds+dynamic=off"
JAVA = shutil.which("java") or "java"


def archive_options(archive: Path) -> str:
    """JVM options that use ``archive`` if it matches the JVM's class path, and say nothing either way."""
    return f"-XX:SharedArchiveFile={archive} {QUIET}"


def class_archive() -> Path:
    """The archive for this JDK, pyspark and jar set; built first if there is none yet."""
    archive = jars_root() / "class-archive" / f"{_fingerprint()}.jsa"
    if not archive.exists():
        _build(archive)
    return archive


def _fingerprint() -> str:
    """What the archive depends on: the JVM, Spark's own jars and the fetched ones."""
    version = subprocess.run([JAVA, "-version"], capture_output=True, text=True, check=True).stderr
    jars = sorted(Path(pyspark.__file__).parent.glob("jars/*.jar")) + [Path(jar) for jar in jar_paths("spark")]
    parts = [version, os.path.realpath(JAVA), *(f"{jar.name}:{jar.stat().st_size}" for jar in jars)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _build(archive: Path) -> None:
    # Imported here: the generator pulls in pandas, which a session start that finds the archive does not need.
    import yaml

    from jobs.runtime.config import load_config
    from jobs.runtime.settings import config_to_dict
    from jobs.simulate.spec import RandomEffectSpec, StreamSpec
    from jobs.simulate.writers import generate

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="class-archive-") as work:
        folder = Path(work)
        spec = StreamSpec(
            random_effects=(
                RandomEffectSpec("per_member", "member_id", "member", entities=20, features=3),
                RandomEffectSpec("per_item", "item_id", "item", entities=5, features=3),
            ),
            events=400,
            slices=2,
            global_features=4,
        )
        truth = generate(spec, folder / "stream")
        building = archive.with_suffix(f".{os.getpid()}.building")
        config = load_config(
            ROOT / "conf" / "local.yaml",
            [
                "storage.backend=spark-delta",
                f"storage.root={folder / 'tables'}",
                f"stream.path={truth.landing}",
                f"stream.checkpoint={folder / 'checkpoint'}",
                "stream.trigger=available_now",
                "stream.max_files_per_trigger=1",
                f"spark.conf.spark.driver.extraJavaOptions=-XX:ArchiveClassesAtExit={building} {QUIET}",
            ],
        )
        path = folder / "job.yaml"
        path.write_text(yaml.safe_dump(config_to_dict(config)))
        environment = {key: value for key, value in os.environ.items() if key != "JDK_JAVA_OPTIONS"}
        done = subprocess.run(
            [sys.executable, "-m", "jobs.nearline_update", "--config", str(path)],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not building.exists():
            raise RuntimeError(f"building the class archive failed ({done.returncode}):\n{done.stderr[-3000:]}")
        building.replace(archive)  # whole or not at all: a later run never finds half an archive

"""Fetch the project's JVM jars with Maven into ``.jars/`` (``make jars`` runs this).

Two sets, one pom each (no code is built, the poms only name dependencies):

* ``jvm/spark/pom.xml`` -> ``.jars/spark/``: Spark's Delta Lake and Spark's Kafka source and sink, for a
  local session of pip-installed pyspark. Every jar whose artifact pyspark's own ``jars/`` folder already
  has (in any version) is dropped: Spark's copy is the one on the classpath, and a second version of
  jackson, parquet, hadoop-client, log4j, ... would only clash with it.
* ``jvm/kafka/pom.xml`` -> ``.jars/kafka/``: a real Kafka broker and its admin tools, for the tests.

Plain standard library, so that any Python 3.11 runs it (the venv's or the system's). Idempotent: a stamp file
records a hash of the poms, this script and pyspark's jar names; with nothing changed a re-run does nothing.
Maven's local repository is ``.jars/repository`` (not ``~/.m2``), so the project's set-up needs nothing but
``mvn`` and ``java`` on the PATH. ``LAMBDA_LEARNER_JARS``, if set, names another folder for all of it
(``jobs/runtime/jvm.py`` reads the same variable).

Usage: python jvm/fetch.py [--force]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JVM_DIR = Path(__file__).resolve().parent
REPO_ROOT = JVM_DIR.parent
ENV_VAR = "LAMBDA_LEARNER_JARS"
KINDS = ("spark", "kafka")
STAMP_NAME = ".fetched-stamp"
# Pinned so that a fresh machine runs the same plugin as the one these poms were checked with.
COPY_GOAL = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"


class FetchError(RuntimeError):
    """A failure with a message meant for the person running ``make``."""


def jars_root() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".jars"


def pyspark_jars_dir() -> Path:
    """pyspark's ``jars/`` folder, found without importing pyspark (an import costs a second)."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pyspark")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "jars")
    # Run by a Python that is not the venv's: the venv the Makefile made.
    candidates += [Path(p) for p in sorted(glob.glob(str(REPO_ROOT / ".venv/lib/python3*/site-packages/pyspark/jars")))]
    if os.environ.get("SPARK_HOME"):
        candidates.append(Path(os.environ["SPARK_HOME"]) / "jars")
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("spark-core_*.jar")):
            return folder
    raise FetchError(
        "pyspark's jars/ folder was not found (needed to leave out the jars Spark already ships): "
        "run this with the venv's python (.venv/bin/python jvm/fetch.py) after `make venv`."
    )


def require_tools() -> str:
    """``mvn``'s path; a clear message if it or ``java`` is missing."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        raise FetchError(
            f"{' and '.join(missing)} not found on PATH: the project's JVM jars are fetched with Maven and run on "
            "Java 17 (e.g. `apt-get install openjdk-17-jdk-headless maven`)."
        )
    return shutil.which("mvn") or "mvn"


def wanted_hash(pyspark_jars: Path) -> str:
    """What the fetched sets depend on: the poms, this script, and which jars pyspark ships."""
    digest = hashlib.sha256()
    for path in [JVM_DIR / kind / "pom.xml" for kind in KINDS] + [Path(__file__).resolve()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\n".join(sorted(p.name for p in pyspark_jars.glob("*.jar"))).encode())
    return digest.hexdigest()


def up_to_date(root: Path, want: str) -> bool:
    stamp = root / STAMP_NAME
    if not stamp.is_file() or stamp.read_text().strip() != want:
        return False
    # A stamp without its jars (someone deleted a folder) is not up to date.
    return all(any((root / kind).glob("*.jar")) for kind in KINDS)


def run_maven(mvn: str, kind: str, repository: Path, out: Path) -> None:
    """Copy the pom's runtime dependencies into ``out`` in repository layout (group/artifact/version/)."""
    cmd = [
        mvn,
        "-B",
        "-q",
        f"-Dmaven.repo.local={repository}",
        "-f",
        str(JVM_DIR / kind / "pom.xml"),
        COPY_GOAL,
        "-DincludeScope=runtime",
        # The layout says which artifact each jar is, which the filter against pyspark's jars needs.
        "-Dmdep.useRepositoryLayout=true",
        f"-DoutputDirectory={out}",
    ]
    result = subprocess.run(cmd, cwd=JVM_DIR / kind, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise FetchError(
            f"Maven could not fetch the {kind} jars (exit {result.returncode}):\n  {' '.join(cmd)}\n"
            + "\n".join(output[-40:])
        )


def shipped_artifacts(pyspark_jars: Path) -> list[str]:
    return [p.name for p in pyspark_jars.glob("*.jar")]


def already_in_pyspark(artifact_id: str, pyspark_names: list[str]) -> bool:
    """Whether pyspark ships this artifact in some version (file ``<artifactId>-<version>[-classifier].jar``)."""
    pattern = re.compile(re.escape(artifact_id) + r"-\d")
    return any(pattern.match(name) for name in pyspark_names)


def fetch_kind(mvn: str, kind: str, root: Path, pyspark_jars: Path) -> tuple[list[str], list[str]]:
    """Fetch one set into ``root/kind`` (replaced whole); the jars kept and the ones left out."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{kind}-", dir=root) as tmp:
        layout = Path(tmp) / "layout"
        run_maven(mvn, kind, root / "repository", layout)
        staged = Path(tmp) / kind
        staged.mkdir()
        pyspark_names = shipped_artifacts(pyspark_jars) if kind == "spark" else []
        kept: list[str] = []
        dropped: list[str] = []
        for jar in sorted(layout.rglob("*.jar")):
            artifact_id = jar.parent.parent.name  # <group path>/<artifactId>/<version>/<file>.jar
            if kind == "spark" and already_in_pyspark(artifact_id, pyspark_names):
                dropped.append(jar.name)
                continue
            shutil.copy2(jar, staged / jar.name)
            kept.append(jar.name)
        if not kept:
            raise FetchError(f"Maven copied no {kind} jars; see {JVM_DIR / kind / 'pom.xml'}")
        target = root / kind
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return sorted(kept), sorted(dropped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch again even if the stamp says nothing changed")
    args = parser.parse_args(argv)
    root = jars_root()
    try:
        pyspark_jars = pyspark_jars_dir()
        want = wanted_hash(pyspark_jars)
        if not args.force and up_to_date(root, want):
            return 0
        mvn = require_tools()
        started = time.monotonic()
        (root / STAMP_NAME).unlink(missing_ok=True)
        for kind in KINDS:
            kept, dropped = fetch_kind(mvn, kind, root, pyspark_jars)
            left_out = f" ({len(dropped)} left out: pyspark ships them)" if dropped else ""
            print(f"jvm/fetch.py: {len(kept)} {kind} jars in {root / kind}{left_out}")
        (root / STAMP_NAME).write_text(want + "\n")
        print(f"jvm/fetch.py: done in {time.monotonic() - started:.0f} s")
    except FetchError as error:
        print(f"jvm/fetch.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

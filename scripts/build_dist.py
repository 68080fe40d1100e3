"""Build into ``dist/`` what a Spark cluster needs to run the jobs with spark-submit.

- ``lambda_learner_spark-<version>-py3-none-any.whl``: the project, for pip installs and Databricks.
- ``lambda_learner_spark.zip``: the wheel's packages ``lambda_learner``, ``udfs`` and ``jobs`` (their
  ``.py`` files, no tests, no caches) for ``--py-files``: the executors import the project's code from it.
- ``lambda_learner_spark_env.tar.gz``: a packed virtualenv with the executors' third-party
  dependencies, for ``--archives ...#environment`` and ``spark.pyspark.python=./environment/bin/python``.

Run with the project's virtualenv (``make dist``): the packed environment pins every dependency to
the version installed there, so the executors run what the driver was tested with. docs/deploy.md
tells how the artifacts are used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZIP_NAME = "lambda_learner_spark.zip"
ENV_NAME = "lambda_learner_spark_env.tar.gz"
# What the executors import: pandas and pyarrow for the pandas UDFs, numpy and scipy for the
# kernels (udfs/ and lambda_learner/); the settings they unpickle need no YAML (jobs.runtime.settings).
# Not pyspark and py4j (Spark puts its own zips on the executors' path), not
# deltalake or delta-spark (the tables are written from the driver).
EXECUTOR_REQUIREMENTS = ("numpy", "scipy", "pandas", "pyarrow")
# Modules whose functions the jobs ship to the executors; the build imports them with the packed
# environment, the zip and Spark's own zips only, as an executor would.
EXECUTOR_MODULES = (
    "udfs.arrays",
    "udfs.dense_features",
    "udfs.entity_kernels",
    "udfs.entity_metrics",
    "jobs.game.random_effect",
    "jobs.game.fixed_effect",
)
# Fixed zip timestamps: the same sources give a byte-identical zip.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist-dir", type=Path, default=ROOT / "dist")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "dist", help="scratch space, wiped")
    parser.add_argument(
        "--python-prefix",
        help="where the executors' hosts have this Python (e.g. /usr), if not where this machine has it",
    )
    args = parser.parse_args(argv)
    dist, scratch = args.dist_dir.resolve(), args.build_dir.resolve()
    for folder in (dist, scratch):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    started = time.monotonic()
    wheel = build_wheel(scratch / "sdist", dist)
    code = build_zip(wheel, dist / ZIP_NAME)
    environment = build_environment(scratch / "env", dist / ENV_NAME, code, args.python_prefix)
    for artifact in (wheel, code, environment):
        print(f"{artifact.relative_to(dist.parent)}  {artifact.stat().st_size / 2**20:.1f} MiB")
    print(f"built in {time.monotonic() - started:.0f} s")


def build_wheel(scratch: Path, dist: Path) -> Path:
    """The project's wheel, built by ``python -m build`` from a fresh sdist in an isolated environment.

    Going through the sdist keeps setuptools' ``build/lib`` of earlier builds out of the wheel.
    """
    run(sys.executable, "-m", "build", "--quiet", "--outdir", str(scratch), str(ROOT))
    (wheel,) = scratch.glob("*.whl")
    return Path(shutil.move(wheel, dist / wheel.name))


def build_zip(wheel: Path, target: Path) -> Path:
    """The wheel's packages without its metadata: the same files pip would install, in a stable order.

    Taken from the wheel so that the zip can never hold what the wheel does not (tests, caches,
    stray files in the work tree); entries get fixed timestamps, so the same sources give the same zip.
    """
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(source.namelist()):
            if name.split("/", 1)[0].endswith(".dist-info"):
                continue
            entry = zipfile.ZipInfo(name, ZIP_DATE)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, source.read(name))
    return target


def build_environment(env_dir: Path, target: Path, code: Path, python_prefix: str | None) -> Path:
    """A fresh virtualenv with the executors' dependencies, checked, then packed with venv-pack.

    It is created without pip and filled by this interpreter's pip, so it holds the
    dependencies and nothing else (no pip, no setuptools, never the project itself). Its
    ``bin/python`` stays a link to the base interpreter: every executor host needs the same
    Python version at that prefix (``python_prefix``, by default this machine's).
    """
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in EXECUTOR_REQUIREMENTS]
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--only-binary=:all:", *pins)
    check_executor_imports(python, code)
    # The libraries' own test suites are a fifth of the environment and never run on a cluster.
    pack = ["--prefix", str(env_dir), "--output", str(target), "--exclude", "*/tests/*", "--quiet"]
    if python_prefix:
        pack += ["--python-prefix", python_prefix]
    run(sys.executable, "-m", "venv_pack", *pack)
    target.chmod(0o644)  # venv-pack leaves its temporary file's 0600
    return target


def check_executor_imports(python: Path, code: Path) -> None:
    """Import what the executors unpickle, with the path an executor has: the zip and Spark's zips."""
    import pyspark

    spark_lib = Path(pyspark.__file__).parent / "python" / "lib"
    path = [str(code), *map(str, sorted(spark_lib.glob("*.zip")))]
    script = f"import importlib, sys; sys.path[:0] = {path!r}; [importlib.import_module(m) for m in sys.argv[1:]]"
    # -I: no user site, no PYTHONPATH from the caller, no current directory on the path.
    run(str(python), "-I", "-c", script, *EXECUTOR_MODULES, cwd=python.parent)


def run(*command: str, cwd: Path | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=cwd or ROOT, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


if __name__ == "__main__":
    main()

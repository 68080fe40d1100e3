"""The Databricks asset bundle: databricks.yml and resources/*.yml, read as the bundle schema expects them."""

import re
from pathlib import Path

import pytest
import yaml

from jobs.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = yaml.safe_load((ROOT / "databricks.yml").read_text())
TOP_LEVEL_KEYS = {
    "bundle",
    "include",
    "variables",
    "artifacts",
    "targets",
    "resources",
    "sync",
    "workspace",
    "permissions",
    "run_as",
    "presets",
    "scripts",
    "experimental",
}
TASK_TYPES = {"spark_python_task", "notebook_task", "python_wheel_task", "spark_jar_task", "sql_task", "run_job_task"}
# The Spark each runtime is built on; the Kafka connector must be the same version.
RUNTIME_SPARK = {"17.3": "4.0.0"}
WORKSPACE_FILES = "${workspace.file_path}/"
VARIABLE = re.compile(r"\$\{var\.([A-Za-z0-9_]+)\}")


def resource_files() -> list[Path]:
    return sorted(path for pattern in BUNDLE["include"] for path in ROOT.glob(pattern))


def jobs() -> dict[str, tuple[Path, dict]]:
    """Every job of the bundle by key, with the file that declares it (paths in it are relative to that file)."""
    found = {}
    for path in resource_files():
        for key, job in yaml.safe_load(path.read_text())["resources"]["jobs"].items():
            assert key not in found, f"job {key} is declared twice"
            found[key] = (path, job)
    return found


def resolved(value):
    """``value`` with a whole-string ``${var.name}`` replaced by the variable's default."""
    match = VARIABLE.fullmatch(value) if isinstance(value, str) else None
    return BUNDLE["variables"][match.group(1)]["default"] if match else value


def local_file(declared_in: Path, reference: str) -> Path:
    """A path the bundle refers to: relative to its YAML file, or under the synced files of the workspace."""
    if reference.startswith(WORKSPACE_FILES):
        return ROOT / reference.removeprefix(WORKSPACE_FILES)
    return (declared_in.parent / reference).resolve()


def test_the_bundle_has_a_name_targets_and_the_wheel():
    assert set(BUNDLE) <= TOP_LEVEL_KEYS
    assert BUNDLE["bundle"]["name"]
    assert resource_files(), "include matches no resource file"
    targets = BUNDLE["targets"]
    assert set(targets) == {"dev", "prod"}
    assert [name for name, target in targets.items() if target.get("default")] == ["dev"]
    assert {target["mode"] for target in targets.values()} == {"development", "production"}
    for target in targets.values():
        assert target["workspace"]["host"].startswith("https://")
    (artifact,) = BUNDLE["artifacts"].values()
    assert artifact["type"] == "whl"
    assert (ROOT / artifact["path"] / "pyproject.toml").exists()
    assert "wheel" in artifact["build"] and "--wheel-dir dist" in artifact["build"]


def test_every_resource_file_declares_jobs_and_nothing_else():
    for path in resource_files():
        resources = yaml.safe_load(path.read_text())
        assert set(resources) == {"resources"}, path.name
        assert set(resources["resources"]) == {"jobs"}, path.name


def test_every_job_has_well_formed_tasks_on_a_current_runtime():
    for key, (path, job) in jobs().items():
        assert job["name"], key
        assert not ("schedule" in job and "continuous" in job), f"{key}: one trigger per job"
        clusters = {cluster["job_cluster_key"]: resolved(cluster["new_cluster"]) for cluster in job["job_clusters"]}
        task_keys = [task["task_key"] for task in job["tasks"]]
        assert len(set(task_keys)) == len(task_keys), key
        for task in job["tasks"]:
            assert len(TASK_TYPES & set(task)) == 1, f"{key}.{task['task_key']}: exactly one task type"
            assert task["job_cluster_key"] in clusters
            wheels = [local_file(path, library["whl"]) for library in task["libraries"] if "whl" in library]
            assert [wheel.parent for wheel in wheels] == [ROOT / "dist"], "the wheel the artifact build writes"
        for cluster in clusters.values():
            runtime = re.fullmatch(r"(\d+\.\d+)\.x-scala2\.13", cluster["spark_version"])
            assert runtime and runtime.group(1) in RUNTIME_SPARK, cluster["spark_version"]
            assert cluster["node_type_id"] and cluster["num_workers"] >= 1
            # Dedicated; docs/deploy.md tells what standard access mode (USER_ISOLATION) changes.
            assert cluster["data_security_mode"] == "SINGLE_USER"


def test_the_nightly_job_runs_once_a_night_in_utc_one_run_at_a_time():
    path, job = jobs()["nightly_retrain"]
    fields = job["schedule"]["quartz_cron_expression"].split()
    seconds, minutes, hours, day_of_month, month, day_of_week = fields[:6]
    assert all(field.isdigit() for field in (seconds, minutes, hours)), "one fixed time of day"
    assert (day_of_month, month, day_of_week) == ("*", "*", "?"), "every day"
    assert job["schedule"]["timezone_id"] == "UTC"
    assert job["max_concurrent_runs"] == 1
    (task,) = job["tasks"]
    assert local_file(path, task["spark_python_task"]["python_file"]) == ROOT / "jobs" / "nightly_retrain.py"


def test_the_nearline_job_runs_continuously():
    path, job = jobs()["nearline_update"]
    assert job["continuous"]["pause_status"] == "UNPAUSED"
    assert "schedule" not in job
    (task,) = job["tasks"]
    assert "max_retries" not in task, "a continuous job retries by itself; task retry policies are refused"
    assert local_file(path, task["spark_python_task"]["python_file"]) == ROOT / "jobs" / "nearline_update.py"


def test_no_task_installs_a_jar_the_runtime_already_has():
    """Databricks Runtime brings Delta Lake and the Kafka source; serverless compute refuses Maven libraries."""
    for key, (_, job) in jobs().items():
        for task in job["tasks"]:
            kinds = {kind for library in task["libraries"] for kind in library}
            assert kinds == {"whl"}, f"{key}.{task['task_key']}: {kinds}"
    text = "\n".join(path.read_text() for path in [ROOT / "databricks.yml", *resource_files()])
    assert "maven" not in text and "spark-sql-kafka" not in text and "delta-spark" not in text


def test_every_notebook_is_deployed_as_a_notebook_task():
    deployed = {
        local_file(path, task["notebook_task"]["notebook_path"])
        for path, job in jobs().values()
        for task in job["tasks"]
        if "notebook_task" in task
    }
    assert deployed == set((ROOT / "notebooks").glob("*.py"))
    for notebook in deployed:
        assert notebook.read_text().startswith("# Databricks notebook source\n")


@pytest.mark.parametrize("job_key", ["nightly_retrain", "nearline_update", "inspect_tables", "replay"])
def test_every_referenced_file_exists_and_every_config_loads(job_key):
    path, job = jobs()[job_key]
    for task in job["tasks"]:
        if "spark_python_task" in task:
            python = task["spark_python_task"]
            assert local_file(path, python["python_file"]).is_file()
            arguments = python["parameters"]
            config = arguments[arguments.index("--config") + 1]
        else:
            assert local_file(path, task["notebook_task"]["notebook_path"]).is_file()
            config = task["notebook_task"]["base_parameters"]["config"]
        assert config.startswith(WORKSPACE_FILES), "a task's working directory is its own file's folder"
        load_config(local_file(path, config))

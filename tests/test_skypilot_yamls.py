"""The three SkyPilot YAMLs as SkyPilot itself parses them (offline), plus `bash -n` on their scripts.

SkyPilot conflicts with the test venv (transformers pins click), so it runs in its own interpreter:
$SKYPILOT_PYTHON, else <repo>/.venv-sky/bin/python. tests/sky_inspect.py does the parsing there
and prints JSON facts; one subprocess serves the whole module.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import run_in_skypilot_venv

REPO = Path(__file__).resolve().parent.parent
BUCKET = "my-test-bucket"
TOKEN = "hf_test_token"
L40S = {"L40S": 1}

# name -> how the CLI would be called (--env / --secret) for that YAML.
CASES: dict[str, dict[str, Any]] = {
    "pool": {"yaml": "sam3-pool.yaml", "env": {"OUTPUT_BUCKET_NAME": BUCKET}, "secret": {"HF_TOKEN": TOKEN}},
    "pool_without_bucket": {"yaml": "sam3-pool.yaml", "secret": {"HF_TOKEN": TOKEN}},
    "pool_without_secret": {"yaml": "sam3-pool.yaml", "env": {"OUTPUT_BUCKET_NAME": BUCKET}},
    "job": {"yaml": "sam3-job.yaml", "secret": {"HF_TOKEN": TOKEN}},
    "single": {
        "yaml": "sam3-test-single.yaml",
        "env": {"OUTPUT_BUCKET_NAME": BUCKET},
        "secret": {"HF_TOKEN": TOKEN},
    },
    "single_without_bucket": {"yaml": "sam3-test-single.yaml", "secret": {"HF_TOKEN": TOKEN}},
    # A user with videos in their own bucket and no Kaggle account, and one with Kaggle secrets.
    "pool_own_videos": {
        "yaml": "sam3-pool.yaml",
        "env": {"OUTPUT_BUCKET_NAME": BUCKET, "DATASET": "bucket", "VIDEO_DIR": "/outputs/matches"},
        "secret": {"HF_TOKEN": TOKEN},
    },
    "single_own_videos": {
        "yaml": "sam3-test-single.yaml",
        "env": {"OUTPUT_BUCKET_NAME": BUCKET, "DATASET": "bucket", "VIDEO_DIR": "/outputs/matches"},
        "secret": {"HF_TOKEN": TOKEN},
    },
    "pool_kaggle": {
        "yaml": "sam3-pool.yaml",
        "env": {"OUTPUT_BUCKET_NAME": BUCKET},
        "secret": {"HF_TOKEN": TOKEN, "KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0123"},
    },
}
NO_KAGGLE = {"KAGGLE_USERNAME": "", "KAGGLE_KEY": ""}  # the YAMLs' defaults: set only for a kaggle: DATASET


@pytest.fixture(scope="module")
def sky_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HOME for SkyPilot (`import sky` writes ~/.sky). It has no ~/.kaggle: nothing local is
    needed beyond the repository (Kaggle credentials come as secrets)."""
    return tmp_path_factory.mktemp("sky-home")


@pytest.fixture(scope="module")
def facts(sky_home: Path) -> dict[str, dict[str, Any]]:
    """What SkyPilot parsed for each entry of CASES."""
    cases = [{**case, "yaml": str(REPO / case["yaml"])} for case in CASES.values()]
    return dict(zip(CASES, run_in_skypilot_venv("sky_inspect.py", cases, sky_home), strict=True))


def ok(facts: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    assert "error" not in facts[name], f"SkyPilot rejected {CASES[name]['yaml']}: {facts[name]['error']}"
    return facts[name]


def test_pool_yaml_scales_from_no_worker_to_three_on_its_queue(facts):
    """No job queued, no worker billed; SkyPilot's queue-length autoscaler adds workers up to 3."""
    pool = ok(facts, "pool")
    assert pool["is_pool"]
    assert (pool["workers"], pool["max_workers"]) == (0, 3)  # min_workers, max_workers
    assert pool["queue_length_threshold"] == 1
    assert (pool["upscale_delay_seconds"], pool["downscale_delay_seconds"]) == (60, 300)
    assert pool["pool_validation"] == "ok"
    assert pool["run"] is None


@pytest.mark.parametrize("name", ["job", "single"])
def test_non_pool_yaml_is_not_a_pool(facts, name):
    assert not ok(facts, name)["is_pool"]


@pytest.mark.parametrize("name", ["pool", "job", "single"])
def test_yaml_accelerators_l40s(facts, name):
    resources = ok(facts, name)["resources"]
    assert [r["accelerators"] for r in resources] == [L40S]  # SkyPilot does not check the name offline


def test_job_yaml_resources_match_pool(facts):
    def without_recovery(resources):
        return [{k: v for k, v in r.items() if k != "job_recovery"} for r in resources]

    assert without_recovery(ok(facts, "job")["resources"]) == without_recovery(ok(facts, "pool")["resources"])


def test_job_yaml_retries_failed_jobs(facts):
    assert ok(facts, "job")["resources"][0]["job_recovery"]["max_restarts_on_errors"] == 3
    # SkyPilot refuses job_recovery in a pool; the pool YAML passed its validation above without it.
    assert ok(facts, "pool")["resources"][0]["job_recovery"] is None


def test_job_yaml_has_nothing_pools_ignore(facts):
    job = ok(facts, "job")
    assert job["setup"] is None
    assert job["workdir"] is None
    assert job["file_mounts"] == {}
    assert job["storage_mounts"] == {}
    assert job["run"]


@pytest.mark.parametrize("name", ["pool", "single"])
def test_yaml_bucket_from_env(facts, name):
    parsed = ok(facts, name)
    assert parsed["storage_mounts"] == {"/outputs": {"source": f"s3://{BUCKET}", "mode": "MOUNT_CACHED"}}
    assert parsed["envs"]["OUTPUT_BUCKET_NAME"] == BUCKET


@pytest.mark.parametrize("name", ["pool_without_bucket", "single_without_bucket"])
def test_yaml_bucket_env_required(facts, name):
    assert "OUTPUT_BUCKET_NAME" in facts[name].get("error", ""), facts[name]


@pytest.mark.parametrize("name", ["pool", "job", "single"])
def test_yaml_secret_resolves(facts, name):
    parsed = ok(facts, name)
    assert parsed["secrets"] == {"HF_TOKEN": TOKEN, **(NO_KAGGLE if name != "job" else {})}
    assert parsed["managed_secret_refs"] == []
    assert "HF_TOKEN" not in parsed["envs"]


def test_pool_yaml_secret_without_flag_is_launch_time_reference(facts):
    parsed = ok(facts, "pool_without_secret")
    assert parsed["secrets"] == NO_KAGGLE  # empty defaults, not references that the launch would refuse
    assert parsed["managed_secret_refs"] == ["HF_TOKEN"]  # resolved by `sky` at launch, never in the YAML


@pytest.mark.parametrize("name", ["pool", "single", "pool_own_videos", "single_own_videos", "pool_kaggle"])
def test_yaml_needs_no_local_file_but_the_workdir(facts, sky_home, name):
    """`sky jobs pool apply` and `sky launch` check local file mounts on the client
    (expand_and_validate_file_mounts, run by sky_inspect): none here, with a HOME without ~/.kaggle."""
    parsed = ok(facts, name)
    assert parsed["file_mounts"] == {}
    assert parsed["workdir"] == str(REPO)
    assert parsed.get("pool_validation", "ok") == "ok"
    assert not (sky_home / ".kaggle").exists()


@pytest.mark.parametrize("name", ["pool_own_videos", "single_own_videos"])
def test_own_videos_with_flags_only(facts, name):
    parsed = ok(facts, name)
    assert parsed["envs"]["DATASET"] == "bucket" and parsed["envs"]["VIDEO_DIR"] == "/outputs/matches"
    assert parsed["storage_mounts"] == {"/outputs": {"source": f"s3://{BUCKET}", "mode": "MOUNT_CACHED"}}
    assert parsed["secrets"] == {"HF_TOKEN": TOKEN, **NO_KAGGLE}


def test_kaggle_credentials_come_as_secrets(facts):
    parsed = ok(facts, "pool_kaggle")
    assert parsed["secrets"] == {"HF_TOKEN": TOKEN, "KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "0123"}
    assert "KAGGLE_KEY" not in parsed["envs"]


def test_job_and_pool_read_the_same_videos_by_default(facts):
    assert ok(facts, "job")["envs"]["VIDEO_DIR"] == ok(facts, "pool")["envs"]["VIDEO_DIR"]


def test_single_yaml_setup_same_as_pool(facts):
    pool, single = ok(facts, "pool"), ok(facts, "single")
    assert single["setup"] == pool["setup"]
    assert single["file_mounts"] == pool["file_mounts"]
    assert single["storage_mounts"] == pool["storage_mounts"]


JOB_ONLY_ENVS = ("BUCKET_LAG", "PROCESSES_PER_GPU", "OBJECTS_PER_FRAME")


def test_single_yaml_envs_same_defaults_as_job(facts):
    """The pool's envs aside: a single node has no other job whose files it waits for, and runs
    one process for a first look."""
    job, single = ok(facts, "job"), ok(facts, "single")
    envs = {key: value for key, value in job["envs"].items() if key not in JOB_ONLY_ENVS}
    assert {key: single["envs"].get(key) for key in envs} == envs
    assert all(key in job["envs"] and key not in single["envs"] for key in JOB_ONLY_ENVS)


@pytest.mark.parametrize(
    ("name", "field"),
    [("pool", "setup"), ("job", "run"), ("single", "setup"), ("single", "run")],
    ids=["pool-setup", "job-run", "single-setup", "single-run"],
)
def test_yaml_script_bash_syntax(facts, name, field):
    script = ok(facts, name)[field]
    assert script, f"{name} has no {field}"
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

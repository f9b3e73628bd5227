"""Parse SkyPilot YAMLs the way the CLI does, offline, and print what SkyPilot understood as JSON.

Run with the interpreter that has `skypilot` installed (it conflicts with the test venv), e.g.:
  echo '[{"yaml": "sam3-pool.yaml", "env": {"OUTPUT_BUCKET_NAME": "b"}}]' | .venv-sky/bin/python tests/sky_inspect.py

Input (stdin): a JSON list of cases {"yaml": path, "env": {K: V}, "secret": {K: V}}.
Output (stdout): a JSON list with one object of facts per case, or {"error": "..."} where SkyPilot
rejected it. Only offline steps are used: the CLI's YAML loader (schema, env substitution,
secrets), workdir and file-mount expansion, and the client-side pool validation of
`sky jobs pool apply`. Never Task.validate(): it fetches the accelerator catalog.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def inspect(case: dict[str, Any]) -> dict[str, Any]:
    from sky.serve import serve_utils
    from sky.utils import dag_utils

    dag = dag_utils.load_chain_dag_from_yaml(
        case["yaml"],
        env_overrides=list(case.get("env", {}).items()),
        secret_overrides=list(case.get("secret", {}).items()),
    )
    if len(dag.tasks) != 1:
        raise ValueError(f"expected one task, got {len(dag.tasks)}")
    task = dag.tasks[0]
    task.expand_and_validate_workdir()
    task.expand_and_validate_file_mounts()

    facts: dict[str, Any] = {
        "name": task.name,
        "workdir": task.workdir,
        "setup": task.setup,
        "run": task.run,
        "envs": dict(task.envs),
        "secrets": {key: value.get_secret_value() for key, value in task.secrets.items()},
        "managed_secret_refs": [ref.name for ref in task.managed_secret_refs],
        "file_mounts": dict(task.file_mounts or {}),
        "storage_mounts": {
            path: {"source": storage.source, "mode": storage.mode.value}
            for path, storage in (task.storage_mounts or {}).items()
        },
        "resources": [
            {
                "accelerators": resources.accelerators,
                "job_recovery": resources.job_recovery,
                "use_spot": resources.use_spot,
            }
            for resources in task.resources
        ],
        "is_pool": bool(task.service is not None and task.service.pool),
    }
    if facts["is_pool"]:
        facts["workers"] = task.service.min_replicas
        facts["max_workers"] = task.service.max_replicas
        for name in ("queue_length_threshold", "upscale_delay_seconds", "downscale_delay_seconds"):
            facts[name] = getattr(task.service, name)
        try:
            serve_utils.validate_service_task(task, pool=True)
            facts["pool_validation"] = "ok"
        except Exception as error:  # reported, not raised: the test shows SkyPilot's message
            facts["pool_validation"] = f"{type(error).__name__}: {error}"
    return facts


def main() -> int:
    results = []
    for case in json.load(sys.stdin):
        try:
            results.append(inspect(case))
        except Exception as error:  # a rejected YAML is a fact too
            results.append({"error": f"{type(error).__name__}: {error}"})
    json.dump(results, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

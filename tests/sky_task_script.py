"""Print the bash script that SkyPilot runs on a node for a YAML's `run` block, composed by SkyPilot.

Run with the interpreter that has `skypilot` installed (it conflicts with the test venv), e.g.:
  echo '[{"yaml": "sam3-job.yaml", "secret": {"HF_TOKEN": "t"}}]' |
    .venv-sky/bin/python tests/sky_task_script.py

Input (stdin): a JSON list of cases {"yaml": path, "env": {K: V}, "secret": {K: V}}, as --env and
--secret would give them.
Output (stdout): a JSON list with the script of each case, or {"error": "..."}.

The steps are SkyPilot 0.14.1's for a task on a VM (CloudVmRayBackend -> RayCodeGen.add_task ->
log_lib.run_bash_command_with_log): TaskCodeGen.build_task_bash_script puts the Ray env cleanup
before the run block and appends the wait for MOUNT_CACHED uploads (get_rclone_flush_script);
log_lib.make_task_bash_script adds the header (~/.bashrc, cd ~/sky_workdir) and exports the
task's envs and secrets. SkyPilot then runs the file with `/bin/bash -i`.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def compose(case: dict[str, Any]) -> str:
    from sky.backends import task_codegen
    from sky.skylet import log_lib
    from sky.utils import dag_utils

    dag = dag_utils.load_chain_dag_from_yaml(
        case["yaml"],
        env_overrides=list(case.get("env", {}).items()),
        secret_overrides=list(case.get("secret", {}).items()),
    )
    [task] = dag.tasks
    # The env prefix as RayCodeGen.add_task makes it.
    env_prefix = " && ".join(f"unset {var}" for var in task_codegen.UNSET_RAY_ENV_VARS)
    script = task_codegen.TaskCodeGen.build_task_bash_script(task.run, env_prefix=env_prefix)
    env_vars = {
        key: value.get_secret_value() if hasattr(value, "get_secret_value") else value
        for key, value in task.envs_and_secrets.items()
    }
    return log_lib.make_task_bash_script(script, env_vars=env_vars)


def main() -> int:
    results = []
    for case in json.load(sys.stdin):
        try:
            results.append({"script": compose(case)})
        except Exception as error:  # reported, so that the test shows SkyPilot's message
            results.append({"error": f"{type(error).__name__}: {error}"})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

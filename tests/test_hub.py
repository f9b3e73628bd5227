"""A first run that cannot get the checkpoint ends in one line that names the fix, after one request.

The Hugging Face Hub is stood in for by a local HTTP server that answers as the Hub does (its status
codes and `X-Error-Code` / `X-Error-Message` headers, which huggingface_hub turns into its errors);
"no network" is a port where nothing listens. The script runs as a user runs it, in a subprocess
with an empty Hugging Face cache and HF_ENDPOINT pointing at the stand-in.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, failure_lines

MODEL = "facebook/sam3"
CONFIG_PATH = f"/{MODEL}/resolve/main/config.json"
INVALID_TOKEN = "Invalid credentials in Authorization header"  # the Hub's X-Error-Message for a bad token
REGISTRY_PATH = "/api/agent-harnesses"  # huggingface_hub fetches this list for its user agent, once a day


class StandInHub(http.server.ThreadingHTTPServer):
    """Answers every request with one status and headers; keeps (method, path, Authorization) of each."""

    def __init__(self, status: int, headers: dict[str, str]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.status, self.headers, self.all_requests = status, headers, []

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """The requests for the model, not huggingface_hub's own."""
        return [request for request in self.all_requests if request[1] != REGISTRY_PATH]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: StandInHub

    def answer(self) -> None:
        self.server.all_requests.append((self.command, self.path, self.headers.get("Authorization")))
        self.send_response(self.server.status)
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_in_hub() -> Iterator:
    servers = []

    def start(status: int, **headers: str) -> StandInHub:
        server = StandInHub(status, {name.replace("_", "-"): value for name, value in headers.items()})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once the socket closes


def first_run(tmp_path: Path, make_video, endpoint: str, model: str = MODEL, **env: str) -> subprocess.CompletedProcess:
    video = make_video(tmp_path / "match.mp4", seconds=1, fps=4)
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=endpoint, OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, str(REPO / "process_segmentation.py"), str(video), "--model", model, "--device", "cpu"]
        + ["--output-dir", str(tmp_path / "out")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,  # the retries this replaces took minutes
    )


def assert_one_line(completed: subprocess.CompletedProcess, *expected: str) -> str:
    """The run ended at the model load (exit 2) in exactly one error line holding `expected`, quietly."""
    assert completed.returncode == 2, completed.stderr[-3000:]
    [line] = failure_lines(completed.stderr)
    assert line.startswith("error: cannot load model ")
    for text in expected:
        assert text in line
    assert "Traceback" not in completed.stderr and "Retry" not in completed.stderr, completed.stderr
    return line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("status", "headers", "token", "expected"),
    [
        (401, {"X-Error-Code": "GatedRepo"}, None, ["HF_TOKEN is not set", f"/{MODEL}", "settings/tokens"]),
        (
            403,
            {"X-Error-Code": "GatedRepo"},
            "hf_no_access",
            ["has no access to this gated checkpoint yet", f"/{MODEL}"],
        ),
        (
            401,
            {"X-Error-Message": INVALID_TOKEN},
            "hf_revoked",
            ["does not accept the token (HF_TOKEN", "settings/tokens"],
        ),
    ],
    ids=["no-token", "token-without-access", "invalid-token"],
)
def test_a_checkpoint_the_token_cannot_get_fails_in_one_line_after_one_request(
    tmp_path, make_video, stand_in_hub, status, headers, token, expected
):
    hub = stand_in_hub(status, **headers)
    completed = first_run(tmp_path, make_video, hub.endpoint, **({"HF_TOKEN": token} if token else {}))

    assert_one_line(completed, *expected)
    assert hub.requests == [("HEAD", CONFIG_PATH, f"Bearer {token}" if token else None)]


@pytest.mark.slow
def test_the_token_of_a_login_is_used_when_hf_token_is_not_set(tmp_path, make_video, stand_in_hub):
    hub = stand_in_hub(403, **{"X-Error-Code": "GatedRepo"})
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("hf_from_login")  # where `hf auth login` keeps it
    completed = first_run(tmp_path, make_video, hub.endpoint)

    assert_one_line(completed, "has no access to this gated checkpoint yet")
    assert hub.requests == [("HEAD", CONFIG_PATH, "Bearer hf_from_login")]


def test_a_mistyped_model_id_is_named_as_such(tmp_path, make_video, stand_in_hub):
    hub = stand_in_hub(404, **{"X-Error-Code": "RepoNotFound"})
    completed = first_run(tmp_path, make_video, hub.endpoint, model="facebook/sam33")

    line = assert_one_line(completed, "facebook/sam33", "no model of that name", "check --model")
    assert "HF_TOKEN" not in line
    assert [path for _, path, _ in hub.requests] == ["/facebook/sam33/resolve/main/config.json"]


@pytest.mark.slow
def test_no_network_and_nothing_cached_says_the_hub_cannot_be_reached(tmp_path, make_video):
    endpoint = closed_port_endpoint()
    completed = first_run(tmp_path, make_video, endpoint, HF_TOKEN="hf_valid")

    line = assert_one_line(completed, f"cannot reach the Hugging Face Hub at {endpoint}", "--model a local folder")
    assert "HF_TOKEN" not in line


@pytest.mark.slow
def test_offline_mode_without_a_cached_checkpoint_says_so(tmp_path, make_video):
    completed = first_run(tmp_path, make_video, closed_port_endpoint(), HF_HUB_OFFLINE="1")

    assert_one_line(completed, "HF_HUB_OFFLINE is set", "does not hold it", "--model a local folder")


@pytest.mark.slow
def test_no_network_with_the_checkpoint_cached_runs_from_the_cache_without_retries(
    tmp_path, make_video, tiny_model_dir
):
    # The layout huggingface_hub gives a download: a worker whose setup fetched the weights.
    commit = "0" * 40
    cached = tmp_path / "hf-home" / "hub" / f"models--{MODEL.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, cached / "snapshots" / commit)

    completed = first_run(tmp_path, make_video, closed_port_endpoint())

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Retry" not in completed.stderr and not failure_lines(completed.stderr)
    assert (tmp_path / "out" / "match" / "match_segmented.mp4").is_file()
    assert (tmp_path / "out" / "match" / "match_metadata.json").is_file()


def test_setup_fetching_the_weights_without_a_token_stops_in_the_same_one_line(tmp_path, stand_in_hub):
    hub = stand_in_hub(401, **{"X-Error-Code": "GatedRepo"})
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=hub.endpoint)
    completed = subprocess.run(
        [sys.executable, "-m", "sam3_pipeline.hub", MODEL],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 2 and completed.stderr.startswith(
        f"error: cannot load model {MODEL}: HF_TOKEN is not set"
    )
    assert completed.stderr.count("\n") == 1 and hub.requests == [("HEAD", CONFIG_PATH, None)]

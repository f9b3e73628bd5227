"""The results page `--summarize` writes (OUTPUT_DIR/index.html), checked as a person would meet
it: opened from disk and served over HTTP in Debian's Chromium (driven by Playwright), on a
folder with done, failed and missing videos made by the tiny SAM3."""

from __future__ import annotations

import functools
import html.parser
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import process_segmentation as ps
from conftest import segment
from synthetic_video import write_test_video

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the networking flags Chromium keeps trying to reach Google's hosts from a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# name in the dataset -> status on the page
VIDEOS = {"match one & two": "done", "clips/short": "done", "broken": "failed", "later": "missing"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """An output folder summarized with its page: two videos done (one of them over three windows,
    assembled), one failed (not a video), one missing (added to the dataset after the run)."""
    root = tmp_path_factory.mktemp("page")
    data = root / "data"
    (data / "clips").mkdir(parents=True)
    write_test_video(data / "match one & two.mp4", seconds=6, fps=10, size=(192, 108))
    write_test_video(data / "clips" / "short.mp4", seconds=2, fps=10, size=(160, 96))
    (data / "broken.mp4").write_bytes(b"not a video")
    out = root / "out"
    assert ps.main(segment([data], out, tiny_model_dir, "--sample-fps", "2", "--chunk-frames", "4")) == 1
    write_test_video(data / "later.mp4", seconds=1)
    assert ps.main(["--summarize", str(out), str(data)]) == 0
    return out


class Links(html.parser.HTMLParser):
    """What a page loads or links to: (tag, attribute, value) of every src and href."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.links += [(tag, name, value or "") for name, value in attrs if name in ("src", "href")]


def test_the_page_is_one_file_that_links_only_to_the_results_beside_it(results):
    page = (results / "index.html").read_text(encoding="utf-8")
    parser = Links()
    parser.feed(page)

    assert not [tag for tag, attrs in parser.tags if tag == "script" and "src" in attrs]
    assert [attrs for tag, attrs in parser.tags if tag == "link"] == [{"rel": "icon", "href": "data:,"}], (
        "no stylesheet; an empty icon, so that a server is not asked for /favicon.ico"
    )
    assert "@import" not in page and "url(" not in page, "no style loaded from elsewhere"
    assert parser.links, "previews and videos are linked"
    for tag, attribute, value in parser.links:
        if tag == "link":
            continue
        link = urlparse(value)
        assert not link.scheme and not link.netloc and not value.startswith("/"), (tag, attribute, value)
        assert (results / unquote(link.path)).is_file(), f"{value} is not a file beside the page"
    assert "“soccer player”, “ball”" in page


def browser_results(url: str, screenshot: Path) -> dict:
    """Open the page in Chromium and do what a person would; returns what they would see."""
    from playwright.sync_api import sync_playwright

    seen: dict = {"console": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda message: seen["console"].append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: seen["console"].append(f"pageerror: {error}"))
            page.goto(url, wait_until="load")
            seen["cards"] = page.evaluate(
                """[...document.querySelectorAll('.card')].map(card => [card.querySelector('h2').textContent,
                    card.dataset.status, card.querySelector('.badge').textContent])"""
            )
            for image in page.locator(".card img").all():  # lazy: each loads once scrolled to
                image.scroll_into_view_if_needed()
            page.wait_for_function("[...document.images].every(image => image.complete)")
            seen["previews"] = page.evaluate(
                "[...document.images].map(image => [image.closest('.card').querySelector('h2').textContent,"
                " image.naturalWidth, image.alt])"
            )

            # By keyboard: the first done card's disclosure, focused, opened with Enter.
            card = page.locator('.card[data-status="done"]').first
            card.locator("summary").focus()
            page.keyboard.press("Enter")
            page.wait_for_function(
                "(video => video && video.readyState >= 2 && video.currentTime > 0.3)"
                "(document.querySelector('details[open] video'))"
            )
            seen["playing"] = page.evaluate(
                "(video => ({ready: video.readyState, time: video.currentTime, paused: video.paused, "
                "error: video.error && video.error.code}))(document.querySelector('details[open] video'))"
            )
            seen["opened"] = card.locator("h2").text_content()
            seen["rows"] = page.evaluate(
                """[...document.querySelectorAll('details[open] svg > text')].slice(2).map(text => text.textContent)"""
            )
            seen["bars"] = page.evaluate(
                """[...document.querySelectorAll('details[open] svg rect')].map(bar =>
                    [bar.querySelector('title').textContent.split(':')[0], bar.getAttribute('fill')])"""
            )
            page.screenshot(path=str(screenshot))

            page.locator("label", has_text="failed").click()
            seen["failed_filter"] = page.evaluate(
                "[...document.querySelectorAll('.card h2')].filter(name => name.checkVisibility())"
                ".map(name => name.textContent)"
            )
        finally:
            browser.close()
    return seen


@pytest.fixture(params=["file", "http"])
def page_url(request: pytest.FixtureRequest, results: Path) -> Iterator[str]:
    """The page opened from disk, or served by Python's own static server."""
    if request.param == "file":
        yield (results / "index.html").as_uri()
        return
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(results))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
        finally:
            server.shutdown()


def test_the_page_in_chromium(results, page_url, tmp_path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (.ci/run installs it)"
    screenshot = tmp_path / "page.png"
    seen = browser_results(page_url, screenshot)

    assert [line for line in seen["console"] if line.startswith(("error", "pageerror"))] == []
    summary = {row["video"]: row for row in json.loads((results / "summary.json").read_text())["videos"]}
    assert [(name, status) for name, status, _ in seen["cards"]] == sorted(VIDEOS.items())
    assert all(badge.startswith(status) for _, status, badge in seen["cards"])
    assert {name: row["status"] for name, row in summary.items()} == VIDEOS

    done = sorted(name for name, status in VIDEOS.items() if status == "done")
    assert [name for name, _, _ in seen["previews"]] == done
    assert all(width == 1440 and alt.startswith(name) for name, width, alt in seen["previews"])

    assert seen["playing"]["ready"] >= 2 and seen["playing"]["error"] is None and not seen["playing"]["paused"]
    metadata_file = results / seen["opened"] / f"{Path(seen['opened']).name}_metadata.json"
    objects = json.loads(metadata_file.read_text())["objects"]
    assert seen["rows"] == [f"#{obj['id']} {obj['prompt']}" for obj in objects], "one row per object"
    assert seen["bars"] == [
        [f"#{obj['id']} {obj['prompt']}", span["color"]] for obj in objects for span in obj["spans"]
    ], "a bar per span, in its overlay colour"

    assert seen["failed_filter"] == ["broken"]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_timeline_bar_per_window_where_the_overlay_colour_changes():
    """The overlay is drawn with each window's own IDs: an object that is session ID 1 in window 0
    and ID 4 in window 1 is drawn in two colours, so its row has two bars; where its colour stays
    and it is there at the boundary, one bar."""
    from sam3_pipeline.assembly import object_summaries
    from sam3_pipeline.overlay import color_hex, object_color

    def window(frames: int, *tracks: tuple[int, int, int]) -> dict:
        return {
            "frames": frames,
            "objects": [
                {
                    "object_id": obj_id,
                    "prompt": "ball",
                    "first_frame": first,
                    "last_frame": last,
                    "first_time": first / 2,
                    "last_time": last / 2,
                    "frames_present": last - first + 1,
                    "max_score": 0.9,
                    "score_sum": 0.9 * (last - first + 1),
                }
                for obj_id, first, last in tracks
            ],
        }

    windows = [window(10, (1, 2, 9), (2, 0, 9)), window(10, (4, 0, 5), (2, 0, 9)), window(10, (2, 3, 9))]
    mappings = [{1: 1, 2: 2}, {4: 1, 2: 2}, {2: 2}]
    objects = {obj["id"]: obj for obj in object_summaries(windows, mappings)}

    assert objects[1]["spans"] == [
        {"first_frame": 2, "last_frame": 9, "color": color_hex(object_color(1))},
        {"first_frame": 10, "last_frame": 15, "color": color_hex(object_color(4))},
    ]
    assert objects[2]["spans"] == [
        {"first_frame": 0, "last_frame": 19, "color": color_hex(object_color(2))},  # on through a boundary
        {"first_frame": 23, "last_frame": 29, "color": color_hex(object_color(2))},  # back after a gap
    ]
    assert (objects[1]["first_frame"], objects[1]["last_frame"]) == (2, 15)


def test_keys_and_prompts_cannot_break_the_page_and_older_metadata_still_draws(tmp_path):
    """A key or prompt with markup in it stays text, and the timelines' data stays data; metadata
    written before objects had `spans` gets one bar per object."""
    from sam3_pipeline.page import results_page

    prompt, key = '</script><!-- "ball" & co', "a<b>/c d#1"
    metadata = {
        "status": "complete",
        "width": 320,
        "height": 180,
        "duration_seconds": 2.0,
        "frames_processed": 2,
        "output_fps": 1.0,
        "processing_seconds": 1.5,
        "prompts": [prompt],
        "objects_per_prompt": {prompt: 1},
        "objects": [{"id": 3, "prompt": prompt, "first_frame": 0, "last_frame": 1}],
        "outputs": {"video": {"file": "c d#1_segmented.mp4", "bytes": 1}},
    }
    row = {"video": key, "status": "done", "frames_processed": 2, "processing_seconds": 1.5, "error": None}
    row["objects_per_prompt"] = {prompt: 1}
    summary = {
        "generated_at": "2026-01-02T03:04:05+00:00",
        "counts": {"done": 1, "partial": 0, "failed": 0, "missing": 0},
        "videos": [{**row, "decode_error": None}],
    }
    page = results_page(tmp_path, summary, {key: metadata})

    class Reader(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.open: str | None = None
            self.text: dict[str, str] = {}

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.open = dict(attrs).get("id") or tag

        def handle_data(self, data: str) -> None:
            if self.open:
                self.text[self.open] = self.text.get(self.open, "") + data

    reader = Reader()
    reader.feed(page)
    assert reader.text["h2"] == key
    [timeline] = json.loads(reader.text["timelines"])
    assert timeline["prompts"] == [prompt]
    assert timeline["objects"] == [[3, 0, 0, 1, 0]] and timeline["colors"] == ["#d62728"], "ID 3's overlay colour"
    assert "a%3Cb%3E/c%20d%231/c%20d%231_segmented.mp4" in page

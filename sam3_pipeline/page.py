"""The results page: `--summarize` writes OUTPUT_DIR/index.html, one static page over the folder.

Self-contained (its styles and script inline; no fonts, scripts or styles from anywhere else) and
linked to the results by relative paths only, so it works opened from disk, from a folder synced
from the bucket, or served by any static server. Everything is drawn here, in Python, except what
opening a card adds: the overlay MP4's player and the object timeline, which the page's own script
draws as inline SVG from data embedded in the page (an SVG per object for every card up front
would make a page of 1,000 videos several times larger and slower to open).
"""

from __future__ import annotations

import datetime
import html
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sam3_pipeline.outputs import output_paths
from sam3_pipeline.overlay import color_hex, object_color, preview_size

PAGE_NAME = "index.html"
STATUS_TEXT = {  # the badge of each status `summary.summary_row` gives
    "done": "done",
    "partial": "partial: decoding stopped early",
    "failed": "failed",
    "missing": "missing: no results yet",
}


def relative_url(output_dir: Path, path: Path) -> str:
    """`path` as a link from the page in `output_dir`: relative, each part percent-encoded."""
    return quote(Path(os.path.relpath(path, output_dir)).as_posix())


def duration_text(seconds: float) -> str:
    """`2 h 05 min`, `4 min 07 s`, `12.3 s`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def timeline_data(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What a card's timeline is drawn from, compact: a 1,000-video page carries one per video.

    {"frames": frames in the MP4, "fps": its frame rate, "prompts": [...], "objects": [[id,
    prompt index, first frame, last frame, colour index, first frame, ...], ...]}, one list per
    object with a (first, last, colour) triple per span (`assembly.object_summaries`), colours
    indexing "colors". None where the metadata does not hold all of that (a file written by hand
    or by an older version): the page is a report, and shows that video without a timeline.
    """
    try:
        return _timeline_data(metadata)
    except (KeyError, TypeError, ValueError):
        return None


def _timeline_data(metadata: dict[str, Any]) -> dict[str, Any]:
    colors: dict[str, int] = {}
    prompts = list(metadata["prompts"])
    objects = []
    for obj in metadata["objects"]:
        entry = [obj["id"], prompts.index(obj["prompt"])]
        spans = obj.get("spans") or [  # metadata from before spans: one SAM3 session, the video's IDs
            {
                "first_frame": obj["first_frame"],
                "last_frame": obj["last_frame"],
                "color": color_hex(object_color(obj["id"])),
            }
        ]
        for span in spans:
            entry += [span["first_frame"], span["last_frame"], colors.setdefault(span["color"], len(colors))]
        objects.append(entry)
    return {
        "frames": metadata["frames_processed"],
        "fps": metadata["output_fps"],
        "prompts": prompts,
        "colors": list(colors),
        "objects": objects,
    }


def objects_per_prompt(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Objects found per prompt, over these summary rows."""
    found: dict[str, int] = {}
    for row in rows:
        for prompt, count in row["objects_per_prompt"].items():
            found[prompt] = found.get(prompt, 0) + count
    return found


def card_html(output_dir: Path, row: dict[str, Any], metadata: dict[str, Any], number: int) -> str:
    """One video's card: preview, status badge, counts, error line, and (for results) a disclosure
    that the page's script fills with the overlay player and the object timeline."""
    key, status = row["video"], row["status"]
    name = html.escape(key)
    paths = output_paths(output_dir, key)
    parts = [f'<li class="card" data-status="{status}">']
    outputs = metadata.get("outputs", {})
    if "preview" in outputs:
        # Its size up front, so that lazily loaded previews do not move the cards below them.
        size = ""
        if metadata.get("width") and metadata.get("height"):
            size = 'width="{}" height="{}" '.format(*preview_size((metadata["height"], metadata["width"])))
        parts.append(
            f'<img src="{relative_url(output_dir, paths["preview"])}" loading="lazy" decoding="async" '
            f'{size}alt="{name}: overlay frames from its start to its end">'
        )
    else:
        parts.append(f'<div class="nopreview" role="img" aria-label="{name}: no preview">no preview</div>')
    parts.append(
        f'<div class="title"><h2>{name}</h2>'
        f'<span class="badge {status}">{html.escape(STATUS_TEXT[status])}</span></div>'
    )
    if metadata:
        duration, seconds = metadata.get("duration_seconds"), metadata.get("processing_seconds")
        facts = [
            ("frames", f"{metadata.get('frames_processed', 0):,}"),
            *([("video", duration_text(duration))] if duration else []),
            *([("processing", duration_text(seconds))] if seconds is not None else []),
            *((prompt, f"{count:,}") for prompt, count in metadata.get("objects_per_prompt", {}).items()),
        ]
        parts.append("<dl>" + "".join(f"<div><dt>{html.escape(k)}</dt><dd>{v}</dd></div>" for k, v in facts) + "</dl>")
    problem = row["error"] or row["decode_error"]
    if problem:
        parts.append(f'<p class="error">{html.escape(problem)}</p>')
    if "video" in outputs:
        video_url = relative_url(output_dir, paths["video"])
        parts.append(
            f'<details data-video="{video_url}" data-index="{number}">'
            f"<summary>Play the overlay and show the object timeline</summary>"
            f'<div class="player"></div><p class="links"><a href="{video_url}">overlay MP4</a></p></details>'
        )
    parts.append("</li>")
    return "".join(parts)


def results_page(output_dir: Path, summary: dict[str, Any], metadatas: dict[str, dict[str, Any]]) -> str:
    """The page's HTML. summary: what summary.json holds (`counts`, `videos` sorted by key,
    `generated_at`); metadatas: the complete metadata of the done and partial videos, by key."""
    rows, counts = summary["videos"], summary["counts"]
    used = list(dict.fromkeys(prompt for metadata in metadatas.values() for prompt in metadata.get("prompts", [])))
    stats = [
        *((status, f"{count:,}") for status, count in counts.items()),
        ("frames processed", f"{sum(row['frames_processed'] or 0 for row in rows):,}"),
        *((f"objects: {prompt}", f"{count:,}") for prompt, count in objects_per_prompt(rows).items()),
        ("processing time", duration_text(sum(row["processing_seconds"] or 0 for row in rows))),
    ]
    generated = datetime.datetime.fromisoformat(summary["generated_at"]).strftime("%Y-%m-%d %H:%M %Z")
    filters = "".join(
        f'<label><input type="radio" name="status" value="{value}"{" checked" if value == "all" else ""}> '
        f"{value} ({count:,})</label>"
        for value, count in [("all", len(rows)), *counts.items()]
    )
    timelines = [timeline_data(metadatas[row["video"]]) if row["video"] in metadatas else None for row in rows]
    cards = "\n".join(
        card_html(output_dir, row, metadatas.get(row["video"], {}), number) for number, row in enumerate(rows)
    )
    # No "<" inside the script element: "</script>" or "<!--" in a prompt or key would end it early.
    data = json.dumps(timelines, separators=(",", ":")).replace("<", "\\u003c")
    title = f"SAM3 results: {output_dir.resolve().name}"
    return PAGE_TEMPLATE.format(
        title=html.escape(title),
        prompts=html.escape(", ".join(f"“{prompt}”" for prompt in used) or "none yet"),
        generated=html.escape(generated),
        stats="".join(f"<div><dt>{html.escape(k)}</dt><dd>{v}</dd></div>" for k, v in stats),
        filters=filters,
        cards=cards,
        data=data,
        style=STYLE,
        script=SCRIPT,
    )


STYLE = """
:root { color-scheme: dark; --bg: #111418; --card: #1b2027; --fg: #e8eaed; --dim: #9aa3ad;
  --done: #2e7d32; --partial: #b26a00; --failed: #c62828; --missing: #546e7a; --focus: #8ab4f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { padding: 20px 24px 8px; }
h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0 0 12px; color: var(--dim); }
dl { margin: 0; display: flex; flex-wrap: wrap; gap: 6px 18px; }
dl div { display: flex; flex-direction: column-reverse; }
dt { color: var(--dim); font-size: 12px; }
dd { margin: 0; font-weight: 600; }
header dd { font-size: 20px; }
fieldset { border: 0; margin: 12px 0 0; padding: 0; display: flex; flex-wrap: wrap; gap: 8px; }
legend { float: left; margin-right: 8px; color: var(--dim); padding-top: 4px; }
fieldset label { padding: 4px 10px; border: 1px solid #3a424d; border-radius: 14px; cursor: pointer; }
fieldset label:has(input:checked) { background: #2b3440; border-color: var(--focus); }
fieldset input { margin: 0 4px 0 0; }
:focus-visible { outline: 2px solid var(--focus); outline-offset: 2px; }
main ol { list-style: none; margin: 0; padding: 12px 24px 24px; display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); align-items: start; }
.card { background: var(--card); border-radius: 8px; overflow: hidden; padding-bottom: 10px;
  content-visibility: auto; contain-intrinsic-size: auto 360px; }  /* cards out of view: no layout */
/* Filtered out. Not display: none, which would take down the layout of every card it hides and
   build it again (0.7 s for 1,000 cards here); hidden content keeps it, out of sight, focus and
   the accessibility tree alike. */
.cards[data-show="done"] .card:not([data-status="done"]),
.cards[data-show="partial"] .card:not([data-status="partial"]),
.cards[data-show="failed"] .card:not([data-status="failed"]),
.cards[data-show="missing"] .card:not([data-status="missing"]) {
  content-visibility: hidden; position: absolute; width: 0; height: 0; padding: 0; }
.card:has(details[open]) { grid-column: 1 / -1; }
.card img, .nopreview { display: block; width: 100%; height: auto; background: #000; }
.nopreview { aspect-ratio: 8 / 3; display: grid; place-items: center; color: var(--dim); }
.card:has(details[open]) img { display: none; }  /* the overlay plays in its place */
.title { display: flex; align-items: baseline; gap: 8px; padding: 8px 12px 4px; }
h2 { margin: 0; font-size: 15px; overflow-wrap: anywhere; flex: 1; }
.badge { font-size: 12px; padding: 1px 8px; border-radius: 10px; white-space: nowrap; color: #fff; }
.badge.done { background: var(--done); } .badge.partial { background: var(--partial); }
.badge.failed { background: var(--failed); } .badge.missing { background: var(--missing); }
.card dl { padding: 0 12px; }
.error { margin: 6px 12px 0; color: #ff8a80; font-family: ui-monospace, monospace; font-size: 13px;
  overflow-wrap: anywhere; }
details { margin: 8px 12px 0; }
summary { cursor: pointer; color: var(--focus); }
.player video { display: block; max-width: 100%; max-height: 60vh; margin-top: 8px; background: #000; }
.timeline { max-width: 960px; max-height: 360px; overflow-y: auto; margin-top: 6px; }
.timeline svg { display: block; width: 100%; height: auto; }
.timeline text { fill: var(--fg); font-size: 11px; }
.timeline .axis { fill: var(--dim); }
.links { margin: 6px 0 0; font-size: 13px; }
a { color: var(--focus); }
"""

SCRIPT = """
"use strict";
const TIMELINES = JSON.parse(document.getElementById("timelines").textContent);
const SVG = "http://www.w3.org/2000/svg";
const LABEL = 170, WIDTH = 1000, ROW = 16;

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// One row per object, from its first to its last appearance, in its overlay colour (a span per
// window it is seen in: the overlay's colours follow each window's own IDs).
function timeline(data, video) {
  const frames = Math.max(data.frames, 1), plot = WIDTH - LABEL - 8;
  const x = (frame) => LABEL + (frame / frames) * plot;
  const height = ROW * (data.objects.length + 1) + 4;
  const svg = svgElement("svg", {viewBox: `0 0 ${WIDTH} ${height}`, role: "img",
    "aria-label": `Object timeline: ${data.objects.length} objects over ${frames} frames`});
  const seconds = frames / data.fps;
  svg.append(svgElement("text", {x: LABEL, y: 12, class: "axis"}, "0 s"));
  svg.append(svgElement("text", {x: WIDTH - 8, y: 12, class: "axis", "text-anchor": "end"},
    `${seconds.toFixed(1)} s`));
  data.objects.forEach((entry, row) => {
    const [id, prompt, ...spans] = entry, y = ROW * (row + 1) + 4;
    const label = `#${id} ${data.prompts[prompt]}`;
    svg.append(svgElement("text", {x: 0, y: y + 11}, label));
    for (let i = 0; i < spans.length; i += 3) {
      const [first, last, color] = spans.slice(i, i + 3);
      const bar = svgElement("rect", {x: x(first), y: y + 2, height: ROW - 5, rx: 2,
        width: Math.max(x(last + 1) - x(first), 2), fill: data.colors[color]});
      bar.append(svgElement("title", {},
        `${label}: ${(first / data.fps).toFixed(1)}-${((last + 1) / data.fps).toFixed(1)} s`));
      svg.append(bar);
    }
  });
  const head = svgElement("line", {x1: LABEL, x2: LABEL, y1: 16, y2: height, stroke: "#fff",
    "stroke-width": 1.5});
  svg.append(head);
  video.addEventListener("timeupdate", () => {
    const at = x(Math.min(video.currentTime * data.fps, frames));
    head.setAttribute("x1", at);
    head.setAttribute("x2", at);
  });
  const box = document.createElement("div");
  box.className = "timeline";
  box.append(svg);
  return box;
}

for (const details of document.querySelectorAll("details[data-video]")) {
  details.addEventListener("toggle", () => {
    const player = details.querySelector(".player");
    if (!details.open) {
      player.querySelector("video")?.pause();
      return;
    }
    if (!player.firstChild) {
      const video = document.createElement("video");
      Object.assign(video, {src: details.dataset.video, controls: true, muted: true, loop: true,
        playsInline: true, preload: "auto"});
      video.setAttribute("aria-label", "Overlay video");
      const data = TIMELINES[Number(details.dataset.index)];
      player.append(video);
      if (data) player.append(timeline(data, video));
    }
    player.querySelector("video").play().catch(() => {});  // a blocked autoplay leaves the controls
  });
}

// One attribute for the whole list (the style sheet hides the rest): a 1,000-card page stays quick.
const cards = document.querySelector(".cards");
for (const radio of document.querySelectorAll('input[name="status"]')) {
  radio.addEventListener("change", () => { cards.dataset.show = radio.value; });
}
"""

PAGE_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{style}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>Prompts {prompts} · generated {generated}</p>
<dl class="stats">{stats}</dl>
<fieldset><legend>Show</legend>{filters}</fieldset>
</header>
<main>
<ol class="cards" data-show="all">
{cards}
</ol>
</main>
<script type="application/json" id="timelines">{data}</script>
<script>{script}</script>
</body>
</html>
"""

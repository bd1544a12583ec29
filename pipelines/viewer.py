"""The interactive viewer: one self-contained HTML page per video, and an index page.

    ms-temba predict VIDEO_OR_DIR... --checkpoint models/model.pt --out predictions/ --html
        -> predictions/{video}.html (with the video itself) and predictions/index.html
    dvc repro (the evaluate stage)
        -> reports/viewer/{video}.html (prediction beside the ground truth) and reports/viewer/index.html

A page holds everything it needs inline (no CDN, no network: users open it offline): the script
and style sheet of `pipelines/viewer_assets/` and the video's data as JSON. The video file, when
there is one, is referenced by a path relative to the page (videos are too large to inline).

What a page shows, under the video: a per-class timeline (each class a row: its probability as a
heat strip, the detected segments as boxes, and in evaluate pages the ground-truth instances as
green bars above), a playhead that follows playback, click-to-seek on the timeline and on the
segment table, zoom (buttons, ctrl + wheel) and scrolling along time, and filters of the classes by
name and by score (a class is shown when its peak probability reaches the score, a segment when its
score does). Probabilities are stored as one byte per frame and class (p * 255, rounded), about
1.3 characters per value once base64-encoded: an hour of features at 3 per second with 157
classes is ~2.3 MB.

The page's script exposes `window.msTembaViewer` (seek, zoom, state) for tests and the console.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote
from urllib.request import pathname2url

import numpy as np

from ms_temba.segments import Segment
from pipelines.io import write_text

ASSETS = Path(__file__).with_name("viewer_assets")
INDEX_FILE = "index.html"


def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


def page_filename(video_id: str) -> str:
    return f"{video_id}.html"


def _href(filename: str) -> str:
    return quote(filename)


# ----------------------------------------------------------------------------------------------
# One video
# ----------------------------------------------------------------------------------------------

def page_data(video_id: str, class_names: list[str], probabilities, start_s, end_s,
              segments: Iterable[Segment], ground_truth: Iterable | None = None,
              video_src: str | None = None) -> dict[str, Any]:
    """The JSON the page's script reads (see viewer.js)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    start_s, end_s = np.asarray(start_s, dtype=np.float64), np.asarray(end_s, dtype=np.float64)
    if probabilities.shape != (len(start_s), len(class_names)) or end_s.shape != start_s.shape:
        raise ValueError(f"probabilities must be (frames, classes) = ({len(start_s)}, {len(class_names)}), got "
                         f"{probabilities.shape}")
    quantised = np.rint(np.clip(np.nan_to_num(probabilities), 0, 1) * 255).astype(np.uint8)
    return {
        "video_id": video_id,
        "classes": list(class_names),
        "start": [round(float(t), 4) for t in start_s],
        "end": [round(float(t), 4) for t in end_s],
        "duration": float(end_s.max()) if len(end_s) else 0.0,
        "probs": [base64.b64encode(np.ascontiguousarray(quantised[:, c]).tobytes()).decode("ascii")
                  for c in range(len(class_names))],
        "segments": [[int(s.class_id), round(float(s.start_s), 4), round(float(s.end_s), 4), round(float(s.score), 4)]
                     for s in segments],
        "truth": None if ground_truth is None else [[int(c), round(float(s), 4), round(float(e), 4)]
                                                    for c, s, e in ground_truth],
        "video": video_src,
    }


def page_html(data: Mapping[str, Any], summary: Mapping[str, Any] | None = None, back: str | None = INDEX_FILE) -> str:
    """The self-contained page of one video."""
    title = f"{data['video_id']}: ms-temba viewer"
    facts = [f"{len(data['start'])} frames", f"{_duration(data['duration'])}", f"{len(data['classes'])} classes",
             f"{len(data['segments'])} detected segments"]
    if data.get("truth") is not None:
        facts.append(f"{len(data['truth'])} ground-truth segments")
    facts += [f"{html.escape(str(key))} <b>{html.escape(str(value))}</b>" for key, value in (summary or {}).items()]
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    video = (f'<video id="video" controls preload="metadata" src="{html.escape(data["video"], quote=True)}"></video>'
             if data.get("video") else "")
    truth_legend = ('<span><span class="swatch truth"></span>ground truth</span>'
                    if data.get("truth") is not None else "")
    kind_header = "<th>kind</th>" if data.get("truth") is not None else ""
    back_link = f'<a href="{html.escape(back, quote=True)}">all videos</a> · ' if back else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>
{_asset("viewer.css")}
</style>
</head>
<body>
<h1>{html.escape(str(data["video_id"]))}</h1>
<p class="summary">{back_link}{" · ".join(facts)}</p>
{video}
<div id="toolbar">
  <span id="time-readout">0:00.00</span>
  <label>classes <input id="class-filter" type="search" placeholder="filter by name" autocomplete="off"></label>
  <label>min score <input id="score-filter" type="range" min="0" max="1" step="0.01" value="0">
    <span id="score-value">0.00</span></label>
  <span><button id="zoom-out" title="zoom out">&minus;</button> <button id="zoom-in" title="zoom in (or ctrl + wheel)">+</button>
    <button id="zoom-fit" title="whole video">fit</button></span>
  <label><input id="follow" type="checkbox" checked> follow playhead</label>
  <span class="legend"><span><span class="swatch heat"></span>probability 0&rarr;1</span>
    <span><span class="swatch segment"></span>detected</span>{truth_legend}</span>
</div>
<div id="timeline">
  <div id="labels"></div>
  <div id="timeline-scroll"><div id="timeline-inner"><canvas id="timeline-canvas"></canvas><div id="playhead"></div></div></div>
</div>
<div id="empty-note" style="display:none">No class matches the filters.</div>
<h2>Segments <small id="table-note"></small></h2>
<div id="segment-table-wrap">
<table id="segment-table">
<thead><tr><th>class</th><th>start</th><th>end</th><th>duration (s)</th><th>score</th>{kind_header}</tr></thead>
<tbody></tbody>
</table>
</div>
<script type="application/json" id="viewer-data">{payload}</script>
<script>
{_asset("viewer.js")}
</script>
</body>
</html>
"""


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return (f"{hours}:{minutes:02d}:{rest:05.2f}" if hours else f"{minutes}:{rest:05.2f}") + " long"


def _percent(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100.0 * value:.1f}"


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------

def index_html(title: str, columns: list[str], rows: list[dict[str, Any]], summary: str = "") -> str:
    """A page listing the videos: `rows` are {"video_id", "href", column: value}; numbers right-aligned."""
    head = "".join(f'<th class="{"num" if k and c != "top classes" else ""}">{html.escape(c)}</th>'
                   for k, c in enumerate(columns))
    body = []
    for row in rows:
        cells = [f'<td><a href="{html.escape(row["href"], quote=True)}">{html.escape(str(row["video_id"]))}</a></td>']
        for column in columns[1:]:
            value = row.get(column, "")
            numeric = isinstance(value, (int, float)) or (isinstance(value, str) and value.replace(".", "", 1).isdigit())
            cells.append(f'<td class="{"num" if numeric else ""}">{html.escape(str(value))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>
{_asset("viewer.css")}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="summary">{summary}</p>
<table class="index" id="video-index">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
</body>
</html>
"""


def _replace_directory(out_dir: Path, write) -> None:
    """Write a directory in a staging place and swap it in, so no page of an earlier run survives."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


# ----------------------------------------------------------------------------------------------
# The evaluate stage
# ----------------------------------------------------------------------------------------------

def write_evaluate_viewer(out_dir, videos: list[Mapping[str, Any]], class_names: list[str]) -> Path:
    """reports/viewer/: a page per test video (prediction and ground truth) and index.html.

    videos: {"video_id", "probabilities" (T, C), "start_s", "end_s", "segments" [Segment],
    "ground_truth" [(class, start, end)], "labels" (T, C) per-frame labels, "detection_map"} each.
    The index lists every video with its per-frame mAP (over the classes present in it) and its
    detection mAP (over the tIoU thresholds of the eval settings)."""
    from ms_temba.metrics import FrameMAP

    def write(directory: Path) -> None:
        rows = []
        for video in videos:
            frame_map = FrameMAP(len(class_names))
            frame_map.update(video["probabilities"], video["labels"])
            frame_value = frame_map.compute()["map"]
            summary = {"per-frame mAP (%)": _percent(frame_value),
                       "detection mAP (%)": _percent(video.get("detection_map"))}
            data = page_data(video["video_id"], class_names, video["probabilities"], video["start_s"],
                             video["end_s"], video["segments"], video["ground_truth"])
            filename = page_filename(video["video_id"])
            write_text(directory / filename, page_html(data, summary))
            rows.append({"video_id": video["video_id"], "href": _href(filename),
                         "duration (s)": f"{data['duration']:.1f}", "frames": len(data["start"]),
                         "ground truth": len(video["ground_truth"]), "detected": len(data["segments"]),
                         "per-frame mAP (%)": _percent(frame_value),
                         "detection mAP (%)": _percent(video.get("detection_map"))})
        columns = ["video", "duration (s)", "frames", "ground truth", "detected", "per-frame mAP (%)",
                   "detection mAP (%)"]
        write_text(directory / INDEX_FILE, index_html(
            "ms-temba evaluation: test videos", columns, rows,
            f"{len(rows)} test videos · per-frame mAP over the classes present in the video · detection mAP "
            f"averaged over the tIoU thresholds (metrics.json has the data-set numbers)"))

    _replace_directory(Path(out_dir), write)
    return Path(out_dir) / INDEX_FILE


# ----------------------------------------------------------------------------------------------
# ms-temba predict --html
# ----------------------------------------------------------------------------------------------

def video_source(video_path: str | os.PathLike | None, page_dir: Path) -> str | None:
    """The page-relative URL of a video file (None without a file)."""
    if not video_path:
        return None
    path = Path(video_path).resolve()
    try:
        relative = os.path.relpath(path, Path(page_dir).resolve())
    except ValueError:  # another drive (Windows)
        return path.as_uri()
    return pathname2url(relative)


def write_predict_viewer(out_dir, video_ids: Iterable[str], video_paths: Mapping[str, str] | None = None) -> Path:
    """{video}.html for each predicted video of a `ms-temba predict` output directory (from its
    {video}.probs.parquet and {video}.segments.json), with the video when its path is known, and
    index.html listing all pages of the directory."""
    from pipelines.predictions import PROBS_SUFFIX, read_probabilities

    out_dir = Path(out_dir)
    video_paths = video_paths or {}
    for video_id in video_ids:
        probs, start_s, end_s, class_names = read_probabilities(out_dir / f"{video_id}{PROBS_SUFFIX}")
        records = json.loads((out_dir / f"{video_id}.segments.json").read_text())
        segments = [Segment(int(r["class_id"]), float(r["start_s"]), float(r["end_s"]), float(r["score"]))
                    for r in records]
        data = page_data(video_id, class_names, probs, start_s, end_s, segments, None,
                         video_source(video_paths.get(video_id), out_dir))
        write_text(out_dir / page_filename(video_id), page_html(data))
    # The index covers every page of the directory, so predicting in several runs keeps one index.
    rows = []
    for probs_file in sorted(out_dir.glob(f"*{PROBS_SUFFIX}")):
        video_id = probs_file.name[: -len(PROBS_SUFFIX)]
        if not (out_dir / page_filename(video_id)).is_file() or not (out_dir / f"{video_id}.segments.json").is_file():
            continue
        probs, start_s, end_s, class_names = read_probabilities(probs_file)
        records = json.loads((out_dir / f"{video_id}.segments.json").read_text())
        peaks = probs.max(axis=0) if len(probs) else np.zeros(len(class_names))
        top = [f"{class_names[c]} {peaks[c]:.2f}" for c in np.argsort(-peaks, kind="stable")[:3]]
        rows.append({"video_id": video_id, "href": _href(page_filename(video_id)),
                     "duration (s)": f"{float(end_s.max()) if len(end_s) else 0.0:.1f}", "frames": len(probs),
                     "segments": len(records), "top classes": ", ".join(top)})
    write_text(out_dir / INDEX_FILE, index_html("ms-temba predictions", ["video", "duration (s)", "frames", "segments",
                                                                         "top classes"], rows,
                                                f"{len(rows)} videos · top classes by peak probability"))
    return out_dir / INDEX_FILE

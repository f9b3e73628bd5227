"""Speed and memory of process_segmentation.py, with a tiny random SAM3 or the full-size one.

Default mode: the approaches run on the same synthetic 720p clip with the same tiny random SAM3
(tests/make_tiny_sam3.py) set up to track ~20 objects, so the numbers measure the pipeline around
the model, not SAM3:
  ours   streaming decode -> SAM3 -> box-local masks and overlay -> H.264, chunked sessions, the
         stages side by side; with the time per stage (the metadata's stage_seconds)
  serial ours with --serial: the same stages one after another
  sam3   SAM3 alone on the same frames, decoded and prepared first: the floor for ours
  naive  the upstream example's approach: every sampled frame decoded into RAM first, one SAM3
         session over all of them, transformers' postprocess_outputs, a float32 mask per object
         per frame kept for the whole video, a float blend per mask, OpenCV mp4v output
--full-size: the full-size SAM3 (~860M parameters) with random weights (bench/full_size_sam3.py,
saved once under --cache-dir) through the real script path, process_segmentation.main(), on a
synthetic 720p clip: seconds per frame, frames/s, peak RSS and GPU memory, and what SAM3's session
holds per frame and per object; on CUDA the first run is repeated with --serial, and each run
reports the GPU's mean utilization (nvidia-smi, every 200 ms). Random weights give meaningless masks but the real compute.
Each measurement runs in its own process so that its peak memory is its own.

Usage:
  python bench/benchmark.py                    # 60 and 600 frames, prints a table
  python bench/benchmark.py --readme           # also writes the table into docs/performance.md
  python bench/benchmark.py --small            # a few small frames: the CI smoke run
  python bench/benchmark.py --full-size --json cpu.json   # CPU: 2 and 4 frames, 20 and 10 objects
  python bench/benchmark.py --full-size --device cuda --dtype bfloat16 --json gpu.json
                                               # GPU: 201 frames at --chunk-frames 100 (also
                                               # --serial), 200, 50
  python bench/benchmark.py --full-size --smoke           # one frame on the CPU: the CI smoke run
  PIPELINE=1 bash bench/gpu_check.sh                      # the GPU run on a lent machine, offline
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from synthetic_video import write_test_video  # noqa: E402  (no pytest: it runs on a bare GPU machine too)

PROMPTS = ["soccer player", "ball"]
README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
PERFORMANCE_PAGE = REPO / "docs" / "performance.md"  # where --readme writes the table by default
MEMORY_HEADROOM = 0.6  # run the naive approach only when its estimated RSS fits in this share of RAM


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(clip: Path, model_dir: Path, frames: int, workdir: Path, *options: str) -> dict:
    import process_segmentation as ps

    code = ps.main(
        [
            str(clip),
            "--output-dir",
            str(workdir),
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--sample-fps",
            "0",
            "--max-frames",
            str(frames),
            "--prompts",
            *PROMPTS,
            *options,
        ]
    )
    if code != 0:
        raise SystemExit(f"process_segmentation.py exited {code}")
    metadata = json.loads((workdir / clip.stem / f"{clip.stem}_metadata.json").read_text())
    return {
        "frames": metadata["frames_processed"],
        "seconds": metadata["processing_seconds"],
        "stage_seconds": metadata["stage_seconds"],
    }


def run_serial(clip: Path, model_dir: Path, frames: int, workdir: Path) -> dict:
    """Ours with every stage one after another in one thread (--serial): the same outputs."""
    return run_ours(clip, model_dir, frames, workdir, "--serial")


def run_sam3_alone(clip: Path, model_dir: Path, frames: int, workdir: Path) -> dict:
    """SAM3's own time on the same frames, the floor for ours: the frames decoded and prepared
    first, then only SAM3's per-frame calls (`add_new_frame` and the model, in the same windows of
    sessions, with the logits brought to the CPU), as process_segmentation's SAM3 stage makes them."""
    import av
    import torch

    from sam3_pipeline.sam3 import DEFAULT_CHUNK_FRAMES, load_segmenter, model_frames, prepare_frames
    from sam3_pipeline.stages import StageTimes
    from sam3_pipeline.video_io import sample_frames

    segmenter = load_segmenter(str(model_dir), torch.device("cpu"), torch.float32)
    times = StageTimes()
    with av.open(str(clip)) as container:
        prepared = list(prepare_frames(segmenter, sample_frames(container, 0, frames), times))
    for _ in model_frames(segmenter, prepared, PROMPTS, DEFAULT_CHUNK_FRAMES, times):
        pass
    return {"frames": len(prepared), "seconds": round(times.seconds["sam3"], 3)}


def run_naive(clip: Path, model_dir: Path, frames: int, workdir: Path) -> dict:
    """The upstream example's approach, re-implemented: hold everything, then write mp4v."""
    import cv2
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    model = Sam3VideoModel.from_pretrained(model_dir).eval()
    processor = Sam3VideoProcessor.from_pretrained(model_dir)
    started = time.monotonic()
    capture = cv2.VideoCapture(str(clip))
    fps = capture.get(cv2.CAP_PROP_FPS)
    images = []
    while len(images) < frames:
        ok, bgr = capture.read()
        if not ok:
            break
        images.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    capture.release()

    session = processor.init_video_session(
        video=images,
        inference_device="cpu",
        processing_device="cpu",
        video_storage_device="cpu",
        dtype=torch.float32,
    )
    processor.add_text_prompt(inference_session=session, text=PROMPTS)
    masks_by_frame: dict[int, dict[int, np.ndarray]] = {}
    with torch.no_grad():
        for output in model.propagate_in_video_iterator(
            inference_session=session, max_frame_num_to_track=len(images)
        ):
            result = processor.postprocess_outputs(session, output)
            masks_by_frame[output.frame_idx] = {
                int(obj_id): (result["masks"][i].float().cpu().numpy() > 0).astype(np.float32)
                for i, obj_id in enumerate(result["object_ids"])
            }

    drawn = []
    for index, image in enumerate(images):
        blended = np.array(image, dtype=np.float32) / 255.0
        for obj_id, mask in masks_by_frame.get(index, {}).items():
            color = np.array((255, 100, 100) if obj_id % 2 else (100, 255, 100), dtype=np.float32) / 255.0
            blended = blended * (1 - 0.5 * mask[..., None]) + color * (0.5 * mask[..., None])
        drawn.append(Image.fromarray((blended * 255).clip(0, 255).astype(np.uint8)))
    height, width = np.array(drawn[0]).shape[:2]
    writer = cv2.VideoWriter(
        str(workdir / "naive.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
    )
    for image in drawn:
        writer.write(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR))
    writer.release()
    return {"frames": len(images), "seconds": round(time.monotonic() - started, 3)}


APPROACHES = {"ours": run_ours, "serial": run_serial, "sam3": run_sam3_alone, "naive": run_naive}


def worker(approach: str, clip: Path, model_dir: Path, frames: int) -> None:
    """One measurement, in this process; prints its result as JSON on the last line."""
    import torch

    torch.set_num_threads(1)  # the same for both; one thread was fastest on the 2-core CI machine
    with tempfile.TemporaryDirectory() as workdir:
        result = APPROACHES[approach](clip, model_dir, frames, Path(workdir))
    result["frames_per_second"] = round(result["frames"] / result["seconds"], 3)
    result["peak_rss_mb"] = round(peak_rss_mb())
    # ours runs its outputs stage in a forked child per video; Linux reports the largest child's peak
    result["child_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps(result))


def measure(approach: str, clip: Path, model_dir: Path, frames: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        approach,
        "--clip",
        str(clip),
        "--model-dir",
        str(model_dir),
        "--frames",
        str(frames),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if completed.returncode != 0:
        raise SystemExit(f"{approach} with {frames} frames failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def naive_estimate_gb(frames: int, width: int, height: int, objects: int) -> float:
    """RSS the naive approach needs for its frames, drawn frames and float32 masks."""
    return frames * width * height * (3 + 3 + 4 * objects) / 1e9


def machine(threads: int = 1) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    plural = "s" if threads > 1 else ""
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, CPU only, {threads} torch thread{plural}"


def table(rows: list[dict], size: tuple[int, int], objects: int) -> str:
    lines = [
        f"Synthetic {size[0]}x{size[1]} clip, tiny random SAM3 tracking {objects} objects, every frame sampled. "
        f"Machine: {machine()}.",
        "",
        "| sampled frames | ours frames/s | ours / SAM3 alone | serial frames/s | naive frames/s "
        "| speed-up over naive | ours peak RSS (+ outputs process) | naive peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours, serial, alone, naive = row["ours"], row["serial"], row["sam3"], row["naive"]
        if "skipped" in naive:
            naive_fps, speedup, naive_rss = "not run", "-", naive["skipped"]
        else:
            naive_fps = f"{naive['frames_per_second']:.2f}"
            speedup = f"{ours['frames_per_second'] / naive['frames_per_second']:.1f}x"
            naive_rss = f"{naive['peak_rss_mb']:,} MB"
        lines.append(
            f"| {row['frames']} | {ours['frames_per_second']:.2f} | {ours['seconds'] / alone['seconds']:.2f} "
            f"| {serial['frames_per_second']:.2f} | {naive_fps} | {speedup} "
            f"| {ours['peak_rss_mb']:,} MB (+ {ours['child_peak_rss_mb']:,} MB) | {naive_rss} |"
        )
    first, last = rows[0], rows[-1]
    lines += [
        "",
        f"Ours: peak RSS at {last['frames']} frames is {last['ours']['peak_rss_mb'] / first['ours']['peak_rss_mb']:.2f}x "
        f"that at {first['frames']} frames (outputs process: "
        f"{last['ours']['child_peak_rss_mb'] / first['ours']['child_peak_rss_mb']:.2f}x).",
        "",
        f"Seconds of work per stage at {first['frames']} frames, stages side by side (serial in brackets); "
        f"SAM3 alone on the same frames: {first['sam3']['seconds']:.2f} s.",
        "",
        "| " + " | ".join(first["ours"]["stage_seconds"]) + " |",
        "| " + " | ".join("---" for _ in first["ours"]["stage_seconds"]) + " |",
        "| "
        + " | ".join(
            f"{seconds:.2f} ({first['serial']['stage_seconds'].get(stage, 0):.2f})"
            for stage, seconds in first["ours"]["stage_seconds"].items()
        )
        + " |",
    ]
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    start, end = content.index(README_START) + len(README_START), content.index(README_END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[end:])


# ---------------------------------------------------------------------------------------------
# --full-size: the full-size SAM3 through process_segmentation.main()
# ---------------------------------------------------------------------------------------------

FULL_SIZE_OBJECTS = [20, 10]  # the first is measured everywhere, the others for memory per object
FULL_SIZE_CPU_FRAMES = [2, 4]  # CPU: ~35 s for a first frame, ~55 s for later ones (20 objects, 2 idle cores)
FULL_SIZE_CHUNKS = [100, 200, 50]  # GPU: --chunk-frames compared, in this order
CPU_CHUNK_FRAMES = 100  # process_segmentation's default; CPU runs stay inside one window
GPU_SESSION_EVERY = 10  # window frames 9, 19, ...: the last frame of a 50-, 100- or 200-frame window too
CPU_DEADLINE_S = 900  # the CPU default plan takes ~10 min on 2 idle cores; later runs are skipped
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam3-bench"
MB = 1e6


def session_memory(session: object) -> dict[str, float]:
    """MB of tensor storage a SAM3 video session holds: its stored frames, its per-object tracker
    state and everything else, with the number of frames and of (object, frame) entries held."""
    import torch

    seen_storage: set[tuple[str, int]] = set()
    seen_objects: set[int] = set()

    def walk(value: object) -> int:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (str(value.device), storage.data_ptr())
            if key in seen_storage:
                return 0
            seen_storage.add(key)
            return storage.nbytes()
        if id(value) in seen_objects or isinstance(value, (str, bytes, type, torch.nn.Module)):
            return 0
        seen_objects.add(id(value))
        if isinstance(value, dict):
            return sum(walk(item) for item in value.values())
        if isinstance(value, (list, tuple, set, frozenset)):
            return sum(walk(item) for item in value)
        return walk(vars(value)) if hasattr(value, "__dict__") else 0

    per_object = session.output_dict_per_obj  # {obj_idx: {"cond_frame_outputs": {frame: {...}}, ...}}
    frames_mb = walk(session.processed_frames or {}) / MB
    object_state_mb = walk(per_object) / MB
    other_mb = walk(vars(session)) / MB  # storage already counted above is not counted again
    entries = sum(len(outputs) for kinds in per_object.values() for outputs in kinds.values())
    return {
        "frames_mb": round(frames_mb, 1),
        "object_state_mb": round(object_state_mb, 1),
        "other_mb": round(other_mb, 1),
        "frames_held": len(session.processed_frames or {}),
        "object_frame_entries": entries,
    }


def probe_frames(device: str, trace: list[dict]) -> None:
    """Record each frame SAM3 processes in this process: model seconds, seconds since the previous
    frame's model call ended (decode, overlay, encode and the model), objects, what the session holds
    and memory. Wraps Sam3VideoModel.forward, which process_segmentation calls once per frame; the
    time the measuring itself takes is recorded (probe_s) and left out of the other times. On CUDA,
    where a frame takes less time than walking a long session, the session is measured on every
    GPU_SESSION_EVERY-th frame of a window only."""
    import torch
    from transformers import Sam3VideoModel

    forward = Sam3VideoModel.forward
    cuda = device == "cuda"
    previous_end: list[float] = []

    def measured_forward(self, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = forward(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
        record = {
            "frame": len(trace),
            "window_frame": kwargs.get("frame_idx"),
            "model_s": round(end - start, 4),
            "wall_s": round(end - previous_end[-1], 4) if previous_end else None,
            "objects": len(output.object_ids),
            "rss_mb": round(current_rss_mb()),
            "at": time.time(),  # for the GPU utilization samples taken meanwhile
        }
        if not cuda or record["window_frame"] % GPU_SESSION_EVERY == GPU_SESSION_EVERY - 1:
            record["session"] = session_memory(kwargs["inference_session"])
        if cuda:
            record["gpu_allocated_mb"] = round(torch.cuda.memory_allocated() / MB)
            record["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / MB)
        print(f"frame {json.dumps(record)}", file=sys.stderr, flush=True)
        previous_end[:] = [time.perf_counter()]
        record["probe_s"] = round(previous_end[0] - end, 4)  # left out of wall_s and frames/s
        trace.append(record)
        return output

    Sam3VideoModel.forward = measured_forward


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def gpu_utilization_sampler() -> subprocess.Popen | None:
    """nvidia-smi printing the time and the GPU's utilization (percent of the time a kernel ran)
    every 200 ms, or None where there is no nvidia-smi."""
    try:
        return subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        return None


def mean_utilization(sampler: subprocess.Popen, start: float, end: float) -> float | None:
    """The mean of the samples taken between `start` and `end` (time.time()): while frames were
    processed, not while the model loaded."""
    sampler.terminate()
    output, _ = sampler.communicate()
    samples = []
    for line in output.splitlines():
        stamp, _, value = line.rpartition(",")
        with contextlib.suppress(ValueError):
            when = datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            if start <= when <= end:
                samples.append(float(value))
    return round(sum(samples) / len(samples), 1) if samples else None


def run_full_size(
    clip: Path, model_dir: Path, frames: int, chunk_frames: int, device: str, dtype: str | None, pipeline: str
) -> dict:
    """One process_segmentation.main() run with the frame probe; returns its measurements."""
    import torch

    import process_segmentation as ps

    trace: list[dict] = []
    probe_frames(device, trace)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    options = ["--device", device, "--chunk-frames", str(chunk_frames)]
    if dtype:
        options += ["--dtype", dtype]
    if pipeline == "serial":
        options.append("--serial")
    sampler = gpu_utilization_sampler() if device == "cuda" else None
    with tempfile.TemporaryDirectory() as workdir:
        code = ps.main(
            [str(clip), "--output-dir", workdir, "--model", str(model_dir), "--sample-fps", "0"]
            + ["--max-frames", str(frames), "--prompts", *PROMPTS, *options]
        )
        if code != 0:
            raise SystemExit(f"process_segmentation.py exited {code}")
        metadata = json.loads((Path(workdir) / clip.stem / f"{clip.stem}_metadata.json").read_text())
    model_seconds = sum(record["model_s"] for record in trace)
    seconds = metadata["processing_seconds"] - sum(record["probe_s"] for record in trace)
    result = {
        "frames": metadata["frames_processed"],
        "chunk_frames": chunk_frames,
        "windows": metadata["chunking"]["frames_per_window"],
        "device": metadata["device"],
        "dtype": metadata["dtype"],
        "objects_detected": metadata["objects_detected"],
        "objects_last_frame": trace[-1]["objects"] if trace else 0,
        "seconds": round(seconds, 3),
        "frames_per_second": round(metadata["frames_processed"] / seconds, 3),
        "model_seconds": round(model_seconds, 3),
        "outside_model_share": round(1 - model_seconds / seconds, 3),
        "pipeline": metadata["pipeline"],
        "stage_seconds": metadata["stage_seconds"],
        "peak_rss_mb": round(peak_rss_mb()),
        "threads": torch.get_num_threads(),
        "per_frame": trace,
    }
    if sampler is not None and trace:
        result["gpu_utilization_percent"] = mean_utilization(sampler, trace[0]["at"], trace[-1]["at"])
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / MB)
        result["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / MB)
    return result


def build_full_size(cache_dir: Path, objects: int, most_objects: int) -> Path:
    """The full-size random SAM3 with one detection query per object of `most_objects`, split over
    the prompts, tracking at most `objects` objects. The weights are built and saved once (~3.3 GB);
    a smaller `objects` shares them (its own config, same weights)."""
    import full_size_sam3

    for count in (objects, most_objects):
        if count % len(PROMPTS) or count <= 0:
            raise SystemExit(f"--objects must be multiples of {len(PROMPTS)} (the prompts), got {count}")
    base = cache_dir / f"full-size-sam3-{len(PROMPTS)}x{most_objects // len(PROMPTS)}"
    if not (base / full_size_sam3.COMPLETE_MARKER).is_file():
        started = time.monotonic()
        full_size_sam3.save_full_size_sam3(base, len(PROMPTS), most_objects // len(PROMPTS))
        print(f"built {base} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    if objects == most_objects:
        return base
    variant = base.with_name(f"{base.name}-max{objects}")
    return full_size_sam3.save_object_limit_variant(base, variant, objects)


def measure_full_size(
    clip: Path,
    model_dir: Path,
    frames: int,
    chunk_frames: int,
    device: str,
    dtype: str | None,
    pipeline: str,
    log: Path,
) -> dict:
    """One full-size run in its own process; its stderr (one line per frame) goes to `log`."""
    command = [sys.executable, __file__, "--worker", "full", "--clip", str(clip), "--model-dir", str(model_dir)]
    command += ["--frames", str(frames), "--chunk-frames", str(chunk_frames), "--device", device]
    command += ["--pipeline", pipeline]
    if dtype:
        command += ["--dtype", dtype]
    started = time.monotonic()
    with log.open("w") as stderr:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    if completed.returncode != 0:
        tail = log.read_text()[-2000:]
        print(f"run failed, exit {completed.returncode}; end of {log}:\n{tail}", file=sys.stderr, flush=True)
        return {"failed": f"failed (exit {completed.returncode}), see {log.name}"}
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.monotonic() - started, 1)
    return result


def full_size_plan(args: argparse.Namespace, device: str) -> list[dict]:
    """The runs to make, most informative first: (objects, frames, chunk_frames, pipeline) each."""
    main_objects, *other_objects = args.objects
    if args.smoke:
        return [
            {"objects_requested": main_objects, "frames": 1, "chunk_frames": CPU_CHUNK_FRAMES, "pipeline": "overlapped"}
        ]
    if device == "cpu":
        frames = args.frames or FULL_SIZE_CPU_FRAMES
        return [
            {
                "objects_requested": objects,
                "frames": count,
                "chunk_frames": max(CPU_CHUNK_FRAMES, count),
                "pipeline": "overlapped",
            }
            for objects in args.objects
            for count in sorted(frames)
        ]
    chunks = args.chunk_frames or FULL_SIZE_CHUNKS
    frames = (args.frames or [max(chunks) + 1])[0]
    runs = [
        {"objects_requested": main_objects, "frames": frames, "chunk_frames": chunk, "pipeline": "overlapped"}
        for chunk in chunks
    ]
    # second: the first run again with the stages one after another, what side by side saves
    runs.insert(1, {**runs[0], "pipeline": "serial"})
    for objects in other_objects:
        runs.append(
            {"objects_requested": objects, "frames": frames, "chunk_frames": chunks[0], "pipeline": "overlapped"}
        )
    return runs


def predicted_seconds(done: list[dict], frames: int) -> float | None:
    """How long a run of `frames` frames should take, by the last completed run's start-up time,
    first frame and later frames, plus 10%; None before any run has completed."""
    last = next((run for run in reversed(done) if "frames_per_second" in run), None)
    if last is None:
        return None
    first = last["per_frame"][0]["model_s"]
    later = [record["wall_s"] for record in last["per_frame"] if record["wall_s"]] or [first]
    startup = last["process_seconds"] - last["seconds"]
    return 1.1 * (startup + first + (frames - 1) * sum(later) / len(later))


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x, or None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def full_size_summary(runs: list[dict]) -> dict:
    """Memory per frame and per object (MB): from what the sessions held, exactly, and from the
    runs' peaks (peak GPU memory on CUDA, peak RSS on the CPU), by least squares."""
    done = [run for run in runs if "frames_per_second" in run]
    if not done:
        return {}
    summary: dict = {}
    # what one session held at its fullest: its stored frames and tracker state per (object, frame)
    sessions = [record["session"] for run in done for record in run["per_frame"] if "session" in record]
    if not sessions:
        return {}
    held = max(sessions, key=lambda session: session["frames_held"])
    summary["session per stored frame"] = round(held["frames_mb"] / max(held["frames_held"], 1), 2)
    if held["object_frame_entries"]:
        summary["session tracker state per object per frame"] = round(
            held["object_state_mb"] / held["object_frame_entries"], 2
        )
    gpu = "peak_gpu_mb" in done[0]
    peak, current = ("peak_gpu_mb", "gpu_allocated_mb") if gpu else ("peak_rss_mb", "rss_mb")
    name = "peak GPU memory" if gpu else "peak RSS"
    # within the longest session: memory in use after each frame
    longest = max(done, key=lambda run: max(run["windows"]))
    window = longest["per_frame"][: max(longest["windows"])]
    per_frame = slope([(record["window_frame"], record[current]) for record in window if record["window_frame"]])
    if per_frame is not None:
        label = "GPU memory allocated" if gpu else "RSS"
        summary[f"{label} after each frame, growth per frame within a session"] = round(per_frame, 1)
    # peaks against frames per session, for each object count
    for objects in sorted({run["objects_requested"] for run in done}, reverse=True):
        points = [(max(run["windows"]), run[peak]) for run in done if run["objects_requested"] == objects]
        per_frame = slope(points)
        if per_frame is not None:
            summary[f"{name} per session frame, {objects} objects"] = round(per_frame, 1)
    # peaks against objects, for runs with the same windows; then those against frames per session
    per_object_at: list[tuple[int, float]] = []
    for windows in sorted({tuple(run["windows"]) for run in done}):
        group = [run for run in done if tuple(run["windows"]) == windows]
        per_object = slope([(run["objects_last_frame"], run[peak]) for run in group])
        if per_object is not None:
            summary[f"{name} per object, {max(windows)}-frame sessions"] = round(per_object, 1)
            per_object_at.append((max(windows), per_object))
    per_object_per_frame = slope(per_object_at)
    if per_object_per_frame is not None:
        summary[f"{name} per object per session frame"] = round(per_object_per_frame, 1)
    return summary


def full_size_table(runs: list[dict], summary: dict, device_line: str) -> str:
    """Markdown: one row per run, then the memory summary."""
    gpu = any("peak_gpu_mb" in run for run in runs)
    lines = [
        f"Full-size SAM3 (random weights) through process_segmentation.main() on a synthetic 1280x720 "
        f"clip, every frame sampled, prompts {PROMPTS}. {device_line}.",
        "",
        "| objects (on last frame) | sampled frames | chunk frames | frames/s | first frame, model s "
        "| later frames, s each (mean) | time outside the model | peak RSS | stages |"
        + (" peak GPU memory | GPU utilization |" if gpu else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if gpu else ""),
    ]
    for run in runs:
        shape = f"| {run['frames']} | {run['chunk_frames']} |"
        if "frames_per_second" not in run:
            lines.append(f"| {run['objects_requested']} {shape} {run.get('skipped') or run.get('failed')} |")
            continue
        later = [record["wall_s"] for record in run["per_frame"] if record["wall_s"] and record["window_frame"]]
        lines.append(
            f"| {run['objects_requested']} ({run['objects_last_frame']}) {shape} {run['frames_per_second']:.3g} "
            f"| {run['per_frame'][0]['model_s']:.3g} | {f'{sum(later) / len(later):.3g}' if later else '-'} "
            f"| {run['outside_model_share']:.0%} | {run['peak_rss_mb']:,} MB | {run['pipeline']} |"
            + (f" {run['peak_gpu_mb']:,} MB | {run.get('gpu_utilization_percent') or '-'}% |" if gpu else "")
        )
    lines.append("")
    lines += [f"- {label}: {value} MB" for label, value in summary.items()]
    return "\n".join(lines)


def full_size_main(args: argparse.Namespace) -> int:
    """Build the full-size model once, run the plan, print a table. The JSON is rewritten after
    every run, and the table is written even when the run is stopped (SIGTERM, Ctrl-C)."""
    started = time.monotonic()
    import torch
    import transformers

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA GPU")
    if device == "cuda":
        described = f"GPU: {torch.cuda.get_device_name()}, PyTorch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        described = f"Machine: {machine(torch.get_num_threads())}, PyTorch {torch.__version__}"
    deadline = args.deadline if args.deadline is not None else (CPU_DEADLINE_S if device == "cpu" else 0)
    plan = full_size_plan(args, device)
    report: dict = {
        "device": f"{described}, transformers {transformers.__version__}",
        "deadline_s": deadline,
        "plan": plan,
        "runs": [],
        "summary": {},
    }

    def save() -> None:
        report["total_seconds"] = round(time.monotonic() - started)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="sam3-bench-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"full-size SAM3 on {device}: {len(plan)} runs, logs in {log_dir}", file=sys.stderr, flush=True)
    try:
        build_full_size(args.cache_dir, max(args.objects), max(args.objects))
        with tempfile.TemporaryDirectory() as scratch:
            frames = max(run["frames"] for run in plan)
            clip = write_test_video(Path(scratch) / "clip.mp4", seconds=frames / 25, fps=25, size=(1280, 720))
            for number, run in enumerate(plan, start=1):
                name = f"{run['objects_requested']}obj-{run['frames']}f-chunk{run['chunk_frames']}-{run['pipeline']}"
                expected = predicted_seconds(report["runs"], run["frames"])
                if deadline and expected and time.monotonic() - started + expected > deadline:
                    result = {"skipped": f"not run: ~{expected:.0f} s more would pass the {deadline:.0f} s limit"}
                else:
                    print(f"{number}/{len(plan)} - {name}", file=sys.stderr, flush=True)
                    model_dir = build_full_size(args.cache_dir, run["objects_requested"], max(args.objects))
                    log = log_dir / f"{name}.log"
                    result = measure_full_size(
                        clip, model_dir, run["frames"], run["chunk_frames"], device, args.dtype, run["pipeline"], log
                    )
                report["runs"].append({**run, **result})
                report["summary"] = full_size_summary(report["runs"])
                save()
                brief = {key: value for key, value in report["runs"][-1].items() if key != "per_frame"}
                print(json.dumps(brief), flush=True)
    finally:
        report["table"] = full_size_table(report["runs"], report["summary"], report["device"])
        save()
        print(report["table"], flush=True)
    return 1 if any("failed" in run for run in report["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames",
        type=int,
        nargs="+",
        help="sampled frame counts to measure (default 60 600; --full-size: 2 4 on the CPU, "
        "one count on CUDA, default the largest --chunk-frames + 1)",
    )
    parser.add_argument("--size", default="1280x720", help="clip size WIDTHxHEIGHT")
    parser.add_argument("--objects-per-prompt", type=int, default=10, help="objects per prompt (2 prompts)")
    parser.add_argument(
        "--small", action="store_true", help="smoke run: 3 and 6 frames at 320x180, 2 objects per prompt"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        nargs="?",
        const=PERFORMANCE_PAGE,
        metavar="FILE",
        help="write the table, with today's date, between the benchmark markers of FILE "
        "(default docs/performance.md, the performance page)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of ours, serial and SAM3 alone per frame count; the run with the median time is reported "
        "(on a 2-core VM, single runs of the same thing differ by 10%%)",
    )
    full = parser.add_argument_group("--full-size", "the full-size SAM3 through process_segmentation.main()")
    full.add_argument("--full-size", action="store_true", help="measure the full-size random SAM3 instead")
    full.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    full.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="passed to process_segmentation.py --dtype (default: not passed, its auto)",
    )
    full.add_argument(
        "--objects",
        type=int,
        nargs="+",
        default=FULL_SIZE_OBJECTS,
        help="objects SAM3 reports, split over the 2 prompts; the first in every run, the others "
        "(for memory per object) at each CPU frame count / the first GPU chunk size",
    )
    full.add_argument(
        "--chunk-frames",
        type=int,
        nargs="+",
        help=f"CUDA: process_segmentation.py --chunk-frames values, run in this order (default "
        f"{' '.join(map(str, FULL_SIZE_CHUNKS))})",
    )
    full.add_argument("--smoke", action="store_true", help="one frame, the first object count only")
    full.add_argument("--json", type=Path, help="write the results here (rewritten after every run)")
    full.add_argument("--log-dir", type=Path, help="one log per run, a line per frame (default: a temp dir)")
    full.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where the built model is kept (3.3 GB)")
    full.add_argument(
        "--deadline",
        type=float,
        help="seconds: skip a run that, by the previous run's speed, would end later than this after the "
        f"start (default {CPU_DEADLINE_S} on the CPU, none on CUDA; 0 = none)",
    )
    parser.add_argument("--worker", choices=(*APPROACHES, "full"), help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", choices=("overlapped", "serial"), default="overlapped", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke and not args.full_size:
        parser.error("--smoke goes with --full-size (the tiny model's smoke run is --small)")
    if args.worker == "full":
        result = run_full_size(
            args.clip, args.model_dir, args.frames[0], args.chunk_frames[0], args.device, args.dtype, args.pipeline
        )
        print(json.dumps(result))
        return 0
    if args.worker:
        worker(args.worker, args.clip, args.model_dir, args.frames[0])
        return 0
    if args.full_size:
        return full_size_main(args)
    args.frames = args.frames or [60, 600]
    if args.small:
        args.frames, args.size, args.objects_per_prompt, args.repeat = [3, 6], "320x180", 2, 1
    width, height = map(int, args.size.split("x"))
    objects = 2 * args.objects_per_prompt

    import make_tiny_sam3

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_tiny_sam3.save_tiny_sam3(
            Path(scratch) / "model", len(PROMPTS), args.objects_per_prompt
        )
        clip = write_test_video(
            Path(scratch) / "clip.mp4", seconds=max(args.frames) / 10, fps=10, size=(width, height)
        )
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        rows = []
        for frames in sorted(args.frames):
            row = {"frames": frames}
            for approach in ("ours", "serial", "sam3"):
                runs = sorted(
                    (measure(approach, clip, model_dir, frames) for _ in range(args.repeat)),
                    key=lambda run: run["seconds"],
                )
                row[approach] = {**runs[len(runs) // 2], "all_seconds": [run["seconds"] for run in runs]}
            needed = naive_estimate_gb(frames, width, height, objects)
            if needed > MEMORY_HEADROOM * memory_gb:
                row["naive"] = {"skipped": f"~{needed:.0f} GB (est.), over this machine's {memory_gb:.0f} GB"}
            else:
                row["naive"] = measure("naive", clip, model_dir, frames)
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows, (width, height), objects)
    print(text)
    if args.readme:
        write_readme(args.readme, f"Measured {datetime.date.today().isoformat()}. {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

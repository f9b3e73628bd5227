"""The GPU study of SAM3's step per frame: transformers' step against ours, where a frame's time
goes, the synchronisations CUDA sees, torch.compile, and processes side by side on one GPU.

On a GPU it runs the full-size SAM3 (bench/full_size_sam3.py: ~860M parameters, random weights,
each prompt reporting up to 10 objects) in bfloat16 on synthetic 720p frames, offline. Random
weights give meaningless masks but the real compute. The parts, each a table row:
  speed      stock and ours at 10 and 20 objects: frames/s after warm-up, peak memory, GPU use
  phases     one frame of ours at 20 objects, split into backbone, detector, tracker and the rest
             (device time from torch.profiler; wall time with a synchronize after each phase)
  syncs      one frame of each step under torch.cuda.set_sync_debug_mode("warn"): CUDA's count
  compile    ours with the backbone, the detector's DETR and the tracker's memory attention and
             mask decoder compiled (module.compile()): time to the first frames, frames/s after
  processes  1, 2 and 3 processes of ours side by side: aggregate frames/s, peak memory each
--small rehearses every part on the CPU with the tiny SAM3 (tests/make_tiny_sam3.py) in a
minute or two (compile is left out there: it takes minutes on a CPU).

Usage:
  python bench/gpu_study.py --out DIR            # on a GPU; bash bench/gpu_check.sh wraps it
  python bench/gpu_study.py --small --out DIR    # the CPU rehearsal (CI)
Writes DIR/results.json and DIR/table.md, which name the GPU, its driver and the versions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPTS = ["soccer player", "ball"]
PHASES = {"backbone": ("detector_model", "get_vision_features"), "detector": (None, "run_detection"),
          "tracker": (None, "run_tracker_propagation")}  # fmt: skip
COMPILED = ("detector_model.vision_encoder", "detector_model.detr_encoder", "detector_model.detr_decoder",
            "tracker_model.memory_attention", "tracker_model.mask_decoder")  # fmt: skip


def build(small: bool, device: str) -> tuple[Any, Any, torch.dtype]:
    """The model (up to 20 objects: 10 detection queries per prompt), its processor and dtype."""
    if small:
        import make_tiny_sam3

        model = make_tiny_sam3.tiny_model(len(PROMPTS), 10, full_depth=True)
        return model, make_tiny_sam3.tiny_processor(), torch.float32
    import full_size_sam3

    with torch.device(device):
        model = full_size_sam3.full_size_model(len(PROMPTS), 10)
    return model.to(torch.bfloat16), full_size_sam3.full_size_processor(), torch.bfloat16


class Runner:
    """One model on one device, run frame by frame through `sam3.track_frame`."""

    def __init__(self, small: bool, device: str, step: str) -> None:
        from sam3_pipeline.model_step import apply_model_step
        from sam3_pipeline.sam3 import Segmenter, enable_sam3_postprocessing

        model, processor, dtype = build(small, device)
        self.step = apply_model_step(step, model)
        self.segmenter = Segmenter(
            model.to(device).eval(), processor, "random", torch.device(device), dtype,
            enable_sam3_postprocessing(), self.step,
        )  # fmt: skip
        rng = np.random.default_rng(0)
        picture = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        self.frames = [
            processor.video_processor(videos=[np.roll(picture, 8 * i, axis=1)], device=device, return_tensors="pt")
            .pixel_values_videos[0]
            .to(dtype)
            for i in range(8)
        ]  # a few distinct frames, reused: preprocessing stays out of the timing

    def session(self, objects: int) -> Any:
        from sam3_pipeline.sam3 import open_session

        self.segmenter.model.max_num_objects = objects
        return open_session(self.segmenter, PROMPTS)

    def frame(self, session: Any, index: int) -> Any:
        from sam3_pipeline.sam3 import track_frame

        with torch.inference_mode():
            return track_frame(self.segmenter, session, index, self.frames[index % len(self.frames)])

    def synchronize(self) -> None:
        if self.segmenter.device.type == "cuda":
            torch.cuda.synchronize()

    def frames_per_second(self, objects: int, warm: int, timed: int) -> dict[str, float]:
        """Frames/s over `timed` frames after `warm` (whose time is `warm_up_seconds`), peak memory."""
        session = self.session(objects)
        start = time.perf_counter()
        for index in range(warm):
            self.frame(session, index)
        self.synchronize()
        warm_up = time.perf_counter() - start
        if self.segmenter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for index in range(warm, warm + timed):
            output = self.frame(session, index)
        self.synchronize()
        seconds = time.perf_counter() - start
        return {
            "frames_per_second": timed / seconds, "warm_up_seconds": warm_up, "objects_seen": len(output.object_ids),
            **memory(self),
        }  # fmt: skip


def memory(runner: Runner) -> dict[str, float]:
    if runner.segmenter.device.type != "cuda":
        import resource

        return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}


def phase_split(runner: Runner, objects: int, warm: int) -> dict[str, float]:
    """ms per phase of one frame: device time (torch.profiler; CPU time on the CPU) and wall time
    with a synchronize after each phase (a second frame, so that the profile has none)."""
    model = runner.segmenter.model
    walls: dict[str, float] = {}
    synchronized = False

    def measured(phase: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(phase):
                if not synchronized:
                    return original(*args, **kwargs)
                runner.synchronize()
                start = time.perf_counter()
                result = original(*args, **kwargs)
                runner.synchronize()
                walls[phase] = walls.get(phase, 0.0) + (time.perf_counter() - start) * 1000
                return result

        return call

    targets = {phase: (getattr(model, owner) if owner else model, name) for phase, (owner, name) in PHASES.items()}
    originals = {phase: getattr(target, name) for phase, (target, name) in targets.items()}
    for phase, (target, name) in targets.items():
        setattr(target, name, measured(phase, originals[phase]))
    try:
        session = runner.session(objects)
        for index in range(warm):
            runner.frame(session, index)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if runner.segmenter.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        runner.synchronize()
        with torch.profiler.profile(activities=activities) as profile:
            with torch.profiler.record_function("frame"):
                runner.frame(session, warm)
            runner.synchronize()
        synchronized = True
        runner.synchronize()
        start = time.perf_counter()
        runner.frame(session, warm + 1)
        runner.synchronize()
        walls["frame"] = (time.perf_counter() - start) * 1000
    finally:
        for phase, (target, name) in targets.items():
            setattr(target, name, originals[phase])
    on_gpu = runner.segmenter.device.type == "cuda"
    totals = {event.key: event for event in profile.key_averages()}
    result = {}
    for label in ("frame", *PHASES):
        event = totals.get(label)
        time_us = (getattr(event, "device_time_total", 0) if on_gpu else event.cpu_time_total) if event else 0
        result[f"{label}_profiled_ms"] = time_us / 1000
        result[f"{label}_wall_ms"] = walls.get(label, 0.0)
    for kind in ("profiled", "wall"):
        result[f"rest_{kind}_ms"] = result[f"frame_{kind}_ms"] - sum(result[f"{p}_{kind}_ms"] for p in PHASES)
    return result


def cuda_syncs(runner: Runner, objects: int, warm: int) -> int | None:
    """The synchronisations CUDA reports for one frame in the steady state (None on the CPU)."""
    if runner.segmenter.device.type != "cuda":
        return None
    session = runner.session(objects)
    for index in range(warm):
        runner.frame(session, index)
    runner.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.frame(session, warm)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(warning.message) for warning in caught)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in its own process (for compile, and for processes side by side)."""
    runner = Runner(spec["small"], spec["device"], spec["step"])
    if spec.get("compile"):
        for path in COMPILED:
            module = runner.segmenter.model
            for part in path.split("."):
                module = getattr(module, part)
            module.compile()
    if spec.get("barrier"):  # start together with the other processes
        Path(spec["barrier"], f"ready-{os.getpid()}").touch()
        while not Path(spec["barrier"], "go").exists():
            time.sleep(0.01)
    result = runner.frames_per_second(spec["objects"], spec["warm"], spec["timed"])
    return {**result, "end": time.time()}


def in_processes(specs: list[dict[str, Any]], timeout: float, barrier: Path | None = None) -> list[dict[str, Any]]:
    """Run `worker` for each spec in its own process, side by side; each result or its error."""
    processes = []
    for spec in specs:
        spec = {**spec, "barrier": str(barrier) if barrier else None}
        command = [sys.executable, __file__, "--worker", json.dumps(spec)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    if barrier:
        deadline = time.time() + timeout
        while len(list(barrier.glob("ready-*"))) < len(specs) and time.time() < deadline:
            if any(process.poll() is not None for process in processes):
                break
            time.sleep(0.05)
        (barrier / "go").touch()
    results = []
    for process in processes:
        try:
            output, errors = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            output, errors = process.communicate()
            results.append({"error": f"over {timeout:.0f} s"})
            continue
        lines = output.strip().splitlines()
        results.append(json.loads(lines[-1]) if process.returncode == 0 and lines else {"error": errors.strip()[-300:]})
    return results


def describe(device: str) -> dict[str, str]:
    import transformers

    facts = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            facts["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
    else:
        facts["cpu"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only"
    return facts


def table(results: dict[str, Any]) -> str:
    facts = ", ".join(f"{key} {value}" for key, value in results["machine"].items())
    lines = [f"Measured {results['date']}: {results['model']}. {facts}.", ""]
    lines += ["| step | objects | frames/s | peak memory | CUDA syncs per frame |", "| --- | --- | --- | --- | --- |"]
    for row in results["speed"]:
        syncs = row.get("cuda_syncs")
        lines.append(
            f"| {row['step']} | {row['objects']} | {row['frames_per_second']:.2f} | {row['peak_memory_mb']:,.0f} MB "
            f"| {'n/a (CPU)' if syncs is None else syncs} |"
        )
    phases = results["phases"]
    lines += ["", "| one frame of ours, 20 objects | backbone | detector | tracker | the rest | whole frame |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for kind, name in (("profiled", "profiler (device time; CPU time on the CPU)"), ("wall", "wall, synchronized")):
        cells = " | ".join(f"{phases[f'{label}_{kind}_ms']:.1f} ms" for label in (*PHASES, "rest", "frame"))
        lines.append(f"| {name} | {cells} |")
    lines += ["", "| ours, 20 objects | frames/s | peak memory | note |", "| --- | --- | --- | --- |"]
    for row in results["processes"] + results["compile"]:
        if "skipped" in row or "error" in row:
            why = row.get("skipped") or f"failed: {row['error'][:120]}"
            lines.append(f"| {row['name']} | - | - | {why} |")
        else:
            note = row.get("note") or f"first {row['warm']} frames (compiling) {row['warm_up_seconds']:.0f} s"
            speed, peak = row["frames_per_second"], row["peak_memory_mb"]
            lines.append(f"| {row['name']} | {speed:.2f} | {peak:,.0f} MB | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json and table.md")
    parser.add_argument("--small", action="store_true", help="the CPU rehearsal with the tiny SAM3")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1 if args.small else torch.get_num_threads())
    import transformers

    transformers.logging.set_verbosity_error()  # "hitting max_num_objects" on every frame: by design here
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not args.out:
        parser.error("--out is required")
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run with --small for the CPU rehearsal")
    warm, timed = (3, 4) if args.small else (5, 20)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": "tiny random SAM3 at full-size depth, float32" if args.small else "full-size random SAM3, bfloat16",
        "machine": describe(device),
        "speed": [], "compile": [], "processes": [],
    }  # fmt: skip
    for step in ("stock", "fast"):
        runner = Runner(args.small, device, step)
        for objects in (10, 20):
            row = {"step": step, "objects": objects, **runner.frames_per_second(objects, warm, timed)}
            row["cuda_syncs"] = cuda_syncs(runner, objects, warm)
            results["speed"].append(row)
            print(row, file=sys.stderr)
        if step == "fast":
            results["phases"] = phase_split(runner, 20, warm)
        del runner
    spec = {"small": args.small, "device": device, "step": "fast", "objects": 20, "warm": warm, "timed": timed}
    if args.small:
        results["compile"].append({"name": "compiled", "skipped": "not run on the CPU (minutes per graph)"})
    else:
        (compiled,) = in_processes([{**spec, "compile": True}], timeout=240)
        results["compile"].append({"name": "compiled", "warm": warm, **compiled})
    for count in (1, 2) if args.small else (1, 2, 3):
        barrier = args.out / f"barrier-{count}"
        barrier.mkdir(exist_ok=True)
        runs = in_processes([spec] * count, timeout=300, barrier=barrier)
        failed = [run for run in runs if "error" in run]
        if failed:
            results["processes"].append({"name": f"{count} side by side", "error": failed[0]["error"]})
            continue
        # Each times its frames after its warm-up: the aggregate is over the span all of them timed.
        started = min(run["end"] - timed / run["frames_per_second"] for run in runs)
        seconds = max(run["end"] for run in runs) - started
        results["processes"].append({
            "name": f"{count} side by side", "frames_per_second": count * timed / seconds,
            "peak_memory_mb": max(run["peak_memory_mb"] for run in runs), "note": "aggregate; peak of one",
        })  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

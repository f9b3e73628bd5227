"""What one SAM3 frame costs the host, per frame in the steady state: operations dispatched, host
synchronisations and the session's memory growth, for transformers' own step and ours.

Runs on the CPU with the tiny random SAM3 at the full-size model's depth (tests/make_tiny_sam3.py
`full_depth`: the same layers and memory frames, narrow widths), so a frame dispatches the same
operations as the full model's. What it counts is what a GPU pays for per frame whatever the card:
- operations: ATen operations that reach a kernel (views and metadata left out), each a launch on
  a GPU, 5-10 us when the GPU waits on Python;
- host waits: operations that make the host wait for the device's result, counted twice over as
  ../shared/notes/sam3-model-step.md counts them: at the ATen level (`_local_scalar_dense`,
  `nonzero`, boolean indexing, ...) and at the Python level (`.item()`, `.tolist()`, `.cpu()`,
  `bool(tensor)`, `torch.tensor(list, device=)`, ...), and their sum;
- memory growth: bytes of tensors the session holds, per frame, after the memory bank has filled.

Usage:
  python bench/model_step.py                 # 1, 10 and 20 objects, stock and ours (about 10 minutes)
  python bench/model_step.py --readme        # also writes the table into docs/performance.md
  python bench/model_step.py --small         # shallow model, few frames: the CI smoke run
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from sam3_pipeline.model_step import FAST, STOCK, apply_model_step  # noqa: E402

PERFORMANCE_PAGE = REPO / "docs" / "performance.md"
TABLE_START, TABLE_END = "<!-- model-step:start -->", "<!-- model-step:end -->"
OBJECT_COUNTS = (1, 10, 20)
# Not kernels: allocation, views' bookkeeping and metadata queries launch nothing on a GPU.
NOT_KERNELS = {
    "empty", "empty_strided", "detach", "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_nonzero", "set_", "resize_", "_has_compatible_shallow_copy_type",
    "is_same_size", "equal",
}  # fmt: skip
# ATen operations whose output size or value the host must wait for.
WAITING_OPERATIONS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim"}
# Python-level calls that hand a device's value to the host.
WAITING_CALLS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique"}


class OperationCounter(TorchDispatchMode):
    """Counts ATen operations that reach a kernel (`kernels`) and those that make the host wait
    (`waits`). Composite operations are counted as what they decompose into, as FlopCounterMode
    does: under inference mode the dispatcher would otherwise show them undecomposed."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.waits = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        name = func.overloadpacket.__name__
        if name in WAITING_OPERATIONS or (name == "index" and has_bool_index(args[1] if len(args) > 1 else ())):
            self.waits += 1
        if not func.is_view and name not in NOT_KERNELS:
            self.kernels += 1
        return func(*args, **kwargs)


class HostWaitCounter(TorchFunctionMode):
    """Counts Python-level calls that hand a tensor's value to the host, and blocking copies from
    Python lists to a device."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (
            name in WAITING_CALLS
            or (name == "where" and len(args) + len(kwargs) == 1)
            or (name == "tensor" and kwargs.get("device") is not None)
            or (name in ("__getitem__", "__setitem__") and len(args) > 1 and has_bool_index(args[1]))
        ):
            self.waits += 1
        return func(*args, **kwargs)


def has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


def tensor_bytes(value: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `value` through dicts, lists, sets,
    tuples and objects' attributes."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = storage.data_ptr() or id(storage)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return sum(tensor_bytes(item, seen) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        return tensor_bytes(vars(value), seen)
    return 0


def synthetic_frames(count: int, size: int) -> Iterator[np.ndarray]:
    """(size, size, 3) uint8 RGB frames: one random picture sliding sideways, so objects move."""
    picture = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    for index in range(count):
        yield np.roll(picture, 3 * index, axis=1)


def measure(objects: int, step: str, frames: int, counted: int, full_depth: bool) -> dict[str, float]:
    """One session of `frames` frames with SAM3 reporting `objects` objects, run by
    `sam3.track_frame`. Returns per frame: operations and host waits (mean of the last `counted`
    frames) and the session's growth in MB (mean over the frames after the memory bank filled)."""
    import make_tiny_sam3

    from sam3_pipeline.model_step import frames_read_back
    from sam3_pipeline.sam3 import Segmenter, enable_sam3_postprocessing, open_session, track_frame

    prompts = ["soccer player", "ball"] if objects > 1 else ["soccer player"]
    model = make_tiny_sam3.tiny_model(len(prompts), objects // len(prompts), full_depth=full_depth)
    processor = make_tiny_sam3.tiny_processor()
    if apply_model_step(step, model) != step:
        raise RuntimeError(f"the {step} step cannot run with this transformers")
    segmenter = Segmenter(
        model, processor, "tiny", torch.device("cpu"), torch.float32, enable_sam3_postprocessing(), step
    )
    session = open_session(segmenter, prompts)
    filled = frames_read_back(model) + 1
    kernels = waits = 0
    sizes: list[int] = []
    seen_objects = 0
    for index, rgb in enumerate(synthetic_frames(frames, make_tiny_sam3.IMAGE_SIZE * 4)):
        pixels = processor.video_processor(videos=[rgb], return_tensors="pt").pixel_values_videos[0]
        if index >= frames - counted:
            operations, calls = OperationCounter(), HostWaitCounter()
            with torch.inference_mode(), calls, operations:
                output = track_frame(segmenter, session, index, pixels)
            kernels, waits = kernels + operations.kernels, waits + operations.waits + calls.waits
        else:
            with torch.inference_mode():
                output = track_frame(segmenter, session, index, pixels)
        seen_objects = len(output.object_ids)
        sizes.append(tensor_bytes(session))
    if seen_objects != objects:
        raise RuntimeError(f"SAM3 reported {seen_objects} objects on the last frame, not {objects}")
    growth = (sizes[-1] - sizes[filled]) / max(len(sizes) - 1 - filled, 1) / 1e6
    return {"operations": kernels / counted, "host_waits": waits / counted, "growth_mb": growth}


def table(results: dict[tuple[int, str], dict[str, float]], note: str) -> str:
    lines = [
        note,
        "",
        "| objects | operations per frame, stock / ours | host waits per frame, stock / ours "
        "| session growth per frame, stock / ours |",
        "| --- | --- | --- | --- |",
    ]
    for objects in sorted({objects for objects, _ in results}):
        stock, ours = results[(objects, STOCK)], results[(objects, FAST)]
        lines.append(
            f"| {objects} | {stock['operations']:,.0f} / {ours['operations']:,.0f} "
            f"| {stock['host_waits']:.1f} / {ours['host_waits']:.1f} "
            f"| {stock['growth_mb']:.3f} MB / {ours['growth_mb']:.3f} MB |"
        )
    return "\n".join(lines)


def write_table(page: Path, text: str) -> None:
    content = page.read_text()
    start, end = content.index(TABLE_START) + len(TABLE_START), content.index(TABLE_END)
    page.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a shallow model, 1 and 2 objects, few frames")
    parser.add_argument("--frames", type=int, default=100, help="frames per session (default 100: one window)")
    parser.add_argument("--counted", type=int, default=3, help="last frames whose operations are counted (default 3)")
    parser.add_argument(
        "--readme", nargs="?", const=PERFORMANCE_PAGE, type=Path, metavar="PAGE",
        help="write the table between the model-step markers of PAGE (default docs/performance.md)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()  # "hitting max_num_objects" on every frame: by design here
    object_counts, frames, full_depth = ((1, 2), 20, False) if args.small else (OBJECT_COUNTS, args.frames, True)
    results = {}
    for objects in object_counts:
        for step in (STOCK, FAST):
            results[(objects, step)] = measure(objects, step, frames, args.counted, full_depth)
            print(f"{objects} objects, {step}: {results[(objects, step)]}", file=sys.stderr)
    note = (
        f"Measured {datetime.date.today()}: tiny random SAM3 at {'full-size' if full_depth else 'tiny'} depth, "
        f"{frames} frames per session, operations and waits over the last {args.counted}, float32 on the CPU "
        f"({platform.processor() or platform.machine()}, 1 torch thread), torch {torch.__version__}, "
        f"transformers {transformers.__version__}."
    )
    text = table(results, note)
    print(text)
    if args.readme:
        write_table(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

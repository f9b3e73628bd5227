"""Where SAM3 runs: the GPU (or why it cannot be used), the CPU, and the precision."""

from __future__ import annotations

import os
import subprocess

import torch

from sam3_pipeline.messages import UsageError, log

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The oldest NVIDIA driver each CUDA major version of PyTorch runs on (CUDA 12 through
# minor-version compatibility).
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None where there is no working nvidia-smi."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


def cuda_unavailable_reason() -> str:
    """One line on why PyTorch cannot use a GPU here, naming the driver and the CUDA build."""
    build = f"PyTorch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build: install a CUDA build (docs/gpu-drivers.md)"
    needed = MIN_DRIVER_FOR_CUDA.get(int(torch.version.cuda.split(".")[0]))
    build += f" (CUDA {torch.version.cuda}" + (f", needs NVIDIA driver >= {needed})" if needed else ")")
    driver = nvidia_driver_version()
    if driver is None:
        return f"{build} cannot see a CUDA GPU: no NVIDIA driver answers (nvidia-smi missing or failing)"
    if needed and int(driver.split(".")[0]) < needed:
        return (
            f"{build} cannot use the GPU: NVIDIA driver {driver} is too old; install the PyTorch build "
            f"for this driver (docs/gpu-drivers.md) or use an image with a newer driver"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"{build} cannot see a CUDA GPU although NVIDIA driver {driver} is installed{hint}"


def choose_device(requested: str) -> torch.device:
    """CUDA when asked (or, for "auto", when there is one); "cuda" without a usable GPU is an error."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise UsageError(f"--device cuda: {cuda_unavailable_reason()}")
    log("warning: no CUDA GPU: running SAM3 on the CPU, about 100x slower (--device cuda makes this an error)")
    return torch.device("cpu")


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The model's dtype; "auto" is bfloat16 on GPUs that support it, float32 elsewhere."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def describe_device(device: torch.device, dtype: torch.dtype) -> str:
    """One line: the device, and for a GPU its name, memory, driver and PyTorch's CUDA version."""
    name = dtype_name(dtype)
    if device.type != "cuda":
        return f"cpu: PyTorch {torch.__version__}, {name}"
    gpu = torch.cuda.get_device_properties(device)
    return (
        f"cuda: {gpu.name} ({gpu.total_memory / 2**30:.0f} GiB), NVIDIA driver {nvidia_driver_version() or '?'}, "
        f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}), {name}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def leave_a_core_free(device: torch.device) -> None:
    """On the CPU, keep SAM3's threads off one core, for the stages that run beside it: PyTorch
    takes every core by default, and its threads then spin against the decode thread and the
    outputs process (measured on 2 cores: SAM3's time per frame up by half). Done for --serial
    too: SAM3's float sums come out slightly different with another thread count, and --serial
    must give the same outputs. A lower thread count set by the user (OMP_NUM_THREADS,
    torch.set_num_threads) is kept."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the cores this process may use
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    if device.type == "cpu" and cores > 1 and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)

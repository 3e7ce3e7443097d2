"""Which precision the hardware runs fast: `model.dtype: auto` and `select.bds.autocast: auto` resolve here.

bf16 halves memory and, where the hardware has bf16 units, speeds up matmuls (AVX512-BF16 CPUs: BDS 1.6x faster
with autocast). Where it has none, torch emulates bf16 on the CPU: on an AVX2-only EPYC one 512x576 @ 576x1536
matmul takes 754 ms in bf16 against 12 ms in fp32, and a bf16 demo stalls. So "auto" means bf16 only on a CUDA
GPU that supports it or a CPU with AVX512-BF16 or AMX, else fp32. The resolved value, not "auto", reaches the
stages, so manifests record what actually ran and a run moved to other hardware recomputes what differs.
"""
from __future__ import annotations

import functools
from pathlib import Path

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return cpu_has_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no cheap way to tell, and fp32 is never the slow choice
        return False


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's flags name bf16 units (all cores of a machine list the same flags)."""
    flags = set(cpuinfo.split())
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(dtype: str) -> str:
    """"fp32" / "bf16" as given; "auto": bf16 where the hardware has it, else fp32."""
    return ("bf16" if native_bf16() else "fp32") if dtype == "auto" else dtype


def resolve_autocast(autocast: bool | str) -> bool:
    """True / False as given; "auto": bf16 autocast only where bf16 is native."""
    return native_bf16() if autocast == "auto" else bool(autocast)

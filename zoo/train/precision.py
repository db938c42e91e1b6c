"""``train.precision: auto``: bf16 mixed precision where the hardware computes in bf16 natively, float32
elsewhere (emulated bf16 is slower than float32 and no more accurate)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

AUTO = "auto"
# CPU feature flags (Linux /proc/cpuinfo names) of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16
# (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later), Arm's BF16 extension (Armv8.6-A).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """The native-bf16 flags among a ``/proc/cpuinfo`` text's ``flags`` (x86) or ``Features`` (Arm) lines."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so float32
        return ""


def _cpu_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name":
            return value.strip()
    return platform.machine() or "of unknown model"


def resolve_precision(precision: str | int, accelerator: str = "auto") -> tuple[str | int, str]:
    """``(precision, why)``: ``precision`` itself unless it is ``"auto"``, which becomes ``"bf16-mixed"`` on a
    CUDA device with native bf16 or a CPU with one of :data:`CPU_BF16_FLAGS`, else ``"32-true"``."""
    if precision != AUTO:
        return precision, "as configured"
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"CUDA device {name} computes bf16 natively"
        return "32-true", f"CUDA device {name} has no native bf16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator!r}: bf16 support is not checked there"
    cpuinfo = _cpuinfo()
    flags, cpu = cpu_bf16_flags(cpuinfo), _cpu_name(cpuinfo)
    if flags:
        return "bf16-mixed", f"CPU {cpu} computes bf16 natively ({', '.join(flags)})"
    return "32-true", f"CPU {cpu} has no native bf16 ({', '.join(CPU_BF16_FLAGS)} absent)"

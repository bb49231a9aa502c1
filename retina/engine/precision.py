"""The autocast dtype of ``train.amp`` on the device a run uses.

``auto`` picks the fastest precision the hardware runs natively: bf16 on a CUDA GPU that has it
(fp16, with a GradScaler, on older GPUs), bf16 on a CPU with bf16 instructions (AVX512-BF16 or
AMX), and fp32 on any other CPU. There bf16 is emulated, and emulation is slower than fp32:
the ``photos_cpu`` step took 86 s in bf16 against 3.5 s in fp32 on a 2-core AVX2 EPYC, while an
AVX512-BF16 EPYC ran it in 1.07 s against 2.0 s. An explicit ``bf16`` is kept as asked, with a
warning when the CPU would emulate it.
"""

from __future__ import annotations

from typing import Optional

import torch

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), as oneDNN's bf16 kernels need."""
    try:  # torch's CPU-feature probes; private, so a torch without them counts as "no"
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def _describe(device: torch.device) -> str:
    if device.type == "cpu":
        return f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return f"this GPU ({torch.cuda.get_device_name(device) if torch.cuda.is_available() else device})"


def autocast_dtype(amp: str, device: torch.device,
                   native_bf16: Optional[bool] = None) -> tuple[Optional[torch.dtype], Optional[str]]:
    """``train.amp`` (one of the config's values) on ``device`` -> (autocast dtype or None for
    fp32, a line for the log or None).

    ``native_bf16`` (tests) stands for the hardware probe: ``cpu_has_native_bf16()`` on a CPU,
    ``torch.cuda.is_bf16_supported()`` on CUDA."""
    if device.type not in ("cpu", "cuda"):
        return AMP_DTYPES.get(amp), None  # other backends: as asked, "auto" as fp32
    cpu = device.type == "cpu"
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16() if cpu else torch.cuda.is_bf16_supported()
    where = _describe(device)
    if amp == "auto":
        if native_bf16:
            return torch.bfloat16, f"train.amp=auto: bf16 autocast ({where} runs bf16 natively)"
        if cpu:
            return None, f"train.amp=auto: fp32 ({where} has no bf16 instructions; emulated bf16 is slower)"
        return torch.float16, f"train.amp=auto: fp16 autocast with a GradScaler ({where} has no bf16)"
    if amp == "bf16" and cpu and not native_bf16:
        return torch.bfloat16, (f"warning: train.amp=bf16 on {where}, which has no bf16 instructions: "
                                "emulated bf16 is slower than fp32 (25x for photos_cpu on an AVX2 CPU); "
                                "train.amp=auto picks fp32 here")
    return AMP_DTYPES[amp], None

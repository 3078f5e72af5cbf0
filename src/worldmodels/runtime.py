"""Where and how torch runs: device choice, thread count, seeding."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from worldmodels.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA where there is one; a device that is not there is refused in one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (use cpu, cuda or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_supports_fast_bf16() -> bool:
    """bf16 matmuls are only fast on CPUs with native bf16 (AVX512-BF16 or AMX); elsewhere
    autocast to bf16 runs many times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    """The one bf16 rule, for training and acting alike: a CUDA device that supports it, or a
    CPU with native bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_fast_bf16()


def dream_in_bf16(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether dreams step M in bf16: `precision` is auto, fp32 or bf16; auto follows the one
    bf16 rule."""
    if precision == "auto":
        return bf16_is_fast(torch.device(device))
    return precision == "bf16"


def use_acting_threads(device: torch.device | str = "cpu") -> None:
    """One torch thread for the stages that act in envs (train-controller, evaluate, play).

    V runs on small batches between env steps, and the env's own threads (envpool pools,
    Gymnasium processes) need the cores: on 2 cores the agent in the loop ran more env steps
    per second with one torch thread than with two (`make bench` measures it)."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)


def use_all_threads() -> None:
    """Every core for torch: for work that is all torch, such as dreaming a population in M."""
    torch.set_num_threads(os.cpu_count() or 1)

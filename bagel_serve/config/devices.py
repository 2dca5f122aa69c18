"""Checks of the devices a run asks for against the machine, made before anything loads."""

from __future__ import annotations

from typing import Any

from bagel_serve.config.deploy import DeployConfig


class DeviceError(ValueError):
    """The requested device (or a deploy config's `devices`) is not on this machine."""


def check_device(device: Any) -> Any:
    """`device` as a torch.device (None: cuda if available, else cpu); DeviceError if it is a CUDA device
    this machine does not have."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"device (--device) {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device (--device) {str(dev)!r}: no CUDA GPU is available here "
                              f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device (--device) {str(dev)!r}: this machine has {count} CUDA GPU(s) "
                              f"(indices 0..{count - 1})")
    elif dev.type not in ("cpu", "meta"):
        raise DeviceError(f"device (--device) {str(dev)!r}: bagel-serve runs on cuda or cpu")
    return dev


def check_stage_devices(deploy: DeployConfig, device: Any) -> None:
    """On CUDA, every GPU index a stage's `devices` names (one per rank) must exist here, counted as torch
    sees them (after CUDA_VISIBLE_DEVICES). On the CPU the indices are only counted against the ranks (the
    deploy config's own rule): CPU ranks are processes, not hardware."""
    import torch

    if torch.device(device).type != "cuda":
        return
    count = torch.cuda.device_count()
    for i, stage in enumerate(deploy.stages):
        missing = [str(d) for d in stage.device_ids if d >= count]
        if missing:
            src = f"{deploy.source}: " if deploy.source else ""
            names = f"GPU {missing[0]}" if len(missing) == 1 else f"GPUs {', '.join(missing[:-1])} and {missing[-1]}"
            ranks = f" for {stage.parallel_config.describe_ranks()}" if stage.num_ranks > 1 else ""
            raise DeviceError(f"{src}stages[{i}].devices: {stage.devices!r} names {names}{ranks}, but this machine "
                              f"has {count} CUDA GPU(s) (indices 0..{count - 1})")

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
    """On CUDA, every GPU index a stage's `devices` names must exist here (CPU runs ignore `devices`)."""
    import torch

    if torch.device(device).type != "cuda":
        return
    count = torch.cuda.device_count()
    for i, stage in enumerate(deploy.stages):
        missing = [d for d in stage.device_ids if d >= count]
        if missing:
            src = f"{deploy.source}: " if deploy.source else ""
            raise DeviceError(f"{src}stages[{i}].devices: {stage.devices!r} names GPU {missing[0]}, but this machine "
                              f"has {count} CUDA GPU(s) (indices 0..{count - 1})")

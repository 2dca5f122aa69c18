"""HSDP: the LLM's decoder layers sharded with FSDP2, each gathered only while it runs.

The decoder layers hold almost all of BAGEL's weights (both experts of all 28 layers: 24.3 of 27.2 GiB in
bf16). `shard_decoder_layers` splits every layer's parameters over the `shard` ranks of a device mesh with
`torch.distributed.fsdp.fully_shard`; in the forward, each layer's pre-forward hook all-gathers its full
weights and its post-forward hook frees them again (`reshard_after_forward=True`), so a rank holds its
1/shard of every layer plus one layer in full (two with `prefetch`). On a 2-D mesh ("replicate", "shard")
the layers are sharded within each row of ranks and replicated across rows (HSDP); a 1-D mesh is plain
FSDP. The token embedding and the LM head are sharded the same way (a unit each); everything else (final
norms, ViT, connector, embedders, position tables; the VAE is separate) stays whole on every rank. The model code does not change: a linear's `quant_method.apply` reads
`layer.weight` inside the layer's forward, where FSDP has registered the gathered tensor, so the math (and,
on the CPU, every bit of the result) is that of the unsharded model.

What a rank process does (every rank of the mesh, in the same order):
  1. `dist.init_process_group(backend, init_method=..., rank=..., world_size=..., timeout=...)`; on CUDA
     `torch.cuda.set_device(local_rank)` first (the mesh and FSDP take the current device).
  2. `mesh = hsdp_mesh(shard_size, replicate_size, device_type)` over all ranks of the process group.
  3. Load the weights on the CPU (`load_model(..., device="cpu", dtype=torch.bfloat16)`), then
     `shard_decoder_layers(model, mesh)`: each layer is moved to the mesh device and cut to this rank's
     shard one layer at a time (a device never holds the whole LLM); the rest of the model moves whole.
     Move the VAE yourself (`vae.to(device)`).
  4. Run the engine as usual; `torch.inference_mode()` and `torch.no_grad()` both work (the parameters are
     `requires_grad=False`; FSDP2 checks for inference tensors where it would bump version counters).

Constraints:
  * Every forward of the transformer is a collective over the rank's shard group: the ranks of one group
    must run the same number of transformer forwards in the same order (the shapes of their rows may
    differ). Replica groups are independent of each other.
  * CUDA graphs cannot capture FSDP's all-gathers (they run on FSDP's own streams, with allocations and
    waits outside the graph): an HSDP stage runs eager (`enforce_eager`). `torch.compile` is not applied.
  * A shard size of 1 shards nothing: the layers are left as plain modules (FSDP2's one-rank path copies
    into inference tensors with a version-counter guard and fails under `inference_mode`, and there is
    nothing to gather anyway).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

REPLICATE_DIM = "replicate"
SHARD_DIM = "shard"
AUTO = -1
"""`hsdp_shard_size=-1`: the process group's world size divided by the replicate size."""


def hsdp_mesh(shard_size: int, replicate_size: int = 1, device_type: str = "cuda") -> DeviceMesh:
    """The device mesh over all ranks of the default process group: ("replicate", "shard") of shape
    (replicate_size, shard_size), or 1-D ("shard",) when replicate_size is 1. Ranks r*shard .. r*shard +
    shard - 1 form replica r (consecutive ranks share a shard group: on one host, the NVLink neighbours)."""
    for name, v in (("hsdp_shard_size", shard_size), ("hsdp_replicate_size", replicate_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    if replicate_size < 1:
        raise ValueError(f"hsdp_replicate_size must be >= 1, got {replicate_size}")
    if shard_size != AUTO and shard_size < 1:
        raise ValueError(f"hsdp_shard_size must be -1 (auto) or >= 1, got {shard_size}")
    if not dist.is_initialized():
        raise RuntimeError("hsdp_mesh needs torch.distributed initialised (dist.init_process_group) first")
    world = dist.get_world_size()
    if shard_size == AUTO:
        if world % replicate_size:
            raise ValueError(f"hsdp_replicate_size {replicate_size} does not divide the world size {world}")
        shard_size = world // replicate_size
    if shard_size * replicate_size != world:
        raise ValueError(f"hsdp_replicate_size * hsdp_shard_size = {replicate_size} * {shard_size} must equal "
                         f"the world size {world}")
    if replicate_size == 1:
        return init_device_mesh(device_type, (shard_size,), mesh_dim_names=(SHARD_DIM,))
    return init_device_mesh(device_type, (replicate_size, shard_size), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))


def shard_size_of(mesh: DeviceMesh) -> int:
    """Ranks one layer's weights are split over: the size of the mesh's last ("shard") dimension."""
    return mesh.size(mesh.ndim - 1)


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def _move_all_but(module: nn.Module, keep: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of `module` to `device` except those inside `keep`."""
    if module is keep:
        return
    if not any(m is keep for m in module.modules()):
        module.to(device)
        return
    with torch.no_grad():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            t.data = t.data.to(device)
    for child in module.children():
        _move_all_but(child, keep, device)


def shard_decoder_layers(model: nn.Module, mesh: DeviceMesh, *, prefetch: bool = False) -> None:
    """Shard the LLM's decoder layers over `mesh` (FSDP2, one unit per layer) and move the rest of `model`
    to the mesh's device, in place. Call it on every rank of the mesh, after loading (and quantising):
    FSDP shards the parameters as they are then.

    The LLM body (`Qwen2MoTModel`) becomes FSDP's root over the layers, managing none of its own parameters
    (embeddings and final norms are ignored, so they stay whole): one root gives all layers one set of
    streams and lets `prefetch` start the next layer's all-gather while the current one computes, at the
    cost of a second layer's full weights being resident during the forward. Without `prefetch` a rank
    holds at most one gathered layer at a time. With a shard dimension of size 1 the layers stay plain
    modules (see the module docstring); they and everything else are only moved to the device."""
    lm = model.language_model.model
    device = _mesh_device(mesh)
    _move_all_but(model, lm.layers, device)
    layers = list(lm.layers)
    if shard_size_of(mesh) == 1:
        lm.layers.to(device)
        return
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # The token embedding and the LM head (1.1 GB each in BAGEL-7B's bf16) are sharded too, each its own
    # unit: left whole they would keep a shard-4 rank above 30 % of the weights.
    fully_shard(lm.embed_tokens, mesh=mesh, reshard_after_forward=True)
    fully_shard(model.language_model.lm_head, mesh=mesh, reshard_after_forward=True)
    replicated = {p for name, p in lm.named_parameters() if not name.startswith(("layers.", "embed_tokens."))}
    fully_shard(lm, mesh=mesh, reshard_after_forward=True, ignored_params=replicated)
    # The engine calls the embedding before (outside) the root's forward: initialise the root now, so that
    # the embedding is one of its units rather than a root of its own.
    lm._get_fsdp_state()._lazy_init()
    if prefetch:
        for layer, following in zip(layers, layers[1:]):
            layer.set_modules_to_forward_prefetch([following])


def _local_bytes(t: torch.Tensor) -> int:
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def weight_bytes_per_rank(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers resident on this rank: a sharded (DTensor) parameter
    counts its local shard only. Between forwards the layers hold only their shards, so this is what the
    weights occupy on the device; a forward adds one gathered layer (`unsharded_layer_bytes`)."""
    return sum(_local_bytes(t) for t in [*module.parameters(), *module.buffers()])


def unsharded_layer_bytes(model: nn.Module) -> int:
    """Bytes of the largest decoder layer with all its weights: the extra device memory a forward gathers
    (twice this with `prefetch`)."""
    return max(sum(p.numel() * p.element_size() for p in layer.parameters())
               for layer in model.language_model.model.layers)

"""Where an MoE layer's experts live and how tokens reach them.

A layer asks its placement to run its experts on the token chunks routed to them
(:meth:`ResidentExperts.run`). Three placements, chosen from the model config (on stock
``fairseq-generate`` through ``--model-overrides``):

- resident (the default): the experts are ordinary submodules and move with the model;
- offload (``moe_expert_offload``): every expert's weights stay in host memory as loaded (memory-mapped
  where the checkpoint was) and are never moved by ``model.cuda()``; a layer copies to the compute
  device only the experts its batch routes to, into an LRU cache of ``moe_offload_cache_experts``
  experts per layer, and issues the copy of the next routed expert before the current one computes
  (on a side CUDA stream of the compute device, so that the copy is hidden behind compute; on the CPU
  the same code runs synchronously). Nothing is page-locked up front: an expert is page-locked when it
  is copied, into a :class:`StagingRing` of ``LOOKAHEAD + 1`` experts that the layer empties when its
  forward ends, so at most that many experts are page-locked at once, whatever the model's size;
- devices (``moe_expert_devices``): the experts of each layer are split evenly, in order, over a list
  of devices; tokens travel to their expert's device and back.

Every placement runs the same experts on the same tokens in the same order with the same weights,
so decisions, outputs and statistics are identical to the resident model's.

Hugging Face accelerate gives the pieces that fit (building experts without memory with
``init_empty_weights``; putting each loaded tensor in its final place with
``set_module_tensor_to_device``). Its offload hooks (``AlignDevicesHook``) copy a module's weights
to the device on every call and drop them after, one module at a time: they have no cache of hot
experts and no way to know which expert runs next, so the copy-ahead and the LRU are ours.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from fairseq_moe_prune.errors import FairseqMoEPruneError
from fairseq_moe_prune.layout import MoELayerSpec, config_value

if TYPE_CHECKING:  # pragma: no cover  (annotations only: the MoE layer imports this module)
    from fairseq_moe_prune.moe.layer import MoELayer

DEFAULT_CACHE_EXPERTS = 8


class PlacementError(FairseqMoEPruneError, ValueError):
    """The placement options are unusable on this machine or for this model; one line for the user."""


@dataclass(frozen=True)
class PlacementOptions:
    offload: bool = False
    cache_experts: int = DEFAULT_CACHE_EXPERTS
    devices: Tuple[torch.device, ...] = ()

    @property
    def resident(self) -> bool:
        return not self.offload and not self.devices


def parse_devices(text: Optional[str]) -> Tuple[torch.device, ...]:
    """``"cuda:0,cuda:1"`` -> devices, each checked to exist; empty or None -> ()."""
    if text is None or str(text).strip() == "":
        return ()
    devices = []
    for name in str(text).split(","):
        name = name.strip()
        try:
            device = torch.device(name)
        except RuntimeError:
            raise PlacementError(f"moe_expert_devices: {name!r} is not a device name (e.g. cuda:0, cpu)") from None
        if device.type == "cuda":
            count = torch.cuda.device_count()
            index = 0 if device.index is None else device.index
            if index >= count:
                raise PlacementError(f"moe_expert_devices: device {name} does not exist "
                                     f"(this machine has {count} CUDA device{'s' if count != 1 else ''})")
            device = torch.device("cuda", index)
        elif device.type != "cpu":  # CPU indices all name host memory: two "CPU devices" test placement
            raise PlacementError(f"moe_expert_devices: {name}: only cuda:N and cpu devices are supported")
        devices.append(device)
    return tuple(devices)


def placement_options(cfg) -> PlacementOptions:
    """The placement a model config asks for, checked; raises :class:`PlacementError`."""
    offload = bool(config_value(cfg, "moe_expert_offload", False))
    cache = config_value(cfg, "moe_offload_cache_experts", DEFAULT_CACHE_EXPERTS)
    try:
        cache = int(cache)
    except (TypeError, ValueError):
        raise PlacementError(f"moe_offload_cache_experts must be an integer, got {cache!r}") from None
    if offload and cache < 2:
        # the next expert is copied while the current one computes: both need a place on the device
        raise PlacementError(f"moe_offload_cache_experts must be at least 2 (the expert computing and the "
                             f"next one being copied), got {cache}")
    devices = parse_devices(config_value(cfg, "moe_expert_devices"))
    if offload and devices:
        raise PlacementError("moe_expert_offload and moe_expert_devices cannot be combined: choose one")
    return PlacementOptions(offload, cache, devices)


def check_layer(options: PlacementOptions, name: str, num_experts: int) -> None:
    """A layer that cannot be split over the device list is refused (every device gets an expert)."""
    if len(options.devices) > num_experts:
        raise PlacementError(f"{name} has {num_experts} expert{'s' if num_experts != 1 else ''}, fewer than the "
                             f"{len(options.devices)} devices of moe_expert_devices")


def check_placement(cfg, specs: "List[MoELayerSpec]") -> PlacementOptions:
    """The placement ``cfg`` asks for, checked against its MoE layers; raises :class:`PlacementError`."""
    options = placement_options(cfg)
    for spec in specs:
        check_layer(options, spec.prefix, spec.num_experts)
    return options


def split_evenly(num_experts: int, devices: Tuple[torch.device, ...]) -> List[torch.device]:
    """The device of each expert: contiguous runs, sizes differing by at most one, larger runs first."""
    per_device, extra = divmod(num_experts, len(devices))
    placed: List[torch.device] = []
    for i, device in enumerate(devices):
        placed.extend([device] * (per_device + (1 if i < extra else 0)))
    return placed


def building_context(options: PlacementOptions):
    """Where a layer is built: as usual when resident, else on the meta device (no memory, no initialisation),
    its experts' weights arriving later from the checkpoint, each straight to its final place."""
    if options.resident:
        return contextlib.nullcontext()
    try:
        from accelerate import init_empty_weights  # optional extra (offload)
    except ImportError:
        raise PlacementError("expert offload and placement need Hugging Face accelerate: "
                             "pip install 'fairseq-moe-prune[offload]'") from None
    return init_empty_weights(include_buffers=False)


class ResidentExperts:
    """Today's experts: submodules of the layer, wherever the model was moved."""

    def run(self, layer: "MoELayer", chunks: List[Tensor], skip_empty: bool) -> List[Tensor]:
        """Each expert's output on its chunk, in expert order; experts with no tokens skipped when asked."""
        return [expert(chunk) for expert, chunk in zip(layer.experts, chunks) if not skip_empty or chunk.shape[0] > 0]


RESIDENT = ResidentExperts()


def target_of(fn, dtype: torch.dtype) -> Tuple[torch.dtype, torch.device]:
    """What ``Module._apply(fn)`` would turn a floating tensor of ``dtype`` into (``.half()``, ``.cuda()``...)."""
    probe = fn(torch.empty(0, dtype=dtype))
    return probe.dtype, probe.device


def expert_tensors(expert: nn.Module) -> Dict[str, Tensor]:
    return dict(expert.named_parameters())


def load_host_experts(container: nn.ModuleList, state_dict, prefix: str, error_msgs: List[str]) -> None:
    """Make each expert tensor of ``state_dict`` an offloaded expert's weight as it is: no copy (it stays
    memory-mapped when the checkpoint was), the checkpoint's dtype. The state dict entry becomes the
    parameter itself, so that the default copy that follows is a no-op."""
    from accelerate.utils import set_module_tensor_to_device  # optional extra (offload)

    for j, expert in enumerate(container):
        for name, parameter in list(expert.named_parameters()):
            key = f"{prefix}{j}.{name}"
            if key not in state_dict:
                continue  # reported as missing by the default loading
            value = state_dict[key]
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(parameter.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(f"{key}: checkpoint has {shape}, the model expects {tuple(parameter.shape)}")
                continue
            set_module_tensor_to_device(expert, name, "cpu", value=value, dtype=value.dtype)
            state_dict[key] = expert.get_parameter(name)


class HostExperts(nn.ModuleList):
    """The experts of an offloaded layer: their weights stay in host memory whatever the model is moved to.

    Weights keep the checkpoint's dtype on the host (memory-mapped where loaded from a file), or take
    the dtype the model computes in when that is narrower (``.half()`` of an fp32 checkpoint halves
    the host memory); otherwise the compute dtype is applied when an expert is copied to the device.
    Either way the rounding is the one converting the resident weights would do. They are never
    page-locked here: :class:`StagingRing` page-locks an expert when it is copied.
    """

    def __init__(self, experts: List[nn.Module]):
        super().__init__(experts)
        self.compute_dtype = torch.get_default_dtype()
        # counts the times the host weights may have changed (loading, casting): device copies made
        # from an earlier generation are stale
        self.generation = 0

    def _apply(self, fn, recurse=True):
        self.compute_dtype, _ = target_of(fn, self.compute_dtype)
        self.update_host_tensors()
        return self

    def update_host_tensors(self) -> None:
        """Narrow host weights to the compute dtype; copies cached on a device become stale."""
        narrow = torch.empty(0, dtype=self.compute_dtype).element_size()
        with torch.no_grad():
            for expert in self:
                for name, parameter in list(expert.named_parameters()):
                    if parameter.is_meta:
                        continue
                    value = parameter.data
                    if value.is_floating_point() and value.element_size() > narrow:
                        value = value.to(self.compute_dtype)
                        module_name, _, tensor_name = name.rpartition(".")
                        setattr(expert.get_submodule(module_name), tensor_name, nn.Parameter(value, requires_grad=False))
        self.generation += 1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_host_experts(self, state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.update_host_tensors()  # the model may have been cast or moved before loading


class PlacedExperts(nn.ModuleList):
    """The experts of a layer placed over several devices: moving the model changes their dtype, not their device."""

    def __init__(self, experts: List[nn.Module], device_of: List[torch.device]):
        super().__init__(experts)
        self.device_of = device_of

    def _apply(self, fn, recurse=True):
        for expert, device in zip(self, self.device_of):
            for module in expert.modules():
                for name, parameter in list(module.named_parameters(recurse=False)):
                    dtype, _ = target_of(fn, parameter.dtype)
                    if dtype != parameter.dtype:
                        module._parameters[name] = nn.Parameter(parameter.data.to(device=device, dtype=dtype),
                                                                requires_grad=parameter.requires_grad)
        return self


class DeviceExperts:
    """Experts spread over devices: each chunk goes to its expert's device and its output comes back."""

    def run(self, layer: "MoELayer", chunks: List[Tensor], skip_empty: bool) -> List[Tensor]:
        outputs = []
        placed: PlacedExperts = layer.experts
        for expert, device, chunk in zip(placed, placed.device_of, chunks):
            if skip_empty and chunk.shape[0] == 0:
                continue
            outputs.append(expert(chunk.to(device)).to(chunk.device))
        return outputs


LOOKAHEAD = 1  # routed experts whose copy is issued before the computing expert runs


def page_locked(tensor: Tensor) -> Tensor:
    """A page-locked copy of a host tensor, from which a copy to a GPU runs asynchronously at full
    bandwidth (CUDA's caching host allocator reuses the block once the copies from it are done)."""
    return tensor.pin_memory()


def tensor_bytes(tensors: Dict[str, Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


class StagingRing:
    """Page-locked copies of experts on their way to the device, at most ``slots`` of them at once.

    Page-locking every offloaded expert up front would lock the whole model (96 GiB for NLLB-200) and
    read every memory-mapped expert into RAM. Instead each expert is page-locked as it is copied
    (``pin``); before another is staged beyond ``slots``, the oldest waits for its copy to finish and is
    released, and a layer drains its ring when its forward ends. Layers run one after another, so
    page-locked memory never exceeds ``slots`` experts (``LOOKAHEAD + 1``: the expert computing and the
    ones copied ahead), however many experts, layers or cache places the model has.
    """

    def __init__(self, slots: int, pin: Callable[[Tensor], Tensor] = page_locked):
        self.slots = slots
        self.pin = pin
        self.held: "Deque[Tuple[Dict[str, Tensor], Optional[torch.cuda.Event]]]" = deque()
        self.held_bytes = 0
        self.peak_bytes = 0  # most bytes staged at once (for tests and benchmarks)

    def stage(self, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Page-locked copies of ``tensors``; :meth:`copied` then says when the copy from them is done."""
        while len(self.held) >= self.slots:
            self.release_oldest()
        staged = {}
        for name, tensor in tensors.items():
            staged[name] = self.pin(tensor)
            self.held_bytes += tensor_bytes({name: staged[name]})
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        self.held.append((staged, None))
        return staged

    def copied(self, event: Optional[torch.cuda.Event]) -> None:
        """The copy from the latest staged expert was queued; ``event`` completes with it (None: it is done)."""
        staged, _ = self.held.pop()
        self.held.append((staged, event))

    def release_oldest(self) -> None:
        staged, event = self.held.popleft()
        if event is not None:
            event.synchronize()
        self.held_bytes -= tensor_bytes(staged)

    def drain(self) -> None:
        while self.held:
            self.release_oldest()


@dataclass
class CacheStats:
    """How an offloaded layer's cache served its experts (for benchmarks and tests)."""

    hits: int = 0
    copies: int = 0
    largest: int = 0  # most experts held on the device at once


class OffloadedExperts:
    """Experts in host memory, copied on demand into a per-layer LRU cache on the compute device.

    Before expert ``j`` computes, the copy of the next routed expert is issued (on a side stream of
    the compute device under CUDA), so that it runs while ``j`` computes. The cache evicts the least
    recently used expert; the one computing is always the most recent, so with two or more places the
    copy ahead never overwrites weights in use. Copies go through a :class:`StagingRing` where a ``pin``
    function is given, and always on a GPU (``page_locked``); on the CPU without one they are plain copies.
    Cached copies are dropped when the model moves, is cast, or loads other weights.
    """

    def __init__(self, capacity: int, pin: Optional[Callable[[Tensor], Tensor]] = None):
        self.capacity = capacity
        self.pin = pin
        self.cache: "OrderedDict[int, Dict[str, Tensor]]" = OrderedDict()
        self.ready: Dict[int, Optional[torch.cuda.Event]] = {}
        self.generation: Optional[int] = None  # the host weights' generation the cache was filled from
        self.stats = CacheStats()
        self.copy_stream: Optional[torch.cuda.Stream] = None
        self.staging: Optional[StagingRing] = None

    def run(self, layer: "MoELayer", chunks: List[Tensor], skip_empty: bool) -> List[Tensor]:
        if layer.training:
            raise PlacementError("expert offload is for inference: the experts cannot be trained offloaded")
        host = layer.experts
        order = [j for j, chunk in enumerate(chunks) if not skip_empty or chunk.shape[0] > 0]
        if not order:
            return []
        device = chunks[0].device
        if self.cache:
            cached = next(iter(next(iter(self.cache.values())).values()))
            if (self.generation != host.generation  # other weights were loaded, or the model was cast
                    or cached.device != device or cached.dtype != host.compute_dtype):  # or moved
                self.cache.clear()
                self.ready.clear()
        self.generation = host.generation
        staging = self.staging_ring(device)
        outputs = []
        try:
            self.fetch(host, order[0], device, staging)
            for position, j in enumerate(order):
                weights = self.cache[j]
                self.cache.move_to_end(j)
                if position + 1 < len(order):
                    self.fetch(host, order[position + 1], device, staging)  # copied while expert j computes
                self.wait(j, device)
                outputs.append(functional_call(host[j], weights, (chunks[j],)))
        finally:
            if staging is not None:
                staging.drain()
        return outputs

    def staging_ring(self, device: torch.device) -> Optional[StagingRing]:
        """The ring copies to ``device`` go through: always on a GPU, on the CPU where a pin function is given."""
        pin = self.pin or (page_locked if device.type == "cuda" else None)
        if pin is None:
            return None
        if self.staging is None or self.staging.pin is not pin:
            self.staging = StagingRing(LOOKAHEAD + 1, pin)
        return self.staging

    def fetch(self, host: HostExperts, j: int, device: torch.device, staging: Optional[StagingRing] = None) -> None:
        """Make sure expert ``j`` is (being) copied to ``device``."""
        if j in self.cache:
            self.cache.move_to_end(j)
            self.stats.hits += 1
            return
        tensors = expert_tensors(host[j])
        if any(tensor.is_meta for tensor in tensors.values()):
            raise PlacementError("the offloaded experts have no weights: load a checkpoint into the model first")
        if len(self.cache) >= self.capacity:
            _, buffers = self.cache.popitem(last=False)  # reuse the least recently used expert's place
            self.ready.pop(_, None)
        else:
            buffers = {name: torch.empty(tensor.shape, dtype=host.compute_dtype, device=device)
                       for name, tensor in tensors.items()}
        if staging is not None:
            tensors = staging.stage(tensors)
        event = None
        with self.copy_context(device):
            for name, tensor in tensors.items():
                buffers[name].copy_(tensor, non_blocking=True)
            if device.type == "cuda":
                for buffer in buffers.values():
                    buffer.record_stream(self.copy_stream)  # not reused by the allocator while the copy runs
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        if staging is not None:
            staging.copied(event)
        self.cache[j] = buffers
        self.ready[j] = event
        self.stats.copies += 1
        self.stats.largest = max(self.stats.largest, len(self.cache))

    @contextlib.contextmanager
    def copy_context(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        if self.copy_stream is None or self.copy_stream.device != device:  # the stream follows the model
            self.copy_stream = torch.cuda.Stream(device=device)
        # the copy may overwrite an evicted expert's place: wait for the compute queued so far (which ends
        # with the last use of that place), not for the expert about to be queued
        self.copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.copy_stream):
            yield

    def wait(self, j: int, device: torch.device) -> None:
        event = self.ready.get(j)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
            self.ready[j] = None


def place_layer(layer: "MoELayer", options: PlacementOptions) -> None:
    """Give a layer built in :func:`building_context` its placement; the gate is the only dense part and
    is initialised on the host as usual (a checkpoint overwrites it)."""
    if options.resident:
        return
    check_layer(options, "an MoE layer", layer.num_experts)
    layer.gate.to_empty(device="cpu")
    layer.gate.wg.reset_parameters()
    if options.offload:
        layer.experts = HostExperts(list(layer.experts))
        layer.placement = OffloadedExperts(options.cache_experts)
        return
    device_of = split_evenly(layer.num_experts, options.devices)
    for expert, device in zip(layer.experts, device_of):
        expert.to_empty(device=device)
        for module in expert.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    layer.experts = PlacedExperts(list(layer.experts), device_of)
    layer.placement = DeviceExperts()

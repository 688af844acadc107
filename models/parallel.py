"""Model-parallel sharding inside one replica: a model's layers split across devices.

A model too large for one device keeps running as one model: its stack of repeated layers
(GPT-2's ``transformer.h``, BERT's ``encoder.layer``, Llama's ``model.layers``) is cut into
contiguous *stages*, one per device, balanced by parameter count. What comes before the stack
(embeddings) goes to the first device, what comes after (final norm, head) to the last. Forward
pre-hooks move each module's tensor inputs (hidden states, attention masks, position
embeddings) to the module's device, so the model's own ``forward`` runs unchanged; its outputs
come back on the first device, where its inputs went in (``generate()`` appends each new token
to ``input_ids`` there). The model stays a plain ``nn.Module``; this transforms it in place, the
way torchtitan's ``parallelize_*`` and gpt-fast's ``apply_tp`` do:

    model = split_across_devices(model, ["cuda:0", "cuda:1"])
    model.loom_stages.layer_ranges        # (range(0, 12), range(12, 24))
    logits = model(input_ids.to(model.loom_stages.input_device)).logits

Devices may repeat: ``["cpu", "cpu"]`` is two CPU stages (the hooks run, nothing moves).

Why not accelerate's ``dispatch_model``: its device map treats ``"cpu"`` as the offload tier
(weights parked on ``meta`` and copied to the main GPU at each call), so a CPU stage, and two CPU
stages, cannot be expressed; it also wraps the ``forward`` of every submodule. The part it would
replace here is the input-moving hook, a few lines over torch's own hook API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

STAGES_ATTRIBUTE = "loom_stages"
"""The attribute ``split_across_devices`` records its ``StagePlan`` under, on the model."""
_HOOKS_ATTRIBUTE = "_loom_stage_hooks"
"""The attribute holding the split's hook handles, so they live as long as the model."""

# A forward pre-hook that takes keyword arguments, and a forward hook: what torch calls them with
_PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]
_OutputHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@dataclass(frozen=True)
class StagePlan:
    """Where a split model's parts went: which layers each device holds.

    plan = model.loom_stages
    plan.layer_path, plan.layer_ranges       # "transformer.h", (range(0, 1), range(1, 2))
    plan.device_of_layer(1)                   # device(type='cpu')
    """

    model_class: str
    """The split model's class name (``GPT2LMHeadModel``)."""
    layer_path: str
    """Dotted path of the layer stack inside the model (``transformer.h``)."""
    devices: tuple[torch.device, ...]
    """One device per stage, in pipeline order; may repeat."""
    layer_ranges: tuple[range, ...]
    """Layer indices held by each stage: contiguous, in order, covering the whole stack."""
    stage_param_counts: tuple[int, ...]
    """Parameters in each stage's layers (embeddings and head not counted)."""
    before_stack: tuple[str, ...]
    """Dotted names of the modules placed on the first device (embeddings)."""
    after_stack: tuple[str, ...]
    """Dotted names of the modules placed on the last device (final norm, head)."""

    @property
    def input_device(self) -> torch.device:
        """Where inputs go in, and where outputs come back: the first stage's device."""
        return self.devices[0]

    def device_of_layer(self, index: int) -> torch.device:
        """The device holding layer ``index`` of the stack."""
        for device, layers in zip(self.devices, self.layer_ranges, strict=True):
            if index in layers:
                return device
        raise IndexError(f"layer {index} is outside the stack of {self.layer_ranges[-1].stop}")


def plan_stages(layer_param_counts: Sequence[int], n_devices: int) -> list[range]:
    """Cut layers into ``n_devices`` contiguous, non-empty stages, balanced by parameters.

    Balanced means the largest stage is as small as it can be; among cuts that achieve it,
    earlier stages take as many layers as fit. Raises ``ValueError`` for fewer than one device,
    more devices than layers, or a negative count.

        plan_stages([10] * 6, 2)          # [range(0, 3), range(3, 6)]
        plan_stages([40, 10, 10, 10], 2)  # [range(0, 1), range(1, 4)]: 40 | 30
    """
    counts = [int(count) for count in layer_param_counts]
    if n_devices < 1:
        raise ValueError(f"need at least one device, not {n_devices}")
    if any(count < 0 for count in counts):
        raise ValueError(f"parameter counts cannot be negative: {counts}")
    if n_devices > len(counts):
        raise ValueError(
            f"{n_devices} devices but only {len(counts)} layers: each stage needs at least one"
        )
    limit = _smallest_largest_stage(counts, n_devices)
    # Greedy fill under the limit, always leaving one layer for each stage still to come.
    stages: list[range] = []
    start = 0
    for stage in range(n_devices):
        stages_after = n_devices - stage - 1
        stop, total = start + 1, counts[start]
        while stop < len(counts) - stages_after and (
            stages_after == 0 or total + counts[stop] <= limit
        ):
            total += counts[stop]
            stop += 1
        stages.append(range(start, stop))
        start = stop
    return stages


def _smallest_largest_stage(counts: Sequence[int], n_stages: int) -> int:
    """The least possible size of the largest stage (the linear-partition problem), by
    dynamic programming over (layers so far, stages used): O(layers^2 x stages)."""
    prefix = [0]
    for count in counts:
        prefix.append(prefix[-1] + count)
    n = len(counts)
    infinity = prefix[-1] + 1
    # best[k][i]: smallest largest stage when the first i layers make k stages
    best = [[infinity] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for i in range(k, n + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j]) for j in range(k - 1, i))
    return best[n_stages][n]


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated layers: the ``nn.ModuleList`` of same-type blocks with
    the most parameters (``transformer.h`` in GPT-2, ``encoder.layer`` in BERT).

    Raises ``ValueError`` naming the model's class when it has none.
    """
    found: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1:
            continue
        size = sum(parameter.numel() for parameter in module.parameters())
        if found is None or size > found[0]:
            found = (size, name, module)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} has no stack of repeated layers (an nn.ModuleList of "
            f"same-type blocks) to split across devices"
        )
    return found[1], found[2]


def split_across_devices(model: nn.Module, devices: Sequence[str | torch.device]) -> nn.Module:
    """Split ``model``'s layer stack into ``len(devices)`` pipeline stages, in place.

    Stage k's layers move to ``devices[k]``; modules before the stack to the first device,
    those after it to the last. Every placed module gets a forward pre-hook moving its tensor
    inputs (args and kwargs, nested in tuples, lists and dicts) to its device; the model's
    outputs come back on the first device. A parameter shared between modules on different
    devices (GPT-2's ``lm_head`` and ``wte``) gets a read-only copy on the later device: the
    tie holds only within a device, so train a split model only when its tied modules share
    a device. Returns ``model``, with its ``StagePlan`` under ``model.loom_stages``.

    Raises ``ValueError`` for no devices, a model already split, a model without a layer
    stack, or more devices than layers.
    """
    if not devices:
        raise ValueError("split_across_devices needs at least one device")
    if hasattr(model, STAGES_ATTRIBUTE):
        raise ValueError(f"{type(model).__name__} is already split across devices")
    stage_devices = tuple(torch.device(device) for device in devices)
    layer_path, layers = find_layer_stack(model)
    layer_counts = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    try:
        layer_ranges = plan_stages(layer_counts, len(stage_devices))
    except ValueError as exc:
        raise ValueError(f"{type(model).__name__}.{layer_path}: {exc}") from None
    before, after = _modules_around(model, layer_path)

    placed = _Placed()
    handles: list[RemovableHandle] = []
    # Placed in forward order (embeddings, stages, head), so a tied weight stays with the
    # module that uses it first and later users on other devices get the copy.
    for name in before:
        _place(model.get_submodule(name), stage_devices[0], placed, handles)
    for device, layer_range in zip(stage_devices, layer_ranges, strict=True):
        for index in layer_range:
            _place(layers[index], device, placed, handles)
    for name in after:
        _place(model.get_submodule(name), stage_devices[-1], placed, handles)
    # Parameters and buffers held directly by the model or the stack's ancestors.
    for module in _ancestors(model, layer_path):
        _move_own_tensors(module, stage_devices[0], placed)
    handles.append(model.register_forward_hook(_outputs_to(stage_devices[0])))

    plan = StagePlan(
        model_class=type(model).__name__,
        layer_path=layer_path,
        devices=stage_devices,
        layer_ranges=tuple(layer_ranges),
        stage_param_counts=tuple(sum(layer_counts[i] for i in r) for r in layer_ranges),
        before_stack=tuple(before),
        after_stack=tuple(after),
    )
    setattr(model, STAGES_ATTRIBUTE, plan)
    # setattr: nn.Module's own __setattr__ is typed for tensors and modules, not a list
    setattr(model, _HOOKS_ATTRIBUTE, handles)
    return model


def _modules_around(model: nn.Module, layer_path: str) -> tuple[list[str], list[str]]:
    """Siblings of the stack and of each of its ancestors, split by registration order
    (before the path / after it): for GPT-2, ``[wte, wpe, drop]`` and ``[ln_f, lm_head]``.

    Registration order stands in for forward order; where they differ (Llama registers its
    rotary embedding after the layers) the module still works, its inputs moved by its hook.
    """
    before: list[str] = []
    after: list[str] = []
    module, prefix = model, ""
    for part in layer_path.split("."):
        children = _children(module)
        names = list(children)
        position = names.index(part)
        before += [prefix + name for name in names[:position]]
        # inner siblings (the final norm) run before outer ones (the head): put them first
        after[:0] = [prefix + name for name in names[position + 1 :]]
        module, prefix = children[part], f"{prefix}{part}."
    return before, after


def _ancestors(model: nn.Module, layer_path: str) -> list[nn.Module]:
    """The model and each module on the path down to the stack, the stack included."""
    modules = [model]
    for part in layer_path.split("."):
        modules.append(_children(modules[-1])[part])
    return modules


def _children(module: nn.Module) -> dict[str, nn.Module]:
    """``module``'s direct children by name, in registration order (slots set to None left
    out)."""
    return {name: child for name, child in module._modules.items() if child is not None}


class _Placed:
    """Each parameter or buffer placed so far, by the identity of the original, and what
    stands for it on each device: the moved original on its first device, copies elsewhere."""

    def __init__(self) -> None:
        self.home: dict[int, torch.device] = {}
        self.on_device: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.originals: list[torch.Tensor] = []  # kept alive, so no id() is reused meanwhile


def _place(
    module: nn.Module, device: torch.device, placed: _Placed, handles: list[RemovableHandle]
) -> None:
    for submodule in module.modules():
        _move_own_tensors(submodule, device, placed)
    handles.append(module.register_forward_pre_hook(_inputs_to(device), with_kwargs=True))


def _move_own_tensors(module: nn.Module, device: torch.device, placed: _Placed) -> None:
    """Move the parameters and buffers ``module`` holds itself (not its children's).

    A tensor shared by modules on one device stays one object there (moved in place through
    ``.data`` where torch allows, as ``nn.Module.to`` does); one first placed on another device
    is replaced, in the modules on ``device``, by one frozen copy."""
    for key, parameter in list(module._parameters.items()):
        if parameter is not None:
            # a parameter's stand-in is a Parameter too: _moved keeps the class
            module._parameters[key] = cast(nn.Parameter, _stand_in(parameter, device, placed))
    for key, buffer in list(module._buffers.items()):
        if buffer is not None:
            module._buffers[key] = _stand_in(buffer, device, placed)


def _stand_in(tensor: torch.Tensor, device: torch.device, placed: _Placed) -> torch.Tensor:
    """What stands for ``tensor`` on ``device``: placed there once, then reused."""
    known = placed.on_device.get((id(tensor), device))
    if known is None:
        known = _moved(tensor, device, copy=id(tensor) in placed.home)
        placed.home.setdefault(id(tensor), device)
        placed.on_device[(id(tensor), device)] = known
        placed.originals.append(tensor)
    return known


def _moved(tensor: torch.Tensor, device: torch.device, *, copy: bool) -> torch.Tensor:
    """``tensor`` on ``device``: the same object where torch can swap its storage (cpu <->
    cuda), else a new one; a ``copy`` (a later device's stand-in) is always new and frozen."""
    data = tensor.detach().to(device)
    if not copy and torch._has_compatible_shallow_copy_type(tensor, data):
        tensor.data = data
        return tensor
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(data, requires_grad=tensor.requires_grad and not copy)
    return data


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors moved to ``device``, through tuples, lists and dicts; anything else (a KV
    cache object, whose layers already live on their stages' devices) left as it is."""
    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        # async only into a GPU: a copy out of one may be read before it lands
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_to_device(item, device) for item in value))
    if isinstance(value, tuple | list):
        return type(value)(_to_device(item, device) for item in value)
    if type(value) is dict:
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, dict):
        # transformers' ModelOutput: a dict whose items are also attributes, set in place
        for key in list(value):
            value[key] = _to_device(value[key], device)
        return value
    return value


def _inputs_to(device: torch.device) -> _PreHook:
    def move_inputs(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _to_device(args, device), _to_device(kwargs, device)

    return move_inputs


def _outputs_to(device: torch.device) -> _OutputHook:
    def move_outputs(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _to_device(output, device)

    return move_outputs

"""The one place edgespec reaches into private attributes of torch's and transformers' objects.

Each function says what it touches, why no public API does the job, and what would replace it.
tests/test_imports.py checks that no other module of the package reads or writes a private attribute of
an object it does not define itself.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_param) of the tensors `module` registers itself (not its children's); a tensor
    registered under two names is listed under both. (Public: named_parameters/named_buffers.)"""
    for name, t in module.named_parameters(recurse=False, remove_duplicate=False):
        yield name, t, True
    for name, t in module.named_buffers(recurse=False, remove_duplicate=False):
        yield name, t, False


def bind(module: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    """Put `value` under `name` in `module`'s parameter (or buffer) table as it is — a plain tensor too,
    no nn.Parameter wrapper, no autograd, no checks. Streaming binds every streamed weight into its layer
    and unbinds it again on every pass, and the self-drafter shares the target's very tensors. Touches
    `_parameters` / `_buffers`. The public route, setattr(module, name, nn.Parameter(value,
    requires_grad=False)), allocates a wrapper per tensor per pass and refuses plain tensors;
    torch.func.functional_call would need every forward rewritten."""
    (module._parameters if is_param else module._buffers)[name] = value


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward hooks (edgespec's streamer, accelerate's dispatch) wrap `module`: a forward that
    calls its submodules' weights directly would bypass them. Reads `_forward_pre_hooks`,
    `_forward_hooks` and accelerate's `_hf_hook`; torch has no public "is this module hooked"."""
    return bool(module._forward_pre_hooks or module._forward_hooks) or accelerate_hooked(module)


def accelerate_hooked(module: nn.Module) -> bool:
    """Whether accelerate dispatched `module` (device_map / its own offloading): its `_hf_hook`."""
    return getattr(module, "_hf_hook", None) is not None


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """The names of `module`'s own buffers that state_dict leaves out (`_non_persistent_buffers_set`;
    torch has no public reader: a state_dict round trip would materialise every tensor)."""
    return set(module._non_persistent_buffers_set)


def model_from_config(cls, config, dtype: torch.dtype):
    """A transformers model of class `cls` built from `config` with its weights in `dtype` from the start
    (transformers' `_from_config`; the public AutoModelForCausalLM.from_config goes through the auto
    class mapping, which padded benchmark shapes do not need)."""
    return cls._from_config(config, dtype=dtype)


def set_attn_implementation(config, name: str) -> None:
    """Choose the attention implementation a model built from `config` uses (transformers reads
    `config._attn_implementation` when it builds the modules; `model.set_attn_implementation` needs the
    model first)."""
    config._attn_implementation = name


def attn_implementation(config, default: str | None = None) -> str | None:
    """The attention implementation a model of `config` runs (`config._attn_implementation`, which
    transformers itself reads at every forward; no public getter)."""
    return getattr(config, "_attn_implementation", None) or default


def supports_sdpa(model) -> bool:
    """Whether transformers lets `model` run SDPA attention (its class's `_supports_sdpa`)."""
    return bool(getattr(model, "_supports_sdpa", False))


def derived_generation_config(gen) -> bool:
    """Whether a generation_config was derived from the model config (`_from_model_config`: the model
    ships no sampling settings of its own), as transformers' generate tells them apart."""
    return bool(getattr(gen, "_from_model_config", False))


def gpu_sleep(cycles: int) -> None:
    """Spin the current CUDA stream for `cycles` GPU clock cycles (`torch.cuda._sleep`): the emulated slow
    link on a GPU, a delay on the copy stream that the host never waits for. No public equivalent."""
    torch.cuda._sleep(cycles)


def gloo_options(timeout, device):
    """gloo's process-group options with `timeout` and one network `device` (the interface the group's
    sockets bind to). Touches ProcessGroupGloo._Options and its `_timeout` / `_devices`: torch has no
    public way to bind a standalone gloo group to a chosen address (init_process_group reads
    GLOO_SOCKET_IFNAME, an interface name, from the environment, for the one global group)."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [device]
    return opts

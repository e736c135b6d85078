"""CUDA tensors emulated on the CPU, for checking a GPU code path where there is no GPU.

A tensor made under ``EmulatedCuda`` with ``device="cuda"`` (or moved there with ``to_cuda``) says it
lives on ``cuda:0``, so code takes its CUDA branches, while its values live in a CPU tensor and every
op runs there. The mode records what would be a host round trip on a real GPU (a value read on the
host: ``int()``, ``bool()``, ``.item()``, ``.tolist()``, a copy to the CPU; an op whose output size
depends on values: ``nonzero``, boolean-mask indexing, ``unique``, ...) and fails an op that mixes a
CUDA tensor with a non-scalar CPU tensor, as CUDA would. Triton kernels launch interpreted on the CPU
values (``launch_on_cpu``), their Python wrappers still run under the mode.

What it cannot see: kernels' own device behaviour (the Triton grid runs under the interpreter), streams
and timing. It sees every host read of a device value that goes through a tensor method.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_map

aten = torch.ops.aten
CUDA = torch.device("cuda", 0)

# Ops whose output size is read from device values on the host (so a real GPU syncs).
_VALUE_SIZED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.masked_scatter.default}
# Ops where a CPU tensor beside a CUDA one is allowed (a copy, or CPU indices that PyTorch uploads).
_CROSS_DEVICE_OK = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
                    aten.index_put.default, aten._index_put_impl_.default}

_ACTIVE: list[EmulatedCuda] = []


class OnCuda(torch.Tensor):
    """A tensor that reports ``cuda:0`` and holds its values in ``cpu_values``."""

    cpu_values: torch.Tensor

    @staticmethod
    def __new__(cls, values: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, values.shape, strides=values.stride(),
                                                storage_offset=values.storage_offset(), dtype=values.dtype,
                                                device=CUDA, requires_grad=False)
        t.cpu_values = values
        return t

    def __repr__(self):
        return f"OnCuda({self.cpu_values!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on an emulated CUDA tensor outside EmulatedCuda")

    def _host_read(self, what: str):
        if _ACTIVE:  # outside the mode (after the step) reading values is what the caller asked for
            _ACTIVE[-1].record(f"{what} of a device tensor {tuple(self.shape)}")
        return self.cpu_values

    # Python-level reads of values do not reach the dispatcher as ops that name the device.
    def __int__(self):
        return int(self._host_read("int()"))

    def __index__(self):
        return self._host_read("index()").__index__()

    def __bool__(self):
        return bool(self._host_read("bool()"))

    def __float__(self):
        return float(self._host_read("float()"))

    def item(self):
        return self._host_read(".item()").item()

    def tolist(self):
        return self._host_read(".tolist()").tolist()

    def numpy(self, *args, **kwargs):
        return self._host_read(".numpy()").numpy(*args, **kwargs)

    # These Python bindings take a CUDA device guard before dispatch, which a CPU-only PyTorch lacks: run
    # them on the values (a view stays a view of them), recording what a GPU would sync on.
    def contiguous(self, memory_format=torch.contiguous_format):
        return _wrap(self.cpu_values.contiguous(memory_format=memory_format))

    def __invert__(self):
        return aten.bitwise_not(self)

    def copy_(self, src, non_blocking=False):
        return aten.copy_(self, src, non_blocking)

    def new_tensor(self, data, dtype=None):
        return OnCuda(torch.tensor(data, dtype=self.dtype if dtype is None else dtype))

    def cuda(self, *args, **kwargs):
        return self

    def __getitem__(self, index):
        return _wrap(self.cpu_values[_plain_index(index)])

    def __setitem__(self, index, value):
        self.cpu_values[_plain_index(index)] = cpu_values(value)


def _plain_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, OnCuda) and i.dtype == torch.bool for i in parts):
        _ACTIVE[-1].record("indexing with a device boolean mask sizes its output by device values")
    plain = tuple(cpu_values(i) for i in parts)
    return plain if isinstance(index, tuple) else plain[0]


def cpu_values(x):
    """An emulated CUDA tensor's values (anything else as it is)."""
    return x.cpu_values if isinstance(x, OnCuda) else x


def _wrap(x):
    return OnCuda(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnCuda) else x


class EmulatedCuda(TorchDispatchMode):
    """Records host round trips in ``self.round_trips``; raises on CPU/CUDA mixes."""

    def __init__(self):
        super().__init__()
        self.round_trips: list[str] = []

    def record(self, what: str) -> None:
        """Notes ``what`` with the innermost fastctx line that caused it."""
        frames = [f for f in traceback.extract_stack() if "/fastctx/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/fastctx/', 1)[1]}:{frames[-1].lineno}" if frames else "?"
        self.round_trips.append(f"{where}: {what}")

    def __enter__(self):
        self._saved_lazy_init = torch.cuda._lazy_init
        torch.cuda._lazy_init = lambda: None  # factories with device="cuda" reach the mode instead of failing
        torch._C._ensureCUDADeviceGuardSet()  # a no-op device guard where PyTorch has no CUDA (as FakeTensor)
        # torch.tensor(..., device="cuda") builds on the CPU and moves through the dispatcher (as FakeTensor)
        self._saved_lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.pop()
        torch.cuda._lazy_init = self._saved_lazy_init
        torch._C._set_only_lift_cpu_tensors(self._saved_lift)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {"cuda": False, "cpu": False}

        def to_values(x):
            if isinstance(x, OnCuda):
                seen["cuda"] = True
                return x.cpu_values
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                seen["cpu"] = True
            if isinstance(x, torch.device) and x.type == "cuda":
                seen["cuda"] = True
                return torch.device("cpu")
            return x

        plain_args, plain_kwargs = tree_map(to_values, args), tree_map(to_values, kwargs)
        to_host = func is aten._to_copy.default and torch.device(kwargs.get("device") or "cuda").type == "cpu"
        if func is aten.copy_.default and not isinstance(args[0], OnCuda) and isinstance(args[1], OnCuda):
            to_host = True
        if to_host:
            self.record(f"{func} to the host")
        elif seen["cuda"] and seen["cpu"] and func not in _CROSS_DEVICE_OK:
            raise RuntimeError(f"{func}: a CUDA tensor beside a non-scalar CPU tensor (CUDA would refuse this)")
        if seen["cuda"] and (func in _VALUE_SIZED or func is aten.index.Tensor and _bool_mask(args)):
            self.record(f"{func} sizes its output by device values")
        out = func(*plain_args, **plain_kwargs)
        if to_host or not seen["cuda"]:
            return out
        if "out" in kwargs:
            return kwargs["out"]
        if func.overloadpacket.__name__.endswith("_"):
            return args[0]  # in place: the CPU values changed under the caller's tensor
        return tree_map(_wrap, out)


def _bool_mask(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


def to_cuda(x):
    """A CPU tensor's emulated CUDA twin (sharing its values)."""
    return OnCuda(x)


class launch_on_cpu:
    """Stands in for a ``@triton.jit`` function (imported interpreted): ``kernel[grid](...)`` launches it
    on the arguments' CPU values under the interpreter, outside the mode."""

    def __init__(self, kernel, interpreted):
        self.kernel, self.interpreted = kernel, interpreted

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _disable_current_modes(), self.interpreted():
                return self.kernel[grid](*map(cpu_values, args), **{k: cpu_values(v) for k, v in kwargs.items()})

        return launch


def outside_emulation():
    """Plain PyTorch again inside ``emulated_cuda`` (for stand-ins of what is not checked)."""
    return _disable_current_modes()


emulated_cuda = EmulatedCuda  # ``with emulated_cuda() as mode``: the mode, its round trips in ``mode.round_trips``

"""Makes PyPI's CUDA-built ``torchvision`` importable beside a CPU ``torch``, for SGLang on CPU.

SGLang imports ``torchvision.transforms`` on its engine's import path. PyPI's torchvision wheel
is a CUDA build: its ops library links ``libtorch_cuda.so`` and does not load beside a CPU
torch, and then torchvision's own fake-tensor registrations for ``torchvision::nms`` and
``torchvision::qnms`` fail with "operator torchvision::nms does not exist". Defining those
two operator schemas first (no kernels: nothing on SGLang's text path calls them) lets the
import succeed. ``install()`` runs from a ``.pth`` file at interpreter start, so it also runs
in SGLang's spawned scheduler and detokenizer processes; it only adds an import hook, and
imports torch only when torchvision is imported.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # kept alive: the schemas live as long as this object


class _TorchvisionOps(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None  # the regular finders load torchvision


def define_missing_ops() -> None:
    global _library
    import torch

    missing = [op for op in _OPS if not _has_schema(op)]
    if missing and _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for op in missing:
            _library.define(op)


def _has_schema(op: str) -> bool:
    import torch

    try:
        torch._C._get_schema("torchvision::" + op.split("(")[0], "")
        return True
    except RuntimeError:
        return False


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionOps())

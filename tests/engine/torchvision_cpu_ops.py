"""torchvision's two unguarded operators, defined for a CPU-only torch.

Why this exists: PyPI's torchvision wheels for Linux are CUDA builds. Beside
the CPU build of torch (``torch==2.13.0+cpu``, the one vLLM's CPU build runs
on) their C++ extension cannot load (it links ``libtorch_cuda.so``), which
torchvision tolerates everywhere except in ``torchvision/_meta_registrations.py``:
it registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
without checking that the extension defined them, so ``import torchvision``
fails with "operator torchvision::nms does not exist". transformers'
Qwen2-VL image processor, which vLLM uses, needs torchvision's Python
transforms (pure torch), nothing from the extension.

The engine test's set-up (``tests/engine/setup_venv.sh``) installs this
module with a ``.pth`` line into the engine's virtual environment, only when
``import torchvision`` fails that way. It defines the two operators' schemas
(as torchvision's C++ does) with a plain torch CPU implementation, so that
torchvision imports (``torchvision.ops`` still says its C++ operators are
missing). Nothing else changes; with a torchvision whose extension loads,
this is never installed.
"""

from __future__ import annotations


def _nms(dets, scores, iou_threshold: float):
    import torch

    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.float().unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _qnms(dets, scores, iou_threshold: float):
    return _nms(dets.dequantize(), scores.dequantize(), iou_threshold)


def install() -> None:
    import torch

    try:
        torch.ops.torchvision.nms          # already defined (a torchvision extension loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms, "CPU")
    lib.impl("qnms", _qnms, "QuantizedCPU")
    globals()["_LIB"] = lib                # the definitions live as long as the library object


try:
    install()
except Exception:  # pragma: no cover - never break interpreter start-up
    pass

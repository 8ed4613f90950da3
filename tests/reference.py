"""Independent reference: torchxrayvision's own reader and model (tests only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def xrv_input(path: Path) -> np.ndarray:
    import torchxrayvision as xrv

    img = xrv.utils.read_xray_dcm(str(path))
    return np.asarray(xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(img[None])))


def xrv_outputs(img: np.ndarray, weights_dir: Path) -> dict[str, float]:
    """The 18 outputs of xrv's densenet121-res224-all loaded from ``weights_dir``."""
    import torch
    import torchxrayvision as xrv

    model = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(weights_dir))
    with torch.no_grad():
        out = model(torch.from_numpy(img)[None]).numpy()[0]
    return {name: float(v) for name, v in zip(model.pathologies, out, strict=True)}

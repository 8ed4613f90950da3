"""The classifier: torchxrayvision's DenseNet-121 ``densenet121-res224-all``.

The weights file is read into memory once; those bytes are hashed and those same bytes are
unpickled (a file swapped after the check is never loaded). ``torch.load`` unpickles and so
can run code: only the published file (its SHA-256 equal to :data:`OFFICIAL_SHA256`) is
fully unpickled. Any other file is refused unless ``model.allow_untrained`` is set; it is then
unpickled by torch's restricted unpickler (``weights_only=True``) allowing only the classes a
torchxrayvision DenseNet pickle holds, and a file that needs anything else is not loaded at
all (the architecture runs untrained). ``model.unsafe_unpickle_unverified_weights`` lifts
that restriction. Whatever the file, the module is built as torchxrayvision's own loader
(``xrv.models.DenseNet(weights=..., cache_dir=...)``) builds it; the model is labelled
untrained everywhere unless the file is the published one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import pickle
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from node.analysis.graph import traced
from node.analysis.streams import Streams, start_streams
from node.analysis.threads import apply_wait_policy
from node.core.config import ModelConfig
from node.core.errors import ModelError

log = logging.getLogger(__name__)

# SHA-256 of the file torchxrayvision downloads for densenet121-res224-all
# (nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-...-best.pt, 28,382,008 bytes).
OFFICIAL_SHA256 = {
    "densenet121-res224-all": "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899",
}
# where torchxrayvision downloads it from (xrv.models.model_urls, pinned with the hash above,
# so that `cxr-node check` names the file without importing torch; tests/analysis/test_model.py
# checks it against xrv's own)
OFFICIAL_URL = {
    "densenet121-res224-all": "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0"
    "-best.pt",
}
UNTRAINED_LABEL = "UNTRAINED - NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class ModelInfo:
    """Everything the report needs to say which model produced a result."""

    weights: str
    weights_file: str
    weights_sha256: str
    library_version: str
    trained: bool
    pathologies: tuple[str, ...]
    op_threshs: tuple[float, ...]

    @property
    def name(self) -> str:
        base = f"torchxrayvision {self.weights}"
        return base if self.trained else f"{base} [{UNTRAINED_LABEL}]"

    @property
    def model_id(self) -> str:
        return f"{self.weights}@{self.weights_sha256[:16]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


DYNAMO_UTILS = "torch._dynamo.utils"


def import_xrv() -> ModuleType:
    """torchxrayvision, imported without torch's compiler stack.

    xrv imports torchvision, whose ``ops.roi_align`` imports ``torch._dynamo.utils`` for a
    single helper, ``is_compile_supported`` (torchvision meant to keep dynamo out of eager
    users' imports: pytorch/vision#8436). That drags in dynamo, sympy, torch.distributed
    and triton: memory and start-up time for a node that never compiles (measured in
    bench/RESULTS.md, third session, Memory). So while xrv is first imported, that one
    module is a stand-in whose helper imports the real one when called; it leaves
    ``sys.modules`` right after, so any later ``import torch._dynamo`` gets the real package.
    """
    loaded = sys.modules.get("torchxrayvision")
    if loaded is not None:
        return loaded
    with _dynamo_utils_deferred():
        import torchxrayvision

    module: ModuleType = torchxrayvision
    return module


@contextlib.contextmanager
def _dynamo_utils_deferred() -> Iterator[None]:
    if DYNAMO_UTILS in sys.modules or "torchvision" in sys.modules:
        yield  # already imported: nothing to spare
        return
    stand_in = ModuleType(DYNAMO_UTILS, "stand-in while torchvision is imported (node.model)")

    def is_compile_supported(device_type: str) -> bool:
        from torch._dynamo.utils import is_compile_supported as real

        return bool(real(device_type))

    stand_in.is_compile_supported = is_compile_supported  # type: ignore[attr-defined]
    sys.modules[DYNAMO_UTILS] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]


def expected_weights_path(cfg: ModelConfig) -> tuple[Path, str]:
    """Return (the file torchxrayvision loads, the URL it downloads it from)."""
    url = OFFICIAL_URL[cfg.weights]
    name = os.path.basename(url)
    if cfg.weights_file is not None:
        path = cfg.weights_file.expanduser()
        if path.name != name:
            raise ModelError(
                f"model.weights_file must be named {name} (torchxrayvision's file name), got {path}"
            )
        return path, url
    return cfg.cache_dir.expanduser() / name, url


def _missing_message(path: Path, url: str) -> str:
    return (
        f"model weights not found: {path}\n"
        f"  download {url}\n"
        f"  and place it at {path} (set model.cache_dir or model.weights_file to use another "
        "folder),\n  or set model.allow_untrained = true to run an untrained model "
        "(outputs are marked NOT FOR CLINICAL USE)"
    )


def _try_download(cfg: ModelConfig, path: Path, url: str) -> None:
    xrv = import_xrv()

    log.info("weights %s missing: downloading %s", path, url)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            xrv.models.get_weights(cfg.weights, cache_dir=str(path.parent))
    except Exception as exc:  # requests/OS errors: any failure means "not available"
        log.warning("download of %s failed: %s", url, exc)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device = 'cuda' but no CUDA device is available")
    return name


class Classifier:
    """Wraps the torch module; ``predict`` takes a batch and returns probabilities."""

    def __init__(self, module: Any, info: ModelInfo, device: str) -> None:
        self._module = module
        self.info = info
        self.device = device
        self.traced = False
        self._streams: Streams | None = None

    def trace(self, channels_last: bool = True, streams: int = 1) -> bool:
        """Run DenseNet-121's layers as a TorchScript graph from now on, where it is checked
        to compute what the module does (:mod:`node.analysis.graph`, ``model.trace``);
        returns whether it does. Before the first batch, in the thread that runs the model;
        ``channels_last``: the graph's weights in that layout (``model.channels_last``);
        ``streams``: parts of each batch run through the graph at once
        (:mod:`node.analysis.streams`, ``model.streams``)."""
        if self.traced:
            return True
        try:
            graph = traced(self._module.features, self.device, channels_last)
        except Exception as exc:  # whatever it is, the module runs as it is
            log.warning("model.trace: not traced (%s: %s); eager", type(exc).__name__, exc)
            return False
        if graph is not None:
            self._module.features = graph
            self.traced = True
            self._streams = start_streams(streams)
        return self.traced

    def trace_as_configured(self, cfg: ModelConfig) -> bool:
        """:meth:`trace` as ``cfg`` says (``model.trace``, ``.channels_last``, ``.streams``
        capped at the batch); returns whether the graph runs."""
        return cfg.trace and self.trace(cfg.channels_last, cfg.batch_streams)

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``batch`` is ``(N, 1, 224, 224)`` in [-1024, 1024]; returns ``(N, 18)``."""
        return self._forward(batch, maps=False)[0]

    def predict_with_maps(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """As :meth:`predict`, from the same forward pass, with DenseNet-121's last feature
        map (``features`` after its ReLU, before the pooling): ``(N, 18)`` scores and
        ``(N, 1024, 7, 7)`` maps for a 224 input."""
        scores, maps = self._forward(batch, maps=True)
        assert maps is not None
        return scores, maps

    def _forward(
        self, batch: npt.NDArray[np.float32], maps: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        """xrv's ``DenseNet.forward`` (``features2``, ``classifier``, ``op_norm``), written
        out so that the feature map is kept and the layers may run in streams."""
        import torch
        import torch.nn.functional as F

        if batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"batch must have shape (N, 1, H, W), got {batch.shape}")
        m = self._module
        xrv = import_xrv()
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            if hasattr(m, "input_resolution"):
                x = xrv.utils.fix_resolution(x, m.input_resolution, m)
            features = m.features(x) if self._streams is None else self._streams(m.features, x)
            relu = F.relu(features)
            out = m.classifier(F.adaptive_avg_pool2d(relu, (1, 1)).flatten(1))
            if getattr(m, "op_threshs", None) is not None:
                out = xrv.models.op_norm(torch.sigmoid(out), m.op_threshs)
            elif getattr(m, "apply_sigmoid", False):
                out = torch.sigmoid(out)
            scores = np.asarray(out.cpu().numpy(), dtype=np.float32)
            if not maps:
                return scores, None
            return scores, np.asarray(relu.contiguous().cpu().numpy(), dtype=np.float32)

    def class_weights(self) -> npt.NDArray[np.float32]:
        """The classifier's weight matrix ``(18, 1024)``: finding k's class activation map
        is ``sum_c W[k, c] * F[c]`` over the feature map ``F`` (its bias shifts the map by a
        constant, irrelevant to its shape)."""
        weight = self._module.classifier.weight
        return np.asarray(weight.detach().cpu().numpy(), dtype=np.float32)


def _build_untrained(cfg: ModelConfig) -> Any:
    import torch

    xrv = import_xrv()

    threshs = xrv.models.model_urls[cfg.weights]["op_threshs"]
    return xrv.models.DenseNet(weights=None, op_threshs=torch.tensor(threshs)).eval()


def _read_weights(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read weights file {path}: {exc}") from exc


def densenet_pickle_classes() -> tuple[type[Any], ...]:
    """The classes a torchxrayvision DenseNet pickle (``torch.save(model)``) holds, and no more."""
    from torch import nn

    models = import_xrv().models
    return (
        models.DenseNet,
        models._DenseBlock,
        models._DenseLayer,
        models._Transition,
        nn.Sequential,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.Linear,
    )


def _unpickle(data: bytes, *, restricted: bool) -> Any:
    """``torch.load`` of ``data``; ``restricted``: torch's weights-only unpickler, which raises
    :class:`pickle.UnpicklingError` for any global outside :func:`densenet_pickle_classes`."""
    import torch

    if not restricted:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(list(densenet_pickle_classes())):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its page of advice."""
    text = str(exc)
    if found := _REFUSED_GLOBAL.search(text):
        return f"{found.group(1)} is not allowed"
    if found := _UNPICKLER_ERROR.search(text):
        return found.group(1).strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _densenet_from(saved: Any, cfg: ModelConfig, path: Path) -> Any:
    """What ``xrv.models.DenseNet(weights=cfg.weights, cache_dir=...)`` does with the object
    ``torch.load`` returned (torchxrayvision's models.py, ``DenseNet.__init__``)."""
    import torch

    xrv = import_xrv()

    spec = xrv.models.model_urls[cfg.weights]
    module = xrv.models.DenseNet(weights=None, num_classes=len(spec["labels"]))
    module.weights = cfg.weights
    module.targets = module.pathologies = spec["labels"]
    module.weights_filename_local = str(path)
    for mod in saved.modules():  # xrv's patch for old pickles (pytorch/pytorch#42242)
        if not hasattr(mod, "_non_persistent_buffers_set"):
            mod._non_persistent_buffers_set = set()
    module.load_state_dict(saved.state_dict())
    module.eval()
    if "op_threshs" in spec:
        module.op_threshs = torch.tensor(spec["op_threshs"])
    if "input_resolution" in spec:
        module.input_resolution = spec["input_resolution"]
    return module


def _unpickle_checked(cfg: ModelConfig, path: Path, data: bytes, digest: str) -> Any | None:
    """The unpickled file, or None where the restricted unpickler refused it."""
    if digest == OFFICIAL_SHA256[cfg.weights]:
        return _unpickle(data, restricted=False)
    if cfg.unsafe_unpickle_unverified_weights:
        log.warning(
            "weights file %s (SHA-256 %s) is not the published file and is unpickled "
            "UNVERIFIED (model.unsafe_unpickle_unverified_weights = true): it can run code",
            path,
            digest,
        )
        return _unpickle(data, restricted=False)
    try:
        return _unpickle(data, restricted=True)
    except pickle.UnpicklingError as exc:
        log.warning(
            "weights file %s (SHA-256 %s) not loaded: it is unverified and the restricted "
            "unpickler refused it (%s); running the architecture without weights",
            path,
            digest,
            _refusal_reason(exc),
        )
        return None


def _load_file(cfg: ModelConfig, path: Path) -> tuple[Any, str, bool, str]:
    """(module, SHA-256, trained, weights file) from the file at ``path``, read once."""
    data = _read_weights(path)
    digest = hashlib.sha256(data).hexdigest()
    expected = OFFICIAL_SHA256[cfg.weights]
    log.info("weights file %s, SHA-256 %s", path, digest)
    trained = digest == expected
    if not trained and not cfg.allow_untrained:
        raise ModelError(
            f"weights file {path} has SHA-256 {digest}, not the published {expected}: "
            "refusing to load it (torch.load can run code). Replace the file, or set "
            "model.allow_untrained = true to run it marked NOT FOR CLINICAL USE"
        )
    try:
        saved = _unpickle_checked(cfg, path, data, digest)
        module = None if saved is None else _densenet_from(saved, cfg, path)
    except Exception as exc:  # torch.load raises many types for a broken file
        raise ModelError(f"cannot load weights file {path}: {exc}") from exc
    if module is None:
        return _build_untrained(cfg), "none", False, ""
    return module, digest, trained, str(path)


def load_classifier(cfg: ModelConfig) -> Classifier:
    """Load the model as configured, or raise :class:`ModelError` with what to do."""
    apply_wait_policy(cfg.omp_wait_policy)  # before torch loads libgomp
    import torch

    xrv = import_xrv()

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path, url = expected_weights_path(cfg)
    if not path.is_file() and cfg.allow_download:
        _try_download(cfg, path, url)
    if path.is_file():
        module, digest, trained, weights_file = _load_file(cfg, path)
    elif cfg.allow_untrained:
        log.warning("weights %s not found: running an UNTRAINED model", path)
        module, digest, trained, weights_file = _build_untrained(cfg), "none", False, ""
    else:
        raise ModelError(_missing_message(path, url))
    device = _resolve_device(cfg.device)
    module = module.to(device).eval()
    spec = xrv.models.model_urls[cfg.weights]
    info = ModelInfo(
        weights=cfg.weights,
        weights_file=weights_file,
        weights_sha256=digest,
        library_version=xrv.__version__,
        trained=trained,
        pathologies=tuple(str(p) for p in spec["labels"]),
        op_threshs=tuple(float(t) for t in spec["op_threshs"]),
    )
    if not trained:
        log.warning("model %s is %s", info.name, UNTRAINED_LABEL)
    return Classifier(module, info, device)


@dataclass(frozen=True)
class Finding:
    """One pathology's result for one image.

    ``score`` is torchxrayvision's output: a sigmoid probability re-scaled by ``op_norm``
    so that 0.5 is the pathology's operating threshold; ``present`` is ``score >= 0.5``.
    """

    pathology: str
    score: float
    threshold: float
    present: bool

    @property
    def probability(self) -> float | None:
        """The model's own sigmoid probability, before xrv's ``op_norm`` (which maps the
        operating threshold ``threshold`` to 0.5); None where the threshold is undefined."""
        t = self.threshold
        if math.isnan(t) or not 0.0 < t < 1.0:
            return None
        s = self.score
        return 2.0 * s * t if s < 0.5 else 1.0 - 2.0 * (1.0 - s) * (1.0 - t)


def class_maps(
    features: npt.NDArray[np.float32], weights: npt.NDArray[np.float32], which: Sequence[int]
) -> npt.NDArray[np.float32]:
    """Exact class activation maps of one image (pure): ``features`` ``(C, h, w)``, the
    classifier's ``weights`` ``(K, C)``; returns ``(len(which), h, w)``, one map per finding
    index in ``which``: ``sum_c W[k, c] * F[c]``."""
    c, h, w = features.shape
    picked = weights[list(which)]
    return np.asarray(picked @ features.reshape(c, h * w), dtype=np.float32).reshape(-1, h, w)


def to_findings(scores: npt.NDArray[np.float32], info: ModelInfo) -> tuple[Finding, ...]:
    """Pair one image's 18 outputs with their pathologies and thresholded labels (pure)."""
    if scores.shape != (len(info.pathologies),):
        raise ValueError(f"expected {len(info.pathologies)} scores, got shape {scores.shape}")
    return tuple(
        Finding(name, float(s), float(t), bool(s >= 0.5))
        for name, s, t in zip(info.pathologies, scores.tolist(), info.op_threshs, strict=True)
    )

"""Weights loading: the module torchxrayvision's loader builds, the untrained guard, and no
unverified pickle run as code."""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import write_config
from helpers import NIH, WEIGHTS_NAME
from reference import xrv_input, xrv_outputs

from node.analysis.model import OFFICIAL_SHA256, UNTRAINED_LABEL, load_classifier, sha256_file
from node.core.config import ModelConfig, load_config
from node.core.errors import ConfigError, ModelError


def test_checkpoint_loads_through_xrv_loader_and_is_labelled_untrained(weights_dir):
    clf = load_classifier(
        ModelConfig(cache_dir=weights_dir, allow_untrained=True, allow_download=False)
    )
    assert clf.info.weights_file == str(weights_dir / WEIGHTS_NAME)
    assert clf.info.weights_sha256 == sha256_file(weights_dir / WEIGHTS_NAME)
    assert clf.info.weights_sha256 != OFFICIAL_SHA256["densenet121-res224-all"]
    assert not clf.info.trained and UNTRAINED_LABEL in clf.info.name
    assert len(clf.info.pathologies) == 18
    img = xrv_input(NIH)
    got = clf.predict(img[None])[0]
    want = xrv_outputs(img, weights_dir)
    np.testing.assert_allclose(got, list(want.values()), atol=1e-6)


def test_unverified_weights_refused_without_allow_untrained(weights_dir):
    with pytest.raises(ModelError, match=r"SHA-256 .* not the published"):
        load_classifier(ModelConfig(cache_dir=weights_dir, allow_download=False))


def test_tampered_weights_refused(weights_dir, tmp_path):
    bad = tmp_path / WEIGHTS_NAME
    shutil.copy(weights_dir / WEIGHTS_NAME, bad)
    with bad.open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="refusing to load"):
        load_classifier(ModelConfig(cache_dir=tmp_path, allow_download=False))


def test_missing_weights_message_names_file_url_and_place(tmp_path):
    with pytest.raises(ModelError) as err:
        load_classifier(ModelConfig(cache_dir=tmp_path, allow_download=False))
    text = str(err.value)
    assert str(tmp_path / WEIGHTS_NAME) in text
    assert "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + WEIGHTS_NAME in text


def test_the_pinned_weights_url_is_torchxrayvisions(tmp_path):
    """expected_weights_path names the file without importing torch (cxr-node check)."""
    from node.analysis.model import OFFICIAL_URL, import_xrv

    for name, url in OFFICIAL_URL.items():
        assert import_xrv().models.model_urls[name]["weights_url"] == url
    code = (
        "import sys; from node.core.config import ModelConfig; "
        "from node.analysis.model import expected_weights_path as e; e(ModelConfig()); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_weights_without_file_runs_untrained_when_allowed(tmp_path):
    clf = load_classifier(
        ModelConfig(cache_dir=tmp_path, allow_untrained=True, allow_download=False)
    )
    assert not clf.info.trained and clf.info.weights_file == ""


def test_serve_exits_nonzero_when_weights_missing_and_download_fails(tmp_path):
    """The real download path runs and fails (no network: a dead proxy makes that certain)."""
    conf = write_config(
        tmp_path / "n.toml",
        {
            "scp": {"port": 0},
            "spool": {"directory": str(tmp_path / "spool")},
            "model": {"cache_dir": str(tmp_path / "models"), "allow_download": True},
        },
    )
    env = {
        **os.environ,
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-m", "node", "serve", "--config", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0
    assert "model weights not found" in done.stderr
    assert str(tmp_path / "models" / WEIGHTS_NAME) in done.stderr
    assert "https://github.com/mlmed/torchxrayvision/releases/download/v1/" in done.stderr
    assert "Traceback" not in done.stderr


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="no CUDA device on this machine")
def test_gpu_and_cpu_give_the_same_scores(weights_dir):
    """device = auto picks the GPU when there is one; its scores equal the CPU's."""
    cfg = {"cache_dir": weights_dir, "allow_untrained": True, "allow_download": False}
    cpu = load_classifier(ModelConfig(**cfg, device="cpu"))
    gpu = load_classifier(ModelConfig(**cfg, device="auto"))
    assert str(gpu.device).startswith("cuda")
    batch = np.stack([xrv_input(NIH)] * 4)
    np.testing.assert_allclose(gpu.predict(batch), cpu.predict(batch), atol=1e-3)


def test_xrv_is_imported_without_torchs_compiler_stack():
    """node.analysis.model.import_xrv keeps torchvision's roi_align from importing
    torch._dynamo (and sympy, triton: ~125 MB); the stand-in is gone afterwards and defers to
    the real one."""
    probe = (
        "import sys\n"
        "from node.analysis.model import import_xrv\n"
        "xrv = import_xrv()\n"
        "assert xrv.models.DenseNet is not None\n"
        "heavy = [m for m in ('torch._dynamo', 'torch._dynamo.utils', 'sympy', 'triton')"
        " if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "helper = sys.modules['torchvision.ops.roi_align'].is_compile_supported\n"
        "assert helper('cpu') is True\n"  # the real helper, imported on first use
        "import torch._dynamo.utils as real\n"
        "assert hasattr(real, 'counters'), 'a later import gets the real module'\n"
        "assert import_xrv() is xrv\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


class _RunsCode:
    """Unpickles as ``model`` after touching ``marker``: a checkpoint that works and runs code."""

    def __init__(self, marker: Path, model: Any) -> None:
        self.marker, self.model = marker, model

    def __reduce__(self) -> tuple[Any, ...]:
        return (operator.getitem, ((_Touch(self.marker), self.model), 1))


def _hostile_checkpoint(
    weights_dir: Path, folder: Path, marker: Path, legacy: bool = False
) -> Path:
    """The test checkpoint's model, saved by torch.save wrapped in a pickle that runs code."""
    import torch

    model = torch.load(weights_dir / WEIGHTS_NAME, map_location="cpu", weights_only=False)
    folder.mkdir(exist_ok=True)
    path = folder / WEIGHTS_NAME
    torch.save(_RunsCode(marker, model), path, _use_new_zipfile_serialization=not legacy)
    return path


def _warnings(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "node.analysis.model"
        and word in r.getMessage()
    ]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_unverified_pickle_that_runs_code_is_refused_and_the_architecture_runs_untrained(
    weights_dir, tmp_path, caplog, legacy
):
    marker = tmp_path / "MARKER"
    path = _hostile_checkpoint(weights_dir, tmp_path / "models", marker, legacy)
    digest = sha256_file(path)
    cfg = ModelConfig(cache_dir=path.parent, allow_untrained=True, allow_download=False)
    with caplog.at_level(logging.WARNING, logger="node.analysis.model"):
        clf = load_classifier(cfg)
    assert not marker.exists(), "the pickle ran code"
    assert not clf.info.trained and UNTRAINED_LABEL in clf.info.name
    assert clf.info.weights_file == "" and clf.info.weights_sha256 == "none"
    assert clf.predict(np.stack([xrv_input(NIH)] * 2)).shape == (2, 18)
    (refused,) = _warnings(caplog, "not loaded")
    assert str(path) in refused and digest in refused
    assert "restricted unpickler refused it (_operator.getitem is not allowed)" in refused
    assert "trusted source" not in refused  # torch's reason, without its advice


def test_unverified_checkpoint_is_unpickled_restricted_into_the_module_xrv_builds(
    weights_dir, monkeypatch
):
    """Only torch's weights-only unpickler reads it; the module equals xrv's loader's own."""
    import torch
    import torchxrayvision as xrv

    real_load, weights_only = torch.load, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    clf = load_classifier(
        ModelConfig(cache_dir=weights_dir, allow_untrained=True, allow_download=False)
    )
    monkeypatch.undo()
    assert weights_only == [True]
    got = clf._module
    want = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(weights_dir))
    assert type(got) is type(want) and repr(got) == repr(want) and not got.training
    assert set(vars(got)) == set(vars(want))
    for name in ("weights", "targets", "pathologies", "input_resolution", "apply_sigmoid"):
        assert getattr(got, name) == getattr(want, name), name
    assert got.weights_filename_local == want.weights_filename_local
    assert got.state_dict().keys() == want.state_dict().keys()
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key
    img = xrv_input(NIH)
    with torch.no_grad():
        expected = want(torch.from_numpy(img)[None]).numpy()[0]
    np.testing.assert_allclose(clf.predict(img[None])[0], expected, atol=1e-6)


def test_the_bytes_loaded_are_the_bytes_hashed(weights_dir, tmp_path, monkeypatch):
    """A verified file swapped for a hostile one once hashed: the hashed bytes are loaded."""
    path = tmp_path / "models" / WEIGHTS_NAME
    path.parent.mkdir()
    shutil.copy(weights_dir / WEIGHTS_NAME, path)
    digest = sha256_file(path)
    monkeypatch.setitem(OFFICIAL_SHA256, "densenet121-res224-all", digest)  # as if published
    marker = tmp_path / "MARKER"
    hostile = _hostile_checkpoint(weights_dir, tmp_path / "hostile", marker)

    def sha256_then_swap(*data: bytes) -> SimpleNamespace:
        real = hashlib.sha256(*data)

        def hexdigest() -> str:
            if hostile.exists():
                os.replace(hostile, path)
            return real.hexdigest()

        return SimpleNamespace(update=real.update, hexdigest=hexdigest)

    monkeypatch.setattr("node.analysis.model.hashlib", SimpleNamespace(sha256=sha256_then_swap))
    clf = load_classifier(ModelConfig(cache_dir=path.parent, allow_download=False))
    assert not hostile.exists(), "the file was not swapped: the test did not run"
    assert not marker.exists(), "the swapped-in file was unpickled"
    assert clf.info.trained and clf.info.weights_sha256 == digest
    img = xrv_input(NIH)
    want = xrv_outputs(img, weights_dir)
    np.testing.assert_allclose(clf.predict(img[None])[0], list(want.values()), atol=1e-6)


def test_unsafe_option_fully_unpickles_an_unverified_file_and_says_so(
    weights_dir, tmp_path, caplog
):
    marker = tmp_path / "MARKER"
    path = _hostile_checkpoint(weights_dir, tmp_path / "models", marker)
    digest = sha256_file(path)
    cfg = ModelConfig(
        cache_dir=path.parent,
        allow_untrained=True,
        unsafe_unpickle_unverified_weights=True,
        allow_download=False,
    )
    with caplog.at_level(logging.WARNING, logger="node.analysis.model"):
        clf = load_classifier(cfg)
    assert marker.exists(), "the full unpickle did not run"
    assert not clf.info.trained and clf.info.weights_sha256 == digest
    assert clf.info.weights_file == str(path)
    (warned,) = _warnings(caplog, "UNVERIFIED")
    assert str(path) in warned and digest in warned and "can run code" in warned
    img = xrv_input(NIH)
    want = xrv_outputs(img, weights_dir)
    np.testing.assert_allclose(clf.predict(img[None])[0], list(want.values()), atol=1e-6)


def test_unsafe_option_is_set_from_the_environment_and_needs_allow_untrained():
    env = {
        "CXR_NODE_MODEL__UNSAFE_UNPICKLE_UNVERIFIED_WEIGHTS": "true",
        "CXR_NODE_MODEL__ALLOW_UNTRAINED": "true",
    }
    assert load_config(None, env).model.unsafe_unpickle_unverified_weights
    assert not load_config(None, {}).model.unsafe_unpickle_unverified_weights
    del env["CXR_NODE_MODEL__ALLOW_UNTRAINED"]
    with pytest.raises(ConfigError, match=r"needs model\.allow_untrained"):
        load_config(None, env)


SPIN_PROBE = """
import sys
from node.core.config import ModelConfig
from node.analysis.model import load_classifier
load_classifier(ModelConfig(cache_dir=sys.argv[1], allow_untrained=True, allow_download=False,
                            omp_wait_policy=sys.argv[2]))
"""


@pytest.mark.parametrize(
    ("policy", "environment", "spin_count"),
    [("passive", None, "0"), ("passive", "ACTIVE", "30000000000")],
)
def test_torchs_openmp_threads_wait_as_configured(tmp_path, policy, environment, spin_count):
    """libgomp prints its settings when torch loads it (OMP_DISPLAY_ENV): with the default
    ``passive`` its threads never spin (libgomp's default: 300000); an OMP_WAIT_POLICY in
    the environment wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    if environment:
        env["OMP_WAIT_POLICY"] = environment
    out = subprocess.run(
        [sys.executable, "-c", SPIN_PROBE, str(tmp_path), policy],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert f"GOMP_SPINCOUNT = '{spin_count}" in out.stderr, out.stderr[-2000:]

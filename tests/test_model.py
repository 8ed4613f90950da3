"""Weights loading through torchxrayvision's own code, and the untrained guard."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_config
from helpers import NIH, WEIGHTS_NAME
from reference import xrv_input, xrv_outputs

from node.config import ModelConfig
from node.errors import ModelError
from node.model import OFFICIAL_SHA256, UNTRAINED_LABEL, load_classifier, sha256_file


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
    """node.model.import_xrv keeps torchvision's roi_align from importing torch._dynamo (and
    sympy, triton: ~125 MB); the stand-in is gone afterwards and defers to the real one."""
    probe = (
        "import sys\n"
        "from node.model import import_xrv\n"
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

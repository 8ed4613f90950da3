"""Compressed and re-encoded variants of the shared files, made at test time with dcmtk/gdcm,
preprocess to the same array as the uncompressed original."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import ACRNEMA, NIH

from node.analysis.preprocess import preprocess
from node.dicom.dicomio import read_dataset

TRANSCODERS = {
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70"),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80"),
    "jpeg2000-lossless": (["gdcmconv", "--j2k"], "1.2.840.10008.1.2.4.90"),
    "rle": (["dcmcrle"], "1.2.840.10008.1.2.5"),
    "explicit-big-endian": (["dcmconv", "+tb"], "1.2.840.10008.1.2.2"),
    "deflate": (["dcmconv", "+td"], "1.2.840.10008.1.2.1.99"),
}


def transcode(src: Path, kind: str, out_dir: Path) -> Path:
    cmd, _ = TRANSCODERS[kind]
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} not installed")
    out = out_dir / f"{src.stem}-{kind}.dcm"
    subprocess.run([*cmd, str(src), str(out)], check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.parametrize("kind", sorted(TRANSCODERS))
@pytest.mark.parametrize("src", [NIH, ACRNEMA], ids=["nih", "acrnema"])
def test_transcode_preprocesses_like_the_original(tmp_path, src, kind):
    out = transcode(src, kind, tmp_path)
    ds = read_dataset(out)
    assert ds.file_meta.TransferSyntaxUID == TRANSCODERS[kind][1]
    np.testing.assert_allclose(preprocess(ds).array, preprocess(read_dataset(src)).array, atol=1e-3)

"""Integration: the summary image through real Orthanc: routed image -> node (stand-in model)
-> SR and summary image back in the same study; Orthanc renders the summary (its preview)."""

from __future__ import annotations

import os
import subprocess
from io import BytesIO

import numpy as np
import pydicom
import pytest
from helpers import NIH, chest_images, free_port, wait_for
from test_summary import _summary_refs

from node.sr.summary import banner_height

pytestmark = pytest.mark.integration

SC = "1.2.840.10008.5.1.4.1.1.7"


def test_orthanc_renders_the_summary_image_beside_the_sr(orthanc_factory, node_factory, tmp_path):
    from PIL import Image

    node_port = free_port()
    orthanc = orthanc_factory(node_port)
    node_factory(orthanc.dicom_port, port=node_port, model=False, report={"summary_image": True})
    square = pydicom.dcmread(NIH)
    [wide] = chest_images(1, seed="landscape")  # 700 x 1024: a landscape image
    wide.PixelData = np.ascontiguousarray(wide.pixel_array[100:800]).tobytes()
    wide.Rows = 700
    files = [NIH, tmp_path / "wide.dcm"]
    wide.save_as(files[1])
    done = subprocess.run(
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    def instances(modality: str) -> list[str] | None:
        query = {"StudyInstanceUID": square.StudyInstanceUID, "Modality": modality}
        found = orthanc.rest.find("Instance", query)
        return found if len(found) == 2 else None

    ids = wait_for(lambda: instances("OT"), 90, "both summary images to reach Orthanc")
    srs = wait_for(lambda: instances("SR"), 30, "both SRs to reach Orthanc")
    summary_uids = set()
    for instance in srs:  # each SR references its summary image, which Orthanc holds
        sr = pydicom.dcmread(BytesIO(orthanc.rest.file(instance)))
        [uid] = _summary_refs(sr)
        summary_uids.add(uid)
    shapes = {}
    for instance in ids:
        sc = pydicom.dcmread(BytesIO(orthanc.rest.file(instance)))
        assert sc.SOPClassUID == SC and sc.BurnedInAnnotation == "YES"
        source = sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        assert sc.SeriesDescription == "AI CXR summary, not for diagnosis [UNTRAINED]"
        png = orthanc.rest._req(f"/instances/{instance}/preview")
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(BytesIO(png))
        image.load()
        shapes[source] = image.size
        summary_uids.discard(sc.SOPInstanceUID)
        assert image.size == (sc.Columns, sc.Rows)
        pixels = np.asarray(image.convert("RGB")).astype(int)
        band = pixels[: banner_height(sc.Columns, sc.Rows)]
        assert (band[..., 0] - band[..., 1] > 100).mean() > 0.5  # the red UNTRAINED banner
        assert (band.min(axis=2) > 200).sum() > 50  # with its text in white
    assert shapes == {square.SOPInstanceUID: (1024, 1024), wide.SOPInstanceUID: (1024, 700)}
    assert summary_uids == set()  # every referenced summary image is in Orthanc

"""Fail closed: Orthanc run with this repository's orthanc.json never lets an empty user name
and password in, even where ORTHANC_USER / ORTHANC_PASSWORD are unset (Orthanc then
substitutes empty strings into RegisteredUsers)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import stop_process
from helpers import ROOT, http_status, move_orthanc, wait_for

pytestmark = pytest.mark.integration


def test_orthanc_without_the_credential_variables_lets_nobody_in(tmp_path):
    cfg = json.loads((ROOT / "orthanc.json").read_text())
    http = move_orthanc(cfg, tmp_path, ROOT / "config")
    assert cfg["RemoteAccessAllowed"] and cfg["AuthenticationEnabled"]
    conf = tmp_path / "orthanc.json"
    conf.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in {"ORTHANC_USER", "ORTHANC_PASSWORD"}}
    log = tmp_path / "orthanc.log"
    proc = subprocess.Popen(
        ["/usr/sbin/Orthanc", str(conf)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        # up once it answers at all (401: it is listening)
        wait_for(lambda: proc.poll() is not None or _answers(http), 30, "Orthanc")
        assert proc.poll() is None, log.read_text()
        assert http_status(http, ("", "")) == 403  # was 200: the empty user was let in
        assert http_status(http, None) == 401
        assert http_status(http, ("", ""), "/instances") == 403
    finally:
        stop_process(proc, 10)
    assert "no user name (set ORTHANC_USER / ORTHANC_PASSWORD" in log.read_text()


def _answers(port: int) -> bool:
    try:
        return http_status(port, None) > 0
    except OSError:
        return False

"""Unit: config precedence, triage rule, spool transitions, backoff."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from conftest import write_config
from helpers import ACRNEMA, NIH
from pydantic import ValidationError
from pydicom.dataset import Dataset

from node.analysis.triage import skip_reason
from node.core.config import FilterConfig, load_config, load_destination, load_network
from node.core.errors import ConfigError, SpoolError
from node.dicom.dicomio import read_dataset
from node.jobs.delivery import backoff_delay, dead_letter_due
from node.store.spool import Spool


def test_config_precedence_cli_over_env_over_file(tmp_path):
    conf = write_config(tmp_path / "c.toml", {"scp": {"port": 1000, "ae_title": "FILE_AE"}})
    env = {"CXR_NODE_SCP__PORT": "2000", "CXR_NODE_SCP__AE_TITLE": "ENV_AE"}
    assert load_config(conf, {}).scp.port == 1000
    assert load_config(conf, env).scp.ae_title == "ENV_AE"
    assert load_config(conf, env, {"scp.port": 3000}).scp.port == 3000
    assert load_config(None, {}).scp.port == 11112


@pytest.mark.parametrize(
    "bad",
    [
        {"scp": {"ae_title": "A" * 17}},
        {"scp": {"port": 70000}},
        {"report": {"uid_root": "1.02."}},
        {"nope": {"x": 1}},
    ],
)
def test_invalid_config_is_a_config_error(tmp_path, bad):
    with pytest.raises(ConfigError):
        load_config(write_config(tmp_path / "c.toml", bad), {})


def test_environment_values_are_parsed_by_their_fields_type():
    """pydantic-settings reads the variables: a list's value is JSON, any other key's a plain
    string even when it starts with "[" (the hand-written parser took that for a list);
    names without ``__``, or not spelled ``CXR_NODE_``, are not the node's."""
    env = {
        "CXR_NODE_SCP__ALLOWED_CALLING_AETS": '["PACS_A", "PACS_B"]',
        "CXR_NODE_REPORT__MANUFACTURER": '["lab"]',
        "CXR_NODE_scp__Port": "2000",
        "CXR_NODE_SCP": "not a section",
        "cxr_node_scp__max_pdu": "not read",
    }
    cfg = load_config(None, env)
    assert cfg.scp.allowed_calling_aets == ("PACS_A", "PACS_B")
    assert cfg.report.manufacturer == '["lab"]'
    assert (cfg.scp.port, cfg.scp.max_pdu) == (2000, 131072)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"CXR_NODE_SCP__BOGUS": "1"},
            "CXR_NODE_SCP__BOGUS='1': scp.bogus: unknown key (config/node.toml lists them all)",
        ),
        (
            {"CXR_NODE_SCP__PORT__X": "1"},
            "CXR_NODE_SCP__PORT__X='1': scp.port__x: unknown key (config/node.toml lists them all)",
        ),
        (
            {"CXR_NODE_BOGUS__X": "1"},
            "CXR_NODE_BOGUS__X: bogus: unknown section (config/node.toml lists them all)",
        ),
        (
            {"CXR_NODE_SCP__ALLOWED_CALLING_AETS": '["A",'},
            "CXR_NODE_SCP__ALLOWED_CALLING_AETS='[\"A\",': scp.allowed_calling_aets: "
            'not a JSON list, e.g. ["A","B"]',
        ),
    ],
)
def test_an_environment_error_is_one_line_naming_the_variable(env, line):
    with pytest.raises(ConfigError) as failed:
        load_config(None, env)
    assert str(failed.value) == line


def test_echo_and_push_read_only_their_section(tmp_path):
    """load_destination and load_network validate their section alone: a key only serve
    uses (file or environment) does not fail a healthcheck's echo."""
    conf = write_config(tmp_path / "c.toml", {"tls": {"enabled": True}, "destination": {"port": 1}})
    env = {
        "CXR_NODE_SCP__PORT": "abc",
        "CXR_NODE_BOGUS__X": "1",
        "CXR_NODE_NETWORK__FAST_PATHS": "0",
    }
    assert load_destination(conf, env).port == 1
    assert load_network(conf, env).fast_paths is False
    with pytest.raises(ConfigError) as failed:
        load_destination(conf, {**env, "CXR_NODE_DESTINATION__PORT": "x"})
    assert str(failed.value) == "CXR_NODE_DESTINATION__PORT='x': destination.port: not an integer"


def test_config_is_frozen():
    cfg = load_config(None, {})
    with pytest.raises(ValidationError):
        cfg.scp.port = 1  # type: ignore[misc]


def test_triage_rule():
    rule = FilterConfig()
    assert skip_reason(read_dataset(NIH), rule) is None  # DX, no BodyPartExamined
    assert skip_reason(read_dataset(ACRNEMA), rule) is None  # CR CHEST
    ds = pydicom.dcmread(NIH)
    ds.ViewPosition = "LL"
    assert "ViewPosition LL is not one of PA, AP" in skip_reason(ds, rule)
    ds.ViewPosition = "PA"
    assert skip_reason(ds, rule) is None
    ds.BodyPartExamined = "HAND"
    assert "BodyPartExamined HAND" in skip_reason(ds, rule)
    ds.Modality = "CT"
    assert "Modality CT" in skip_reason(ds, rule)
    ds.Modality = "SR"
    assert "not an image" in skip_reason(ds, rule)


def test_spool_store_is_atomic_and_recorded(tmp_path):
    spool = Spool(tmp_path / "s")
    job_id = spool.store(b"DICM-bytes", "1.2.3", "1.2.840.10008.5.1.4.1.1.1", "AE")
    [job] = spool.jobs()
    assert job.id == job_id and job.image.read_bytes() == b"DICM-bytes"
    assert list(spool.incoming.iterdir()) == []


def test_spool_store_writes_buffers_back_to_back_and_fsyncs_before_the_row(tmp_path, monkeypatch):
    """The SCP hands the File Meta bytes and a view of the received data set; the file is
    their concatenation, fsynced (file, then its directory) before the job row exists."""
    import node.store.spool

    spool = Spool(tmp_path / "s")
    synced: list[int] = []
    real_fsync = node.store.spool.os.fsync

    def fsync(fd: int) -> None:
        assert spool.jobs() == []  # no row before the bytes are on disk
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(node.store.spool.os, "fsync", fsync)
    body = bytearray(b"dataset" * 1000)
    with memoryview(body) as view:
        spool.store((b"META", view[7:]), "1.2.3", "1.2.840.10008.5.1.4.1.1.1", "AE")
    [job] = spool.jobs()
    assert job.image.read_bytes() == b"META" + bytes(body[7:])
    assert len(synced) == 2  # the file and the images/ directory


def test_spool_unwritable_raises_and_leaves_nothing(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "s")

    def fail(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("node.store.spool.os.replace", fail)
    with pytest.raises(SpoolError, match="No space left"):
        spool.store(b"x", "1.2.3", "1.2", "AE")
    assert spool.jobs() == [] and list(spool.incoming.iterdir()) == []
    assert list(spool.images.iterdir()) == []


def test_recover_enqueues_orphans(tmp_path):
    spool = Spool(tmp_path / "s")
    orphan = spool.images / "orphan.dcm"
    orphan.write_bytes(NIH.read_bytes())
    (spool.incoming / "half.part").write_bytes(b"partial")
    from node.dicom.dicomio import read_uids

    assert spool.recover(read_uids) == 1
    [job] = spool.jobs()
    assert job.state == "received" and job.image == orphan
    assert list(spool.incoming.iterdir()) == []


def test_retry_then_dead_letter_then_requeue(tmp_path):
    spool = Spool(tmp_path / "s")
    spool.store(b"x", "1.2.3", "1.2", "AE")
    [job] = spool.jobs()
    spool.mark_classified(job.id, spool.reports / "r.dcm", "1.2.4")
    seen: list[tuple[int, float]] = []

    def plan(attempts: int, since: float) -> tuple[bool, float]:
        seen.append((attempts, since))
        return attempts >= 3, 0.0

    for now in (100.0, 200.0, 300.0):
        state, _ = spool.refused(job.id, "0xA700", now, plan)
    assert state == "dead" and spool.counts()["dead"] == 1
    assert seen == [(1, 100.0), (2, 100.0), (3, 100.0)]  # failing since the first refusal
    assert spool.requeue("dead") == 1
    [job] = spool.jobs("classified")
    assert job.attempts == 0
    spool.refused(job.id, "0xA700", 400.0, plan)
    assert seen[-1] == (1, 400.0)  # the window starts again


def test_dead_letter_needs_both_the_attempts_and_the_window():
    hours = 3600.0
    assert not dead_letter_due(100, 0.0, 71 * hours, 8, 72 * hours)  # window not spent
    assert not dead_letter_due(7, 0.0, 100 * hours, 8, 72 * hours)  # attempts not spent
    assert dead_letter_due(8, 0.0, 72 * hours, 8, 72 * hours)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("72h", 259200.0), ("30m", 1800.0), ("45s", 45.0), ("3d", 259200.0), ("90", 90.0), (2.5, 2.5)],
)
def test_retry_for_takes_seconds_or_a_unit(text, seconds):
    assert load_config(None, {}, {"destination.retry_for": text}).destination.retry_for == seconds


@pytest.mark.parametrize("bad", ["72 hours", "-1h", "0", "h", True, "1w"])
def test_retry_for_refuses_what_is_not_a_duration(bad):
    with pytest.raises(ConfigError, match="retry_for"):
        load_config(None, {}, {"destination.retry_for": bad})


def test_backoff_grows_and_is_capped():
    assert backoff_delay(1, 2.0, 300.0, 1.0) == 2.0
    assert backoff_delay(4, 2.0, 300.0, 1.0) == 16.0
    assert backoff_delay(20, 2.0, 300.0, 1.0) == 300.0
    assert backoff_delay(4, 2.0, 300.0, 0.0) == 8.0


def test_config_file_loads_and_documents_every_key():
    """config/node.toml is valid, and every key of every section appears in it (set or as a
    commented example), so it is a complete reference."""
    import re

    from node.core.config import NodeConfig

    path = Path(__file__).resolve().parents[2] / "config" / "node.toml"
    cfg = load_config(path, {})
    assert cfg.scp.allowed_calling_aets == ("ORTHANC",)
    documented: dict[str, set[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#?\s*(\w+)\s*=", line):
            documented.setdefault(section, set()).add(m.group(1))
    for name, field in NodeConfig.model_fields.items():
        keys = set(field.annotation.model_fields)  # type: ignore[union-attr]
        assert keys <= documented.get(name, set()), (name, keys - documented.get(name, set()))


def test_huge_dimensions_are_not_decoded():
    ds = read_dataset(NIH)
    ds.Rows = ds.Columns = 60000  # header claims 3.6 gigapixels: never decode that
    assert "exceeds filter.max_pixels" in skip_reason(ds, FilterConfig())
    assert skip_reason(read_dataset(NIH), FilterConfig(max_pixels=1024 * 1024)) is None
    assert "exceeds" in skip_reason(read_dataset(NIH), FilterConfig(max_pixels=1024 * 1023))


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_malloc_keeps_freed_memory_for_the_batch_unless_the_environment_says(monkeypatch):
    from node.analysis import allocator

    libc = _FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)
    assert allocator.keep_freed_memory(4)
    assert allocator.keep_freed_memory(8)
    mib = 2**20  # M_MMAP_THRESHOLD is -3, M_TRIM_THRESHOLD -1: both, always together
    assert libc.calls == [(-3, 32 * mib), (-1, 64 * mib), (-3, 32 * mib), (-1, 128 * mib)]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert not allocator.keep_freed_memory(4)  # glibc reads its variables itself
    assert len(libc.calls) == 4
    with pytest.raises(ValueError, match="batch_size"):
        allocator.keep_freed_memory(0)


def test_scp_contexts_copy_cheaply_and_independently():
    """pynetdicom deep-copies the supported contexts per association: CheapCopyContext's copy
    must not share the mutable transfer syntax list (nor the negotiation results)."""
    import copy
    import time

    from node.core.config import ScpConfig
    from node.net.scp import CheapCopyContext, build_ae

    contexts = build_ae(ScpConfig(port=0)).supported_contexts
    assert {type(cx) for cx in contexts} == {CheapCopyContext}
    start = time.perf_counter()
    clones = copy.deepcopy(contexts)
    assert time.perf_counter() - start < 0.02  # pynetdicom's generic deep copy: ~40 ms
    for cx, clone in zip(contexts, clones, strict=True):
        assert clone is not cx and clone.transfer_syntax == cx.transfer_syntax
        assert clone.abstract_syntax == cx.abstract_syntax
    clones[0].add_transfer_syntax("1.2.840.10008.1.2.4.80")
    clones[0].result = 0
    assert "1.2.840.10008.1.2.4.80" not in contexts[0].transfer_syntax
    assert contexts[0].result is None


def test_zips_are_told_by_name_magic_or_directory_and_dicom_files_are_not_searched(
    tmp_path, monkeypatch
):
    import zipfile

    from helpers import NIH

    from node.tools import archive

    named = tmp_path / "a.zip"
    named.write_bytes(b"damaged")
    plain = tmp_path / "archive.bin"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("x.dcm", NIH.read_bytes())
    prefixed = tmp_path / "self-extracting.bin"  # a zip after other bytes: found by its end
    prefixed.write_bytes(b"#!stub\n" * 30 + plain.read_bytes())
    assert [archive._is_zip(p) for p in (named, plain, prefixed, NIH)] == [True] * 3 + [False]
    searched: list[object] = []
    monkeypatch.setattr(archive.zipfile, "is_zipfile", lambda p: searched.append(p) or False)
    assert not archive._is_zip(NIH)
    assert searched == []  # a Part 10 file: no scan of its last 64 KiB


def test_hidden_modules_are_unimportable_inside_and_importable_after():
    import sys

    from node.core.imports import hidden

    name = "colorsys"  # a stdlib module nothing in the test process has imported
    sys.modules.pop(name, None)
    with hidden((name, "json")):
        with pytest.raises(ImportError):
            __import__(name)
        import json  # already imported before the block: untouched

        assert json.dumps([1]) == "[1]"
    assert name not in sys.modules
    assert __import__(name).rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="top-level"):
        with hidden(("os.path",)):
            pass


def test_start_up_garbage_is_handed_back_to_the_kernel():
    """Freed memory in the middle of the heap stays resident (glibc trims only its top)
    until release_start_up_garbage() asks glibc to hand it back."""
    import sys

    from node.analysis.allocator import release_start_up_garbage

    def rss_mb() -> float:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    blobs = [bytes([i % 251]) * 4096 for i in range(16384)]  # 64 MiB of malloc'd blocks
    keep = blobs[::64]  # a survivor every 256 KiB: the free space is not at the heap's top
    del blobs
    before = rss_mb()
    assert release_start_up_garbage()
    assert before - rss_mb() > 32, (before, rss_mb())
    assert len(keep) == 256


# -- chest radiographs as real archives label them ---------------------------------------
def _cr(**attrs: str) -> Dataset:
    ds = read_dataset(ACRNEMA)
    del ds.BodyPartExamined, ds.ViewPosition
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "body", ["THORAX", "TORAX", "Tórax", "LUNG", "PORT CHEST", "chest", "CHEST_PA"]
)
def test_chest_synonyms_are_chests(body):
    assert skip_reason(_cr(BodyPartExamined=body), FilterConfig()) is None


@pytest.mark.parametrize("body", ["CSPINE", "HAND", "ABDOMEN", "THORACIC SPINE X"])
def test_other_body_parts_are_not(body):
    reason = skip_reason(_cr(BodyPartExamined=body), FilterConfig())
    assert reason is not None and "BodyPartExamined" in reason


@pytest.mark.parametrize(
    ("attrs", "classified", "strictly"),
    [
        ({"StudyDescription": "RX TORAX PA"}, True, True),
        ({"ProtocolName": "Thorax p.a."}, True, True),
        ({"StudyDescription": "KNEE 2 VIEWS"}, False, False),
        ({"SeriesDescription": "C-SPINE"}, False, False),
        ({"StudyDescription": "PORTABLE"}, True, False),  # says nothing: the setting decides
        ({}, True, False),
    ],
)
def test_descriptions_decide_where_the_body_part_is_absent(attrs, classified, strictly):
    assert (skip_reason(_cr(**attrs), FilterConfig()) is None) is classified
    strict = FilterConfig(allow_missing_body_part=False)
    assert (skip_reason(_cr(**attrs), strict) is None) is strictly


@pytest.mark.parametrize(
    "attrs",
    [
        {"ViewPosition": "LL"},
        {"ViewPosition": "RL"},
        {"ViewPosition": "LAT"},
        {"SeriesDescription": "CHEST LAT"},
        {"StudyDescription": "TORAX LATERAL"},
    ],
)
def test_laterals_are_never_classified(attrs):
    reason = skip_reason(_cr(BodyPartExamined="CHEST", **attrs), FilterConfig())
    assert reason is not None and ("lateral" in reason or "ViewPosition" in reason)

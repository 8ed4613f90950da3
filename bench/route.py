"""``python -m bench route``: Orthanc's auto-route to the node, call style by call style.

Two scenarios, each with a real Orthanc (the repo's orthanc.json, some keys replaced) and the
node as a real process, every peer with TCP_NODELAY=1:

- *kill*: images pushed into Orthanc one by one at ``rate`` per second (each its own study,
  one storescu each); after ``kill_after`` images the node is killed with SIGKILL and
  restarted at once (it is down for its start-up time). Counted afterwards: which images got
  an SR back in Orthanc (the node keeps what it acknowledged, so an image without an SR never
  reached it). A missing image sent before the restarted node listened was lost "while
  down"; one sent after it, "while up" (Orthanc's route lost it though the node answered).
- *burst*: ``burst`` images stored into Orthanc by one storescu at once; the time from its
  start until every SR is back in Orthanc. The same burst into dcmtk's storescp instead of
  the node gives the route's own ceiling for each call style.
- *alone*: no Orthanc: the burst sent with storescu straight to the node (one association),
  dcmtk's storescp (every transfer syntax) as its PACS: what the node does with the two
  cores to itself, beside the burst through Orthanc.

Each variant is a routing function for config/route-to-node.lua (the script's filters are
kept; only ``route(instanceId)`` is replaced) plus orthanc.json keys. Rounds alternate
the variants (A, B, C, A, B, C, ...) so that the shared machine's drift hits all alike.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    NODELAY,
    ROOT,
    Orthanc,
    cpu_seconds,
    free_port,
    orthanc,
    settle,
    start_node,
    wait_for,
)
from node.core.config import ReportConfig

LUA = ROOT / "config" / "route-to-node.lua"
ROUTE_FUNCTION = re.compile(r"local function route\(instanceId\)\n.*?\n-- end of route\n", re.S)

SEND = 'SendToModality(instanceId, "cxr-node")'
PCALL_RETRY = """local ok, err = pcall(SendToModality, instanceId, "cxr-node")
  if not ok then
    print("cxr-node: retrying " .. instanceId .. ": " .. tostring(err))
    SendToModality(instanceId, "cxr-node")
  end"""
REST_SYNC_RETRY = """local body = DumpJson({ Resources = { instanceId }, Synchronous = true }, true)
  local ok, answer = pcall(RestApiPost, "/modalities/cxr-node/store", body)
  if not ok or answer == nil then
    print("cxr-node: store of " .. instanceId .. " failed (" .. tostring(answer) .. "), retrying")
    RestApiPost("/modalities/cxr-node/store", body)
  end"""
REST_ASYNC = """RestApiPost("/modalities/cxr-node/store",
    DumpJson({ Resources = { instanceId }, Asynchronous = true }, true))"""


@dataclass(frozen=True)
class Variant:
    """``call``: the body of the Lua ``route(instanceId)``; None: the repo's script as is.
    ``settings``: orthanc.json keys replaced."""

    call: str | None
    settings: dict[str, Any] = field(default_factory=dict)

    def script(self, work: Path) -> Path:
        if self.call is None:
            return LUA
        text, n = ROUTE_FUNCTION.subn(
            f"local function route(instanceId)\n  {self.call}\nend\n-- end of route\n",
            LUA.read_text(),
        )
        assert n == 1, "config/route-to-node.lua has no route(instanceId) function"
        path = work / "route.lua"
        path.write_text(text)
        return path


# send: SendToModality (Orthanc queues it into its Lua job, which keeps one association open
# for DicomAssociationCloseDelay); pcall-retry: the same in pcall, again on a Lua error;
# rest-sync-retry: POST /modalities/cxr-node/store from Lua, waited for, once more on an
# error; rest-async: the same as an asynchronous job (one job, one association per image)
VARIANTS: dict[str, Variant] = {
    "shipped": Variant(None),
    "send-delay5": Variant(SEND, {"DicomAssociationCloseDelay": 5}),
    "send-delay1": Variant(SEND, {"DicomAssociationCloseDelay": 1}),
    "send-delay0": Variant(SEND, {"DicomAssociationCloseDelay": 0}),
    "send-delay5-scutimeout5": Variant(
        SEND, {"DicomAssociationCloseDelay": 5, "DicomScuTimeout": 5}
    ),
    "pcall-retry-delay5": Variant(PCALL_RETRY, {"DicomAssociationCloseDelay": 5}),
    "rest-sync-retry": Variant(REST_SYNC_RETRY),
    "rest-async": Variant(REST_ASYNC),
}


def _storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)],
        env=NODELAY,
        check=True,
        capture_output=True,
        timeout=300,
    )


def _studies_with_sr(o: Orthanc) -> set[str]:
    """StudyInstanceUIDs of the studies that hold an SR."""
    series = o.get("/series?expand")
    parents = {s["ParentStudy"] for s in series if s["MainDicomTags"].get("Modality") == "SR"}
    studies = o.get("/studies?expand")
    return {s["MainDicomTags"]["StudyInstanceUID"] for s in studies if s["ID"] in parents}


def _log_counts(o: Orthanc) -> dict[str, int]:
    text = o.log.read_text(errors="replace")
    return {
        k: text.count(k)
        for k in (
            "Lua: Unable to send instance",
            "Broken pipe",
            "Lua: Error in",
            "cxr-node: retrying",
            "failed (",
        )
        if k in text
    }


def _job_states(o: Orthanc) -> dict[str, int]:
    """Jobs still in Orthanc's list (finished ones: only the last JobsHistorySize)."""
    return dict(Counter(f"{j['Type']}: {j['State']}" for j in o.get("/jobs?expand")))


def kill_round(
    variant: Variant,
    images: list[tuple[Path, str]],
    work: Path,
    rate: float = 2.0,
    kill_after: int = 10,
) -> dict[str, Any]:
    """``images``: (file, StudyInstanceUID), one study each."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    node_port = free_port()
    settings = variant.settings
    with orthanc(
        work / "orthanc", node_port=node_port, lua=variant.script(work), settings=settings
    ) as o:
        nodes = [start_node(work, o.dicom, node_port)]
        sent_at: list[float] = []
        events: dict[str, float] = {}

        def restart() -> None:
            nodes.append(start_node(work, o.dicom, node_port))
            events["ready"] = time.perf_counter() - t0

        restarter: threading.Thread | None = None
        t0 = time.perf_counter()
        try:
            for i, (path, _) in enumerate(images):
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                if i == kill_after:
                    nodes[0].send_signal(signal.SIGKILL)
                    nodes[0].wait(10)
                    events["killed"] = time.perf_counter() - t0
                    restarter = threading.Thread(target=restart)
                    restarter.start()
                _storescu(o.dicom, [path])
                sent_at.append(time.perf_counter() - t0)
            assert restarter is not None, "the node was never killed"
            restarter.join(120)
            # settled: every SR back, or the count unchanged for 20 s (the node classifies
            # a 60-image backlog in a few seconds)
            last, since, deadline = -1, time.monotonic(), time.monotonic() + 240
            while time.monotonic() < deadline:
                got = _studies_with_sr(o)
                if len(got) == len(images):
                    break
                if len(got) != last:
                    last, since = len(got), time.monotonic()
                elif time.monotonic() - since > 20:
                    break
                time.sleep(1)
            log, jobs = _log_counts(o), _job_states(o)
        finally:
            for n in nodes:
                n.terminate()
                n.wait(60)
    settle(work)
    ready = events["ready"]
    lost = [t for (_, study), t in zip(images, sent_at, strict=True) if study not in got]
    return {
        "sent": len(images),
        "reached_node": len(images) - len(lost),
        "lost": len(lost),
        "lost_while_down": sum(t <= ready for t in lost),
        "lost_while_up": sum(t > ready for t in lost),
        "node_down_s": ready - events["killed"],
        "orthanc_log": log,
        "jobs": jobs,
    }


def burst_round(
    variant: Variant,
    images: list[Path],
    work: Path,
    sink: str = "node",
    warm: Path | None = None,
    per_image: int = 3,
) -> dict[str, float]:
    """Seconds from the burst's start until Orthanc stored it and until every SR is back
    (``sink="storescp"``: until dcmtk's storescp received every image; ``sink="direct"``:
    storescu sends to the node itself, not through Orthanc, whose route is then unused).

    ``warm``: an image routed first, its SR waited for, before the clock and the CPU counts
    start: the burst then meets a running node (model loaded and traced, SR encoder checked)
    as the pipeline bench's warm model does; without it the node's start-up is in the burst.
    ``per_image``: instances each image routed through Orthanc leaves there (itself, its SR
    and its summary image; one fewer sent straight to the node): the burst is over when
    Orthanc's instance count says so (``/statistics``, cheap
    enough to poll every 50 ms beside the burst), then checked study by study."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    n = len(images)
    lua = False if sink == "direct" else variant.script(work)
    with orthanc(work / "orthanc", node_port=port, lua=lua, settings=variant.settings) as o:
        target = ["-aet", "STORESCU", "-aec", "CXR_NODE", "127.0.0.1", str(port)]
        if sink in ("direct", "node"):
            proc = start_node(work, o.dicom, port)
            each = per_image - (sink == "direct")  # sent straight to the node: not in Orthanc
            if warm is not None:
                if sink == "direct":
                    subprocess.run(["storescu", *target, str(warm)], env=NODELAY, check=True)
                else:
                    _storescu(o.dicom, [warm])
                wait_for(lambda: o.count() >= each, 120, "the warm-up image's SR")
            base = o.count()
            done = lambda: o.count() >= base + each * n  # noqa: E731
        else:
            out = work / "storescp"
            out.mkdir()
            proc = subprocess.Popen(
                ["storescp", "-aet", "CXR_NODE", "--output-directory", str(out), str(port)],
                env=NODELAY,
            )
            wait_for(lambda: _listening(port), 30, "storescp")
            done = lambda: sum(1 for _ in out.iterdir()) >= n  # noqa: E731
        try:
            cpu0 = {"sink": cpu_seconds(proc.pid), "orthanc": cpu_seconds(o.proc.pid)}
            t0 = time.perf_counter()
            if sink == "direct":
                subprocess.run(
                    ["storescu", *target, *map(str, images)],
                    env=NODELAY,
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
            else:
                _storescu(o.dicom, images)
            stored = time.perf_counter() - t0
            wait_for(done, 600, f"{n} images through the route", every=0.05)
            total = time.perf_counter() - t0
            cpu = {
                "sink_cpu_s": cpu_seconds(proc.pid) - cpu0["sink"],
                "orthanc_cpu_s": cpu_seconds(o.proc.pid) - cpu0["orthanc"],
            }
            if sink != "storescp":
                with_sr = len(_studies_with_sr(o))
                assert with_sr >= n + (warm is not None), f"{with_sr} studies with an SR"
        finally:
            proc.terminate()
            proc.wait(60)
    settle(work)
    return {"stored_in_orthanc_s": stored, "total_s": total, "images_per_s": n / total, **cpu}


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alone_round(images: list[Path], work: Path, warm: Path, per_image: int = 3) -> dict[str, float]:
    """The burst without Orthanc: storescu sends ``images`` straight to the node in one
    association, dcmtk's storescp (``+xa``: it takes the summary image's JPEG as sent) is the
    node's PACS; seconds from the burst's start until storescp has every SR and summary
    image. ``warm``: sent and its results waited for first, as in :func:`burst_round`."""
    shutil.rmtree(work, ignore_errors=True)
    out = work / "pacs"
    out.mkdir(parents=True)
    pacs_port, port = free_port(), free_port()
    pacs = subprocess.Popen(
        ["storescp", "+xa", "-aet", "ORTHANC", "--output-directory", str(out), str(pacs_port)],
        env=NODELAY,
        stdout=subprocess.DEVNULL,
    )
    wait_for(lambda: _listening(pacs_port), 30, "storescp")
    each = per_image - 1  # what the node sends back per image: its SR (and summary image)
    received = lambda: sum(1 for _ in out.iterdir())  # noqa: E731
    target = ["-aet", "STORESCU", "-aec", "CXR_NODE", "127.0.0.1", str(port)]
    node = start_node(work, pacs_port, port)
    try:
        subprocess.run(["storescu", *target, str(warm)], env=NODELAY, check=True)
        wait_for(lambda: received() >= each, 120, "the warm-up image's SR")
        cpu0 = {"sink": cpu_seconds(node.pid), "pacs": cpu_seconds(pacs.pid)}
        t0 = time.perf_counter()
        subprocess.run(
            ["storescu", *target, *map(str, images)], env=NODELAY, check=True, timeout=300
        )
        wait_for(lambda: received() >= each * (len(images) + 1), 600, "every SR", every=0.05)
        total = time.perf_counter() - t0
        cpu = {
            "sink_cpu_s": cpu_seconds(node.pid) - cpu0["sink"],
            "pacs_cpu_s": cpu_seconds(pacs.pid) - cpu0["pacs"],
        }
    finally:
        node.terminate()
        node.wait(60)
        pacs.terminate()
        pacs.wait(30)
    settle(work)
    return {"total_s": total, "images_per_s": len(images) / total, **cpu}


def bench_route(
    work: Path,
    pipelines: dict[str, float],
    variants: list[str] | None = None,
    rounds: int = 3,
    kill_images: int = 60,
    burst: int = 150,
    scenarios: tuple[str, ...] = ("kill", "burst", "storescp"),
) -> dict[str, Any]:
    """The scenarios (kill, burst into the node, burst into storescp, burst straight into the
    node: "direct", and without Orthanc: "alone", once per round) for every variant,
    ``rounds`` times, alternating."""
    from bench.common import make_images

    names = variants or list(VARIANTS)
    files = make_images(max(kill_images, burst + 1), work / "route-images", "route", study_size=1)
    warm = files[burst]  # routed before each burst, its own study
    # each image leaves itself, its SR and (unless switched off for an A/B) its summary image
    summary_env = {"summary_image": os.environ.get("CXR_NODE_REPORT__SUMMARY_IMAGE", "true")}
    per_image = 3 if ReportConfig.model_validate(summary_env).summary_image else 2
    import pydicom

    studies = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files]
    kill_set = list(zip(files[:kill_images], studies[:kill_images], strict=True))
    kills: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    bursts: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    ceilings: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    direct: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    alone: list[dict[str, float]] = []
    for r in range(rounds):
        if "alone" in scenarios:
            alone.append(alone_round(files[:burst], work / "route-alone", warm, per_image))
            _say(f"round {r + 1}: burst straight into the node, storescp as PACS {alone[-1]}")
        for name in names:
            v = VARIANTS[name]
            if "kill" in scenarios:
                kills[name].append(kill_round(v, kill_set, work / "route-kill"))
                _say(f"round {r + 1} {name}: kill {kills[name][-1]}")
            if "burst" in scenarios:
                bursts[name].append(
                    burst_round(
                        v, files[:burst], work / "route-burst", warm=warm, per_image=per_image
                    )
                )
                _say(f"round {r + 1} {name}: burst {bursts[name][-1]}")
            if "storescp" in scenarios:
                ceilings[name].append(
                    burst_round(v, files[:burst], work / "route-sink", sink="storescp")
                )
                _say(f"round {r + 1} {name}: burst into storescp {ceilings[name][-1]}")
            if "direct" in scenarios:
                direct[name].append(
                    burst_round(
                        v,
                        files[:burst],
                        work / "route-direct",
                        sink="direct",
                        warm=warm,
                        per_image=per_image,
                    )
                )
                _say(f"round {r + 1} {name}: burst straight into the node {direct[name][-1]}")
    summary: dict[str, Any] = {}
    for name in names:
        row: dict[str, Any] = {}
        if kills[name]:
            row["lost_per_round"] = [k["lost"] for k in kills[name]]
            row["lost_while_up_per_round"] = [k["lost_while_up"] for k in kills[name]]
            row["lost_while_down_per_round"] = [k["lost_while_down"] for k in kills[name]]
            row["node_down_s"] = [round(k["node_down_s"], 1) for k in kills[name]]
        if bursts[name]:
            row.update(_rates("burst", bursts[name], pipelines))
        if ceilings[name]:
            row["route_into_storescp_images_per_s"] = [
                round(c["images_per_s"], 1) for c in ceilings[name]
            ]
        if direct[name]:
            row.update(_rates("direct", direct[name], pipelines))
        summary[name] = row
    if alone:
        summary["alone"] = _rates("alone", alone, pipelines)
    return {
        "kill_images": kill_images,
        "kill_rate_per_s": 2.0,
        "burst_images": burst,
        "pipelines_images_per_s": pipelines,
        "instances_per_image": per_image,
        "summary": summary,
        "kill_rounds": kills,
        "burst_rounds": bursts,
        "storescp_rounds": ceilings,
        "direct_rounds": direct,
        "alone_rounds": alone,
    }


def _rates(
    scenario: str, rounds: list[dict[str, float]], pipelines: dict[str, float]
) -> dict[str, Any]:
    """A burst scenario's rounds: their seconds, the median images/s and its ratio to each
    of ``pipelines``' images/s."""
    rate = statistics.median(b["images_per_s"] for b in rounds)
    return {
        f"{scenario}_total_s": [round(b["total_s"], 2) for b in rounds],
        f"{scenario}_images_per_s_median": rate,
        **{f"{scenario}_vs_{name}": rate / value for name, value in pipelines.items()},
    }


def _say(text: str) -> None:
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()

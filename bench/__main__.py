"""``make bench``: push, ingest, inference, end-to-end and memory benchmarks.

Every peer runs on loopback with TCP_NODELAY=1 (dcmtk reads it from the environment; the
node sets it on its own sockets). Results: a table on stdout and bench/results/*.json.
Usage: python -m bench [push] [ingest] [inference] [e2e] [memory] [classify] [route] [--n N]
[--rounds R]. ``python -m bench inference route``: Orthanc's auto-route (bench/route.py),
with the burst through Orthanc compared to the pipeline's images/s measured in the same run.
``push`` and ``ingest`` measure the node with ``network.fast_paths`` on and off side by side
(``*_fast_vs_stock``: what the workarounds of pynetdicom's internals buy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    MODEL_ENV,
    NODELAY,
    ROOT,
    WAIT_POLICY_ENV,
    cpu_seconds,
    free_port,
    machine,
    make_images,
    node_settings_env,
    orthanc,
    settle,
    start_node,
    table,
    timed,
    wait_for,
)
from bench.route import bench_route
from node.analysis.threads import apply_wait_policy
from node.core.config import ModelConfig

PY = sys.executable
ROUNDS = 5  # push and ingest: rounds of all clients in turn; ratios are per-round medians
STOCK = "stock pynetdicom"  # in a client's name: network.fast_paths = false
FAST_PATHS_ENV = "CXR_NODE_NETWORK__FAST_PATHS"


def _storescu_to_orthanc(port: int, files: list[Path]) -> list[str]:
    """dcmtk's storescu command line sending ``files`` to the bench's Orthanc."""
    return ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(port), *map(str, files)]


def bench_push(images: list[Path], work: Path, n_rounds: int = ROUNDS) -> dict[str, Any]:
    """cxr-node push (with and without the fast paths) vs storescu vs REST (POST
    /instances) into a fresh Orthanc each."""
    import requests

    n = len(images)
    folder = images[0].parent

    def storescu(o: Any) -> None:
        subprocess.run(
            _storescu_to_orthanc(o.dicom, images),
            env=NODELAY,
            check=True,
            capture_output=True,
        )

    def storescu_parallel(o: Any) -> None:
        """Orthanc's limit: its fastest client, dcmtk's own, four processes at once."""
        quarters = [images[i::4] for i in range(4)]
        procs = [
            subprocess.Popen(
                _storescu_to_orthanc(o.dicom, part),
                env=NODELAY,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for part in quarters
        ]
        codes = [p.wait() for p in procs]
        assert codes == [0, 0, 0, 0], codes

    def rest(o: Any) -> None:
        with requests.Session() as s:
            s.auth = ("bench", "bench")
            s.trust_env = False  # loopback: no proxy
            for p in images:
                r = s.post(f"http://127.0.0.1:{o.http}/instances", data=p.read_bytes(), timeout=30)
                r.raise_for_status()

    def push(assocs: int, fast: bool = True):
        # both settings through the environment: each push then reads it alike
        env = {**os.environ, FAST_PATHS_ENV: "true" if fast else "false"}

        def run(o: Any) -> None:
            subprocess.run(
                [
                    PY,
                    "-m",
                    "node",
                    "push",
                    str(folder),
                    "--port",
                    str(o.dicom),
                    "--aet",
                    "ORTHANC",
                    "--associations",
                    str(assocs),
                ],
                env=env,
                check=True,
                capture_output=True,
            )

        return run

    clients = {
        "storescu": storescu,
        "4 x storescu in parallel (Orthanc's limit)": storescu_parallel,
        "REST (requests.Session)": rest,
        "cxr-node push --associations 1": push(1),
        "cxr-node push --associations 2": push(2),
        "cxr-node push --associations 4": push(4),
        f"cxr-node push, {STOCK}, --associations 1": push(1, fast=False),
        f"cxr-node push, {STOCK}, --associations 4": push(4, fast=False),
    }
    # Rounds of every client in turn, each into a fresh Orthanc: the shared machine's drift
    # then hits all clients of a round alike; per-round ratios and their medians are reported.
    rounds: list[dict[str, float]] = []
    for _ in range(n_rounds):
        rates: dict[str, float] = {}
        for name, client in clients.items():
            with orthanc(work / "orthanc-push") as o:
                seconds = timed(lambda: client(o))  # noqa: B023
                assert o.count() == n, (name, o.count())
            rates[name] = n / seconds
        rounds.append(rates)
    ours = [k for k in clients if k.startswith("cxr-node") and STOCK not in k]
    stock = [k for k in clients if STOCK in k]

    def ratio(client: str, reference: str) -> float:
        return statistics.median(r[client] / r[reference] for r in rounds)

    best = max(ours, key=lambda k: ratio(k, "storescu"))
    return {
        "n": n,
        "rounds": rounds,
        "images_per_s": {k: statistics.median(r[k] for r in rounds) for k in clients},
        **{f"push{_assocs(k)}_vs_storescu": ratio(k, "storescu") for k in ours},
        **{f"push{_assocs(k)}_stock_vs_storescu": ratio(k, "storescu") for k in stock},
        **{
            f"push{_assocs(k)}_fast_vs_stock": ratio(
                f"cxr-node push --associations {_assocs(k)}", k
            )
            for k in stock
        },
        "best_push_vs_storescu": ratio(best, "storescu"),
        "best_push_vs_rest": ratio(best, "REST (requests.Session)"),
        "best_push_vs_orthanc_limit": ratio(best, "4 x storescu in parallel (Orthanc's limit)"),
        "best_push_associations": _assocs(best),
    }


def _assocs(client: str) -> int:
    """The association count in a client's name ("cxr-node push --associations 4" -> 4)."""
    return int(client.rsplit(" ", 1)[1])


def _storescu_time(port: int, images: list[Path], *extra: str) -> float:
    return timed(
        lambda: subprocess.run(
            [
                "storescu",
                *extra,
                "-aet",
                "STORESCU",
                "-aec",
                "CXR_NODE",
                "127.0.0.1",
                str(port),
                *map(str, images),
            ],
            env=NODELAY,
            check=True,
            capture_output=True,
        )
    )


def bench_ingest(images: list[Path], work: Path, n_rounds: int = ROUNDS) -> dict[str, Any]:
    """Node SCP (spool only; with and without the fast paths) vs dcmtk storescp, all fed
    by the same storescu; each server fresh in each round, ratios are per-round medians."""
    n = len(images)
    rounds = [_ingest_round(images, work) for _ in range(n_rounds)]

    def vs_best_dcmtk(name: str) -> float:
        return statistics.median(
            r[name] / max(v for k, v in r.items() if k.startswith("storescp")) for r in rounds
        )

    def fast_vs_stock(fsync: bool) -> float:
        fast, stock = _ingest_name(fsync, True), _ingest_name(fsync, False)
        return statistics.median(r[fast] / r[stock] for r in rounds)

    return {
        "n": n,
        "rounds": rounds,
        "images_per_s": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
        "node_fsync_vs_best_storescp": vs_best_dcmtk(_ingest_name(True, True)),
        "node_nofsync_vs_best_storescp": vs_best_dcmtk(_ingest_name(False, True)),
        "node_fsync_stock_vs_best_storescp": vs_best_dcmtk(_ingest_name(True, False)),
        "node_nofsync_stock_vs_best_storescp": vs_best_dcmtk(_ingest_name(False, False)),
        "node_fsync_fast_vs_stock": fast_vs_stock(True),
        "node_nofsync_fast_vs_stock": fast_vs_stock(False),
    }


def _ingest_name(fsync: bool, fast: bool) -> str:
    stock = "" if fast else f", {STOCK}"
    return f"cxr-node SCP (spool, fsync={'on' if fsync else 'off'}{stock})"


def _ingest_round(images: list[Path], work: Path) -> dict[str, float]:
    n = len(images)
    rates: dict[str, float] = {}
    for name, extra in {
        "storescp (default PDU)": [],
        "storescp --max-pdu 131072": ["--max-pdu", "131072"],
    }.items():
        out = Path(tempfile.mkdtemp(dir=work))
        port = free_port()
        scp = subprocess.Popen(
            ["storescp", *extra, "--output-directory", str(out), str(port)], env=NODELAY
        )
        time.sleep(0.5)
        rates[name] = n / _storescu_time(port, images, *(["--max-pdu", "131072"] if extra else []))
        scp.terminate()
        scp.wait()
        settle(out)
    for fsync, fast in ((True, True), (True, False), (False, True), (False, False)):
        with _ingest_server(work, fsync, fast) as (port, _):
            name = _ingest_name(fsync, fast)
            rates[name] = n / _storescu_time(port, images, "--max-pdu", "131072")
    return rates


@contextmanager
def _ingest_server(work: Path, fsync: bool, fast: bool) -> Iterator[tuple[int, int]]:
    """A spool-only node SCP (bench.ingest_server) on a free port, its spool in ``work``:
    (port, pid) while the block runs; stopped and its spool removed afterwards."""
    port = free_port()
    spool = Path(tempfile.mkdtemp(dir=work))
    args = [str(port), str(spool), "1" if fsync else "0", "1" if fast else "0"]
    node = subprocess.Popen(
        [PY, "-m", "bench.ingest_server", *args], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert node.stdout is not None and node.stdout.readline().strip() == b"ready"
        yield port, node.pid
    finally:
        node.terminate()
        node.wait()
        settle(spool)


def bench_associations(images: list[Path], work: Path, n_rounds: int = 3) -> dict[str, Any]:
    """The node SCP's CPU per association (spool only, fsync on), with and without the fast
    paths: storescu sends the images one association each, as Orthanc's route does (its
    every request proposes 128 presentation contexts, as storescu's does), and then all in
    one (other images: the spool takes a known image as cheaply as a dup); the difference
    in the SCP's CPU, per image, is what an association costs it."""
    half = len(images) // 2
    together, apart = images[:half], images[half : 2 * half]
    rounds = []
    for _ in range(n_rounds):
        row: dict[str, float] = {}
        for fast in (True, False):
            name = "fast paths" if fast else STOCK
            with _ingest_server(work, True, fast) as (port, pid):
                cpu = cpu_seconds(pid)
                _storescu_time(port, together)  # one association: the images alone
                alone = cpu_seconds(pid) - cpu
                cpu = cpu_seconds(pid)
                seconds = sum(_storescu_time(port, [image]) for image in apart)
                each = cpu_seconds(pid) - cpu
            row[f"{name}: CPU ms per association"] = 1000 * (each - alone) / half
            row[f"{name}: images/s, an association each"] = half / seconds
        rounds.append(row)
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    cost = "CPU ms per association"
    return {
        "images_each_way": half,
        "rounds": rounds,
        **medians,
        "fast_vs_stock_cpu_per_association": medians[f"fast paths: {cost}"]
        / medians[f"{STOCK}: {cost}"],
    }


def bench_inference(images: list[Path]) -> dict[str, Any]:
    """Pipeline (decode + preprocess + model + SR build) vs raw model(x), same threads; and
    the pipeline with the summary image (display image, class activation maps from the
    same forward pass, rendering, Secondary Capture) vs raw model(x): as the worker runs
    it (``worker.overlap``, the target's number) and one batch at a time."""
    from datetime import datetime

    import numpy as np
    import torch
    import torchxrayvision as xrv

    from node.analysis.allocator import keep_freed_memory
    from node.analysis.model import load_classifier
    from node.analysis.preprocess import preprocess
    from node.core.config import ModelConfig
    from node.dicom.dicomio import read_dataset
    from node.process.overlap import Overlap
    from node.process.pipeline import analyze, model_batch
    from node.process.summarize import Summarizer
    from node.sr.report import ReportContext
    from node.sr.srtemplate import ReportEncoder

    clf = load_classifier(
        ModelConfig(
            cache_dir=Path(tempfile.mkdtemp()),
            allow_untrained=True,
            allow_download=False,
            device="cpu",
        )
    )
    # model.trace, .channels_last and .streams as the node runs them; CXR_NODE_MODEL__TRACE=
    # false, CXR_NODE_MODEL__CHANNELS_LAST=false or CXR_NODE_MODEL__STREAMS=1 for an A/B
    model_cfg = ModelConfig.model_validate(
        {k: os.environ[e] for k, e in MODEL_ENV.items() if e in os.environ}
    )
    torch_threads = torch.get_num_threads()
    traced = clf.trace_as_configured(model_cfg)
    node_threads = torch.get_num_threads()  # per stream
    module = xrv.models.DenseNet(weights=None).eval()  # raw: torchxrayvision's, eager

    @contextmanager
    def raw_threads() -> Iterator[None]:
        """torch's own threads for the raw model, whatever the streams took."""
        torch.set_num_threads(torch_threads)
        try:
            yield
        finally:
            torch.set_num_threads(node_threads)

    def raw_rate(bs: int, images: int) -> float:
        x = torch.zeros((bs, 1, 224, 224))
        with torch.inference_mode(), raw_threads():
            module(x)
            reps = max(2, images // bs)
            return bs * reps / timed(lambda: [module(x) for _ in range(reps)])

    # malloc as serve and classify set it, for the largest batch tried (raw shares it)
    malloc_tuned = keep_freed_memory(16)
    raw = {bs: raw_rate(bs, 32) for bs in (1, 4, 8, 16)}
    best_bs = max(raw, key=lambda k: raw[k])
    ctx = ReportContext(uid_root="1.2.826.0.1.3680043.8.498.", device_name="BENCH")
    reports = ReportEncoder(clf.info, ctx)
    summaries = Summarizer(clf.info, ctx, clf.class_weights())
    blobs = [p.read_bytes() for p in images[:64]]
    chunks = [blobs[i : i + best_bs] for i in range(0, len(blobs), best_bs)]
    # raw model(x) on the same images, preprocessed outside its timing
    inputs = [
        torch.from_numpy(np.stack([preprocess(read_dataset(b)).array for b in chunk]))
        for chunk in chunks
    ]
    stages: dict[str, float] = {}
    with_summary: dict[str, float] = {}
    maps_drawn = [0]

    def raw_batch(x: torch.Tensor) -> float:
        with torch.inference_mode(), raw_threads():
            return timed(lambda: module(x))

    def pipeline_batch(chunk: list[bytes], summary: bool = False) -> float:
        t = time.perf_counter()
        dss = [read_dataset(b) for b in chunk]
        out = analyze(dss, clf, reports, datetime.now(), summaries if summary else None)
        seconds = time.perf_counter() - t
        for o in out:
            assert not isinstance(o, Exception), o
            assert (o.summary is not None) == summary, "summary image missing"
            maps_drawn[0] += summary and min(3, sum(f.present for f in o.findings))
            for k, v in o.timings.items():
                into = with_summary if summary else stages
                into[k] = into.get(k, 0.0) + v
        return seconds

    def overlapped(chunks: list[list[bytes]]) -> float:
        """All batches with their summary images as the worker runs them
        (``worker.overlap``): one batch's summaries and SRs built while the model runs on
        the next."""
        overlap: Overlap[int] = Overlap(reports, summaries)

        def check(done: tuple[int, list[Any]] | None) -> None:
            for o in [] if done is None else done[1]:
                assert not isinstance(o, Exception), o
                assert o.summary is not None, "summary image missing"

        t = time.perf_counter()
        for i, chunk in enumerate(chunks):
            classified = model_batch([read_dataset(b) for b in chunk], clf, summaries=True)
            check(overlap.collect())
            overlap.submit(i, classified, datetime.now())
        check(overlap.collect())
        return time.perf_counter() - t

    def raw_stream() -> float:
        return sum(raw_batch(x) for x in inputs)

    for chunk, x in zip(chunks, inputs, strict=True):  # warm-up (operators, SR header cache)
        raw_batch(x)
        pipeline_batch(chunk)
        pipeline_batch(chunk, summary=True)
    overlapped(chunks[:2])
    stages.clear()
    with_summary.clear()
    maps_drawn[0] = 0
    # Raw and pipeline alternate batch by batch over the same images: a shared machine's
    # drift (±10 % within seconds here) then hits both sides of each ratio alike. The
    # overlapped pipeline spans batches, so it alternates with raw over all the images.
    rounds = []
    n = len(blobs)
    for _ in range(3):
        raw_s = pipe_s = summary_s = 0.0
        for chunk, x in zip(chunks, inputs, strict=True):
            raw_s += raw_batch(x)
            pipe_s += pipeline_batch(chunk)
            summary_s += pipeline_batch(chunk, summary=True)
        r, p, ps = n / raw_s, n / pipe_s, n / summary_s
        # the overlapped stream twice over (128 images): a burst's first model batch and
        # last completion have nothing beside them, which 4 batches of 16 overstate
        r2 = 2 * n / (raw_stream() + raw_stream())
        po = 2 * n / overlapped(chunks + chunks)
        # and against the node's own model as it runs it (the traced graph, if traced)
        rt = 2 * n / sum(timed(lambda x=x: clf.predict(x.numpy())) for x in inputs + inputs)
        rounds.append(
            {
                "raw": r,
                "pipeline": p,
                "ratio": p / r,
                "summary_one_batch_at_a_time": ps,
                "s1_ratio": ps / r,
                "raw_before_overlapped": r2,
                "summary": po,
                "s_ratio": po / r2,
                "raw_as_the_node_runs_it": rt,
                "s_ratio_node_model": po / rt,
            }
        )
    ratio = statistics.median(x["ratio"] for x in rounds)
    summary_ratio = statistics.median(x["s_ratio"] for x in rounds)
    encoders = sr_encoders(clf.info, ctx, [read_dataset(b) for b in blobs[:32]])
    return {
        "threads": torch_threads,
        "model_traced": traced,
        "model": model_cfg.model_dump(include={"trace", "channels_last", "streams"}),
        "threads_per_stream": node_threads,
        "malloc_thresholds_kept": malloc_tuned,
        "raw_images_per_s": raw,
        "best_batch": best_bs,
        "rounds": rounds,
        "pipeline_images_per_s": statistics.median(x["pipeline"] for x in rounds),
        "pipeline_vs_raw": ratio,
        "pipeline_seconds_per_image_by_stage": {k: v / (3 * len(blobs)) for k, v in stages.items()},
        "pipeline_with_summary_images_per_s": statistics.median(x["summary"] for x in rounds),
        "pipeline_with_summary_vs_raw": summary_ratio,
        "pipeline_with_summary_vs_the_nodes_own_model": statistics.median(
            x["s_ratio_node_model"] for x in rounds
        ),
        "pipeline_with_summary_one_batch_at_a_time_vs_raw": statistics.median(
            x["s1_ratio"] for x in rounds
        ),
        "pipeline_with_summary_seconds_per_image_by_stage": {
            k: v / (3 * len(blobs)) for k, v in with_summary.items()
        },
        "summary_heat_maps_per_image": maps_drawn[0] / (3 * len(blobs)),
        "sr_encode_ms_per_image": encoders,
        "numpy": np.__version__,
    }


def sr_encoders(info: Any, ctx: Any, sources: list[Any]) -> dict[str, float]:
    """CPU ms per SR: the template encoder (``report.fast_encoder = true``) and highdicom's
    build (false), on the same sources and findings, each kind's first image (the template
    encoder's check against highdicom) left out."""
    from datetime import datetime

    import numpy as np

    from node.analysis.model import to_findings
    from node.sr.srtemplate import ReportEncoder

    findings = to_findings(np.linspace(0.1, 0.9, len(info.pathologies), dtype=np.float32), info)
    now = datetime(2026, 1, 2, 3, 4, 5)
    out = {}
    for name, fast in (("template", True), ("highdicom", False)):
        encoder = ReportEncoder(info, ctx, fast=fast)
        for ds in sources:  # warm: the template, each header kind and its check
            encoder.encode(ds, findings, now)
        t = time.process_time()
        for ds in sources:
            encoder.encode(ds, findings, now)
        out[name] = 1000 * (time.process_time() - t) / len(sources)
    return out


def bench_classify(images: list[Path], work: Path, rounds: int = 3) -> dict[str, Any]:
    """``cxr-node classify`` over a folder (CSV + JSON out) vs raw model(x) at the same
    threads and batch size; the command's start-up (imports, model load) is measured on 4
    images and taken off."""
    import torch
    import torchxrayvision as xrv

    folder = work / "classify-in"
    folder.mkdir(exist_ok=True)
    for p in images:
        (folder / p.name).symlink_to(p)
    small = work / "classify-small"
    small.mkdir(exist_ok=True)
    for p in images[:4]:
        (small / p.name).symlink_to(p)
    env = {
        **NODELAY,
        **node_settings_env(),
        "CXR_NODE_MODEL__CACHE_DIR": str(work / "models"),
        "CXR_NODE_MODEL__ALLOW_UNTRAINED": "true",
        "CXR_NODE_MODEL__ALLOW_DOWNLOAD": "false",
        "CXR_NODE_LOGGING__LEVEL": "WARNING",
    }

    def run(src: Path) -> float:
        out = work / "classify-out"
        cmd = [PY, "-m", "node", "classify", str(src), "--follow-symlinks"]
        cmd += ["--csv", str(out.with_suffix(".csv")), "--json", str(out.with_suffix(".json"))]
        return timed(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True))

    from node.analysis.allocator import keep_freed_memory

    keep_freed_memory(4)  # as classify sets it: raw model(x) under the same malloc tuning
    module = xrv.models.DenseNet(weights=None).eval()
    x = torch.zeros((4, 1, 224, 224))

    def raw_rate() -> float:
        with torch.inference_mode():
            module(x)
            reps = 25
            return 4 * reps / timed(lambda: [module(x) for _ in range(reps)])

    # raw is measured right before and after each classify round, and each round's ratio is
    # taken against the mean of the two: on a shared machine the load drifts within minutes
    results = []
    for _ in range(rounds):
        before = raw_rate()
        startup = run(small)
        whole = run(folder)
        after = raw_rate()
        rate = (len(images) - 4) / max(1e-6, whole - startup)
        raw = (before + after) / 2
        results.append(
            {
                "startup_s": startup,
                "total_s": whole,
                "images_per_s": rate,
                "raw_before": before,
                "raw_after": after,
                "ratio": rate / raw,
            }
        )
    return {
        "images": len(images),
        "threads": torch.get_num_threads(),
        "raw_images_per_s": statistics.median(
            (r["raw_before"] + r["raw_after"]) / 2 for r in results
        ),
        "rounds": results,
        "classify_images_per_s": statistics.median(r["images_per_s"] for r in results),
        "classify_vs_raw": statistics.median(r["ratio"] for r in results),
    }


def bench_e2e(images: list[Path], work: Path, singles: int = 50) -> dict[str, Any]:
    """Orthanc stored the image -> the SR is stored in Orthanc: p50/p95, and a burst."""
    node_port = free_port()
    with orthanc(work / "orthanc-e2e", node_port=node_port, lua=True) as o:
        node = start_node(work, o.dicom, node_port)
        try:
            lat = []
            for p in images[:singles]:
                before = o.count()
                subprocess.run(
                    _storescu_to_orthanc(o.dicom, [p]),
                    env=NODELAY,
                    check=True,
                    capture_output=True,
                )
                t0 = time.perf_counter()  # storescu returned: Orthanc has stored the image
                wait_for(lambda: o.count() >= before + 2, 60, "the SR", every=0.005)  # noqa: B023
                lat.append(time.perf_counter() - t0)
                time.sleep(0.3)
            burst = images[singles:]
            before = o.count()
            t0 = time.perf_counter()
            subprocess.run(
                _storescu_to_orthanc(o.dicom, burst),
                env=NODELAY,
                check=True,
                capture_output=True,
            )
            wait_for(lambda: o.count() >= before + 2 * len(burst), 900, "the burst's SRs", 0.05)
            burst_s = time.perf_counter() - t0
        finally:
            node.terminate()
            node.wait(60)
    q = statistics.quantiles(lat, n=20)
    return {
        "singles": len(lat),
        "p50_s": statistics.median(lat),
        "p95_s": q[18],
        "max_s": max(lat),
        "burst_images": len(burst),
        "burst_total_s": burst_s,
        "burst_images_per_s": len(burst) / burst_s,
    }


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def bench_memory(images: list[Path], work: Path) -> dict[str, Any]:
    """Peak RSS of the node while a backlog of N images is queued (destination down)."""
    out: dict[str, Any] = {}
    for n in (200, len(images)):
        sub = work / f"mem{n}"
        sub.mkdir()
        port = free_port()
        node = start_node(sub, free_port(), port)  # destination down: SRs pile up too
        try:
            _storescu_time(port, images[:n])
            time.sleep(5)  # the worker is busy classifying the backlog
            out[f"peak_rss_mb_backlog_{n}"] = _peak_rss_kb(node.pid) / 1024
        finally:
            node.terminate()
            node.wait(60)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "which", nargs="*", default=["push", "ingest", "associations", "inference", "e2e", "memory"]
    )
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="push and ingest rounds")
    parser.add_argument(
        "--route-variants",
        help="route: comma-separated names from bench/route.py VARIANTS (default: all)",
    )
    parser.add_argument("--route-rounds", type=int, default=3)
    parser.add_argument(
        "--route-scenarios",
        default="kill,burst,storescp",
        help="route: kill, burst, storescp, direct, alone",
    )
    args = parser.parse_args()
    # torch's threads wait in this process as in the node's: model.omp_wait_policy, or
    # CXR_NODE_MODEL__OMP_WAIT_POLICY / OMP_WAIT_POLICY from the environment for an A/B (the
    # node processes the bench starts get them too)
    policy = os.environ.get(WAIT_POLICY_ENV, ModelConfig().omp_wait_policy)
    wait_policy = apply_wait_policy(ModelConfig(omp_wait_policy=policy).omp_wait_policy)
    results: dict[str, Any] = {
        "machine": machine(),
        "tcp_nodelay": "1 for every peer",
        "omp_wait_policy": wait_policy,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = make_images(args.n, work / "images", "bench")
        backlog = "memory" in args.which or "classify" in args.which
        images = make_images(1000, work / "backlog", "backlog") if backlog else []
        steps = {
            "push": lambda: bench_push(base, work, args.rounds),
            "ingest": lambda: bench_ingest(base, work, args.rounds),
            "associations": lambda: bench_associations(base[:100], work),
            "inference": lambda: bench_inference(base),
            "e2e": lambda: bench_e2e(base, work),
            "memory": lambda: bench_memory(images, work),
            "classify": lambda: bench_classify(images, work),
            "route": lambda: bench_route(
                work,
                {
                    name: results["inference"][key]
                    for name, key in (
                        ("pipeline", "pipeline_images_per_s"),
                        ("pipeline_with_summary", "pipeline_with_summary_images_per_s"),
                    )
                    if "inference" in results
                },
                args.route_variants.split(",") if args.route_variants else None,
                args.route_rounds,
                scenarios=tuple(args.route_scenarios.split(",")),
            ),
        }
        for name in args.which:
            t = time.perf_counter()
            results[name] = steps[name]()
            results[name]["bench_seconds"] = time.perf_counter() - t
            sys.stdout.write(f"\n== {name}\n{json.dumps(results[name], indent=2)}\n")
            sys.stdout.flush()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    rows = [("benchmark", "metric", "value")]
    for name in args.which:
        for k, v in results[name].items():
            if isinstance(v, float):
                rows.append((name, k, f"{v:.3f}"))
    sys.stdout.write("\n" + table(rows) + f"\n\nresults: {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

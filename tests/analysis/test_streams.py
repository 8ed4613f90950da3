"""A batch's parts through the traced graph at once (``model.streams``,
node.analysis.streams): the same outputs in the batch's order, what a part raises comes
back, torch's threads shared out, and only for the graph."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from node.analysis.model import load_classifier
from node.analysis.streams import Streams, start_streams
from node.core.config import ModelConfig


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_parts_run_at_once_in_their_own_threads_and_join_in_order():
    seen: list[tuple[str, int]] = []
    both = threading.Barrier(2, timeout=10)  # each part waits for the other: run at once

    def fn(part: torch.Tensor) -> torch.Tensor:
        seen.append((threading.current_thread().name, len(part)))
        both.wait()
        assert torch.is_inference_mode_enabled()
        return part * 2

    streams = Streams(2)
    x = torch.arange(5.0).reshape(5, 1)
    with torch.inference_mode():
        out = streams(fn, x)
    streams.close()
    assert out.flatten().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert sorted(n for _, n in seen) == [2, 3]
    assert len({name for name, _ in seen}) == 2


def test_a_batch_of_one_runs_whole():
    calls = []
    streams = Streams(2)
    out = streams(lambda p: calls.append(len(p)) or p, torch.ones((1, 3)))
    streams.close()
    assert calls == [1] and out.shape == (1, 3)


def test_what_a_part_raises_comes_back():
    def fn(part: torch.Tensor) -> torch.Tensor:
        if threading.current_thread().name.startswith("model-stream"):
            raise RuntimeError("out of memory in the second part")
        return part

    streams = Streams(2)
    with pytest.raises(RuntimeError, match="second part"):
        streams(fn, torch.ones((4, 1)))
    streams.close()


HUNG_PART = textwrap.dedent(
    """
    import contextlib, sys, threading, time, types

    # torch's two calls, on a list: the exit is the subject, not the tensors (fast to start)
    stub = types.ModuleType("torch")
    stub.tensor_split = lambda x, n: [x[: len(x) // n], x[len(x) // n :]]
    stub.cat = lambda parts: sum(parts, [])
    stub.inference_mode = contextlib.nullcontext
    sys.modules["torch"] = stub
    from node.analysis.streams import Streams

    streams = Streams(2)

    def fn(part):
        if threading.current_thread().name.startswith("model-stream"):
            time.sleep(3600)  # a forward that never returns
        return part

    # the node's worker thread (a daemon): stop() gives up on it at worker.shutdown_timeout
    threading.Thread(target=streams, args=(fn, [1, 2]), daemon=True).start()
    time.sleep(0.2)
    print("main returns", flush=True)
    """
)


def test_a_hung_part_does_not_keep_the_process_from_exiting():
    """The worker is a daemon thread so that the node exits once ``worker.shutdown_timeout``
    has passed, whatever its batch does; a part running in a stream thread must not hold
    the interpreter's exit either (concurrent.futures joins its threads at exit)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", HUNG_PART], env=env, capture_output=True, text=True, timeout=20
    )
    assert "main returns" in done.stdout, done.stderr
    assert done.returncode == 0, done.stderr


def test_torch_threads_are_shared_out(torch_threads):
    torch.set_num_threads(4)
    streams = start_streams(2)
    assert streams is not None and streams.count == 2
    assert torch.get_num_threads() == 2
    streams.close()
    torch.set_num_threads(1)
    streams = start_streams(3)
    assert streams is not None and torch.get_num_threads() == 1  # at least one each
    streams.close()


def test_one_stream_leaves_torch_as_it_is(torch_threads):
    torch.set_num_threads(2)
    assert start_streams(1) is None
    assert torch.get_num_threads() == 2


def _classifier(weights_dir: Path):
    return load_classifier(
        ModelConfig(cache_dir=weights_dir, allow_untrained=True, allow_download=False, device="cpu")
    )


def test_the_graph_in_two_streams_gives_the_modules_scores_and_maps(weights_dir, torch_threads):
    clf = _classifier(weights_dir)
    rng = np.random.default_rng(11)
    batch = (rng.random((3, 1, 224, 224)) * 2048 - 1024).astype(np.float32)
    scores, maps = clf.predict_with_maps(batch)
    assert clf.trace(streams=2) and clf._streams is not None
    split_scores, split_maps = clf.predict_with_maps(batch)
    np.testing.assert_allclose(split_scores, scores, atol=1e-5)
    np.testing.assert_allclose(split_maps, maps, atol=1e-5 * float(np.abs(maps).max()))
    np.testing.assert_allclose(clf.predict(batch), scores, atol=1e-5)


def test_no_streams_without_the_graph(weights_dir, monkeypatch, torch_threads):
    clf = _classifier(weights_dir)
    monkeypatch.setattr("node.analysis.model.traced", lambda *_: None)
    threads = torch.get_num_threads()
    assert not clf.trace(streams=2)
    assert clf._streams is None and torch.get_num_threads() == threads


def test_a_thread_count_set_in_another_thread_is_undone_for_later_threads():
    """torch.set_num_threads in the worker's thread (start_streams) leaves the calling
    thread's count as it was but is what every thread started later gets: the tests'
    restore (tests/helpers.py, conftest's autouse fixture) must undo it for those."""
    from helpers import torch_threads_kept

    def started_later() -> int:
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return seen[0]

    before = started_later()
    other = 1 if before > 1 else 2
    with torch_threads_kept():
        worker = threading.Thread(target=torch.set_num_threads, args=(other,))
        worker.start()
        worker.join()
        assert started_later() == other  # what the worker set reaches later threads
    assert started_later() == before

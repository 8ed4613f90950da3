"""DenseNet-121's layers as a TorchScript graph (``model.trace``): the same results as the
module, and the module kept wherever the graph cannot be had or differs
(node.analysis.graph)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import NIH
from reference import xrv_input, xrv_outputs

from node.analysis import graph
from node.analysis.model import load_classifier
from node.core.config import ModelConfig


def _classifier(weights_dir: Path):
    return load_classifier(
        ModelConfig(cache_dir=weights_dir, allow_untrained=True, allow_download=False, device="cpu")
    )


def test_the_graph_gives_the_modules_scores_and_maps(weights_dir):
    clf = _classifier(weights_dir)
    rng = np.random.default_rng(7)
    batch = np.stack([xrv_input(NIH), *(rng.random((2, 1, 224, 224)) * 2048 - 1024)])
    batch = batch.astype(np.float32)
    scores, maps = clf.predict_with_maps(batch)
    assert clf.trace() and clf.traced
    assert isinstance(clf._module.features, torch.jit.ScriptModule)
    traced_scores, traced_maps = clf.predict_with_maps(batch)
    np.testing.assert_allclose(traced_scores, scores, atol=1e-5)
    np.testing.assert_allclose(traced_maps, maps, atol=1e-5 * float(np.abs(maps).max()))
    np.testing.assert_allclose(clf.predict(batch), scores, atol=1e-5)
    # and torchxrayvision's own forward pass on the same weights
    want = xrv_outputs(batch[0], weights_dir)
    got = clf.predict(batch[:1])[0]
    np.testing.assert_allclose(got, [want[p] for p in clf.info.pathologies], atol=1e-5)
    assert clf.trace()  # once: the graph is not traced again


def _tiny() -> torch.nn.Module:
    """A stand-in for DenseNet's layers: quick to trace."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()


def test_a_graph_that_differs_from_the_module_is_not_used(monkeypatch, caplog):
    real_freeze = torch.jit.freeze

    def off_by_a_little(module):
        frozen = real_freeze(module)
        return lambda x: frozen(x) * 1.001

    monkeypatch.setattr(torch.jit, "freeze", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger="node.analysis.graph"):
        assert graph.traced(_tiny(), "cpu") is None
    assert "differs from the module by 0.001" in caplog.text


def test_tracing_that_raises_keeps_the_module(monkeypatch, caplog):
    def broken(*_args, **_kwargs):
        raise RuntimeError("Tracer cannot infer type of output")

    monkeypatch.setattr(torch.jit, "trace", broken)
    with caplog.at_level(logging.WARNING, logger="node.analysis.graph"):
        assert graph.traced(_tiny(), "cpu") is None
    assert "tracing failed (RuntimeError: Tracer cannot infer type of output)" in caplog.text


def test_a_torch_without_trace_or_freeze_keeps_the_module(monkeypatch, caplog):
    monkeypatch.setattr(torch, "jit", SimpleNamespace(trace=torch.jit.trace))  # no freeze
    with caplog.at_level(logging.WARNING, logger="node.analysis.graph"):
        assert graph.traced(_tiny(), "cpu") is None
    assert "has no torch.jit.trace/freeze" in caplog.text


def test_not_on_cuda(caplog):
    with caplog.at_level(logging.INFO, logger="node.analysis.graph"):
        assert graph.traced(_tiny(), "cuda") is None
    assert "not on cuda" in caplog.text


def test_a_classifier_whose_graph_cannot_be_had_stays_eager(weights_dir, monkeypatch):
    clf = _classifier(weights_dir)
    monkeypatch.setattr("node.analysis.model.traced", lambda *_: None)
    eager = clf._module.features
    assert not clf.trace() and clf._module.features is eager


@pytest.mark.parametrize("trace", [True, False])
def test_the_worker_traces_as_configured_before_its_first_batch(weights_dir, tmp_path, trace):
    import threading

    from node.core.config import NodeConfig
    from node.jobs.worker import Worker
    from node.store.spool import Spool

    cfg = NodeConfig.model_validate(
        {"model": {"cache_dir": str(weights_dir), "allow_untrained": True, "trace": trace}}
    )
    clf = _classifier(weights_dir)
    spool = Spool(tmp_path / "spool", fsync=False)
    stop = threading.Event()
    stop.set()  # no round: only what the worker does before its first batch
    Worker(spool, clf, cfg).run(stop)
    spool.close()
    assert clf.traced is trace


def test_whatever_tracing_raises_leaves_the_classifier_as_it_is(weights_dir, caplog):
    clf = _classifier(weights_dir)
    clf._module = SimpleNamespace()  # no layers at all
    with caplog.at_level(logging.WARNING, logger="node.analysis.model"):
        assert not clf.trace()
    assert "not traced (AttributeError" in caplog.text


def _two_convs() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3)).eval()


def _layout(module: torch.nn.Module) -> str:
    weight = module[1].weight  # 4 input channels: the two layouts differ
    return "channels_last" if weight.is_contiguous(memory_format=torch.channels_last) else "nchw"


@pytest.mark.parametrize(("channels_last", "layout"), [(True, "channels_last"), (False, "nchw")])
def test_the_graph_is_traced_in_the_layout_asked_and_the_module_left_as_built(
    monkeypatch, channels_last, layout
):
    seen = []
    real_trace = torch.jit.trace

    def spy(module, *args, **kwargs):
        seen.append(_layout(module))
        return real_trace(module, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", spy)
    module = _two_convs()
    assert graph.traced(module, "cpu", channels_last) is not None
    assert seen == [layout]  # channels last: the layout whose CPU convolutions are faster
    assert _layout(module) == "nchw"  # the eager module as torchxrayvision built it


def test_without_channels_last_a_module_is_left_in_its_own_layout():
    module = _two_convs().to(memory_format=torch.channels_last)
    assert graph.traced(module, "cpu", channels_last=False) is not None
    assert _layout(module) == "channels_last"  # not turned into the default layout


def test_a_failed_trace_leaves_the_module_as_built(monkeypatch):
    def broken(module, *_args, **_kwargs):
        assert _layout(module) == "channels_last"
        raise RuntimeError("no")

    monkeypatch.setattr(torch.jit, "trace", broken)
    module = _two_convs()
    assert graph.traced(module, "cpu") is None
    assert _layout(module) == "nchw"


@pytest.mark.parametrize(
    ("channels_last", "streams", "batch_size", "expected"),
    [(True, 2, 4, 2), (False, 1, 4, 1), (True, 8, 4, 4)],  # never more than a batch's images
)
def test_the_worker_traces_with_the_models_layout_and_streams(
    weights_dir, tmp_path, channels_last, streams, batch_size, expected
):
    import threading

    from node.core.config import NodeConfig
    from node.jobs.worker import Worker
    from node.store.spool import Spool

    asked = []
    model = {"cache_dir": str(weights_dir), "allow_untrained": True}
    model.update(channels_last=channels_last, streams=streams, batch_size=batch_size)
    cfg = NodeConfig.model_validate({"model": model})
    clf = _classifier(weights_dir)
    clf.trace = lambda *args: asked.append(args)
    spool = Spool(tmp_path / "spool", fsync=False)
    stop = threading.Event()
    stop.set()
    Worker(spool, clf, cfg).run(stop)
    spool.close()
    assert asked == [(channels_last, expected)]

"""A spool-only node SCP (classification paused) for the ingest benchmark.

Usage: python -m bench.ingest_server PORT SPOOL_DIR FSYNC(0|1) [FAST_PATHS(1|0)]
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from node.analysis.allocator import keep_freed_memory
from node.core.config import ModelConfig, ScpConfig
from node.net.fast.fastpaths import resolve
from node.net.scp import start_server
from node.store.spool import Spool


def main() -> None:
    port, spool_dir, fsync = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    fast = resolve(sys.argv[4:5] != ["0"])  # network.fast_paths, as serve resolves it
    keep_freed_memory(ModelConfig().batch_size)  # the process settings serve has
    spool = Spool(spool_dir, fsync=fsync)
    cfg = ScpConfig(port=port, allowed_calling_aets=("STORESCU",))
    server = start_server(cfg, spool, fast_paths=fast)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()

"""Unit: push's progress line (tqdm on a terminal, nothing otherwise), updated from many
sending threads at once."""

from __future__ import annotations

import io
import threading

from node.tools.push import Progress, Summary


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_every_thread_s_files_are_counted_on_one_line():
    out, summary = Terminal(), Summary()
    progress = Progress(out)

    def send(k: int) -> None:
        for i in range(250):
            if i % 50 == 0:
                summary.fail(f"{k}-{i}", "refused")
            else:
                summary.stored(f"{k}-{i}", 10_000, 0x0000)
            progress.update(summary)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    progress.close()
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("2000file [")  # every file done, sent or failed
    assert last.endswith("40 failed, 0 skipped, 19.6 MB]")


def test_not_a_terminal_shows_nothing():
    out, summary = io.StringIO(), Summary()
    progress = Progress(out)
    summary.stored("a", 10, 0x0000)
    progress.update(summary)
    progress.close()
    assert out.getvalue() == ""

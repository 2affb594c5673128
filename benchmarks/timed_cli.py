"""``python -m benchmarks.timed_cli ARGS…``: ``mergekit ARGS…``, timed once mergekit is imported.

Writes the seconds spent in the command itself (CSV, render, ledger, send) to
the file named by ``MERGEKIT_BENCH_TIMING``, so the figure compares with
clients timed the same way; the benchmark reports the whole command's wall time too.
pyarrow's CSV reader and compute functions, which mergekit imports only once it
reads a CSV, are imported before the clock starts as well: imports, like the
plain loop's aiosmtplib.
"""

from __future__ import annotations

import os
import sys
import time

import pyarrow.compute
import pyarrow.csv  # noqa: F401

from mergekit.cli import main

if __name__ == "__main__":
    started = time.perf_counter()
    code = 0
    try:
        main(sys.argv[1:])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    with open(os.environ["MERGEKIT_BENCH_TIMING"], "w") as file:
        file.write(str(time.perf_counter() - started))
    sys.exit(code)

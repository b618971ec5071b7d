"""How long ``audit`` takes and how much memory it holds: cold (the backbone computes every feature) and cached (the
features stored by the first run, or by a frozen ``fit``), each in a fresh process; the ratio of the two. Any
``audit`` options after ``--``::

    python benchmarks/audit_speed.py -- --config configs/timm/efficientnet_lite0_frozen.yaml \\
        --config configs/overrides/shared_efficientnet_lite0.yaml --data.data_dir ../shared/data/cifar10

The feature cache goes to a fresh temporary folder (``--feature_cache.cache_dir``), so the first run is cold
whatever ran before; the decoded images' store is the data's usual one. Peak memory is the process's maximum
resident set size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

#: The child process: the audit, then its own peak resident memory (KiB) on the last line.
CHILD = (
    "import resource, sys; from transfer_lightning.commands.main import main; main(['audit', *sys.argv[1:]]); "
    "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def run(arguments: list[str]) -> tuple[float, float]:
    """Seconds and peak resident memory (GiB) of one ``audit`` in a process of its own."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *arguments], check=True, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    print(done.stdout, end="")
    peak_kib = int(done.stdout.strip().splitlines()[-1].split()[1])
    return seconds, peak_kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audit_arguments", nargs=argparse.REMAINDER)
    arguments = [a for a in parser.parse_args().audit_arguments if a != "--"]
    with tempfile.TemporaryDirectory() as folder:
        common = [*arguments, f"--feature_cache.cache_dir={folder}/features", "--trainer.enable_progress_bar=false"]
        cold = run([*common, f"--output={folder}/cold"])
        cached = run([*common, f"--output={folder}/cached"])
    print(f"cold:   {cold[0]:7.1f} s, peak memory {cold[1]:.2f} GiB")
    print(f"cached: {cached[0]:7.1f} s, peak memory {cached[1]:.2f} GiB")
    print(f"cold / cached: {cold[0] / cached[0]:.1f}x")


if __name__ == "__main__":
    main()

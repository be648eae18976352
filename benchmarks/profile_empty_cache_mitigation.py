"""cProfile of reduce_intruder_dimension with an empty base-spectrum cache on the 2-layer
2048-wide Llama of bench_mitigation.py: the breakdown quoted in benchmarks/RESULTS.md 5.4 (a
diagnostic script, not a benchmark).

    HF_HUB_OFFLINE=1 python benchmarks/profile_empty_cache_mitigation.py
"""

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_mitigation  # noqa: E402  (the benchmark's model, not a copy of it)

import intruder_ext  # noqa: E402
from intruder_ext.cache import SpectrumCache  # noqa: E402


def main():
    model = bench_mitigation.llama2048()
    with tempfile.TemporaryDirectory() as cache:
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        intruder_ext.reduce_intruder_dimension(model, logging_sink=lambda line: None,
                                               cache_dir=SpectrumCache(cache))
        profile.disable()
        print(f"total {time.perf_counter() - t0:.1f} s")
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()

"""Where base_spectrum's time goes on the tall Llama-2-7B shape, and what else was tried: the
component timings quoted in benchmarks/RESULTS.md 5.1 and 5.4 (a diagnostic script, not a
benchmark: one run, best of ``ROUNDS``, printed).

    python benchmarks/profile_base_spectrum_parts.py

- the float64 Gram matrix of an 11008 x 4096 bf16-valued weight: one product against
  intruder_ext's symmetric blocks (spectral._gram);
- torch.linalg.eigh of 4096- and 2048-wide float64 Gram matrices, on two threads and one;
- scipy.linalg.eigh's drivers on the same matrices, where scipy is installed (not a dependency).
"""

import time

import torch

from intruder_ext.spectral import _gram

ROUNDS = 2


def best(fn, rounds=ROUNDS):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    torch.manual_seed(0)
    W = (torch.randn(11008, 4096) / 64).to(torch.bfloat16).double()
    print(f"Gram 11008 x 4096, one product:      {best(lambda: W.mT @ W):.2f} s")
    print(f"Gram 11008 x 4096, symmetric blocks: {best(lambda: _gram(W)):.2f} s")
    G4 = _gram(W)
    del W
    A = torch.randn(2048, 5632, dtype=torch.float64)
    G2 = A @ A.mT
    threads = torch.get_num_threads()
    for name, G in (("4096", G4), ("2048", G2)):
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            print(f"eigh {name}, float64, {n} thread(s): {best(lambda: torch.linalg.eigh(G)):.2f} s")
        torch.set_num_threads(threads)
        print(f"eigh {name}, float32:                {best(lambda: torch.linalg.eigh(G.float())):.2f} s")
    try:
        import scipy.linalg
    except ImportError:
        print("scipy not installed: its drivers not measured")
        return
    for name, G in (("4096", G4), ("2048", G2)):
        for driver in ("evd", "evr"):
            t = best(lambda: scipy.linalg.eigh(G.numpy(), driver=driver, check_finite=False))
            print(f"scipy eigh {name}, driver {driver}:     {t:.2f} s")


if __name__ == "__main__":
    main()

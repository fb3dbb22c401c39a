"""Every kernel variant of the CUDA extension once, on small ragged inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/cuda_sanitize_probe.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_sanitize_probe.py --small

Values are not checked here (tests/test_cuda_ext.py does that); this only drives each variant the
wrappers can pick (fp32/bf16/fp16 weights; 16-byte-vector and scalar loads through a misaligned
view; fp32 and bf16 Ω; tensor-core and SIMT products; with and without L Rᵀ; ragged edges) so the
sanitizer sees every out-of-bounds access, misaligned access or shared-memory race. Inputs are made
on the host so that the only device kernels besides ours are copies. Prints one line per call and
"probe done" at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

from r2m_fast import cuda_ops

SHAPES = [(33, 47), (65, 129), (1, 40), (1000, 3), (130, 257)]
SMALL_SHAPES = [(33, 47), (65, 129)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def family(n: int, shape: tuple[int, int], dtype: torch.dtype, misaligned: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n * 1000 + shape[0])
    base = torch.randn(shape, generator=g)
    out = [base] + [base + 1e-2 * torch.randn(shape, generator=g) for _ in range(n)]
    if not misaligned:
        return [w.to(dtype).cuda() for w in out]
    # One extra leading element makes every row start off the 16-byte boundary: the scalar variants.
    return [torch.cat([torch.zeros(1), w.flatten()]).to(dtype).cuda()[1:].view(shape) for w in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="two shapes and N = 3 only (for racecheck)")
    args = parser.parse_args()
    reason = cuda_ops.unavailable_reason()
    if reason is not None:
        print(f"cuda backend unavailable: {reason}")
        return 2
    shapes = SMALL_SHAPES if args.small else SHAPES
    counts = [3] if args.small else [2, 3, 8]
    for (m, n), N, dtype, misaligned, mma in itertools.product(shapes, counts, DTYPES, (False, True), ("1", "0")):
        os.environ["R2M_CUDA_SKETCH_MMA"] = os.environ["R2M_CUDA_ACCUMULATE_MMA"] = mma
        w = family(N, (m, n), dtype, misaligned)
        s = max(1, min(m, n) // 3 + 2)
        g = torch.Generator().manual_seed(m + n)
        for omega_dtype in (torch.float32, torch.bfloat16):
            omega = torch.randn(n, s, generator=g).to(omega_dtype).cuda()
            cuda_ops.gram_sketch(w, omega)
        cuda_ops.gram_sketch(w, None)
        k = max(1, N * (s - 2))
        left = (1e-3 * torch.randn(m, k, generator=g)).cuda()
        right = torch.randn(n, k, generator=g).cuda()
        coeffs = torch.linspace(0.1, 0.3, N)
        for out_dtype in DTYPES:
            cuda_ops.accumulate(w, coeffs, left, right, out_dtype)
            cuda_ops.accumulate(w, coeffs, None, None, out_dtype)
        torch.cuda.synchronize()
        print(f"ok {m}x{n} N={N} {dtype} misaligned={misaligned} mma={mma}", flush=True)
    print("probe done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

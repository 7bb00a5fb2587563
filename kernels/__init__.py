"""Block scatter/gather kernels.

``scatter_chunk`` writes one chunk of a source (tensors or pool blocks) into
destination pool blocks; ``gather_chunk`` builds the merged contiguous tensors
from pool blocks.  Pools on a CUDA device use the CuPy kernels of
:mod:`embresume.kernels.cuda`; everything else uses the torch implementations of
:mod:`embresume.kernels.cpu`, which define the reference semantics.
"""

from __future__ import annotations

if __name__ == "embresume.kernels":
    from embresume.kernels import cpu

    def _on_cuda(pool) -> bool:
        c = getattr(pool, "is_cuda", None)        # BlockPool: a plain attribute
        if c is None:
            c = getattr(pool.embeddings, "is_cuda", False)
        return c

    def scatter_chunk(dst, dst_blocks, src, src_block0, n_tokens, aux=None) -> None:
        if _on_cuda(dst):
            from embresume.kernels import cuda
            return cuda.scatter_chunk(dst, dst_blocks, src, src_block0, n_tokens, aux)
        return cpu.scatter_chunk(dst, dst_blocks, src, src_block0, n_tokens, aux)

    def gather_chunk(src_pool, src_blocks, n_tokens, out_embeddings, out_fill_ids, out_mrope, out_token0) -> None:
        if _on_cuda(src_pool):
            from embresume.kernels import cuda
            return cuda.gather_chunk(src_pool, src_blocks, n_tokens, out_embeddings, out_fill_ids, out_mrope, out_token0)
        return cpu.gather_chunk(src_pool, src_blocks, n_tokens, out_embeddings, out_fill_ids, out_mrope, out_token0)

    __all__ = ["scatter_chunk", "gather_chunk", "cpu"]
else:
    # imported by its folder's bare name, "kernels", because the repository root is on the
    # path (e.g. transformers probing for Hugging Face's "kernels" package from this
    # directory): define nothing, import nothing, so the probe finds no usable package
    __all__ = []

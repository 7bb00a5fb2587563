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
    # directory): define nothing, import nothing of embresume.  Where Hugging Face's package
    # is installed, that import means it: load it in this module's place (the import
    # returns what sys.modules holds once this body has run)
    __all__ = []

    def _installed_kernels():
        import importlib.machinery
        import importlib.util
        import os
        import sys
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is None or spec.loader is None:
            return None
        mine = sys.modules[__name__]
        module = sys.modules[__name__] = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules[__name__] = mine
            raise
        return module

    if _installed_kernels() is None:
        del _installed_kernels

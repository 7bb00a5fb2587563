"""Engine adapters: embresume inside vLLM and SGLang without forking them.

* :mod:`embresume.integrations.vllm` — an encoder-cache (EC) connector for
  vLLM's ``--ec-transfer-config`` (``ECConnectorBase`` subclass, producer and
  consumer roles, tensor-parallel consumers).
* :mod:`embresume.integrations.sglang` — an SGLang general plugin
  (``sglang.srt.plugins`` entry point) that moves the embeddings of SGLang's
  encoder disaggregation (``--encoder-transfer-backend zmq_to_scheduler``)
  through embresume instead of ZeroMQ payload frames.

Nothing here is imported by ``import embresume``; each module imports its
engine lazily, so embresume works without either engine installed.  See
``docs/integrations.md`` for the command lines and every option.
"""

from ._common import build_config, pick_encoder

__all__ = ["build_config", "pick_encoder"]

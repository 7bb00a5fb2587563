"""A deliberately wrong producer, for the proof that the consumer's tokens
come from the transferred embeddings: it publishes each pair of items it
encodes crosswise, the first item's embedding under the second item's hash
and the other way round.  A consumer that really uses what embresume
delivers then answers image A with image B's tokens; one that silently
encodes the images itself (vLLM's fallback) answers as the reference does.

Loaded by vLLM through ``ec_connector_module_path: swap_connector`` (this
folder on PYTHONPATH); everything else is the real EmbresumeECConnector.
"""

from __future__ import annotations

from embresume.integrations.vllm import EmbresumeECConnector


class SwappingECConnector(EmbresumeECConnector):
    def __init__(self, vllm_config, role):
        super().__init__(vllm_config, role)
        self._held_back = None

    def save_caches(self, encoder_cache, mm_hash, **kwargs) -> None:
        if not self._producing or mm_hash not in encoder_cache:
            return
        if self._held_back is None:
            self._held_back = (mm_hash, encoder_cache[mm_hash])
            return
        first, first_tensor = self._held_back
        self._held_back = None
        self._send(first, encoder_cache[mm_hash])
        self._send(mm_hash, first_tensor)

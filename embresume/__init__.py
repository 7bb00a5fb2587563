"""embresume: resumable transfer of variable-length multimodal embeddings."""
__version__ = "0.1.0"

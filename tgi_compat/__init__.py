"""tgi-compat: Hugging Face text-generation-inference's HTTP API on vLLM's engine."""

__version__ = "0.1.0"

"""tgi-compat: Hugging Face text-generation-inference's HTTP API on vLLM's engine."""

__version__ = "0.1.0"

# The TGI release whose HTTP API we implement: the crate version of TGI `main` @ db931fcf,
# the source the wire contract (shared/reference/tgi-api.md) and the code follow.
# `/info.version` and `system_fingerprint` report it, as TGI reports its own release:
# clients gate features on it (LlamaIndex enables tool calling from 2.0.1).
TGI_VERSION = "3.3.6-dev0"


def version_text() -> str:
    return f"tgi-compat {__version__} (TGI API {TGI_VERSION})"

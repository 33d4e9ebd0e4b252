"""afdserve: serving Mixture-of-Experts LLMs with attention-FFN disaggregation."""

from afdserve.core import CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # LLM pulls in the whole engine; worker processes that only need a submodule skip it
    if name == "LLM":
        from afdserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'afdserve' has no attribute {name!r}")

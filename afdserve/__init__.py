"""afdserve: serving Mixture-of-Experts LLMs with attention-FFN disaggregation."""

from afdserve.core import CompletionOutput, RequestOutput, SamplingParams
from afdserve.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

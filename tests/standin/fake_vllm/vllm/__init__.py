"""STAND-IN for the vllm package (vLLM needs a GPU, which tests here do not have): a version to read, and
an OpenAI server module that accepts vLLM's command line. Put this folder on PYTHONPATH to use it."""

__version__ = "0.25.0"

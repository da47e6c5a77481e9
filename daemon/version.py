"""The package version, read once from the installed distribution's metadata, and the Ollama version mgr's API
answers as: clients gate features on /api/version (VS Code Copilot Chat refuses a server older than 0.6.4), and
mgr serves the Ollama API of that release's era (create with from/parameters/system, show's modelfile and
parameters, thinking, tool calls), so it answers as one; its own version travels beside it."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("mgr")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"

OLLAMA_API_VERSION = "0.12.0"

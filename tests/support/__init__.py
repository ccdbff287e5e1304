"""Test doubles that ship with the package, so that benchmarks can use them as well as tests.

``fake_servers``: local HTTP servers speaking the Gemini and Ollama REST APIs, with injectable
faults and a log of every request. Nothing here is imported by the pipeline itself.
"""

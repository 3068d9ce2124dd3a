"""A small OpenAI-compatible chat-completions server for local models (the offline teacher).

In the style of vLLM's OpenAI entrypoints: :mod:`.protocol` (request/response models), :mod:`.serving`
(the serving class: validation, bounded concurrency, generation in a thread pool), :mod:`.api_server`
(the aiohttp routes and ``python -m models.serving.api_server``), :mod:`.backend` (transformers on a GGUF).
"""

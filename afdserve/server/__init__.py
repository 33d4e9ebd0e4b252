"""OpenAI-compatible API server over the (disaggregated) engine.

``cli.py`` (``afdserve serve``, ``afdserve bench serve``) -> ``api.py`` (FastAPI app, gate, drain)
-> ``serving.py`` (completions and chat) -> ``async_engine.py`` (the engine thread) -> the
engine (``Engine`` in-process, or ``AFDFrontend`` over worker processes). ``protocol.py``
holds the request/response bodies, ``render.py`` the text/logprob shaping, ``errors.py`` the
error shape, ``metrics.py`` the Prometheus metrics."""

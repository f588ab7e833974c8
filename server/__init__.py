"""Lynx as a service, in layers (imports point down):

    routes.py     HTTP: parse and check (on a worker thread), translate (FastAPI router; the page at GET /)
    serving.py    a chat request -> question, media, decoding settings -> an Item -> the engine -> the OpenAI response
    media.py      image/video parts -> what the pipeline's Preparer reads (located, sizes checked from headers, not
                  decoded; on a worker thread)
    security.py   the edge: Host, API key, JSON bodies, body size, limits, which media URLs and paths are allowed
    fetch.py      http(s) media URLs: one deadline, its own pool, public addresses only (--allow-http-urls)
    metrics.py    Prometheus metrics for GET /metrics
    protocol.py   OpenAI's request/response shapes (pydantic)
    errors.py     OpenAI's error JSON for every failure
    engine.py     the batching engine over LynxPipeline.answer_items (knows nothing of HTTP)
    app.py        the application: the model's load, the engine's life (supervised), graceful shutdown
"""

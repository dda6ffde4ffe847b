"""The OpenAI-compatible HTTP server over one Runner (`mistralrs-server`, `python -m mistralrs serve`):

    fields.py    OpenAI request bodies -> ChatCompletionRequest / CompletionRequest, and which fields are ignored
    app.py       the FastAPI routes; the Runner's response bodies as JSON, its stream's chunks as server-sent events;
                 serve() and the command line (the loader flags of cli.py, plus where to listen)
    metrics.py   /metrics: HTTP requests, tokens, latencies, and the engine's counters (prometheus-client)
"""

"""`lmforge serve`: an HTTP server for classifiers (one base, many LoRA adapters batched together),
embeddings and generation. app.py: routes; batcher.py: dynamic batching; engine.py: the model;
registry.py: adapters and path checks; metrics.py: Prometheus text; schemas.py: request bodies."""


def create_app(settings, engine=None):
    from lmforge.serve.app import create_app as _create

    return _create(settings, engine)

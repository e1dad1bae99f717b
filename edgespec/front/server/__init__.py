"""`edgespec serve`: an OpenAI-compatible HTTP server over one engine (FastAPI + uvicorn).

    from edgespec.front.server import ServerConfig, create_app, serve
    serve(engine, ServerConfig(model_id="SmolLM2-135M-Instruct"), host="127.0.0.1", port=8080)

body.py: request bytes parsed with limits (size, depth, text); protocol.py: request checking;
answer.py: the answer objects; structured.py: response_format, tools and log-probabilities;
worker.py: the one generation thread; metrics.py: Prometheus text; app.py: the routes and uvicorn.
"""
from edgespec.front.server.app import (
    ServerConfig, bind, create_app, exposure_warning, serve, served_name, uvicorn_server,
)

__all__ = ["ServerConfig", "bind", "create_app", "exposure_warning", "serve", "served_name", "uvicorn_server"]

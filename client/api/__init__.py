"""An OpenAI-compatible HTTP API over the swarm (``swarm api``): chat and text completions, streamed or
not, each request in an inference session of its own, with the client's failover underneath.

app.py: routes, error objects, response bodies; schemas.py: request bodies; engine.py: generations on
worker threads; stops.py: stop strings and incremental text (pure); models.py: the served models;
cli.py: the command.
"""

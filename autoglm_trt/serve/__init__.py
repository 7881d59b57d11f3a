"""Serving: one async engine client (async_engine.py) under two sibling adapters, the OpenAI HTTP API
(openai/) and KServe v2 gRPC (grpc/); `autoglm-trt serve` starts both (server.py)."""

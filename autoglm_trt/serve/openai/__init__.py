"""OpenAI-compatible HTTP API: protocol models, handlers (chat, completions) and a thin router."""

"""Running the input processor for a request: its failures are the request's fault (400)."""

from __future__ import annotations

from typing import Any, Callable

from autoglm_trt.errors import UserError
from autoglm_trt.serve.errors import ServeError

try:  # jinja2 is a dependency of the chat template; its errors name the template problem
    from jinja2 import TemplateError
except ImportError:  # pragma: no cover
    TemplateError = ValueError  # type: ignore[misc,assignment]


def run_processor(fn: Callable[[], Any]) -> Any:
    """Call fn (tokenize / template / image preprocessing); bad input becomes a 400 ServeError."""
    try:
        prompt = fn()
    except ServeError:
        raise
    except UserError as exc:
        raise ServeError(str(exc), status=getattr(exc, "status", 400), param=getattr(exc, "param", None)) from None
    except TemplateError as exc:
        raise ServeError(f"the chat template could not render these messages: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ServeError(f"could not build the prompt: {exc}") from None
    if not prompt.prompt_token_ids:
        raise ServeError("the prompt is empty", param="messages")
    return prompt

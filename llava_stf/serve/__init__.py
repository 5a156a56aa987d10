"""Serving: the chat CLI (``python -m llava_stf.serve.cli``), the OpenAI-compatible API (``python -m
llava_stf.serve.api``) and the web demo (``python -m llava_stf.serve.web``), on top of the one generation helper.

``chat.ChatSession`` keeps a multi-turn conversation for ``llava_stf.generation.Generator``; ``images`` loads the
chat's image from a file or an http(s) URL with a time limit and the package's one image policy
(``data.images.ImageLimits``); ``cli`` is the terminal / script front end; ``web`` the Gradio page, answering through
``web_backends`` (the checkpoint in-process, or an OpenAI-compatible server); ``api`` the HTTP server (``api_http``,
``openai_schema``, ``openai_messages``), whose ``batcher`` groups concurrent requests for ``engine.ServeEngine`` (rows
that stop on their own, cancellation) with ``text_stream`` deciding which streamed text is final.
"""

from .chat import ChatError, ChatSession
from .images import ImageSourceError, open_image_source

__all__ = ["ChatError", "ChatSession", "ImageSourceError", "open_image_source"]

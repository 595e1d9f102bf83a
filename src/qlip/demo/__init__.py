"""The local demo page (``qlip demo``): :mod:`.session` does the work with plain functions, :mod:`.app` lays it
out with Gradio (the optional extra ``demo``, imported only by :func:`build_app`)."""

from .session import DemoInputError, DemoSession, DemoSetupError, TokenizeResult, parse_labels, token_grid_picture

__all__ = ["DemoInputError", "DemoSession", "DemoSetupError", "TokenizeResult", "build_app", "parse_labels",
           "token_grid_picture"]


def build_app(*args, **kwargs):
    """See :func:`qlip.demo.app.build_app` (imported on first use: Gradio is optional)."""
    from .app import build_app as build

    return build(*args, **kwargs)

"""The demo web page (Gradio): Tokenize, Classify and, when their models are given, Generate and Chat.

::

    app = build_app("runs/shapes-tiny-stage2/last", generator_dir="runs/t2i-shapes-1800/last")
    app.launch(server_name="127.0.0.1", server_port=7860)

The page only lays out :class:`qlip.demo.session.DemoSession`'s methods. Each tab has a status line: a user
mistake (:class:`DemoInputError`) is shown there as ``error: ...`` and the tab's other outputs are cleared; any other
failure is logged with its traceback and shown as an internal error. Either way the page stays up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .session import DemoInputError, DemoSession

log = logging.getLogger(__name__)

INSTALL_HINT = 'the demo needs Gradio: pip install "qlip[demo]"'


class GradioMissingError(ImportError):
    """Gradio (the optional extra ``demo``) is not installed."""


def import_gradio():
    """``gradio``, with its usage reporting off (the page must work offline); :class:`GradioMissingError` without it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as e:
        raise GradioMissingError(INSTALL_HINT) from e
    return gradio


def guarded(fn: Callable[..., tuple], n_outputs: int) -> Callable[..., tuple]:
    """``fn`` returning its outputs plus an ``ok`` status, or, when it fails, empty outputs and the error."""

    def run(*args: Any) -> tuple:
        try:
            return (*fn(*args), "ok")
        except DemoInputError as e:
            return (*([None] * n_outputs), f"error: {e}")
        except Exception as e:  # noqa: BLE001 - the page stays up; the traceback goes to the server log
            log.exception("demo callback %s failed", getattr(fn, "__name__", fn))
            return (*([None] * n_outputs), f"error: internal error ({type(e).__name__}: {e}); see the server log")

    run.__name__ = getattr(fn, "__name__", "run")
    return run


def tokenize_outputs(session: DemoSession, image: Any) -> tuple:
    """Tokenize tab: (input as seen, token grid, reconstruction, summary)."""
    r = session.tokenize(image)
    return r.image, r.token_grid, r.reconstruction, r.summary()


def classify_outputs(session: DemoSession, image: Any, labels: str) -> tuple:
    return (session.classify(image, labels),)


def generate_outputs(session: DemoSession, prompt: str, seed: float, cfg_scale: float, n: float) -> tuple:
    return (session.generate(prompt, seed=seed, cfg_scale=cfg_scale, n=n),)


def chat_outputs(session: DemoSession, image: Any, question: str) -> tuple:
    return (session.chat(image, question),)


def build_app(model_dir: str | Path | None = None, generator_dir: str | Path | None = None,
              vlm_dir: str | Path | None = None, *, device: str = "cpu",
              session: DemoSession | None = None):  # fmt: skip
    """The demo's ``gradio.Blocks`` (not launched). Give the directories, or a ready ``session``.

    Raises:
        GradioMissingError: Gradio is not installed.
        DemoSetupError: a directory does not load.
    """
    gr = import_gradio()
    if session is None:
        if model_dir is None:
            raise ValueError("build_app needs model_dir or session")
        session = DemoSession.from_dirs(model_dir, generator_dir, vlm_dir, device=device)
    cfg = session.model.cfg
    g = cfg.vision.grid_size
    about = (f"**{cfg.name}**: {cfg.vision.image_size} px images -> {g} x {g} tokens of {session.model.num_bits} "
             f"bits (compression {cfg.compression_ratio:.1f}x vs 24-bit RGB)")  # fmt: skip

    def bind(fn: Callable[..., tuple], n: int) -> Callable[..., tuple]:
        return guarded(lambda *args: fn(session, *args), n)

    with gr.Blocks(title="qlip demo") as app:
        gr.Markdown(f"# qlip demo\n{about}")
        with gr.Tab("Tokenize", id="tokenize"):
            with gr.Row():
                upload = gr.File(label="image", type="filepath", elem_id="tok-upload")
                seen = gr.Image(label="input (as the model sees it)", type="pil", format="png", height=256,
                                elem_id="tok-input")  # fmt: skip
            with gr.Row():
                grid = gr.Image(label="token grid (one color per token)", type="pil", format="png",
                                elem_id="tok-grid")  # fmt: skip
                recon = gr.Image(label="reconstruction", type="pil", format="png", height=256, elem_id="tok-recon")
            stats = gr.Textbox(label="tokens", interactive=False, elem_id="tok-stats")
            status = gr.Textbox(label="status", interactive=False, elem_id="tok-status")
            button = gr.Button("Tokenize", elem_id="tok-run")
            fn = bind(tokenize_outputs, 4)
            upload.upload(fn, [upload], [seen, grid, recon, stats, status])
            button.click(fn, [upload], [seen, grid, recon, stats, status])
        with gr.Tab("Classify", id="classify"):
            if not session.can_classify:
                gr.Markdown(f"{cfg.name} has no text tower: zero-shot classification is not available.")
            else:
                c_upload = gr.File(label="image", type="filepath", elem_id="cls-upload")
                labels = gr.Textbox(label="labels, comma-separated", value="a circle, a square, a triangle",
                                    elem_id="cls-labels")  # fmt: skip
                c_button = gr.Button("Classify", elem_id="cls-run")
                probs = gr.Label(label="zero-shot probabilities", elem_id="cls-probs")
                c_status = gr.Textbox(label="status", interactive=False, elem_id="cls-status")
                c_button.click(bind(classify_outputs, 1), [c_upload, labels], [probs, c_status])
        if session.generator is not None:
            with gr.Tab("Generate", id="generate"):
                prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="gen-prompt")
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="gen-seed")
                    cfg_scale = gr.Slider(0.0, 10.0, value=3.0, step=0.5, label="CFG scale", elem_id="gen-cfg")
                    n = gr.Slider(1, 8, value=4, step=1, label="images", elem_id="gen-n")
                g_button = gr.Button("Generate", elem_id="gen-run")
                gallery = gr.Gallery(label="generated", columns=4, elem_id="gen-images")
                g_status = gr.Textbox(label="status", interactive=False, elem_id="gen-status")
                g_button.click(bind(generate_outputs, 1), [prompt, seed, cfg_scale, n], [gallery, g_status])
        if session.vlm is not None:
            with gr.Tab("Chat", id="chat"):
                v_upload = gr.File(label="image", type="filepath", elem_id="chat-upload")
                question = gr.Textbox(label="question", elem_id="chat-question")
                v_button = gr.Button("Ask", elem_id="chat-run")
                answer = gr.Textbox(label="answer", interactive=False, elem_id="chat-answer")
                v_status = gr.Textbox(label="status", interactive=False, elem_id="chat-status")
                v_button.click(bind(chat_outputs, 1), [v_upload, question], [answer, v_status])
    app.qlip_session = session
    return app

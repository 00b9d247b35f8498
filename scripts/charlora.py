"""WebUI entry point of Character LoRA (A1111 1.10 / reForge).

Thin by design: the WebUI imports this file with the extension folder on ``sys.path``, so the
``lib_charlora`` package is imported here, at module top, and stays in ``sys.modules``. All logic
lives in ``lib_charlora``; this file only registers the tab and the HTTP API.
"""
import lib_charlora  # noqa: F401

try:
    from modules import script_callbacks
except ImportError:  # imported outside a WebUI (tests, tools)
    script_callbacks = None

if script_callbacks is not None:
    from lib_charlora import webui

    script_callbacks.on_ui_tabs(webui.on_ui_tabs)
    script_callbacks.on_app_started(webui.on_app_started)
    script_callbacks.on_ui_settings(webui.on_ui_settings)

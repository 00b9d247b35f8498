"""WebUI entry point of Character LoRA (A1111 1.10 / reForge / Forge).

Thin by design: the WebUI imports this file with the extension folder on ``sys.path``, so the
``lib_charlora`` package is imported here, at module top, and stays in ``sys.modules``. All logic
lives in ``lib_charlora``. The "Character LoRA" tab and the HTTP API are registered here by the
WebUI adapter (not part of this version yet: see README, "Status").
"""
import lib_charlora  # noqa: F401

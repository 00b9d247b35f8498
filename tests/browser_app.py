"""The page the browser test drives, served by whichever gradio this Python has (3.41.2 in .venv, 4.40.0 in
.venv-gradio4): the real tab (``ui.create_tab``) and the real service over the embedded tiny model, inside a
page that has what the tab reaches outside itself in a WebUI: a "txt2img" tab with the WebUI's prompt box
(``#txt2img_prompt``) and ``switch_to_txt2img()``, and the HTTP API on the same server.

    python tests/browser_app.py --port 7899 --out /tmp/loras
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SWITCH_JS = """() => {
    window.switch_to_txt2img = function() {
        var tab = Array.from(document.querySelectorAll("button")).find(b => b.textContent.trim() === "txt2img");
        if (tab) tab.click();
    };
}"""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import gradio as gr
    from lib_charlora import api, serve, ui
    service, info = serve.demo_service(args.out)
    css, js = serve.assets()
    with gr.Blocks(title="WebUI-like page", css=css, analytics_enabled=False) as page:
        with gr.Tabs():
            with gr.Tab("txt2img"):
                gr.Textbox(label="Prompt", value="a castle", elem_id="txt2img_prompt", lines=3)
            with gr.Tab("Character LoRA", elem_id="tab_charlora"):
                ui.create_tab(service, lambda: info)
        serve.on_load_js(page, js)
        serve.on_load_js(page, SWITCH_JS)
    serve.queue(page)
    app, _, _ = page.launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, show_api=False)
    api.register(app, service)
    print(f"READY gradio {gr.__version__}", flush=True)
    page.block_thread()


if __name__ == "__main__":
    main()

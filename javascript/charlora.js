// Character LoRA: small browser-side helpers for the tab. Inside a WebUI they use the WebUI's own
// gradioApp(), updateInput(), switch_to_txt2img(), randomId() and requestProgress(); served on its own
// (python -m lib_charlora ui) the page has none of those and the tab shows its own progress.

function charloraRoot() {
    return typeof gradioApp === "function" ? gradioApp() : document;
}

// Put "<lora:name:1> trigger" into the txt2img prompt (appended, never replacing the user's text)
// and switch to the txt2img tab.
function charloraSendToTxt2img(text) {
    var prompt = charloraRoot().querySelector("#txt2img_prompt textarea");
    if (!prompt || !text) return [];
    if (prompt.value.indexOf(text) === -1) {
        prompt.value = prompt.value.trim() ? prompt.value.trim() + ", " + text : text;
        if (typeof updateInput === "function") updateInput(prompt);
        else prompt.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") switch_to_txt2img();
    return [];
}

// Train button: under gradio 3 disable it at once, so that a double click queues one job (gradio 4
// ignores clicks while the event runs by itself); give the job a task id and, inside a WebUI, follow it
// with the WebUI's progress bar drawn just above the status line.
function charloraStartTraining() {
    var root = charloraRoot();
    var version = String((window.gradio_config || {}).version || "3");
    var button = root.querySelector("#charlora_train");
    if (button && version.charAt(0) === "3") button.disabled = true;
    var res = Array.from(arguments);
    if (typeof requestProgress === "function" && typeof randomId === "function") {
        var id = randomId();
        var anchor = root.querySelector("#charlora_progress");
        if (anchor) requestProgress(id, anchor, null, function() {});
        res[0] = id;
    } else {
        res[0] = "";
    }
    return res;
}

window.charloraSendToTxt2img = charloraSendToTxt2img;
window.charloraStartTraining = charloraStartTraining;

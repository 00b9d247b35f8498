// Character LoRA: small browser-side helpers for the WebUI tab.

// Put "<lora:name:1> trigger" into the txt2img prompt (appended, never replacing the user's text)
// and switch to the txt2img tab. Uses the WebUI's own gradioApp() and switch_to_txt2img().
function charloraSendToTxt2img(text) {
    var prompt = gradioApp().querySelector("#txt2img_prompt textarea");
    if (!prompt || !text) return [];
    if (prompt.value.indexOf(text) === -1) {
        prompt.value = prompt.value.trim() ? prompt.value.trim() + ", " + text : text;
        updateInput(prompt);
    }
    if (typeof switch_to_txt2img === "function") switch_to_txt2img();
    return [];
}

// Train button: give the job a task id and follow it with the WebUI's own progress bar
// (requestProgress / randomId from the WebUI's progressbar.js), as the built-in Train tab does.
function charloraStartTraining() {
    var id = randomId();
    var anchor = gradioApp().getElementById("charlora_status");
    if (anchor) requestProgress(id, anchor, null, function() {});
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

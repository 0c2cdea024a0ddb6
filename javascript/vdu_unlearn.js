// The Unlearn tab's Train button: a task id for the WebUI's progress API, and its progress bar
// (the same calls as the WebUI's own Train tab). Loaded by the WebUI from the extension's javascript/.
function vdu_unlearn_start() {
    var id = randomId();
    var message = gradioApp().getElementById('vdu_unlearn_message');
    if (message) message.innerHTML = '';
    requestProgress(id, gradioApp().getElementById('vdu_unlearn_results'),
                    gradioApp().getElementById('vdu_unlearn_gallery'), function() {}, function() {});
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}

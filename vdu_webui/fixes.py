"""The fix for each part that can overflow, in the WebUI's words (its command-line flags), for the
engine's non-finite checks (`Backend.fixes`): the WebUI, not the run, picks the model's precision."""

WEBUI_FIXES = {
    "vae": "restart the WebUI with --no-half-vae, or pick a fixed VAE in Settings → VAE",
    "text_encoder": "restart the WebUI with --no-half",
    "unet": "restart the WebUI with --no-half",
    "fisher": "restart the WebUI with --no-half, or choose prior isotropic",
    "lr": "lower the learning rate",
}

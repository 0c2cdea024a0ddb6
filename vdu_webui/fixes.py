"""The fix for each part that can overflow, in the WebUI's words (its command-line flags), for the
engine's non-finite checks (`Backend.fixes`): the WebUI, not the run, picks the model's precision."""

WEBUI_FIXES = {
    "vae": "restart the WebUI with --no-half-vae, or pick a fixed VAE in Settings → VAE",
    "text_encoder": "restart the WebUI with --no-half",
    "unet": "restart the WebUI with --no-half",
    "fisher": "restart the WebUI with --no-half, or choose prior isotropic",
    "lr": "lower the learning rate",
}

# Forge has no --no-half; each part has its own flag (backend/args.py), and it keeps CLIP in fp16 even on the CPU
# unless told otherwise (--all-in-fp32 does not reach CLIP's dtype there).
FORGE_FIXES = {
    **WEBUI_FIXES,
    "vae": "restart Forge with --vae-in-fp32, or pick a fixed VAE in Settings → VAE",
    "text_encoder": "restart Forge with --clip-in-fp32",
    "unet": "restart Forge with --all-in-fp32",
    "fisher": "restart Forge with --all-in-fp32, or choose prior isotropic",
}

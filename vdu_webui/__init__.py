"""The Stable Diffusion WebUI half of vdu-unlearn (A1111 1.10 and Forge): the Unlearn tab and the
Forge backend. Loaded by `scripts/vdu_unlearn_tab.py` as a sub-package of the pack, beside `nodes`
(ComfyUI) and `vdu_engine`; nothing here is imported outside a WebUI."""

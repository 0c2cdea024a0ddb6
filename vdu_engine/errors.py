"""The one exception type the engine raises for bad input or a failed run.

Its message is a single line that names the problem and the fix; front ends (CLI, ComfyUI
nodes, WebUI tab) show it as is, without a traceback.
"""


class VDUError(Exception):
    """A user-facing error: one line, the problem and what to do about it."""


def require_finite(values, what: str, fix: str):
    """`values` unchanged, or VDUError("<what>; <fix>") when any of its rows holds nan or inf.

    Called where each thing a run needs is made (latents, text embeddings, samples, frozen
    predictions, the prior), so the error names the part that overflowed instead of surfacing as a
    nan loss later. `values`: a tensor, its rows along dim 0, or a dict of tensors with the same rows
    (a Cond). `what` may use {bad} and {total} (rows). One reduction and one host sync per call:
    for things made once before training, not per step."""
    tensors = list(values.values()) if isinstance(values, dict) else [values]
    bad = None
    for x in tensors:
        ok = x.detach().isfinite()
        rows = ~(ok.flatten(1).all(1) if ok.dim() > 1 else ok.reshape(-1))
        bad = rows if bad is None else bad | rows.to(bad.device)
    n = int(bad.sum())
    if n:
        raise VDUError(f"{what.format(bad=n, total=len(bad))}; {fix}")
    return values

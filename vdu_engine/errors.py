"""The one exception type the engine raises for bad input or a failed run.

Its message is a single line that names the problem and the fix; front ends (CLI, ComfyUI
nodes, WebUI tab) show it as is, without a traceback.
"""


class VDUError(Exception):
    """A user-facing error: one line, the problem and what to do about it."""

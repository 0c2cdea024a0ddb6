"""ComfyUI entry point for vdu-unlearn: registers the nodes, nothing else.

Tested against ComfyUI 0.3.64 (V1 node mappings, which every recent ComfyUI reads). ComfyUI loads this file by path with
its own root on sys.path, so the pack's modules are imported relatively.
"""

from .nodes.unlearn_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

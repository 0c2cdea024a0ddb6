"""`python first_gradients.py GRADS.safetensors vdu-args...`: the `vdu` command line, which also
writes the LoRA gradients of the first step, as summed over the processes, to GRADS (the main
process writes them; `accelerate launch` runs this file as it runs `-m vdu_engine`).

The summed gradient is what the processes share; comparing it before the optimizer acts tells
whether the processes computed the one-process step, without Adam's amplification of rounding
(and without its blindness to a gradient's scale).
"""

import sys

from safetensors.torch import save_file

from vdu_engine import cli, distributed

_sum_gradients = distributed.Workers.sum_gradients
_seen = []


def _recording_sum(self, params, stats):
    out = _sum_gradients(self, params, stats)
    if not _seen:
        _seen.append(True)
        if self.is_main:
            # a parameter without a gradient is one the step left alone: zero, as the sum counts it
            save_file({str(i): (p.grad if p.grad is not None else p.new_zeros(p.shape)).detach().clone()
                       for i, p in enumerate(params)}, sys.argv[1])
    return out


if __name__ == "__main__":
    distributed.Workers.sum_gradients = _recording_sum
    sys.exit(cli.main(sys.argv[2:]))

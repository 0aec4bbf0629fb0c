"""Linear-layer variants the local spec needs."""

from __future__ import annotations

from megatron.core.tensor_parallel.layers import RowParallelLinear


class ExpertRowParallelLinear(RowParallelLinear):
    """fc2 of a *biased* expert MLP that returns a fresh output tensor.

    megatron's `MLP.forward` adds a biased expert's scaled fc2 bias with ``output += ...``; at
    TP = EP = 1 the row-parallel output is a view produced by a custom autograd function, and the
    in-place add fails in autograd (on GPU too, without TE). CLIP and connector experts have biases.
    """

    def forward(self, input_, **kwargs):
        """Row-parallel linear; the output is a new tensor that may be modified in place."""
        output, output_bias = super().forward(input_, **kwargs)
        return output.clone(), output_bias

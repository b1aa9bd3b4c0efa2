"""titans_cuda: the neural long-term memory of Titans ("Learning to Memorize at Test Time")
as CUDA kernels with an exact pure-PyTorch reference. See SPEC §5 for the contract:

    neural_memory   the chunked memory layer (write with momentum and forgetting, then read)
    memory_forward  y = M_W(x) with given weights
    memory_grad     per-chunk summed inner gradients U_j
    memory_scan     the chunk-level recurrence S_j = eta S_{j-1} - U_j, W_j = (1-alpha) W_{j-1} + S_j
    parallel_neural_memory  the fully parallel variant composed from the three blocks
    MemoryState     what a call carries to the next (streaming, decode)
    info()          which kernels this installation can run here, and why not
"""
from ._version import __version__
from .functional import (memory_forward, memory_grad, memory_scan, neural_memory,
                         parallel_neural_memory)
from .info import info
from .state import MemoryState

__all__ = ["MemoryState", "__version__", "info", "memory_forward", "memory_grad", "memory_scan",
           "neural_memory", "parallel_neural_memory"]

"""2-D convolution on NHWC tensors as Triton implicit GEMMs, forward and backward.

    geometry.py   argument checks, output size, dgrad stride phases, split
                  plans, tile choices (`gemm_tiles`, the one patchable place)
                  and autotune keys, shared by forward and backward
    weights.py    the packed weight layouts the kernels read: the fused
                  optimizer's copies (their `Packing`s), else packed per call
    mainloop.py   the (tap, channel chunk) main loop of forward and dgrad
    pooling.py    the max pool a forward fuses: the order of a tile's rows over
                  the pool windows, the pooling epilogue, the preconditions
    forward.py    implicit-GEMM and depthwise forward kernels with the fused
                  epilogue (bias, folded BN, residual, activation, dropout,
                  BN statistics): conv2d_forward, ConvOutput
    backward.py   dgrad by stride phase, deterministic split-K wgrad, depthwise
                  variants, fused activation gradient: conv2d_dgrad,
                  conv2d_wgrad, act_backward
    function.py   Conv2dFunction (the autograd Function) and conv2d
"""
from engine.kernels.conv.backward import act_backward, conv2d_dgrad, conv2d_wgrad
from engine.kernels.conv.forward import ConvOutput, conv2d_forward
from engine.kernels.conv.function import Conv2dFunction, conv2d

__all__ = ["ConvOutput", "conv2d_forward", "conv2d_dgrad", "conv2d_wgrad", "act_backward", "Conv2dFunction",
           "conv2d"]

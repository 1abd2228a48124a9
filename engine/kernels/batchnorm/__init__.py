"""Batch normalisation fused with the following activation, on channels-last
`[M, C]` rows: training mode (batch statistics, split deterministic reductions)
in `training` (forward, autograd Function) and `backward` (and its hand-offs to
the neighbouring kernels), eval mode (the fold into a per-channel affine, and
that affine + activation) in `inference`."""
from engine.kernels.batchnorm.inference import (
    AffineActFunction,
    BNEvalScaleShiftFunction,
    affine_act,
    affine_act_backward,
    affine_act_forward,
    batch_norm_eval,
    bn_eval_fold,
    bn_eval_scale_shift,
)
from engine.kernels.batchnorm.backward import BnApplyLink, BnGradLink, PoolGradLink, bn_apply_dx, bn_train_backward
from engine.kernels.batchnorm.training import (BatchNormTrainFunction, BatchStats, StatsTail, batch_norm_train,
                                               bn_train_forward)

__all__ = [
    "AffineActFunction", "BNEvalScaleShiftFunction", "BatchNormTrainFunction", "BatchStats", "BnApplyLink",
    "BnGradLink", "PoolGradLink", "StatsTail", "affine_act", "affine_act_backward", "affine_act_forward",
    "batch_norm_eval", "batch_norm_train", "bn_apply_dx", "bn_eval_fold", "bn_eval_scale_shift",
    "bn_train_backward", "bn_train_forward",
]

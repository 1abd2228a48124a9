"""What a detection network is, from its shapes alone (no torch).

A `loss centernet` network ends in a layer with `classes + 4` channels at an
integer output stride (engine/training/detection: the output layout):
channels 0..classes-1 class heatmap logits, then box width, height (in output
cells) and the center offset x, y within its cell. `detection_head` infers the
class count and the stride; `check_detection_head` reports a spec that does
not fit as located errors (the train section's loss line and the last layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from dsl.errors import Collector, Note

REGRESSION_CHANNELS = 4  # width, height, offset x, offset y


@dataclass(frozen=True)
class DetectionHead:
    classes: int
    stride: int
    out_hw: tuple[int, int]


def head_problem(input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[str, str] | None:
    """(message, hint) of why this output cannot be a CenterNet head, or None if it can."""
    if len(output_shape) != 3:
        return (f"loss centernet needs a spatial output [classes+4, H, W], but the network outputs "
                f"{list(output_shape)}",
                "end the network in a conv with classes+4 channels (no flatten, global pool or linear)")
    c, ho, wo = output_shape
    if c < REGRESSION_CHANNELS + 1:
        return (f"loss centernet needs classes + 4 channels (a heatmap per class, then width, height, "
                f"offset x, offset y), but the last layer has {c}",
                f"for k classes the last conv has k+4 channels, e.g. conv {REGRESSION_CHANNELS + 3} for 3 classes")
    if len(input_shape) != 3:
        return f"loss centernet needs an image input [C, H, W], got {list(input_shape)}", None
    _, h, w = input_shape
    if h % ho or w % wo or h // ho != w // wo:
        return (f"loss centernet needs an integer output stride, the same for H and W: input {h}x{w}, "
                f"output {ho}x{wo}",
                "downsample the input by a whole factor (e.g. two stride-2 stages: stride 4)")
    return None


def detection_head(input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> DetectionHead:
    """The class count, stride and output size of a CenterNet head (ValueError if it is not one)."""
    problem = head_problem(tuple(input_shape), tuple(output_shape))
    if problem is not None:
        raise ValueError(problem[0])
    c, ho, wo = output_shape
    return DetectionHead(classes=int(c) - REGRESSION_CHANNELS, stride=int(input_shape[1]) // int(ho),
                         out_hw=(int(ho), int(wo)))


def check_detection_head(graph, loss_pos, errors: Collector) -> None:
    """Report a `loss centernet` network whose output is not a CenterNet head, at the loss line,
    with a note at the last layer."""
    problem = head_problem(tuple(graph.input_shape), tuple(graph.output.shape or ()))
    if problem is None:
        return
    message, hint = problem
    last = graph.output
    errors.error(message, loss_pos, hint,
                 notes=(Note(f"the last layer ({last.describe()}) outputs {list(last.shape or ())}", last.pos),))

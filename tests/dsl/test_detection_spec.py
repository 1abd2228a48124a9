"""`loss centernet` in the train section: its options, the class count and stride inferred from
the network's shapes, and the located errors when the network cannot be a CenterNet head."""
from __future__ import annotations

import pytest

from dsl.errors import FusenetError
from dsl.train_config import DetectionConfig
from engine.ir.detection import detection_head
from engine.ir.frontend import load


def spec(last: str = "conv 7 kernel=1", loss: str = "loss centernet", size: str = "32x32", mid: str = "") -> str:
    return "\n".join([
        "network det {",
        f"    input 3x{size}",
        "    conv 8 kernel=3 stride=2 pad=1 -> relu",
        "    conv 8 kernel=3 stride=2 pad=1 -> relu",
        *([mid] if mid else []),
        f"    {last}",
        "}",
        "train {",
        "    data shapes_boxes",
        f"    {loss}",
        "}",
    ]) + "\n"


def errors(text: str):
    with pytest.raises(FusenetError) as info:
        load(text)
    return info.value.diagnostics


def test_defaults_and_weights():
    s = load(spec())
    assert s.train.loss == "centernet" and s.train.detection == DetectionConfig()
    s = load(spec(loss="loss centernet size_weight=0.2 offset_weight=0.5 alpha=3 beta=2"))
    assert s.train.detection == DetectionConfig(size_weight=0.2, offset_weight=0.5, alpha=3.0, beta=2.0)
    assert load(spec(last="conv 10 kernel=1", loss="loss cross_entropy")).train.detection is None


def test_class_count_and_stride_come_from_the_shapes():
    s = load(spec())
    head = detection_head(s.graph.input_shape, s.graph.output.shape)
    assert (head.classes, head.stride, head.out_hw) == (3, 4, (8, 8))


def test_too_few_channels_is_located_at_the_loss_line_with_a_note_at_the_last_layer():
    (d,) = errors(spec(last="conv 4 kernel=1"))
    assert "classes + 4 channels" in d.message and "has 4" in d.message
    assert (d.pos.line, d.pos.col) == (9, 5)
    assert d.notes and d.notes[0].pos.line == 5 and "conv 4" in d.notes[0].message
    assert "k+4" in d.hint


def test_an_output_that_is_not_spatial():
    (d,) = errors(spec(last="linear 7", mid="    flatten"))
    assert "spatial output" in d.message and "no flatten" in d.hint


def test_a_stride_that_is_not_an_integer():
    (d,) = errors(spec(size="30x30"))
    assert "integer output stride" in d.message and "30x30" in d.message


def test_options_of_the_other_loss_are_refused():
    (d,) = errors(spec(loss="loss centernet label_smoothing=0.1"))
    assert "cross_entropy option" in d.message and d.pos.col == 20
    (d,) = errors(spec(last="conv 10 kernel=1", loss="loss cross_entropy size_weight=1"))
    assert "centernet option" in d.message


def test_check_prints_the_head(tmp_path, capsys):
    from engine.cli.main import main

    f = tmp_path / "d.cnn"
    f.write_text(spec())
    assert main(["check", str(f)]) == 0
    assert "detection head (loss centernet): 3 classes, output stride 4, 8x8 cells" in capsys.readouterr().out
    f.write_text(spec(last="conv 3 kernel=1"))
    assert main(["check", str(f)]) == 1
    assert "d.cnn:9:5: error: loss centernet needs classes + 4 channels" in capsys.readouterr().err

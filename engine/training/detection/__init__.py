"""Object detection, CenterNet style ("Objects as Points", Zhou et al. 2019): the loss's PyTorch
reference (loss.py), decoding (decode.py), the training loop's detection pieces (run.py),
mAP (metrics.py) and drawing (draw.py)."""

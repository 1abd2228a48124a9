"""Training: from a compiled network and data to a run folder.

- loop.py                 `run_training`: one run, step by step;
- schedule.py             the learning-rate schedules;
- optimizer_and_loss.py   the spec's optimizer and loss, fused (Triton) or torch;
- init.py                 seeded initialisation and frozen layers;
- distributed.py          data parallelism under torchrun;
- evaluate.py             loss, accuracy and confusion matrix; logits for images;
- checkpoint.py           the safetensors checkpoint, written atomically;
- report.py               metrics.csv, curves.png, predictions.png, eval's tables;
- data/                   data sets: built-in and file formats, transforms, the loader.
"""

"""Ways out of fusenet: a trained network as ONNX (onnx_file.write_onnx, through the
reference backend) and a spec as standalone PyTorch source (torch_source.torch_source).

A layer between training (whose checkpoints it reads) and the performance tools.
"""

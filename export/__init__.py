"""Export of Cambrian models to ONNX and TensorRT-LLM (see the export issue).

Nothing is exported yet: this package reserves the `cambrian.export`
namespace so the connector's pure-PyTorch reference path can be traced later.
"""

"""The serving side of rnnd. Imports no torch: it runs bundles with ONNX Runtime."""

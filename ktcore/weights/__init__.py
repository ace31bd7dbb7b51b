"""Weight sources (GGUF, safetensors, in-memory), quantized tensors and their dequantizers."""

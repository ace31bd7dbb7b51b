"""Byte offsets of the f16 scale fields inside one block of each quantized type (ggml's ``block_*``
structs). Used to make random but valid blocks (finite scales) for tests and synthetic models."""

F16_SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,),
}

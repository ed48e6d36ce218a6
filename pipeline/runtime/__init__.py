"""The LiteRT side: convert (quantize), LiteRT Quantizer (int4, mixed, sensitivity), run, evaluate, measure."""

"""The conversion model: BERT item encoder with adapters, DIN user-interest tower, ESMM conversion head."""

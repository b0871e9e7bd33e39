"""What the UNet is conditioned on: captions tokenized and encoded (text_encoding.py; long
captions in 75-token chunks, text_chunks.py), the caption encoder that caches or recomputes
text-encoder outputs (caption_encoder.py), SDXL's two encoders and size/crop ids (sdxl.py), and
the UNet call that takes them all (unet_call.py); and TrainingData (training_data.py), a run's
batches: the data layer's images as latents, with their captions encoded, and reg images."""

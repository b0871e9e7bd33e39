"""Kohya-Atelier: sweep, train and compare Stable Diffusion LoRAs."""

__version__ = "0.1.0"

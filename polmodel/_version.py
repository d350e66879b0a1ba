"""The package version, in a module of its own so that model files can record it (polmodel/nn/model_file.py)
without importing the top package, whose lazy attributes reach up into nn and dynamics."""
__version__ = "0.1.0"
